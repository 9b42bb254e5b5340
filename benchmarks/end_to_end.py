"""End-to-end sampling time and quality: MR Sampler at NFE 5-20 against the 100-2000 NFE baselines,
the fast path (static loop, fast network) against the eager one, and against the official MR
Sampler code on the same network.

    python benchmarks/end_to_end.py --device cpu [--quick]
    python benchmarks/end_to_end.py --device cuda              # the static loop as one CUDA graph
    MR_SAMPLER_DIR=/path/to/mr-sampler python benchmarks/end_to_end.py --sections official [--compile]

Networks: the paper-size U-Net (``unet_preset("celeba_sr_x8_160")``, 43M parameters, 160x160) and
the tiny one, randomly initialised (timing only; the zero-initialised output layer gets small
random weights so that outputs are not identically zero): the "mr" estimator layout (input
cat(x_t - mu, mu), noise output) for the mean-reverting samplers, the "cmde" layout (input
cat(x_t, y_t), x and y scores) for predictor-corrector sampling of a multi-speed VE SDE.

Sections (--sections, default all; "official" needs the official code):

samplers: MR Sampler (SDE-2, data prediction) at NFE 5 / 10 / 20 and posterior sampling at NFE 100 on a
mean-reverting SDE; predictor-corrector sampling (1000 steps + 1000 corrector steps = 2000 NFE)
and MR Sampler at NFE 10 on the CMDE network. Runs above --max-measured-nfe network evaluations
are timed on a shorter run of the same sampler and extrapolated linearly in NFE (marked
"extrapolated"). "outside network": the share of the wall time not spent in the network's forward
passes (timed around each network call in the same run). Quality: each row's sampler with the
exact denoiser of Gaussian data N(0.4, 0.2^2) in place of the network, error = per-dimension
2-Wasserstein distance of the samples' fitted Gaussian to the data's.

fast: the MR Sampler rows again with MRSampler(loop="static") (coefficients precomputed on the
device, no host synchronisation; on a GPU loop="graph": the whole loop, network included, captured
once as a CUDA graph and replayed) and the fast network path (models.FastNetwork: channels-last
and inference mode by default, then + bfloat16 autocast and, with --compile, + torch.compile and
MRSampler(loop="compile"), the loop compiled with the network inside), each against
MRSampler.sample with the plain float32 network: wall time, speed-up and the output's difference
(max |difference| and PSNR against the eager output, same generator seed).

official: the official MR Sampler code (grrrute/mr-sampler, a local checkout given by
--mr-sampler-dir or MR_SAMPLER_DIR: fetched, never committed, loaded as compare_reference.py
loads it) against msdiff eager / static / fast on the same network at the same NFE: SDE-2 with
data prediction on the official "linspace" grid of the IR-SDE cosine schedule (max_sigma 50, T
100; the official code's thetabar convention), the same x_T and the same Gaussian noise (the
official code's torch.randn_like calls return the normals msdiff's counter-based stream draws),
for each preset at each --official-batches; wall time, official / row, output agreement.

--profile: torch.profiler's operators by self time for one static-loop run with the FastNetwork
defaults (and compiled, with --compile): where the time goes.
"""

import argparse
import copy
import datetime
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import DATA_MEAN, DATA_STD, cpu_model, per_dimension_w2, synchronize  # noqa: E402

from msdiff_fast import MRSampler, pc_sample, posterior_sample  # noqa: E402
from msdiff_fast.models import FastNetwork, bf16_unsupported, unet_preset  # noqa: E402
from msdiff_fast.samplers import conditioned_model  # noqa: E402
from msdiff_fast.sde import MRSDE, VESDE, MultiSpeedSDE  # noqa: E402
from msdiff_fast.testing import GaussianData  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("samplers", "fast", "official")


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


class Row:
    def __init__(self, label, network, clock, nfe, run, measured_run=None, measured_nfe=None, analytic=None, mr_sampler=None):
        self.label, self.network, self.clock, self.nfe = label, network, clock, nfe
        self.run, self.measured_run, self.measured_nfe = run, measured_run, measured_nfe
        self.analytic = analytic
        self.mr_sampler = mr_sampler  # (sde, steps, options) of the MR Sampler rows, for the fast section
        self.results = {}


