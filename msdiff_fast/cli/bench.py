"""``msdiff bench``: sampler speed (NFE vs time) on one batch, or one of the benchmarks/ scripts."""

import argparse
import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from ..reports import json_text, markdown_table
from ..restoration import ESTIMATOR_NAMES, ModelSpec, SamplerSpec, estimator_options, load_trained, restore_batch
from ..training.tasks import TASKS, task_options
from .common import add_command, add_common, add_task_options, check_seed, command_line, device_from, output_folder

DESCRIPTION = """\
Without --script: times the samplers on one batch (a checkpoint, or a tiny U-Net with random
weights: the time of a sampler does not depend on what the network learned) and prints
NFE, time and speed-up against the reference sampler (pc for VE models, posterior for mr).
With --script NAME: runs the benchmark script NAME of benchmarks/ (`--list` names them),
passing on the arguments after --."""

EPILOG = """\
examples:
  msdiff bench --nfe 5 10 20 --batch 16
  msdiff bench --checkpoint runs/dn --out bench_out
  msdiff bench --list
  msdiff bench --script ops -- --sizes 1024 65536"""

ROW_KEYS = ("sampler", "nfe", "seconds", "ms_per_image", "ms_per_nfe", "speedup")
SCRIPT_PREFIX = "benchmark_"


def add_parser(commands) -> argparse.ArgumentParser:
    bench = add_command(commands, "bench", "sampler speed (NFE vs time) or the benchmarks/ scripts", DESCRIPTION, EPILOG)
    bench.add_argument("--checkpoint", help="a `msdiff train` run or checkpoint (default: random tiny U-Net)")
    bench.add_argument("--task", choices=sorted(TASKS), help="without --checkpoint: task of the random model (default sr)")
    add_task_options(bench)
    bench.add_argument(
        "--estimator", choices=ESTIMATOR_NAMES, help="without --checkpoint: estimator of the random model (default cmde)"
    )
    bench.add_argument("--image-size", type=int, help="without --checkpoint: image size (default 32)")
    bench.add_argument(
        "--samplers", nargs="+", choices=("mr-sde", "mr-ode", "euler"), default=["mr-sde", "mr-ode"], help="fast samplers to time"
    )
    bench.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20], help="NFEs of the fast samplers")
    bench.add_argument("--order", type=int, default=2, help="MR Sampler order")
    bench.add_argument(
        "--reference-nfe", type=int, default=100, help="NFE of the reference sampler (its usual: pc 2000, posterior 100)"
    )
    bench.add_argument("--batch", type=int, default=8, help="images per batch")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    bench.add_argument("--seed", type=int, default=0, help="seed")
    bench.add_argument("--out", help="also write bench.json and bench.md here")
    bench.add_argument(
        "--overwrite", action="store_true", help="replace bench.json and bench.md in --out if they exist (default: refuse)"
    )
    bench.add_argument("--script", help="run the benchmark script SCRIPT of benchmarks/ instead (see --list)")
    bench.add_argument("--list", action="store_true", help="list the benchmark scripts")
    bench.add_argument("--benchmarks-dir", help="folder of benchmark scripts (default: the checkout's benchmarks/)")
    bench.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for --script, after --")
    add_common(bench)
    return bench


def run(args: argparse.Namespace) -> int:
    if args.list or args.script:
        return _run_benchmark_script(args)
    if args.batch < 1 or args.repeats < 1:
        raise UsageError(f"--batch, --repeats: expected integers >= 1, got {args.batch}, {args.repeats}", 2)
    check_seed(args.seed)
    if args.image_size is not None and (args.image_size < 4 or args.image_size % 4):
        raise UsageError(f"--image-size: expected a multiple of 4 (the U-Net halves the image twice), got {args.image_size}", 2)
    device = device_from(args.device)
    if args.checkpoint:
        trained = load_trained(args.checkpoint, device)
        network, estimator, spec = trained.network, trained.estimator, trained.spec
    else:
        estimator_name = args.estimator or "cmde"
        task = args.task or "sr"
        given = vars(args)
        spec = ModelSpec(
            task,
            task_options(task, given, estimator_name),
            estimator_name,
            estimator_options(estimator_name, task, given, 1000),
            "tiny",
            args.image_size or 32,
            3,
        )
        torch.manual_seed(args.seed)
        network, estimator = spec.network().to(device).eval(), spec.build_estimator()
    # Taken before minutes of timing: a busy --out or an existing bench.json fails at once.
    with output_folder(args.out, overwrite=args.overwrite) if args.out else contextlib.nullcontext() as out:
        if out is not None:
            out.check_new(["bench.json", "bench.md"])
        title, table, rows = _time_samplers(args, network, estimator, spec, device)
        print(title)
        print(table, end="")
        if out is not None:
            record = {
                "title": title,
                "command": command_line(),
                "torch": torch.__version__,
                "rows": [dict(zip(ROW_KEYS, row)) for row in rows],
            }
            out.write_text("bench.json", json_text(record))
            out.write_text("bench.md", f"# {title}\n\n`{command_line()}`\n\n{table}")
    if args.out:
        print(f"wrote {Path(args.out) / 'bench.json'} and {Path(args.out) / 'bench.md'}")
    return 0


