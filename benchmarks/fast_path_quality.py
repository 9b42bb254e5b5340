"""What each fast-path switch changes in the demo models' restorations (issue 15).

    python benchmarks/fast_path_quality.py [--demo demo_out] [--compile]

For each model of a finished ``msdiff demo`` run (``--demo``; ``bash scripts/demo.sh`` writes
demo_out), the held-out photographs are restored whole as the demo does (MR Sampler SDE-2 and
ODE-2, NFE 10, one sample per image, the same seed) by the plain float32 eager path and with each
switch: the static loop, channels-last, bfloat16 autocast, torch.compile (with --compile), and
the combination ``msdiff sample`` uses by default (static loop + channels-last + inference mode).
Reported: each variant's PSNR against the ground truth, its difference from the float32 eager
PSNR (the issue's bar for a default: at most 0.05 dB), the largest pixel difference from the eager
output (0-255), and the sampling time (one run, this machine's load; for speed-ups see
end_to_end.py). Writes benchmarks/results/fast_path_quality.md / .json.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model  # noqa: E402

from msdiff_fast.demo import DemoSettings, demo_models  # noqa: E402
from msdiff_fast.demo.experiment import restore_pairs, test_pairs  # noqa: E402
from msdiff_fast.metrics import image_metrics  # noqa: E402
from msdiff_fast.models import FastNetwork, bf16_unsupported  # noqa: E402
from msdiff_fast.reports import markdown_table  # noqa: E402
from msdiff_fast.restoration import SamplerSpec, load_trained  # noqa: E402
from msdiff_fast.training.tasks import consistency_operator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (loop, FastNetwork keywords or None for the plain network); the first is the reference
VARIANTS = {
    "float32 eager (reference)": ("eager", None),
    "static loop": ("static", None),
    "channels-last": ("eager", {"channels_last": True, "inference_mode": False}),
    "inference mode": ("eager", {"channels_last": False, "inference_mode": True}),
    "msdiff sample's default (static + channels-last + inference mode)": ("static", {}),
    "bfloat16 autocast": ("eager", {"channels_last": False, "inference_mode": False, "bf16": True}),
    "torch.compile": ("eager", {"channels_last": False, "inference_mode": False, "compile": True}),
}
SAMPLERS = (("mr-sde", 10), ("mr-ode", 10))


def restore(network, estimator, pairs, sampler: SamplerSpec, settings: DemoSettings):
    """name -> the restored image [C, H, W] (one sample, the demo's seed and tiling), and the seconds taken."""
    samples, seconds = restore_pairs(
        {"network": network, "estimator": estimator}, pairs, sampler, 1, settings.seed + 100, settings, torch.device("cpu")
    )
    return {name: sample[0] for name, sample in samples.items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="demo_out", help="a finished `msdiff demo` folder")
    parser.add_argument("--compile", action="store_true", help="add torch.compile (compiles for a minute or two per model)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fast_path_quality.md")
    args = parser.parse_args()
    folder = Path(args.demo)
    if not (folder / "metrics.json").exists():
        raise SystemExit(f"--demo: expected a finished `msdiff demo` folder (with metrics.json), got {folder}")
    stored = json.loads((folder / "metrics.json").read_text())["settings"]
    settings = DemoSettings(**{**stored, "nfe": tuple(stored["nfe"])})
    variants = {name: v for name, v in VARIANTS.items() if args.compile or not (v[1] or {}).get("compile")}
    if bf16_unsupported(torch.device("cpu")):
        variants = {name: v for name, v in variants.items() if not (v[1] or {}).get("bf16")}
    rows, started = [], time.perf_counter()
    for model in demo_models(settings):
        trained = load_trained(folder / "runs" / model.key, torch.device("cpu"))
        pairs = test_pairs(model, settings)
        operator = consistency_operator(model.spec.task, model.spec.task_options)
        for solver, nfe in SAMPLERS:
            reference = None
            for name, (loop, switches) in variants.items():
                network = copy.deepcopy(trained.network)  # channels-last converts the weights in place
                network = network if switches is None else FastNetwork(network, **switches)
                output, seconds = restore(network, trained.estimator, pairs, SamplerSpec(solver, nfe, loop=loop), settings)
                psnr = sum(image_metrics(output[n][None, None], pairs[n]["truth"][None], operator)["psnr"] for n in pairs) / len(
                    pairs
                )
                if reference is None:
                    reference = {"output": output, "psnr": psnr}
                largest = max(float((output[n] - reference["output"][n]).abs().max()) * 255 for n in pairs)
                rows.append(
                    {
                        "model": model.key,
                        "sampler": f"{solver} NFE {nfe}",
                        "variant": name,
                        "psnr": psnr,
                        "psnr_change": psnr - reference["psnr"],
                        "max_pixel_difference": largest,
                        "seconds": seconds,
                    }
                )
                print(
                    f"{model.key} {solver} {name}: {psnr:.3f} dB ({psnr - reference['psnr']:+.4f}), max |diff| {largest:.3f}/255, {seconds:.1f} s",
                    flush=True,
                )
    command = " ".join(["python", *sys.argv])
    text = (
        f"# The fast-path switches on the demo models\n\n`{command}`: {cpu_model()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {(time.perf_counter() - started) / 60:.1f} min. The demo run in `{folder}` "
        f"({', '.join(m.key for m in demo_models(settings))}), its held-out photographs restored whole with one sample each, "
        "the same seed for every variant. PSNR change: against the float32 eager path's PSNR (the bar for a default: "
        "|change| <= 0.05 dB). Max pixel difference: against the eager output, on the 0-255 scale. Seconds: one run under "
        "this machine's load, not a benchmark (end_to_end.py times the switches).\n\n"
        + markdown_table(
            ["model", "sampler", "variant", "PSNR (dB)", "PSNR change (dB)", "max pixel difference", "seconds"],
            [
                [
                    r["model"],
                    r["sampler"],
                    r["variant"],
                    r["psnr"],
                    round(r["psnr_change"], 4),
                    r["max_pixel_difference"],
                    r["seconds"],
                ]
                for r in rows
            ],
        )
    )
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