def mr_and_cmde_networks(preset: str, device: torch.device):
    """The preset's "mr" and "cmde" U-Nets, randomly initialised."""
    mr_net = unet_preset(preset, estimator="mr").to(device).eval()
    cmde_net = unet_preset(preset, estimator="cmde").to(device).eval()
    for net in (mr_net, cmde_net):
        # the output layer starts at zero (score_sde's init): small random weights make the
        # outputs, and so the samplers' work (e.g. predictor-corrector's score norms), non-trivial
        torch.nn.init.normal_(net.conv_out.weight, std=1e-3, generator=torch.Generator(device=device).manual_seed(3))
    return mr_net, cmde_net


def build_rows(args, preset: str, device: torch.device):
    """The sampler runs for one network preset, their network-only timings and analytic twins."""
    dtype = torch.float32
    mr_net, cmde_net = mr_and_cmde_networks(preset, device)
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
    options = dict(solver="sde", order=2, prediction="data", model_output="noise")
    for nfe in (5, 10, 20):
        sampler = MRSampler(mr_sde, nfe, **options)
        rows.append(
            Row(
                "MR Sampler SDE-2 data",
                "mr",
                mr_model,
                nfe,
                run=lambda sampler=sampler: sampler.sample(mr_model, mu, generator=generator()),
                analytic=lambda sampler=sampler: sampler.sample(exact_mr, analytic_mu, generator=analytic_generator()),
                mr_sampler=(mr_sde, nfe, options),
            )
        )
    rows.append(
        Row(
            "posterior sampling",
            "mr",
            mr_model,
            100,
            run=lambda: posterior_sample(mr_model, mr_sde, mu, 100, generator=generator()),
            measured_run=lambda steps: posterior_sample(mr_model, mr_sde, mu, steps, generator=generator()),
            measured_nfe=lambda steps: steps,
            analytic=lambda: posterior_sample(exact_mr, mr_sde, analytic_mu, 100, generator=analytic_generator()),
        )
    )
    rows.append(
        Row(
            "predictor-corrector (1000 steps, snr 0.15)",
            "cmde",
            cmde_model,
            2000,
            run=lambda: pc_sample(cmde_model, ve_pair, y, 1000, generator=generator()),
            measured_run=lambda steps: pc_sample(cmde_model, ve_pair, y, steps, generator=generator()),
            measured_nfe=lambda steps: 2 * steps,
            analytic=lambda: pc_sample(
                exact_ve, ve_pair.x, None, 1000, shape=(args.analytic_samples, 8), clip=None, generator=analytic_generator()
            ),
        )
    )
    ve_fast = MRSampler(ve_pair, 10, solver="sde", order=2, prediction="data", model_output="score")
    rows.append(
        Row(
            "MR Sampler SDE-2 data (VE)",
            "cmde",
            cmde_model,
            10,
            run=lambda: ve_fast.sample(
                conditioned_model(cmde_model, ve_pair, y, "fresh", generator()),
                None,
                shape=tuple(y.shape),
                generator=generator(),
                device=y.device,
            ),
            analytic=lambda: ve_fast.sample(exact_ve, None, shape=(args.analytic_samples, 8), generator=analytic_generator()),
        )
    )
    networks = {
        "mr": (lambda: mr_net(torch.cat([mu, mu], dim=1), torch.full((args.batch,), 0.5, device=device))),
        "cmde": (lambda: cmde_net(torch.cat([mu, y], dim=1), torch.full((args.batch,), 0.5, device=device))),
    }
    info = {
        "mr": sum(p.numel() for p in mr_net.parameters()),
        "cmde": sum(p.numel() for p in cmde_net.parameters()),
        "size": size,
    }
    return rows, networks, info, (mr_net, mu)


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
        row.results["error"] = per_dimension_w2(row.analytic())


def fast_variants(args, device: torch.device):
    """(label, loop, FastNetwork switches or None for the plain network) of the fast section."""
    loop = "graph" if device.type == "cuda" else "static"
    variants = [
        ("eager loop, plain network (baseline)", "eager", None),
        (f"{loop} loop, plain network", loop, None),
        (f"{loop} loop + FastNetwork defaults (channels-last, inference mode)", loop, {}),
    ]
    bf16 = bf16_unsupported(device) is None
    if bf16:
        variants.append((f"{loop} loop + FastNetwork + bf16", loop, {"bf16": True}))
    if args.compile:
        variants.append((f"{loop} loop + FastNetwork + compile", loop, {"compile": True}))
        if bf16:
            variants.append((f"{loop} loop + FastNetwork + bf16 + compile", loop, {"bf16": True, "compile": True}))
        variants.append(("compiled loop (network inside) + FastNetwork defaults", "compile", {}))
    return variants


