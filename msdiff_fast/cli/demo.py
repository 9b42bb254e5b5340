"""``msdiff demo``: train, sample and evaluate three restoration models; write a report."""

import argparse

from ..demo import DATA, DEMO_OUTPUTS, DemoSettings, run_demo
from ..errors import UsageError, one_line
from .common import add_command, add_common, check_seed, command_line, device_from, output_folder

DESCRIPTION = """\
Trains a mean-reverting denoiser, a mean-reverting x2 super-resolution model and the paper's CMDE x2
super-resolution model (tiny U-Net) on random patches of real photographs (scikit-image ships them;
nothing is downloaded), restores whole photographs it never trained on with the fast MR Sampler
(NFE 1/5/10/20) and the reference samplers (posterior sampling, predictor-corrector), evaluates
them against the input (noisy image, bicubic upsampling) and writes to --out:
  report.md     what was run, metrics table, timings, NFE and speed-up
  metrics.json  every number of the report
  samples.png   input / posterior mean / a fast sample / reference / ground truth, whole photographs
  nfe_curve.png quality vs NFE per sampler
  runs/         the checkpoints (msdiff sample --checkpoint runs/sr_mr ...)
About 15 minutes on 2 CPU cores; --quick takes about a minute (tiny settings, for CI).
Seeded: the same command on the same machine gives the same numbers."""

EPILOG = """\
example:
  msdiff demo --out demo_out
  msdiff demo --quick --out /tmp/demo
  msdiff demo --data synthetic --out demo_synthetic"""

# flags that override the chosen DemoSettings field of the same name when given
OVERRIDES = ("train_steps", "batch_size", "test_images", "pc_nfe", "posterior_nfe", "image_size", "seed")


def add_parser(commands) -> argparse.ArgumentParser:
    demo = add_command(
        commands, "demo", "train, sample and evaluate three restoration models on a CPU; write a report", DESCRIPTION, EPILOG
    )
    demo.add_argument("--out", required=True, help="output directory (created if needed)")
    demo.add_argument("--quick", action="store_true", help="tiny settings for CI: finite numbers, not meaningful quality")
    demo.add_argument(
        "--data",
        default="photos",
        help="photos (scikit-image's photographs; pip install scikit-image) or synthetic (procedural images)",
    )
    demo.add_argument("--train-steps", type=int, help="training steps per model (default: 800 photos, 1500 synthetic, 20 quick)")
    demo.add_argument("--batch-size", type=int, help="training batch (default: 16 full, 4 quick)")
    demo.add_argument(
        "--image-size",
        type=int,
        help="training patch and tile size, a multiple of 4 (default: 32 photos, 16 synthetic and quick)",
    )
    demo.add_argument("--test-images", type=int, help="held-out images to restore (photos: at most 2; synthetic default 16)")
    demo.add_argument(
        "--nfe", type=int, nargs="+", help="NFEs of the fast samplers (default: 1 5 10 20; 1 is the posterior mean)"
    )
    demo.add_argument("--pc-nfe", type=int, help="NFE of predictor-corrector (usual and full default: 2000; quick 10)")
    demo.add_argument("--posterior-nfe", type=int, help="NFE of posterior sampling (usual and full default: 100; quick 5)")
    demo.add_argument("--seed", type=int, help="seed of data, training and sampling (default 0)")
    add_common(demo)
    return demo


def run(args: argparse.Namespace) -> int:
    if args.data not in DATA:
        raise UsageError(f"--data: expected one of {', '.join(DATA)}, got {args.data!r}", 2)
    settings = DemoSettings.quick(args.data) if args.quick else DemoSettings.full(args.data)
    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    if args.nfe is not None:
        overrides["nfe"] = tuple(args.nfe)
    try:
        settings = settings.replace(**overrides)
    except ValueError as err:
        raise UsageError(one_line(err), 2) from None
    check_seed(settings.seed)
    device = device_from(args.device)
    # the demo writes each file once: it never replaces one
    with output_folder(args.out, overwrite_flag=None) as out:
        out.check_new(DEMO_OUTPUTS)
        run_demo(settings, out.path, device, progress=not args.no_progress, command=command_line())
    return 0
