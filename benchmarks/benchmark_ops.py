"""Time, peak memory and (on CUDA) bandwidth of the fused ops against plain PyTorch, in one run.

Providers for every op:
  fused[<backend>]  msdiff_fast.ops with each compiled backend that can run here (cpu; cuda and
                    triton on a GPU). The torch backend is the test oracle (Philox in int64
                    PyTorch arithmetic), not a contender, and is left out.
  eager             the same formula written in plain PyTorch: torch.randn noise, torch.cat, and
                    for the loss autograd through the formula with the noise stored.
  compile           torch.compile of the eager formula.
Ops: mr_step with 2 terms, without and with noise; noise_inject of x and y into the cat buffer;
weighted_score_loss forward, and forward + backward. The fused loss runs twice: regenerating the
noise from (seed, offset), which is how training uses it (no noise tensor kept between
noise_inject and the loss), and reading the stored noise tensor that the eager formula reads;
both with reduction="sum", whose backward scales the forward's gradient in place (the training
losses use reduction="mean", the same path).

Timing: medians (and 20th/80th percentiles) over repeats that visit the providers round-robin, so
that a busy machine slows all of them alike; on CUDA each sample is 10 calls queued back to back
between two CUDA events. Peak memory: bytes allocated during one call over what existed before it
(CUDA: torch.cuda.max_memory_allocated; CPU: the "[memory]" events of torch.profiler with
profile_memory=True, i.e. torch's CPU allocator accounting). On CUDA also the kernels' own GPU
time per call (torch.profiler; host overhead excluded) and, from it, the bandwidth of the bytes
each op must move (inputs read once, outputs written once) as a fraction of a device-to-device
copy of max(8M, numel) float32 elements timed the same way.

CPU memory: torch's CPU allocator takes every tensor from glibc malloc, which serves tensors this
large from fresh pages of the kernel (mmap) or from a heap it trims back, as its own history
decides; fresh pages cost a page fault each (about 1 ms per 5 MB here). The eager formula
allocates several temporaries per call, so its time swings between runs by up to 10x with that
history. `--malloc retained` re-runs the script with glibc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_): no page faults after the
warm-up, eager at its fastest, so its ratios are the conservative ones.

    python3 benchmarks/benchmark_ops.py                          # CPU, [16, 3, 160, 160] float32
    python3 benchmarks/benchmark_ops.py --malloc retained        # CPU, no page faults in any provider
    python3 benchmarks/benchmark_ops.py --device cuda --shape 64,3,256,256
    python3 benchmarks/benchmark_ops.py --quick                  # fewer repeats

Writes benchmarks/results/ops_<device>.csv and .md (ops_<device>_threads<N>.* with --threads,
ops_cpu_retained.* with --malloc retained; overwritten) with the device name, torch version, date,
load average and command line.
"""

import argparse
import csv
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import device_name, synchronize  # noqa: E402

from msdiff_fast.ops import compiled, mr_step, noise_inject, weighted_score_loss  # noqa: E402
from msdiff_fast.ops.dispatch import reason_unavailable  # noqa: E402

FUSED_BACKENDS = ("cpu", "cuda", "triton")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------- the cases
# Each case: name, the bytes the op must move, and {provider: callable}. Eager formulas take
# float32 per-sample coefficient views, as a hand-written training or sampling loop would.


def mr_step_case(shape, dtype, device, noise: bool, backends):
    g = torch.Generator().manual_seed(0)
    x, t1, t2 = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    coefs = torch.rand(shape[0], 3, generator=g).to(device)
    noise_coef = torch.rand(shape[0], generator=g).to(device) if noise else None
    c0, c1, c2 = (per_sample(coefs[:, k].to(dtype), x.ndim) for k in range(3))
    cn = per_sample(noise_coef.to(dtype), x.ndim) if noise else None

    def eager(x, t1, t2):
        out = c0 * x + c1 * t1 + c2 * t2
        if noise:
            out = out + cn * torch.randn_like(x)
        return out

    providers = {
        f"fused[{b}]": (lambda b=b: mr_step(x, [t1, t2], coefs, noise_coef, seed=1, offset=2, backend=b)) for b in backends
    }
    providers["eager"] = lambda: eager(x, t1, t2)
    compiled_eager = torch.compile(eager)
    providers["compile"] = lambda: compiled_eager(x, t1, t2)
    name = "mr_step, 2 terms" + (" + noise" if noise else "")
    return name, 4 * x.numel() * x.element_size(), providers


def noise_inject_case(shape, dtype, device, backends):
    g = torch.Generator().manual_seed(1)
    x0, y0 = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
    x_coefs, y_coefs = (torch.rand(shape[0], 2, generator=g).to(device) for _ in range(2))
    buffer = torch.empty(shape[0], 2 * shape[1], *shape[2:], device=device, dtype=dtype)
    a, s = (per_sample(x_coefs[:, k].to(dtype), x0.ndim) for k in range(2))
    a_y, s_y = (per_sample(y_coefs[:, k].to(dtype), y0.ndim) for k in range(2))

    def eager(x0, y0):
        return torch.cat([a * x0 + s * torch.randn_like(x0), a_y * y0 + s_y * torch.randn_like(y0)], dim=1)

    providers = {
        f"fused[{b}]": (lambda b=b: noise_inject(x0, x_coefs, y0, y_coefs, seed=1, out=buffer, backend=b)) for b in backends
    }
    providers["eager"] = lambda: eager(x0, y0)
    compiled_eager = torch.compile(eager)
    providers["compile"] = lambda: compiled_eager(x0, y0)
    return "noise_inject x, y -> cat buffer", 4 * x0.numel() * x0.element_size(), providers