def output_agreement(output: torch.Tensor, reference: torch.Tensor):
    """(max |difference|, PSNR in dB of output against reference, both clamped to [0, 1])."""
    output, reference = output.clamp(0, 1).double(), reference.clamp(0, 1).double()
    mse = float(((output - reference) ** 2).mean())
    return float((output - reference).abs().max()), (10 * math.log10(1 / mse) if mse > 0 else math.inf)


def timed_variant(run: Callable, device: torch.device, repeats: int):
    """(output of the first call, seconds of that first call, best of ``repeats`` later calls)."""
    synchronize(device)
    start = time.perf_counter()
    output = run()
    synchronize(device)
    first = time.perf_counter() - start
    return output, first, wall_time(run, device, repeats)[0]


def fast_rows(args, rows, mr_net, mu, device, notes):
    """The MR Sampler rows with the static loop and the fast network path against the eager loop."""
    variants = fast_variants(args, device)
    for row in rows:
        if row.mr_sampler is None:
            continue
        sde, steps, options = row.mr_sampler
        row.results["fast"] = []
        reference = None
        for label, loop, switches in tqdm(variants, desc=f"fast path NFE {steps}", leave=False):
            # a fresh copy per variant: FastNetwork converts the weights' memory format in place
            net = mr_net if switches is None else FastNetwork(copy.deepcopy(mr_net), **switches)
            sampler = MRSampler(sde, steps, loop=loop, **options)
            try:
                with torch.no_grad():
                    output, first, seconds = timed_variant(
                        lambda: sampler.sample(mr_network(net), mu, generator=torch.Generator(device).manual_seed(1)),
                        device,
                        args.repeats,
                    )
            except RuntimeError as error:  # e.g. a CUDA graph capture that fails on this machine
                notes.append(f"{label}, NFE {steps}: {error}")
                continue
            if reference is None:
                reference, baseline = output, seconds
            difference, psnr = output_agreement(output, reference)
            row.results["fast"].append(
                (label, first, seconds, baseline / seconds, torch.equal(output, reference), difference, psnr)
            )


def official_rows(args, preset: str, device: torch.device):
    """The official MR Sampler code against msdiff on the same network, x_T and noise, per batch size."""
    import compare_reference as reference  # the official code's loader and noise scripting

    sampler_module, sde_utils = reference.load_mr_sampler(args.mr_sampler_dir)
    mr_net, _ = mr_and_cmde_networks(preset, device)
    size, nfe = mr_net.image_size, args.official_nfe
    sde = MRSDE.from_irsde(reference.MAX_SIGMA, reference.T, reference.SCHEDULE, reference.EPS, "mrs")
    opt = {"sde": {"max_sigma": reference.MAX_SIGMA, "T": reference.T, "schedule": reference.SCHEDULE, "eps": reference.EPS}}
    results = []
    for batch in args.official_batches:
        g = torch.Generator().manual_seed(0)
        mu = torch.rand(batch, 3, size, size, generator=g).to(device)
        x_T = sde.prior(mu.cpu(), g).to(device)
        draws = reference.stream_draws(1, nfe, x_T)

        def official_network(x, condition, t, **context):  # IR-SDE's network signature
            return mr_net(torch.cat([x - condition, condition], dim=1), torch.full((x.shape[0],), float(t), device=x.device))

        irsde = sde_utils.IRSDE(
            max_sigma=reference.MAX_SIGMA, T=reference.T, schedule=reference.SCHEDULE, eps=reference.EPS, device=device
        )
        irsde.set_model(official_network)
        with reference.restored_class(sde_utils.IRSDE):
            official = sampler_module.MRSampler(
                irsde, opt, nfe, solver_type="sde", parameterization="data", order=2, fit_target="noise", time_schedule="linspace"
            )

            def run_official():
                with reference.scripted_noise(draws):
                    return official.sampling(mu, noisy_state=x_T)[0]

            expected, _, official_seconds = timed_variant(run_official, device, args.repeats)
        grid = torch.tensor(official.timesteps, dtype=torch.float64)
        rows = [("official MR Sampler code (float32 eager network)", None, official_seconds, 1.0, 0.0, math.inf)]
        for label, loop, switches in fast_variants(args, device):
            net = mr_net if switches is None else FastNetwork(copy.deepcopy(mr_net), **switches)
            sampler = MRSampler(
                sde, nfe, solver="sde", order=2, prediction="data", model_output="noise", timesteps=grid, loop=loop
            )
            with torch.no_grad():
                output, first, seconds = timed_variant(
                    lambda: sampler.sample(mr_network(net), mu, x_T=x_T, generator=torch.Generator().manual_seed(1)).clamp(0, 1),
                    device,
                    args.repeats,
                )
            rows.append(
                (
                    f"msdiff: {label.replace(' (baseline)', '')}",
                    first,
                    seconds,
                    official_seconds / seconds,
                    *output_agreement(output, expected),
                )
            )
        results.append((batch, rows))
    return results, reference.revision(args.mr_sampler_dir)


