"""End-to-end sampling time and quality: MR Sampler at NFE 5-20 against the 100-2000 NFE baselines.

    python benchmarks/end_to_end.py --device cpu [--quick]
    python benchmarks/end_to_end.py --device cuda              # adds CUDA-graph capture

Networks: the paper-size U-Net (``unet_preset("celeba_sr_x8_160")``, 43M parameters, 160x160) and
the tiny one, randomly initialised (timing only; the zero-initialised output layer gets small
random weights so that outputs are not identically zero): the "mr" estimator layout (input
cat(x_t - mu, mu), noise output) for the mean-reverting samplers, the "cmde" layout (input
cat(x_t, y_t), x and y scores) for predictor-corrector sampling of a multi-speed VE SDE.

Rows: MR Sampler (SDE-2, data prediction) at NFE 5 / 10 / 20 and posterior sampling at NFE 100 on a
mean-reverting SDE; predictor-corrector sampling (1000 steps + 1000 corrector steps = 2000 NFE)
and MR Sampler at NFE 10 on the CMDE network. Runs above --max-measured-nfe network evaluations
are timed on a shorter run of the same sampler and extrapolated linearly in NFE (marked
"extrapolated"). "outside network": the share of the wall time not spent in the network's forward
passes (timed around each network call in the same run). Quality: each row's sampler with the
exact denoiser of Gaussian data N(0.4, 0.2^2) in place of the network, error = per-dimension
2-Wasserstein distance of the samples' fitted Gaussian to the data's.

On a GPU the MR Sampler rows are also run as one CUDA graph: ``StaticMRSampler`` precomputes every
step's coefficients on the device and draws its noise with torch's graph-safe generator, so the
loop has no host synchronisation (MRSampler.sample checks every step for NaN, which
synchronises) and the whole loop, network included, is captured once and replayed.
"""

import argparse
import datetime
import math
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msdiff_fast import MRSampler, pc_sample, posterior_sample  # noqa: E402
from msdiff_fast.cli import cpu_model  # noqa: E402
from msdiff_fast.models import unet_preset  # noqa: E402
from msdiff_fast.ops import mr_step  # noqa: E402
from msdiff_fast.samplers import conditioned_model, prediction_coefficients  # noqa: E402
from msdiff_fast.samplers.mr_sampler import step_coefficients  # noqa: E402
from msdiff_fast.sde import MRSDE, VESDE, MultiSpeedSDE  # noqa: E402
from msdiff_fast.testing import GaussianData  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA_MEAN, DATA_STD = 0.4, 0.2