def loss_case(shape, dtype, device, backward: bool, backends):
    g = torch.Generator().manual_seed(2)
    output = torch.randn(shape, generator=g).to(device, dtype).requires_grad_(backward)
    noise = torch.randn(shape, generator=g).to(device, dtype)  # what eager training keeps from the forward diffusion
    coefs = torch.rand(shape[0], 1, 3, generator=g).to(device)
    w, k = (per_sample(coefs[:, 0, j], output.ndim) for j in range(2))

    def eager_loss(output, noise):
        residual = output.float() - k * noise.float()
        return (w * residual * residual).flatten(1).sum(1)

    def run(loss_fn):
        def step():
            output.grad = None
            loss = loss_fn()
            if backward:
                loss.sum().backward()
            return loss

        return step

    providers = {}
    for b in backends:
        providers[f"fused[{b}]"] = run(lambda b=b: weighted_score_loss(output, coefs, seed=1, reduction="sum", backend=b))
        providers[f"fused[{b}], stored noise"] = run(
            lambda b=b: weighted_score_loss(output, coefs, noise=noise, reduction="sum", backend=b)
        )
    providers["eager"] = run(lambda: eager_loss(output, noise))
    compiled_eager = torch.compile(eager_loss)
    providers["compile"] = run(lambda: compiled_eager(output, noise))
    # Fused: forward reads output, writes grad; backward scales grad in place (reduction="sum").
    element_bytes = output.numel() * output.element_size()
    name = "weighted_score_loss " + ("forward + backward" if backward else "forward")
    return name, (4 if backward else 2) * element_bytes, providers


# ----------------------------------------------------------------------------- measuring


# Calls per timed sample on CUDA: launched back to back between two events, so the sample is the
# steady-state cost per call (GPU time, or the host's launch cost where that is larger) rather
# than one launch plus two synchronisations.
CUDA_CALLS_PER_SAMPLE = 10


def time_once(fn, device) -> float:
    """Seconds per call: one call on CPU; the mean of CUDA_CALLS_PER_SAMPLE queued calls on CUDA."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(CUDA_CALLS_PER_SAMPLE):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / CUDA_CALLS_PER_SAMPLE
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def kernel_seconds(fn, calls: int = 5) -> float:
    """GPU time of the kernels one call launches (host overhead excluded), from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for event in profiler.key_averages():
        # self_device_time_total since torch 2.4, self_cuda_time_total before.
        total_us += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return total_us / 1e6 / calls


def peak_bytes(fn, device) -> int:
    """Bytes allocated at the peak of one call, over what was allocated before it."""
    if device == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max([0] + totals)


def copy_bandwidth(numel: int, device) -> float:
    """Bytes per second of a device-to-device float32 copy (read + write)."""
    source = torch.empty(numel, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    return 2 * numel * 4 / kernel_seconds(lambda: target.copy_(source), calls=20)


def measure(cases, device, repeats, warmup):
    rows = []
    for name, useful_bytes, providers in cases:
        runnable = {}
        for provider, fn in providers.items():
            try:  # warm-up; torch.compile compiles here and may fail (no C++ compiler, ...)
                for _ in range(warmup):
                    fn()
            except Exception as error:
                rows.append(
                    dict(op=name, provider=provider, note=f"failed: {type(error).__name__}: {str(error).splitlines()[0]}")
                )
            else:
                runnable[provider] = fn
        times = {p: [] for p in runnable}
        for _ in range(repeats):
            for provider, fn in runnable.items():
                times[provider].append(time_once(fn, device))
        for provider, fn in runnable.items():
            samples = sorted(times[provider])
            median = statistics.median(samples)
            row = dict(
                op=name,
                provider=provider,
                median_ms=1e3 * median,
                p20_ms=1e3 * samples[int(0.2 * (len(samples) - 1))],
                p80_ms=1e3 * samples[int(0.8 * (len(samples) - 1))],
                peak_mib=peak_bytes(fn, device) / 2**20,
                note="",
            )
            if device == "cuda":
                kernels = kernel_seconds(fn)
                row.update(kernel_ms=1e3 * kernels, gbps=useful_bytes / kernels / 1e9 if kernels > 0 else float("nan"))
            rows.append(row)
        eager = next(r for r in rows if r["op"] == name and r["provider"] == "eager")
        for row in rows:
            if row["op"] == name and "median_ms" in row:
                row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]
        print(
            f"{name}: "
            + ", ".join(f"{r['provider']} {r['median_ms']:.3f} ms" for r in rows if r["op"] == name and "median_ms" in r),
            flush=True,
        )
    return rows