def profile_fast_path(args, mr_net, mu, device) -> List[Tuple[str, str]]:
    """Where the time of one MR Sampler run (NFE 10, static loop) goes, with the FastNetwork defaults and, with
    --compile, compiled: (label, torch.profiler's operators by self time) per variant."""
    sampler = MRSampler(MRSDE(50 / 255, "cosine", 0.005), 10, solver="sde", loop="graph" if device.type == "cuda" else "static")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    variants = [("FastNetwork defaults", {})] + ([("FastNetwork + compile", {"compile": True})] if args.compile else [])
    tables = []
    for label, switches in variants:
        net = FastNetwork(copy.deepcopy(mr_net), **switches)
        run = lambda: sampler.sample(mr_network(net), mu, generator=torch.Generator(device).manual_seed(1))  # noqa: E731
        run()
        with torch.profiler.profile(activities=activities) as profile:
            run()
            synchronize(device)
        tables.append((label, profile.key_averages().table(sort_by=key, row_limit=20)))
    return tables


def graph_network_time(args, rows, networks, device):
    """The network alone, NFE calls captured as one CUDA graph: the floor under the graphed loop."""
    for row in rows:
        if row.mr_sampler is None:
            continue
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            for _ in range(row.nfe):
                networks[row.network]()
        row.results["graph_network"] = wall_time(graph.replay, device, args.repeats)[0]


