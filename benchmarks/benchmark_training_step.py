"""Time and peak memory of one training step (forward + backward + Adam) of a CMDE model.

Providers, measured in one run on the same model, batch and device:
  eager: plain PyTorch (torch.randn noise kept for the loss, torch.cat, the formula with autograd),
         python_tests/test_estimators.plain_conditional_loss, the tests' oracle; float32; Adam as
         torch builds it by default (one tensor at a time on a CPU, foreach on CUDA). The baseline.
  fused: CMDE.loss (ops.noise_inject writes cat(x_t, y_t) into one buffer; ops.weighted_score_loss
         fuses the weighted loss with its gradient; the noise is regenerated from (seed, offset) on
         a GPU and drawn once by the C++ kernels and read by both ops on a CPU);
  then the trainer's throughput switches, each on top of fused, set up as msdiff_fast's Trainer
  sets them up (TrainConfig fields in brackets):
  fused-adam: Adam's fused kernels [optimizer_impl="fused"];
  channels-last: weights and activations in channels-last memory format [channels_last=True];
  bf16: bfloat16 autocast of the forward pass [amp="bf16"];
  compile: torch.compile of the network, forward and backward [compile=True] (compiled during the
         warm-up steps; the first-step compile time is reported separately);
  fast: fused-adam + channels-last + bf16; fast-compile: fast + compile.
Networks: the "tiny" preset, the paper's celeba_sr_x8_160 U-Net with the CMDE head (43.5M
parameters), and "loss-only" (one learnable scale at the paper's 160x160 shapes), which isolates
the part of the step the fused ops replace (eager and fused only). Each configuration runs in its
own process, so its peak memory is its own: CUDA max_memory_allocated, or on CPU the peak resident
set size during the timed steps (VmHWM after resetting it through /proc/self/clear_refs).

    python3 benchmarks/benchmark_training_step.py                 # CPU: tiny b8, paper b2, loss-only b2/b16
    python3 benchmarks/benchmark_training_step.py --quick         # CPU, smaller and fewer steps
    python3 benchmarks/benchmark_training_step.py --device cuda   # adds the paper preset at batch 16
    python3 benchmarks/benchmark_training_step.py --threads 1     # steadier on a shared CPU
    python3 benchmarks/benchmark_training_step.py --providers eager fast   # a subset

Writes benchmarks/results/training_step_<device>.md and .csv (overwritten; device name, torch
version, date, load average and the command line in both).
"""

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python_tests"))

from machine import device_name  # noqa: E402
from test_estimators import plain_conditional_loss  # noqa: E402

from msdiff_fast.estimators import CMDE  # noqa: E402
from msdiff_fast.models import unet_preset  # noqa: E402
from msdiff_fast.training.config import TrainConfig, make_adam  # noqa: E402

PAPER = "celeba_sr_x8_160"
# provider -> (loss, TrainConfig switches); None as optimizer_impl: torch's default Adam
FAST = dict(optimizer_impl="fused", channels_last=True, amp="bf16")
PROVIDERS = {
    "eager": ("eager", dict(optimizer_impl=None)),
    "fused": ("fused", dict(optimizer_impl=None)),
    "fused-adam": ("fused", dict(optimizer_impl="fused")),
    "channels-last": ("fused", dict(optimizer_impl=None, channels_last=True)),
    "bf16": ("fused", dict(optimizer_impl=None, amp="bf16")),
    "compile": ("fused", dict(optimizer_impl=None, compile=True)),
    "fast": ("fused", FAST),
    "fast-compile": ("fused", dict(FAST, compile=True)),
}
# the switches act on the network: a one-parameter model only compares the losses
LOSS_ONLY_PROVIDERS = ("eager", "fused")


class LossOnly(torch.nn.Module):
    """One learnable scale: the network costs nothing, the loss is the whole step."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(-0.5))

    def forward(self, x, t):
        return self.scale * x


def configurations(device: str, quick: bool):
    """(network, image size, batch, timed steps) rows; each is run with every provider. Short steps get more
    timed steps, so that every row's median is over a few seconds of steps."""
    if quick:
        return [("tiny", 16, 4, 5), (PAPER, 160, 1, 2), ("loss-only", 160, 2, 10)]
    if device == "cuda":
        return [
            ("tiny", 32, 16, 50),
            (PAPER, 160, 2, 20),
            (PAPER, 160, 16, 10),
            ("loss-only", 160, 16, 50),
            ("loss-only", 160, 64, 20),
        ]
    return [("tiny", 32, 8, 30), (PAPER, 160, 2, 5), ("loss-only", 160, 2, 50), ("loss-only", 160, 16, 50)]


def build_model(network: str, size: int, device: str):
    if network == "loss-only":
        return LossOnly().to(device)
    return unet_preset(network, estimator="cmde", image_channels=3, image_size=size).to(device)


def eager_loss(est: CMDE, model, x0, y0, generator):
    batch = x0.shape[0]
    t = est.t_eps + (float(est.sde.T) - est.t_eps) * torch.rand(batch, generator=generator, device=x0.device, dtype=torch.float64)
    z_x = torch.randn(x0.shape, generator=generator, device=x0.device)
    z_y = torch.randn(y0.shape, generator=generator, device=x0.device)
    x_sde, y_sde = est.sde.x, est.sde.y
    weight_x = (x_sde.g2(t) / x_sde.sigma(t) ** 2).float()
    weight_y = (y_sde.g2(t) / y_sde.sigma(t) ** 2).float()
    return plain_conditional_loss(
        model, x0, y0, t.float(), z_x, z_y, x_sde.sigma(t).float(), y_sde.sigma(t).float(), weight_x, weight_y
    )