def _time_samplers(args: argparse.Namespace, network, estimator, spec: ModelSpec, device: torch.device):
    """(title, markdown table, rows) of the median time of every sampler of ``args`` on one batch."""
    if estimator.name == "mr":
        reference = SamplerSpec("posterior", args.reference_nfe)
    else:
        reference = SamplerSpec("pc", args.reference_nfe + args.reference_nfe % 2)
    runs = [SamplerSpec(name, nfe, args.order) for name in args.samplers for nfe in args.nfe] + [reference]
    for run_ in runs:
        run_.check(estimator)
    size = spec.image_size
    generator = torch.Generator().manual_seed(args.seed)
    condition = torch.rand(args.batch, spec.channels, size, size, generator=generator).to(device)
    rows, timings = [], {}
    warm_up = SamplerSpec("mr-ode", 1, 1)
    restore_batch(network, estimator, condition, warm_up, torch.Generator().manual_seed(0))
    for sampler in tqdm(runs, desc="bench", unit="sampler", disable=args.no_progress):
        seconds = []
        for repeat in range(args.repeats):
            _synchronize(device)
            started = time.perf_counter()
            restore_batch(network, estimator, condition, sampler, torch.Generator().manual_seed(args.seed + repeat))
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
        timings[(sampler.name, sampler.nfe)] = sorted(seconds)[len(seconds) // 2]
    reference_time = timings[(reference.name, reference.nfe)]
    for sampler in runs:
        median = timings[(sampler.name, sampler.nfe)]
        per_image, per_nfe = 1000 * median / args.batch, 1000 * median / sampler.nfe
        rows.append((sampler.label, sampler.nfe, median, per_image, per_nfe, reference_time / median))
    header = [
        "sampler",
        "NFE",
        "seconds per batch",
        "ms per image",
        "ms per NFE",
        f"speed-up vs {reference.name} {reference.nfe}",
    ]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "random weights (timing only)"
    title = (
        f"msdiff bench: {spec.estimator} {spec.preset} U-Net at {size}x{size}, batch {args.batch}, {device_name}, "
        f"median of {args.repeats}, {weights}"
    )
    return title, markdown_table(header, rows), rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmarks_directory(given: Optional[str]) -> Path:
    if given is not None:
        return Path(given)
    return Path(__file__).resolve().parents[2] / "benchmarks"


def benchmark_scripts(folder: Path) -> Dict[str, Path]:
    """Every runnable script of ``folder`` (a .py file with a ``__main__`` block; the modules the
    scripts share have none) by name: the file name without ``benchmark_`` and ``.py``."""
    scripts = {}
    for path in sorted(folder.glob("*.py")) if folder.is_dir() else []:
        if '__name__ == "__main__"' in path.read_text(errors="replace"):
            name = path.stem[len(SCRIPT_PREFIX) :] if path.stem.startswith(SCRIPT_PREFIX) else path.stem
            scripts[name] = path
    return scripts


def _run_benchmark_script(args: argparse.Namespace) -> int:
    folder = benchmarks_directory(args.benchmarks_dir)
    scripts = benchmark_scripts(folder)
    if args.list:
        if not scripts:
            raise UsageError(
                f"no benchmark scripts in {folder}: they live in the source checkout's benchmarks/ folder; pass --benchmarks-dir"
            )
        for name in scripts:
            print(name)
        return 0
    name = args.script[len(SCRIPT_PREFIX) :] if args.script.startswith(SCRIPT_PREFIX) else args.script
    name = name[:-3] if name.endswith(".py") else name
    if name not in scripts:
        available = ", ".join(scripts) or "none found"
        raise UsageError(
            f"--script {args.script}: no benchmark script {name!r} in {folder} (available: {available}); see `msdiff bench --list`"
        )
    extra: List[str] = list(args.script_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return subprocess.call([sys.executable, str(scripts[name]), *extra])