def report(args, device, per_preset, seconds):
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    lines = [
        f"# End-to-end sampling, {device.type}",
        "",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} CPU threads, device {device}{gpu}; torch {torch.__version__}.",
        f"Date: {datetime.date.today().isoformat()}. Wall time of the benchmark {seconds:.0f} s; load average at the end {os.getloadavg()[0]:.2f}.",
        f"Command: `{command_line(args)}`",
        "",
        f"Batch {args.batch} (official section: batches {', '.join(map(str, args.official_batches))}), float32 unless a row says otherwise, "
        f"randomly initialised networks, best of {args.repeats} timed runs after a warm-up (one run above 200 NFE). "
        f"Runs above {args.max_measured_nfe} NFE are timed on a shorter run of the same sampler and extrapolated linearly in NFE. "
        '"outside network": the share of the wall time spent outside the network\'s calls, timed inside the same run. Analytic error: the same sampler with the exact '
        f"denoiser of N({DATA_MEAN}, {DATA_STD}^2) data ({args.analytic_samples} samples x 8 dimensions), per-dimension "
        "Gaussian W2 to the data (0 is exact; the Monte-Carlo floor at this size is about "
        f"{1.25 * DATA_STD / math.sqrt(args.analytic_samples):.1e}). First call: the warm-up call's time (torch.compile compiles then; "
        "a CUDA graph is captured then). PSNR: of the row's output against the reference output (eager loop or official code), both "
        "clamped to [0, 1]; inf means identical.",
        "",
    ]
    for preset, (rows, info, notes, official, profile) in per_preset.items():
        lines += [
            f"## {preset} ({info['size']}x{info['size']}; mr network {info['mr'] / 1e6:.2f}M parameters, cmde {info['cmde'] / 1e6:.2f}M)",
            "",
        ]
        if rows and "time" in rows[0].results:
            pc = next(r for r in rows if r.nfe == 2000).results["time"]
            posterior = next(r for r in rows if r.nfe == 100).results["time"]
            lines += [
                "Network time per call, measured inside the runs: "
                + ", ".join(f"{row.label} NFE {row.nfe}: {1e3 * row.results['network'] / row.nfe:.1f} ms" for row in rows)
                + ".",
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
            lines.append("")
        fast = [row for row in rows if row.results.get("fast")]
        if fast:
            lines += [
                f"Fast path (MR Sampler SDE-2 data, batch {args.batch}): MRSampler(loop=...) and models.FastNetwork against MRSampler.sample "
                "with the plain float32 network; same generator seed.",
                "",
                "| NFE | variant | first call (s) | wall time (s) | speed-up | identical | max abs diff | PSNR vs eager (dB) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in fast:
                for label, first, wall, speedup, identical, difference, psnr in row.results["fast"]:
                    lines.append(
                        f"| {row.nfe} | {label} | {first:.3f} | {wall:.3f} | {speedup:.2f}x | {'yes' if identical else 'no'} | {difference:.1e} | {psnr:.1f} |"
                    )
                if "graph_network" in row.results:
                    lines.append(
                        f"| {row.nfe} | the network alone, {row.nfe} calls as one CUDA graph (floor) | | {row.results['graph_network']:.3f} | | | | |"
                    )
            lines.append("")
        if official is not None:
            results, revision = official
            lines += [
                f"Against the official MR Sampler code (grrrute/mr-sampler {revision}), SDE-2 data prediction, NFE {args.official_nfe}, "
                "official linspace grid, same network, x_T and noise:",
                "",
                "| batch | code | first call (s) | wall time (s) | per image (s) | official / row | max abs diff vs official | PSNR vs official (dB) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for batch, official_rows_ in results:
                for label, first, wall, ratio, difference, psnr in official_rows_:
                    first_text = "" if first is None else f"{first:.3f}"
                    lines.append(
                        f"| {batch} | {label} | {first_text} | {wall:.3f} | {wall / batch:.3f} | {ratio:.2f}x | {difference:.1e} | {psnr:.1f} |"
                    )
            lines.append("")
        for label, table in profile or []:
            lines += [
                f"Profile of one fast-path run (NFE 10, static loop, {label}), operators by self time:",
                "",
                "```",
                table,
                "```",
                "",
            ]
        lines += [f"- {note}" for note in notes] + [""]
    out = args.out_dir / f"end_to_end_{device.type}.md"
    out.write_text("\n".join(lines))
    return out


def command_line(args) -> str:
    """The command that reproduces this run, the official code's checkout named where it came from the environment."""
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    if "official" in args.sections and "--mr-sampler-dir" not in sys.argv:
        command = "MR_SAMPLER_DIR=<checkout of grrrute/mr-sampler> " + command
    return command


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the static loop as a CUDA graph)")
    parser.add_argument("--presets", nargs="+", default=["celeba_sr_x8_160", "tiny"])
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=None, help="default: all (official only with --mr-sampler-dir)"
    )
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 1 on CPU, 16 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row, best kept (default 2 on CPU, 5 on CUDA)")
    parser.add_argument(
        "--max-measured-nfe", type=int, default=None, help="longer runs are extrapolated (default 20 on CPU, 2000 on CUDA)"
    )
    parser.add_argument("--analytic-samples", type=int, default=4096)
    parser.add_argument(
        "--compile", action="store_true", help="add the torch.compile variants (the first call compiles for minutes on a CPU)"
    )
    parser.add_argument(
        "--mr-sampler-dir",
        type=Path,
        default=os.environ.get("MR_SAMPLER_DIR"),
        help="checkout of grrrute/mr-sampler (env MR_SAMPLER_DIR)",
    )
    parser.add_argument("--official-nfe", type=int, default=10)
    parser.add_argument("--official-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table of one fast-path run per preset")
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
    if args.sections is None:
        args.sections = [s for s in SECTIONS if s != "official" or args.mr_sampler_dir]
    if "official" in args.sections and (args.mr_sampler_dir is None or not Path(args.mr_sampler_dir).is_dir()):
        parser.error(
            f"--sections official: expected a checkout of grrrute/mr-sampler in --mr-sampler-dir or MR_SAMPLER_DIR, got {args.mr_sampler_dir}"
        )
    if min(args.batch, args.repeats, args.max_measured_nfe, args.analytic_samples, args.official_nfe, *args.official_batches) < 1:
        parser.error(
            "--batch, --repeats, --max-measured-nfe, --analytic-samples, --official-nfe, --official-batches: expected positive integers"
        )
    return args, device


def main():
    args, device = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if "official" in args.sections:
        import compare_reference

        compare_reference.prepare_imports()
    per_preset = {}
    for preset in args.presets:
        rows, networks, info, (mr_net, mu) = build_rows(args, preset, device)
        notes = []
        if "samplers" in args.sections:
            with torch.no_grad():
                time_rows(args, rows, device)
                analytic_errors(rows)
        if "fast" in args.sections:
            fast_rows(args, rows, mr_net, mu, device, notes)
            if device.type == "cuda":
                graph_network_time(args, rows, networks, device)
        official = official_rows(args, preset, device) if "official" in args.sections else None
        profile = profile_fast_path(args, mr_net, mu, device) if args.profile else None
        per_preset[preset] = (rows, info, notes, official, profile)
    out = report(args, device, per_preset, time.perf_counter() - start)
    print(out.read_text())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