# ----------------------------------------------------------------------------- reporting


def describe_device(device) -> str:
    kernels = (
        f", msdiff_fast._C kernels: {compiled._C.instruction_set()} on {compiled._C.thread_pool()} threads"
        if compiled._C is not None
        else ""
    )
    return device_name(device, extra=kernels)


# glibc: serve every allocation below 1 GiB from the heap, never trim it, grow it 256 MiB at a time.
RETAINED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**32), "MALLOC_TOP_PAD_": str(2**28)}


def write_results(rows, args, device, copy_bytes_per_s):
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    context = dict(
        device=describe_device(device),
        torch=torch.__version__,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        shape="x".join(map(str, args.shape)),
        dtype=args.dtype,
        load_average=" ".join(f"{v:.2f}" for v in os.getloadavg()),
        command=" ".join(sys.argv),
    )
    if device == "cpu":
        context["malloc"] = (
            "retained (" + " ".join(f"{k}={v}" for k, v in RETAINED_MALLOC.items()) + ")"
            if args.malloc == "retained"
            else "glibc defaults"
        )
    if copy_bytes_per_s:
        context["copy_gbps"] = f"{copy_bytes_per_s / 1e9:.1f}"
        for row in rows:
            if "gbps" in row:
                row["bandwidth_fraction"] = row["gbps"] * 1e9 / copy_bytes_per_s
    columns = [
        "op",
        "provider",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "speedup_vs_eager",
        "peak_mib",
        "kernel_ms",
        "gbps",
        "bandwidth_fraction",
        "note",
    ]
    stem = (
        f"ops_{device}"
        + (f"_threads{args.threads}" if args.threads is not None else "")
        + ("_retained" if args.malloc == "retained" else "")
    )
    csv_path = results / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(context) + columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**context, **{c: row.get(c, "") for c in columns}})
    lines = [f"# Fused ops vs PyTorch on {device}", ""]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in context.items()]
    lines += [
        "",
        "Times are medians (20th-80th percentile) over round-robin repeats; speedup = eager median / "
        "this median; peak = bytes allocated during one call above what existed before.",
        "",
    ]
    header = "| op | provider | median ms (p20-p80) | speedup vs eager | peak MiB |"
    rule = "|---|---|---|---|---|"
    if copy_bytes_per_s:
        header += " kernel ms | GB/s (kernels) | of copy bandwidth |"
        rule += "---|---|---|"
    lines += [header, rule]
    for row in rows:
        if "median_ms" not in row:
            lines.append(f"| {row['op']} | {row['provider']} | {row['note']} | | |" + (" | | |" if copy_bytes_per_s else ""))
            continue
        line = (
            f"| {row['op']} | {row['provider']} | {row['median_ms']:.3f} ({row['p20_ms']:.3f}-{row['p80_ms']:.3f}) | "
            f"{row['speedup_vs_eager']:.2f}x | {row['peak_mib']:.1f} |"
        )
        if copy_bytes_per_s:
            line += f" {row['kernel_ms']:.3f} | {row['gbps']:.0f} | {100 * row['bandwidth_fraction']:.0f}% |"
        lines.append(line)
    md_path = results / f"{stem}.md"
    md_path.write_text("\n".join(lines) + "\n")
    print(f"wrote {csv_path} and {md_path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--shape",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        default=(16, 3, 160, 160),
        help="B,C,H,W of x (y, terms and the network output have the same shape)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    parser.add_argument(
        "--malloc",
        choices=("default", "retained"),
        default="default",
        help="CPU: 'retained' re-runs with glibc keeping freed memory (no page faults; see above)",
    )
    args = parser.parse_args()
    if args.malloc == "retained":
        if args.device != "cpu":
            parser.error("--malloc retained: only for --device cpu (CUDA tensors come from torch's caching allocator)")
        if any(os.environ.get(k) != v for k, v in RETAINED_MALLOC.items()):  # glibc reads these at start-up only
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETAINED_MALLOC})
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    device, dtype = args.device, DTYPES[args.dtype]
    backends = [b for b in FUSED_BACKENDS if reason_unavailable("mr_step", b, torch.device(device), dtype) is None]
    for b in FUSED_BACKENDS:
        if b not in backends:
            print(f"fused[{b}] not measured: {reason_unavailable('mr_step', b, torch.device(device), dtype)}")
    cases = [
        mr_step_case(args.shape, dtype, device, noise=False, backends=backends),
        mr_step_case(args.shape, dtype, device, noise=True, backends=backends),
        noise_inject_case(args.shape, dtype, device, backends),
        loss_case(args.shape, dtype, device, backward=False, backends=backends),
        loss_case(args.shape, dtype, device, backward=True, backends=backends),
    ]
    repeats, warmup = (7, 2) if args.quick else (30, 3)
    rows = measure(cases, device, repeats, warmup)
    numel = 1
    for extent in args.shape:
        numel *= extent
    copy_bytes_per_s = copy_bandwidth(max(numel, 8 * 2**20), device) if device == "cuda" else None
    write_results(rows, args, device, copy_bytes_per_s)


if __name__ == "__main__":
    main()