class StaticMRSampler:
    """MRSampler's multistep loop with every coefficient precomputed on the device.

    Same math as ``MRSampler.sample`` (no clip, threshold or denoise_last): each step is one
    network call and one fused ``mr_step`` whose terms are the current state, mu and the stored
    (output, state) pairs of the previous steps, with the prediction conversion folded into the
    coefficients. No host synchronisation: CUDA-graph capturable for a fixed batch shape. SDE
    noise comes from torch.randn_like (graph-safe: every replay draws fresh noise).
    """

    def __init__(self, sampler: MRSampler, batch: int, device: torch.device, dtype: torch.dtype, has_mu: bool):
        if sampler.clip is not None or sampler.threshold is not None or sampler.denoise_last:
            raise ValueError("sampler: StaticMRSampler supports samplers without clip, threshold and denoise_last")
        self.steps = sampler.steps
        self.has_mu = has_mu
        time_dtype = coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.times, self.coefs, self.noise = [], [], []
        conversions, lams = [], []
        for i in range(sampler.steps):
            s, t = float(sampler.timesteps[i]), float(sampler.timesteps[i + 1])
            conversions.insert(0, [float(c) for c in prediction_coefficients(sampler.sde, s, sampler.model_output, sampler.prediction)])
            order = sampler.step_order(i)
            a, weights, m, noise = step_coefficients(sampler.solver, sampler.prediction, order, sampler.sde, s, t, lams, sampler.multistep)
            lams.insert(0, float(sampler.lams[i]))
            # x_t = a x + m mu + sum_k w_k (c_out_k out_k + c_x_k x_k + c_mu_k mu), k = 0 the current step
            row = [a + weights[0] * conversions[0][1], m + sum(w * conversions[k][2] for k, w in enumerate(weights)), weights[0] * conversions[0][0]]
            for k in range(1, sampler.order):
                w = weights[k] if k < len(weights) else 0.0
                c_out, c_x, _ = conversions[k] if k < len(conversions) else (0.0, 0.0, 0.0)
                row += [w * c_out, w * c_x]
            if not has_mu:
                row.pop(1)
            if not all(math.isfinite(c) for c in row + [noise]):
                raise FloatingPointError(f"sampler: step {i + 1} has non-finite coefficients {row}")
            # the kernels read float32 coefficients (float64 ones would be cast at every step)
            self.coefs.append(torch.tensor([row], dtype=coef_dtype, device=device).expand(batch, -1).contiguous())
            self.noise.append(torch.full((batch,), noise, dtype=coef_dtype, device=device) if noise != 0.0 else None)
            self.times.append(torch.full((batch,), s, dtype=time_dtype, device=device))
            del lams[sampler.order - 1:]
            del conversions[sampler.order - 1:]
        self.history_length = sampler.order - 1

    def __call__(self, model: Callable, x_T: torch.Tensor, mu: Optional[torch.Tensor]) -> torch.Tensor:
        x = x_T
        history: List[torch.Tensor] = []
        for i in range(self.steps):
            output = model(x, self.times[i], mu)
            terms = ([mu] if self.has_mu else []) + [output]
            for k in range(self.history_length):
                terms += history[2 * k: 2 * k + 2] if 2 * k < len(history) else [output, x]
            noise = torch.randn_like(x) if self.noise[i] is not None else None
            new_x = mr_step(x, terms, self.coefs[i], self.noise[i], noise=noise)
            history = ([output, x] + history)[: 2 * self.history_length]
            x = new_x
        return x


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NetworkClock:
    """A model wrapper adding up the time spent inside the network's calls, in the same run as the
    sampler's wall time (CUDA events on a GPU, so the clock adds no synchronisation)."""

    def __init__(self, model: Callable, device: torch.device):
        self.model, self.device = model, device
        self.reset()

    def reset(self) -> None:
        self.seconds, self.events = 0.0, []

    def __call__(self, *args):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = self.model(*args)
            end.record()
            self.events.append((start, end))
            return output
        start = time.perf_counter()
        output = self.model(*args)
        self.seconds += time.perf_counter() - start
        return output

    def total(self) -> float:
        synchronize(self.device)
        return self.seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1e3


def wall_time(function: Callable, device: torch.device, repeats: int, clock: Optional[NetworkClock] = None):
    """Best-of-``repeats`` wall time of function() after one warm-up call, and the time the best run
    spent inside ``clock``'s network (0 without a clock)."""
    function()
    synchronize(device)
    best, inside = float("inf"), 0.0
    for _ in range(repeats):
        if clock is not None:
            clock.reset()
        start = time.perf_counter()
        function()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, inside = elapsed, (clock.total() if clock is not None else 0.0)
    return best, inside


def mr_network(net):
    def model(x_t, t, mu):
        return net(torch.cat([x_t - mu, mu], dim=1), t)

    return model


def cmde_network(net, channels: int):
    def model(x_t, t, y_t):
        return net(torch.cat([x_t, y_t], dim=1), t)[:, :channels]

    return model


def gaussian_w2(samples: torch.Tensor) -> float:
    flat = samples.reshape(samples.shape[0], -1).double()
    return float(torch.sqrt((flat.mean(0) - DATA_MEAN) ** 2 + (flat.std(0) - DATA_STD) ** 2).mean())


class Row:
    def __init__(self, label, network, clock, nfe, run, measured_run=None, measured_nfe=None, analytic=None, static=None):
        self.label, self.network, self.clock, self.nfe = label, network, clock, nfe
        self.run, self.measured_run, self.measured_nfe = run, measured_run, measured_nfe
        self.analytic, self.static = analytic, static
        self.results = {}


