"""``msdiff evaluate``: metrics of restored images against the ground truth."""

import argparse
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..errors import UsageError, one_line
from ..inception import load_inception
from ..metrics import LPIPS, SmallFeatureNet, image_metrics, load_inception_torchscript
from ..reports import METRIC_LABELS, json_text, markdown_table
from ..training.tasks import TASKS, consistency_operator, task_options
from .common import add_command, add_common, add_task_options, list_images, load_image, output_folder, relative_names

DESCRIPTION = """\
PSNR and SSIM (0-255 scale, as the paper), consistency PSNR(A(x_hat), A(x)) for tasks with a
forward operator A (sr, blur, edges; inpaint with --degraded), diversity when --restored holds
sample_K/ folders, LPIPS (--lpips-weights) and FID (--inception; --small-fid for a quick,
non-comparable FID). Files are matched by relative name without extension (two files of one
name, e.g. img0.png and img0.jpg, are refused).
Writes metrics.json and metrics.md to --out (default: the --restored folder)."""

EPILOG = """\
example:
  msdiff evaluate --restored restored/ --reference high_res/ --task sr --scale 4
  msdiff evaluate --restored many/ --reference truth/ --lpips-weights weights/ --inception weights/pt_inception-2015-12-05-6726825d.pth"""

FID_SMALL_NOTE = "FID with a fixed random SmallFeatureNet: for comparing runs here only, not comparable with published FID"


def add_parser(commands) -> argparse.ArgumentParser:
    evaluate = add_command(commands, "evaluate", "metrics of restored images against the ground truth", DESCRIPTION, EPILOG)
    evaluate.add_argument("--restored", required=True, help="folder of restored images (or of sample_K/ folders)")
    evaluate.add_argument("--reference", required=True, help="folder of ground-truth images")
    evaluate.add_argument("--degraded", help="folder of the degraded inputs (inpaint: gives the holes)")
    evaluate.add_argument("--task", choices=sorted(TASKS), help="task, for the consistency metric")
    add_task_options(evaluate)
    evaluate.add_argument("--channels", type=int, choices=(1, 3), default=3, help="read images as grey (1) or RGB (3)")
    evaluate.add_argument("--lpips-weights", help="directory with alexnet-owt-7be5be79.pth and LPIPS alex.pth (never downloaded)")
    evaluate.add_argument(
        "--inception",
        metavar="FILE",
        help="weights of the FID Inception-v3 as a state dict (pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth, or .safetensors), read as data only; for FID (never downloaded)",
    )
    evaluate.add_argument(
        "--inception-torchscript",
        metavar="FILE",
        help="NVIDIA's inception-2015-12-05.pt TorchScript file instead: runs code from FILE, only for files you trust",
    )
    evaluate.add_argument(
        "--small-fid", action="store_true", help="also an FID with a small random network (only to compare runs here)"
    )
    evaluate.add_argument("--out", help="folder for metrics.json and metrics.md (default: --restored)")
    evaluate.add_argument(
        "--overwrite", action="store_true", help="replace metrics.json and metrics.md if they exist (default: refuse)"
    )
    add_common(evaluate, device=False)
    return evaluate


def run(args: argparse.Namespace) -> int:
    if args.inception and args.inception_torchscript:
        raise UsageError("--inception, --inception-torchscript: expected one of them (the same network), got both", 2)
    reference_files = list_images(args.reference, "--reference")
    restored_root = Path(args.restored)
    if not restored_root.is_dir():
        raise UsageError(f"--restored {restored_root}: no such directory")
    sample_dirs = sorted(p for p in restored_root.iterdir() if p.is_dir() and p.name.startswith("sample_")) or [restored_root]
    by_stem = _stems(reference_files, args.reference, "--reference")
    samples = []
    for folder in sample_dirs:
        found = _stems(list_images(folder, "--restored"), folder, f"--restored {folder}")
        missing = sorted(by_stem.keys() - found.keys())
        if missing:
            raise UsageError(
                f"--restored {folder}: no restored image for {len(missing)} reference image(s), e.g. {missing[0]!r}; "
                f"file names (without extension) must match those under --reference"
            )
        samples.append(_load_matching(found, by_stem, args.channels, f"--restored {folder}"))
    reference = _load_matching(by_stem, by_stem, args.channels, "--reference")
    if samples[0].shape != reference.shape:
        raise UsageError(
            f"--restored: images of shape {tuple(samples[0].shape[1:])} vs --reference {tuple(reference.shape[1:])}; they must match"
        )
    mask = None
    options = task_options(args.task, vars(args)) if args.task else {}
    if args.task == "inpaint":
        mask = _observed_mask(args, by_stem, reference)
    operator = consistency_operator(args.task, options, mask) if args.task else None
    lpips_net = None
    if args.lpips_weights:
        try:
            lpips_net = LPIPS(weights=args.lpips_weights)
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise UsageError(f"--lpips-weights: {one_line(err)}") from None
    inception = None
    try:
        if args.inception:
            inception = load_inception(args.inception)
        elif args.inception_torchscript:
            inception = load_inception_torchscript(args.inception_torchscript, trust_code=True)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        flag = "--inception" if args.inception else "--inception-torchscript"
        raise UsageError(f"{flag}: {one_line(err)}") from None
    feature_net = SmallFeatureNet(reference.shape[1]) if args.small_fid else None
    out_path = args.out or restored_root
    with output_folder(out_path, overwrite=args.overwrite) as out:
        out.check_new(["metrics.json", "metrics.md"])  # before the metrics are computed
        with torch.no_grad():
            values = image_metrics(torch.stack(samples), reference, operator, feature_net, lpips_net, inception)
        _write_metrics(out, values, reference.shape[0], len(samples), restored_root, args, options)
    print(_metrics_table(values), end="")
    print(f"wrote {Path(out_path) / 'metrics.json'} and {Path(out_path) / 'metrics.md'}")
    return 0