def _rss_peak_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def run_one(config: dict) -> dict:
    """Time ``config['steps']`` training steps after ``config['warmup']``; runs in a worker process."""
    device, network, size, batch = config["device"], config["network"], config["size"], config["batch"]
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    loss_kind, switches = PROVIDERS[config["provider"]]
    torch.manual_seed(0)
    model = build_model(network, size, device)
    model.train()
    # as the Trainer does it (msdiff_fast/training/trainer.py)
    if switches.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if switches.get("compile") else model
    if switches["optimizer_impl"] is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    else:
        optimizer = make_adam(
            model.parameters(),
            TrainConfig(steps=1, batch_size=batch, warmup=0, optimizer_impl=switches["optimizer_impl"]),
            torch.device(device),
        )
    amp = switches.get("amp", "none")
    est = CMDE.for_images((3, size, size), (3, size, size))
    x0 = torch.rand(batch, 3, size, size, device=device)
    y0 = torch.rand(batch, 3, size, size, device=device)
    generator = torch.Generator(device).manual_seed(1)

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            if loss_kind == "fused":
                loss = est.loss(forward, x0, y0, generator)
            else:
                loss = eager_loss(est, forward, x0, y0, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    first = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    first_step = time.perf_counter() - first
    for _ in range(config["warmup"] - 1):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_rss_peak()
    times = []
    for _ in range(config["steps"]):
        start = time.perf_counter()
        loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_peak_mib()
    return {
        **config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "ms_median": 1e3 * statistics.median(times),
        "ms_min": 1e3 * min(times),
        "first_step_s": first_step,
        "peak_mib": peak,
        "final_loss": float(loss.detach()),
    }


def write_results(rows, device: str, threads: int, command: str, load_at_start: float) -> None:
    header = {
        "device_name": device_name(device, threads),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average_1min_start_end": f"{load_at_start:.2f} / {os.getloadavg()[0]:.2f}",
        "command": command,
    }
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    fields = [
        "network",
        "size",
        "batch",
        "provider",
        "parameters",
        "warmup",
        "steps",
        "ms_median",
        "ms_min",
        "first_step_s",
        "peak_mib",
        "speedup_vs_eager",
        "steps_per_second",
    ]
    eager = {(r["network"], r["size"], r["batch"]): r for r in rows if r["provider"] == "eager"}
    for row in rows:
        baseline = eager.get((row["network"], row["size"], row["batch"]))
        row["speedup_vs_eager"] = baseline["ms_median"] / row["ms_median"] if baseline else float("nan")
        row["steps_per_second"] = 1e3 / row["ms_median"]
    with open(results / f"training_step_{device}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header) + fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**header, **{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}})
    memory = "peak allocated (MiB)" if device == "cuda" else "peak RSS (MiB)"
    lines = [
        f"# Training step (forward + backward + Adam), CMDE loss, on {device}: the trainer's switches against the eager float32 step",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += (
        [""]
        + [line.strip() for line in __doc__.split("\n\n")[1].splitlines()]
        + [
            "",
            "Median of the timed steps after warm-up; speed-up: eager ms / provider ms at the same network and batch.",
            "",
            f"| network | size | batch | params | provider | timed steps | ms per step | steps/s | speed-up vs eager | first step (s) | {memory} |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    )
    for row in rows:
        lines.append(
            f"| {row['network']} | {row['size']} | {row['batch']} | {row['parameters'] / 1e6:.2f}M | {row['provider']} | {row['steps']} | {row['ms_median']:.1f} | "
            f"{row['steps_per_second']:.2f} | {row['speedup_vs_eager']:.2f} | {row['first_step_s']:.1f} | {row['peak_mib']:.0f} |"
        )
    (results / f"training_step_{device}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer steps")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per configuration (default: 5-50 by the step's length)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (default 2, quick 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per worker (default: torch's own); 1 is steadier on a shared machine",
    )
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS), help="default: all")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    warmup = args.warmup if args.warmup is not None else 1 if args.quick else 2
    if (args.steps is not None and args.steps < 1) or warmup < 1 or args.threads < 0:
        parser.error(f"--steps and --warmup must be >= 1, --threads >= 0, got {args.steps}, {warmup}, {args.threads}")
    from tqdm.auto import tqdm

    jobs = [
        {
            "device": args.device,
            "network": network,
            "size": size,
            "batch": batch,
            "provider": provider,
            "steps": args.steps or steps,
            "warmup": warmup,
            "threads": args.threads,
        }
        for network, size, batch, steps in configurations(args.device, args.quick)
        for provider in args.providers
        if network != "loss-only" or provider in LOSS_ONLY_PROVIDERS
    ]
    load_at_start = os.getloadavg()[0]
    rows = []
    for job in tqdm(jobs, desc="training-step benchmark"):
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"configuration {job} failed with exit status {done.returncode}:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        tqdm.write(
            f"{job['network']:>16} {job['size']:>3} b{job['batch']:<3} {job['provider']:>13}: {rows[-1]['ms_median']:9.1f} ms, peak {rows[-1]['peak_mib']:8.0f} MiB"
        )
    write_results(rows, args.device, args.threads, " ".join([os.path.basename(sys.executable), *sys.argv]), load_at_start)
    print((ROOT / "benchmarks" / "results" / f"training_step_{args.device}.md").read_text())


if __name__ == "__main__":
    main()