def build_rows(args, preset: str, device: torch.device):
    """The sampler runs for one network preset, their network-only timings and analytic twins."""
    dtype = torch.float32
    mr_net = unet_preset(preset, estimator="mr").to(device).eval()
    cmde_net = unet_preset(preset, estimator="cmde").to(device).eval()
    for net in (mr_net, cmde_net):
        # the output layer starts at zero (score_sde's init): small random weights make the
        # outputs, and so the samplers' work (e.g. predictor-corrector's score norms), non-trivial
        torch.nn.init.normal_(net.conv_out.weight, std=1e-3, generator=torch.Generator(device=device).manual_seed(3))
    size, channels = mr_net.image_size, 3
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.rand(args.batch, channels, size, size, generator=g).to(device, dtype)
    y = torch.rand(args.batch, channels, size, size, generator=g).to(device, dtype)
    mr_sde = MRSDE(50 / 255, "cosine", 0.005)
    ve_pair = MultiSpeedSDE(VESDE(0.01, 50.0), VESDE(0.01, 5.0))
    mr_model = NetworkClock(mr_network(mr_net), device)
    cmde_model = NetworkClock(cmde_network(cmde_net, channels), device)
    generator = lambda: torch.Generator(device=device).manual_seed(1)  # noqa: E731

    gaussian = GaussianData(DATA_MEAN, DATA_STD)
    analytic_mu = torch.rand(1, 8, generator=g, dtype=torch.float64).expand(args.analytic_samples, 8).contiguous()
    exact_mr = gaussian.denoiser(mr_sde, "noise")
    exact_ve = gaussian.denoiser(ve_pair.x, "score")
    analytic_generator = lambda: torch.Generator().manual_seed(2)  # noqa: E731

    rows = []
    for nfe in (5, 10, 20):
        sampler = MRSampler(mr_sde, nfe, solver="sde", order=2, prediction="data", model_output="noise")
        rows.append(Row(
            "MR Sampler SDE-2 data", "mr", mr_model, nfe,
            run=lambda sampler=sampler: sampler.sample(mr_model, mu, generator=generator()),
            analytic=lambda sampler=sampler: sampler.sample(exact_mr, analytic_mu, generator=analytic_generator()),
            static=(sampler, mr_model.model, mu, lambda: mr_sde.prior(mu, generator())),
        ))
    rows.append(Row(
        "posterior sampling", "mr", mr_model, 100,
        run=lambda: posterior_sample(mr_model, mr_sde, mu, 100, generator=generator()),
        measured_run=lambda steps: posterior_sample(mr_model, mr_sde, mu, steps, generator=generator()),
        measured_nfe=lambda steps: steps,
        analytic=lambda: posterior_sample(exact_mr, mr_sde, analytic_mu, 100, generator=analytic_generator()),
    ))
    rows.append(Row(
        "predictor-corrector (1000 steps, snr 0.15)", "cmde", cmde_model, 2000,
        run=lambda: pc_sample(cmde_model, ve_pair, y, 1000, generator=generator()),
        measured_run=lambda steps: pc_sample(cmde_model, ve_pair, y, steps, generator=generator()),
        measured_nfe=lambda steps: 2 * steps,
        analytic=lambda: pc_sample(exact_ve, ve_pair.x, None, 1000, shape=(args.analytic_samples, 8), clip=None, generator=analytic_generator()),
    ))
    ve_fast = MRSampler(ve_pair, 10, solver="sde", order=2, prediction="data", model_output="score")
    rows.append(Row(
        "MR Sampler SDE-2 data (VE)", "cmde", cmde_model, 10,
        run=lambda: ve_fast.sample(conditioned_model(cmde_model, ve_pair, y, "fresh", generator()), None, shape=tuple(y.shape), generator=generator(), device=y.device),
        analytic=lambda: ve_fast.sample(exact_ve, None, shape=(args.analytic_samples, 8), generator=analytic_generator()),
    ))
    networks = {
        "mr": (lambda: mr_net(torch.cat([mu, mu], dim=1), torch.full((args.batch,), 0.5, device=device))),
        "cmde": (lambda: cmde_net(torch.cat([mu, y], dim=1), torch.full((args.batch,), 0.5, device=device))),
    }
    return rows, networks, {"mr": sum(p.numel() for p in mr_net.parameters()), "cmde": sum(p.numel() for p in cmde_net.parameters()), "size": size}