def _observed_mask(args: argparse.Namespace, by_stem: Dict[str, Path], reference: torch.Tensor) -> torch.Tensor:
    """The observed pixels [B, 1, H, W] of the inpainting inputs under --degraded."""
    if args.degraded is None:
        raise UsageError(
            "--task inpaint: consistency needs the hole of each image: pass --degraded DIR (the inputs given to `msdiff sample`)"
        )
    degraded_files = _stems(list_images(args.degraded, "--degraded"), args.degraded, "--degraded")
    missing = sorted(by_stem.keys() - degraded_files.keys())
    if missing:
        raise UsageError(
            f"--degraded {args.degraded}: no degraded image for {len(missing)} reference image(s), e.g. {missing[0]!r}"
        )
    degraded = _load_matching(degraded_files, by_stem, args.channels, "--degraded")
    if degraded.shape != reference.shape:
        raise UsageError(
            f"--degraded: images of shape {tuple(degraded.shape[1:])} vs --reference {tuple(reference.shape[1:])}; they must match"
        )
    # the hole is where every channel holds the fill value 0 (an observed black pixel is
    # counted as hole too: it is then excluded from the consistency, never misjudged)
    return (degraded.amax(dim=1, keepdim=True) > 0).float()


def _metrics_table(values: Dict) -> str:
    rows = [(METRIC_LABELS[name], value) for name, value in values.items() if value is not None]
    return markdown_table(["metric", "value"], rows)


def _write_metrics(
    out, values: Dict, images: int, samples: int, restored_root: Path, args: argparse.Namespace, options: Dict
) -> None:
    report = {
        "restored": str(restored_root),
        "reference": str(args.reference),
        "images": images,
        "samples_per_image": samples,
        "task": args.task,
        "task_options": options,
        "metrics": values,
        "notes": {"fid_small": FID_SMALL_NOTE},
    }
    out.write_text("metrics.json", json_text(report))
    task = f"; task {args.task}" if args.task else ""
    text = (
        f"# msdiff evaluate\n\n{images} images, {samples} sample(s) each; restored `{restored_root}` vs reference "
        f"`{args.reference}`{task}.\n\n" + _metrics_table(values)
    )
    if values.get("fid_small") is not None:
        text += "\nFID (SmallFeatureNet) uses a small fixed random network: compare runs with it, never with published FID.\n"
    out.write_text("metrics.md", text)


def _load_matching(files: Dict[str, Path], by_stem: Dict[str, Path], channels: int, flag: str) -> torch.Tensor:
    """The images of ``files`` named like the references, in the references' order, as one batch."""
    images: List[torch.Tensor] = [load_image(files[stem], channels) for stem in sorted(by_stem)]
    sizes = sorted({tuple(image.shape[1:]) for image in images})
    if len(sizes) > 1:
        raise UsageError(
            f"{flag}: evaluate compares images of one size, found {len(sizes)} sizes ({sizes[0][0]}x{sizes[0][1]}, "
            f"{sizes[1][0]}x{sizes[1][1]}, ...); evaluate each size in its own folder"
        )
    return torch.stack(images)


def _stems(files: Sequence[Path], root, flag: str) -> Dict[str, Path]:
    """Files by relative name without extension; two files of one name (img0.png, img0.jpg) are refused."""
    return dict(zip(relative_names(files, root, flag), files))