def time_rows(args, rows, device):
    for row in tqdm(rows, desc="timing", leave=False):
        if row.nfe <= args.max_measured_nfe or row.measured_run is None:
            # a single timed run above 200 NFE: long enough to average itself
            seconds, inside = wall_time(row.run, device, args.repeats if row.nfe <= 200 else 1, row.clock)
            row.results["how"] = "measured"
        else:
            steps = max(1, args.max_measured_nfe // (row.measured_nfe(1)))
            seconds, inside = wall_time(lambda: row.measured_run(steps), device, args.repeats, row.clock)
            scale = row.nfe / row.measured_nfe(steps)
            seconds, inside = seconds * scale, inside * scale
            row.results["how"] = f"extrapolated from {row.measured_nfe(steps)} NFE"
        row.results["time"], row.results["network"] = seconds, inside
        row.results["outside"] = max(0.0, 1 - inside / seconds)


def analytic_errors(rows):
    for row in tqdm(rows, desc="analytic model", leave=False):
        row.results["error"] = gaussian_w2(row.analytic())


def static_rows(args, rows, device):
    """The graph-capturable loop run eagerly: its time, and its agreement with MRSampler (ODE, same x_T)."""
    for row in rows:
        if row.static is None:
            continue
        sampler, model, mu, prior = row.static
        x_T = prior()
        ode = MRSampler(sampler.sde, sampler.steps, solver="ode", order=sampler.order, prediction=sampler.prediction, model_output=sampler.model_output)
        ode_static = StaticMRSampler(ode, args.batch, device, mu.dtype, has_mu=True)
        expected = ode.sample(model, mu, x_T=x_T)
        row.results["static_check"] = float((ode_static(model, x_T, mu) - expected).abs().max() / expected.abs().max())
        static = StaticMRSampler(sampler, args.batch, device, mu.dtype, has_mu=True)
        row.results["static_eager"] = wall_time(lambda: static(model, x_T, mu), device, args.repeats)[0]


def graph_rows(args, rows, networks, device, notes):
    """CUDA graphs: the whole MR Sampler loop, network included, and the network alone (NFE calls)."""
    for row in rows:
        if row.static is None:
            continue
        sampler, model, mu, prior = row.static
        static = StaticMRSampler(sampler, args.batch, device, mu.dtype, has_mu=True)
        x_T = prior()
        try:
            static_x, static_mu = x_T.clone(), mu.clone()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    static(model, static_x, static_mu)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = static(model, static_x, static_mu)
            graph.replay()
            synchronize(device)
            row.results["graph"] = wall_time(graph.replay, device, args.repeats)[0]
            net_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(net_graph):
                for _ in range(row.nfe):
                    networks[row.network]()
            row.results["graph_network"] = wall_time(net_graph.replay, device, args.repeats)[0]
            row.results["graph_outside"] = max(0.0, 1 - row.results["graph_network"] / row.results["graph"])
            row.results["graph_finite"] = bool(torch.isfinite(static_out).all())
        except RuntimeError as error:
            notes.append(f"CUDA graph capture of {row.label} NFE {row.nfe} failed: {error}")


def report(args, device, per_preset, seconds):
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    lines = [
        f"# End-to-end sampling, {device.type}",
        "",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} CPU threads, device {device}{gpu}; torch {torch.__version__}.",
        f"Date: {datetime.date.today().isoformat()}. Wall time of the benchmark {seconds:.0f} s.",
        "Command: `python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) + "`",
        "",
        f"Batch {args.batch}, float32, randomly initialised networks, best of {args.repeats} timed runs after a warm-up (one run above 200 NFE). "
        f"Runs above {args.max_measured_nfe} NFE are timed on a shorter run of the same sampler and extrapolated linearly in NFE. "
        "\"outside network\": the share of the wall time spent outside the network's calls, timed inside the same run. Analytic error: the same sampler with the exact "
        f"denoiser of N({DATA_MEAN}, {DATA_STD}^2) data ({args.analytic_samples} samples x 8 dimensions), per-dimension "
        "Gaussian W2 to the data (0 is exact; the Monte-Carlo floor at this size is about "
        f"{1.25 * DATA_STD / math.sqrt(args.analytic_samples):.1e}).",
        "",
    ]
    for preset, (rows, info, notes) in per_preset.items():
        pc = next(r for r in rows if r.nfe == 2000).results["time"]
        posterior = next(r for r in rows if r.nfe == 100).results["time"]
        lines += [
            f"## {preset} ({info['size']}x{info['size']}; mr network {info['mr'] / 1e6:.2f}M parameters, cmde {info['cmde'] / 1e6:.2f}M)",
            "",
            "Network time per call, measured inside the runs: " + ", ".join(f"{row.label} NFE {row.nfe}: {1e3 * row.results['network'] / row.nfe:.1f} ms" for row in rows) + ".",
            "",
            "| sampler | network | NFE | wall time (s) | per image (s) | speed-up vs PC 2000 | vs posterior 100 | outside network | analytic W2 | timing |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            r = row.results
            lines.append(
                f"| {row.label} | {row.network} | {row.nfe} | {r['time']:.3f} | {r['time'] / args.batch:.3f} | {pc / r['time']:.1f}x | "
                f"{posterior / r['time']:.1f}x | {100 * r['outside']:.1f}% | {r['error']:.2e} | {r['how']} |"
            )
        graphed = [row for row in rows if "graph" in row.results]
        if graphed:
            lines += [
                "",
                "CUDA graphs (MR Sampler rows; StaticMRSampler: coefficients precomputed on the device, no host syncs):",
                "",
                "| sampler | NFE | MRSampler.sample (s) | static loop, eager (s) | whole loop as one CUDA graph (s) | graph speed-up | outside network, graphed | static vs MRSampler (ODE, max rel. diff) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in graphed:
                r = row.results
                lines.append(
                    f"| {row.label} | {row.nfe} | {r['time']:.4f} | {r['static_eager']:.4f} | {r['graph']:.4f} | {r['time'] / r['graph']:.2f}x | "
                    f"{100 * r['graph_outside']:.1f}% | {r['static_check']:.1e} |"
                )
        ungraphed = [row for row in rows if "static_eager" in row.results and "graph" not in row.results]
        if ungraphed:
            lines += [
                "",
                "Graph-capturable loop (StaticMRSampler: coefficients precomputed once on the device, no host syncs), run eagerly:",
                "",
                "| sampler | NFE | MRSampler.sample (s) | static loop (s) | static vs MRSampler (ODE, max rel. diff) |",
                "|---|---|---|---|---|",
            ]
            for row in ungraphed:
                r = row.results
                lines.append(f"| {row.label} | {row.nfe} | {r['time']:.4f} | {r['static_eager']:.4f} | {r['static_check']:.1e} |")
        lines += [""] + [f"- {note}" for note in notes] + [""]
    out = args.out_dir / f"end_to_end_{device.type}.md"
    out.write_text("\n".join(lines))
    return out


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds CUDA-graph capture)")
    parser.add_argument("--presets", nargs="+", default=["celeba_sr_x8_160", "tiny"])
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 1 on CPU, 16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row, best kept (default 2 on CPU, 5 on CUDA)")
    parser.add_argument("--max-measured-nfe", type=int, default=None, help="longer runs are extrapolated (default 20 on CPU, 2000 on CUDA)")
    parser.add_argument("--analytic-samples", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="tiny preset only, 1024 analytic samples")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch build")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda, got {args.device}")
    on_gpu = device.type == "cuda"
    args.batch = args.batch or (16 if on_gpu else 1)
    args.repeats = args.repeats or (5 if on_gpu else 2)
    args.max_measured_nfe = args.max_measured_nfe or (2000 if on_gpu else 20)
    if args.quick:
        args.presets, args.analytic_samples = ["tiny"], 1024
    if min(args.batch, args.repeats, args.max_measured_nfe, args.analytic_samples) < 1:
        parser.error("--batch, --repeats, --max-measured-nfe, --analytic-samples: expected positive integers")
    return args, device


def main():
    args, device = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_preset = {}
    with torch.no_grad():
        for preset in args.presets:
            rows, networks, info = build_rows(args, preset, device)
            notes = []
            time_rows(args, rows, device)
            analytic_errors(rows)
            static_rows(args, rows, device)
            if device.type == "cuda":
                graph_rows(args, rows, networks, device, notes)
            per_preset[preset] = (rows, info, notes)
    out = report(args, device, per_preset, time.perf_counter() - start)
    print(out.read_text())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
