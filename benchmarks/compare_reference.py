"""msdiff_fast's samplers beside the reference implementations, on the same exact model.

Point the script at local checkouts of the reference code (never vendored, never committed):

    MR_SAMPLER_DIR=/path/to/mr-sampler IRSDE_DIR=/path/to/image-restoration-sde \\
    DACLIP_DIR=/path/to/daclip-uir python benchmarks/compare_reference.py

(or --mr-sampler-dir / --irsde-dir / --daclip-dir; any subset). For each source it runs the
official sampler and ours on the same schedule, the same x_T and the same exact denoiser of a
finite data set (msdiff_fast.testing.FiniteData: known score, so no training), with the same
Gaussian noise for the stochastic samplers, and reports the largest output difference, the wall
time per sample and the NFE. Results go to benchmarks/results/compare_reference.md.

Workarounds for the reference code, applied here without touching its files:
- numpy >= 1.24 removed ``np.int`` (used in an annotation of utils/sampler.py): ``numpy.int = int``
  before the import.
- utils/sampler.py inserts a hard-coded /mnt/... path and imports ``utils.sde_utils``; the
  ``utils`` package's __init__ imports every helper (cv2, lpips, ...). A bare ``utils`` package
  pointing at the checkout's utils/ folder is registered instead, so only sde_utils and sampler
  load. The two IR-SDE-style repositories both call the module ``utils.sde_utils``; each is
  loaded from its file under its own name.
- torchvision (sde_utils imports torchvision.utils for save_image) and cv2 (sampler.py) are
  stubbed with empty modules when they are not installed: the samplers never call them here.
- Constructing the official MRSampler replaces IRSDE.alpha, .sigma, .score_fn and .prior_sample
  on the class, for every IRSDE in the process; the script restores them after each run.
- The official samplers draw noise with torch.randn_like; during their runs it is replaced by a
  function returning, in order, the draws msdiff_fast's counter-based stream makes for the same
  steps (negated for IRSDE.reverse_sde, which subtracts its dispersion term).
- tqdm bars of the reference loops are silenced (their modules' ``tqdm`` name is rebound).
"""

import argparse
import contextlib
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msdiff_fast import MRSampler, euler_maruyama, posterior_sample, probability_flow_euler  # noqa: E402
from msdiff_fast.compat import DropInMRSampler  # noqa: E402
from msdiff_fast.ops import philox_normal  # noqa: E402
from msdiff_fast.samplers.loop import seed_from  # noqa: E402
from msdiff_fast.sde import MRSDE  # noqa: E402
from msdiff_fast.testing import FiniteData  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_SIGMA, T, SCHEDULE, EPS = 50, 100, "cosine", 0.005


def revision(root: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        marker = root / "REVISION"
        return marker.read_text().strip() if marker.exists() else "unknown revision"


def stub_missing(name: str, attributes: dict) -> None:
    if importlib.util.find_spec(name.split(".")[0]) is not None:
        return
    parent = None
    for depth, part in enumerate(name.split(".")):
        full = ".".join(name.split(".")[: depth + 1])
        module = sys.modules.setdefault(full, types.ModuleType(full))
        if parent is not None:
            setattr(parent, part, module)
        parent = module
    for key, value in attributes.items():
        setattr(parent, key, value)


def load_file(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    module.tqdm = lambda iterable=None, *args, **kwargs: iterable if iterable is not None else _NoBar()
    return module


class _NoBar:
    def update(self, *args):
        pass

    def refresh(self):
        pass

    def close(self):
        pass


def prepare_imports() -> None:
    numpy.int = int
    stub_missing("torchvision.utils", {"save_image": lambda *args, **kwargs: None})
    stub_missing("cv2", {})


def load_mr_sampler(root: Path):
    code = root / "universal-image-restoration"
    if not (code / "utils" / "sampler.py").exists():
        raise FileNotFoundError(
            f"MR_SAMPLER_DIR: expected a checkout of grrrute/mr-sampler with universal-image-restoration/utils/sampler.py, got {root}"
        )
    package = types.ModuleType("utils")
    package.__path__ = [str(code / "utils")]
    sys.modules["utils"] = package
    sde_utils = load_file("utils.sde_utils", code / "utils" / "sde_utils.py")
    sampler = load_file("mr_sampler_official", code / "utils" / "sampler.py")
    return sampler, sde_utils


def load_sde_utils(root: Path, candidates, module_name: str):
    for relative in candidates:
        if (root / relative).exists():
            return load_file(module_name, root / relative)
    raise FileNotFoundError(f"expected one of {candidates} under {root}")


@contextlib.contextmanager
def restored_class(cls, names=("alpha", "sigma", "score_fn", "prior_sample")):
    saved = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(cls, name, saved[name])
            elif name in cls.__dict__:
                delattr(cls, name)


@contextlib.contextmanager
def scripted_noise(draws, sign=1.0):
    """torch.randn_like returns draws[0], draws[1], ... (times sign) while the block runs."""
    original = torch.randn_like
    queue = list(draws)

    def next_draw(like, *args, **kwargs):
        if not queue:
            raise RuntimeError("the reference sampler drew more noise than the matching msdiff_fast run")
        z = queue.pop(0)
        return (sign * z).to(device=like.device, dtype=like.dtype)

    torch.randn_like = next_draw
    try:
        yield queue
    finally:
        torch.randn_like = original


def stream_draws(generator_seed: int, steps: int, like: torch.Tensor):
    """The normals msdiff_fast's samplers inject at steps 0..steps-1 with a generator seeded so."""
    seed = seed_from(torch.Generator().manual_seed(generator_seed))
    n = like.numel()
    return [philox_normal(seed, i * n, n, device=like.device, dtype=torch.float32).view(like.shape) for i in range(steps)]


def timed(function, repeats: int):
    result = function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return result, best


class Problem:
    """FiniteData x0 in [0, 1]^(C, H, W), one mu, one x_T = mu + lam_inf z, on a schedule."""

    def __init__(self, convention: str, batch: int, shape, device: torch.device):
        g = torch.Generator().manual_seed(0)
        self.sde = MRSDE.from_irsde(MAX_SIGMA, T, SCHEDULE, EPS, convention)
        self.data = FiniteData(torch.rand(8, *shape, generator=g, dtype=torch.float64))
        self.mu = torch.rand(batch, *shape, generator=g).to(device)
        self.x_T = (self.mu.cpu() + self.sde.lam_inf * torch.randn(batch, *shape, generator=g)).to(device)
        self.exact = {kind: self.data.denoiser(self.sde, kind) for kind in ("noise", "data", "velocity")}

    def network(self, kind: str = "noise"):
        """The exact model with IR-SDE's network signature net(x_t, mu, t, **context)."""
        exact = self.exact[kind]

        def net(x, mu, t, **context):
            t = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
            return exact(x, t, mu)

        return net


def row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def ms(seconds: float, batch: int) -> str:
    return f"{1e3 * seconds / batch:.2f}"


def compare_mr_sampler(args, device, lines):
    sampler_module, sde_utils = load_mr_sampler(args.mr_sampler_dir)
    problem = Problem("mrs", args.batch, args.shape, device)
    opt = {"sde": {"max_sigma": MAX_SIGMA, "T": T, "schedule": SCHEDULE, "eps": EPS}}
    lines += [
        f"## Official MR Sampler (grrrute/mr-sampler {revision(args.mr_sampler_dir)})",
        "",
        f"Schedule: IR-SDE cosine, max_sigma {MAX_SIGMA}, T {T}, eps {EPS}, the official code's thetabar convention "
        '(`MRSDE.from_irsde(..., convention="mrs")`); network: the exact noise-predicting denoiser (fit_target "noise", '
        "DA-CLIP's) of 8 points in [0, 1]^" + "x".join(map(str, args.shape)) + f"; batch {args.batch}; float32.",
        "Columns: max |official - DropInMRSampler| (our drop-in class, its own float64 time grid); max |official - MRSampler| "
        "(msdiff_fast.MRSampler on the official float32 time grid, lower_order_final=True); ms per sample (best of "
        f"{args.repeats}). Stochastic solvers get the same noise in both codes.",
        "",
        row(
            [
                "solver",
                "order",
                "prediction",
                "time_schedule",
                "NFE",
                "max diff drop-in",
                "max diff MRSampler",
                "official ms",
                "drop-in ms",
                "MRSampler ms",
            ]
        ),
        row(["---"] * 10),
    ]
    worst = {}
    for solver, orders in (("ode", (1, 2, 3)), ("sde", (1, 2))):
        for order in orders:
            for prediction in ("data", "noise"):
                for schedule in args.time_schedules:
                    for nfe in args.nfe:
                        irsde = sde_utils.IRSDE(max_sigma=MAX_SIGMA, T=T, schedule=SCHEDULE, eps=EPS, device=device)
                        irsde.set_model(problem.network("noise"))
                        options = dict(
                            solver_type=solver,
                            parameterization=prediction,
                            order=order,
                            fit_target="noise",
                            time_schedule=schedule,
                        )
                        draws = stream_draws(1, nfe, problem.x_T) if solver == "sde" else []
                        with restored_class(sde_utils.IRSDE):
                            official = sampler_module.MRSampler(irsde, opt, nfe, **options)

                            def run_official():
                                with scripted_noise(draws):
                                    return official.sampling(problem.mu, noisy_state=problem.x_T)[0]

                            reference, official_time = timed(run_official, args.repeats)
                        drop_in = DropInMRSampler(irsde, opt, nfe, **options)

                        def run_drop_in():
                            # the drop-in draws its noise seed from torch's default generator
                            torch.manual_seed(1)
                            return drop_in.sampling(problem.mu, noisy_state=problem.x_T)[0]

                        ours_drop_in, drop_in_time = timed(run_drop_in, args.repeats)
                        native = MRSampler(
                            problem.sde,
                            nfe,
                            solver=solver,
                            order=order,
                            prediction=prediction,
                            model_output="noise",
                            timesteps=torch.tensor(official.timesteps, dtype=torch.float64),
                        )
                        ours_native, native_time = timed(
                            lambda: native.sample(
                                problem.exact["noise"], problem.mu, x_T=problem.x_T, generator=torch.Generator().manual_seed(1)
                            ).clamp(0, 1),
                            args.repeats,
                        )
                        d_drop_in = float((reference - ours_drop_in).abs().max())
                        d_native = float((reference - ours_native).abs().max())
                        key = (solver, order, prediction)
                        worst[key] = max(worst.get(key, (0, 0)), (d_drop_in, d_native))
                        lines.append(
                            row(
                                [
                                    solver.upper(),
                                    order,
                                    prediction,
                                    schedule,
                                    nfe,
                                    f"{d_drop_in:.2e}",
                                    f"{d_native:.2e}",
                                    ms(official_time, args.batch),
                                    ms(drop_in_time, args.batch),
                                    ms(native_time, args.batch),
                                ]
                            )
                        )
                        print(lines[-1], flush=True)
    lines.append("")
    return worst


def compare_irsde(args, root: Path, label: str, candidates, device, lines):
    module = load_sde_utils(root, candidates, f"reference_sde_utils_{label.replace('-', '_')}")
    problem = Problem("irsde", args.batch, args.shape, device)
    sde = module.IRSDE(max_sigma=MAX_SIGMA, T=T, schedule=SCHEDULE, eps=EPS, device=device)
    sde.set_model(problem.network("noise"))
    sde.set_mu(problem.mu)
    grid = torch.arange(T, -1, -1, dtype=torch.float64)
    generator = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    runs = [
        (
            "posterior (IR-SDE optimal posterior)",
            lambda: sde.reverse_posterior(problem.x_T),
            1.0,
            lambda: posterior_sample(
                problem.exact["noise"], problem.sde, problem.mu, T, timesteps=grid, x_T=problem.x_T, generator=generator()
            ),
        ),
        (
            "posterior vs MRSampler SDE-1 data",
            lambda: sde.reverse_posterior(problem.x_T),
            1.0,
            lambda: MRSampler(problem.sde, T, solver="sde", order=1, prediction="data", timesteps=grid).sample(
                problem.exact["noise"], problem.mu, x_T=problem.x_T, generator=generator()
            ),
        ),
        (
            "Euler-Maruyama (reverse_sde)",
            lambda: sde.reverse_sde(problem.x_T),
            -1.0,
            lambda: euler_maruyama(
                problem.exact["noise"], problem.sde, problem.mu, T, timesteps=grid, x_T=problem.x_T, generator=generator()
            ),
        ),
        (
            "probability-flow Euler (reverse_ode)",
            lambda: sde.reverse_ode(problem.x_T),
            1.0,
            lambda: probability_flow_euler(
                problem.exact["noise"], problem.sde, problem.mu, T, timesteps=grid, x_T=problem.x_T, generator=generator()
            ),
        ),
    ]
    lines += [
        f"## {label} sde_utils.IRSDE ({revision(root)})",
        "",
        f"Schedule: IR-SDE cosine, max_sigma {MAX_SIGMA}, T {T}, eps {EPS}, IR-SDE's training convention "
        '(`convention="irsde"`, thetabar_0 = 0); every sampler takes one grid index per step (NFE 100); same network, x_T and noise.',
        "",
        row(["reference sampler", "NFE", "max diff", "reference ms", "msdiff_fast ms"]),
        row(["---"] * 5),
    ]
    worst = 0.0
    draws = stream_draws(2, T, problem.x_T)
    for name, reference_run, sign, ours_run in runs:

        def run_reference():
            with scripted_noise(draws, sign):
                return reference_run()

        reference, reference_time = timed(run_reference, args.repeats)
        ours, ours_time = timed(ours_run, args.repeats)
        difference = float((reference - ours).abs().max())
        worst = max(worst, difference)
        lines.append(row([name, T, f"{difference:.2e}", ms(reference_time, args.batch), ms(ours_time, args.batch)]))
        print(lines[-1], flush=True)
    lines.append("")
    return worst


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mr-sampler-dir",
        type=Path,
        default=os.environ.get("MR_SAMPLER_DIR"),
        help="checkout of grrrute/mr-sampler (env MR_SAMPLER_DIR)",
    )
    parser.add_argument(
        "--irsde-dir",
        type=Path,
        default=os.environ.get("IRSDE_DIR"),
        help="checkout of Algolzw/image-restoration-sde (env IRSDE_DIR)",
    )
    parser.add_argument(
        "--daclip-dir", type=Path, default=os.environ.get("DACLIP_DIR"), help="checkout of Algolzw/daclip-uir (env DACLIP_DIR)"
    )
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--time-schedules", nargs="+", default=["linear-lambda", "linspace"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 16, 16], metavar=("C", "H", "W"))
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "compare_reference.md")
    args = parser.parse_args()
    if not (args.mr_sampler_dir or args.irsde_dir or args.daclip_dir):
        parser.error("point at least one reference checkout: MR_SAMPLER_DIR, IRSDE_DIR or DACLIP_DIR (or the --*-dir flags)")
    for name in ("mr_sampler_dir", "irsde_dir", "daclip_dir"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_dir():
            parser.error(f"--{name.replace('_', '-')}: expected a directory, got {path}")
    if args.batch < 1 or any(n < 1 for n in args.nfe) or args.repeats < 1:
        parser.error(f"--batch, --nfe, --repeats: expected positive integers, got {args.batch}, {args.nfe}, {args.repeats}")
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    prepare_imports()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    lines = [
        "# msdiff_fast vs the reference implementations",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"; torch {torch.__version__}, numpy {numpy.__version__}.",
        f"Date: {datetime.date.today().isoformat()}.",
        "Command: `"
        + " ".join(["python"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
        + "` with "
        + ", ".join(
            f"{k}={v}"
            for k, v in (("MR_SAMPLER_DIR", args.mr_sampler_dir), ("IRSDE_DIR", args.irsde_dir), ("DACLIP_DIR", args.daclip_dir))
            if v
        )
        + ".",
        "",
    ]
    summary = []
    if args.mr_sampler_dir:
        worst = compare_mr_sampler(args, device, lines)
        summary.append(("MR Sampler", worst))
    for label, root, candidates in (
        ("image-restoration-sde", args.irsde_dir, ["codes/utils/sde_utils.py"]),
        ("daclip-uir", args.daclip_dir, ["universal-image-restoration/utils/sde_utils.py"]),
    ):
        if root:
            summary.append((label, compare_irsde(args, Path(root), label, candidates, device, lines)))
    if args.mr_sampler_dir:
        lines += [
            "## Why the MR Sampler outputs differ where they do",
            "",
            "- ODE-1 and ODE-2, both predictions: float32 rounding (the official code evaluates its schedule "
            "and time grid in float32, msdiff_fast in float64).",
            "- The MRSampler column at NFE 5 (fewer than 10 steps): msdiff_fast's lower_order_final lowers the "
            "order of the last steps; the official code lowers steps j < M to min(order, M - j) and runs the "
            "final step M at full order again. DropInMRSampler reproduces the official rule.",
            "- ODE-3: the official third-order step (like DPM-Solver's multistep 3M) weights "
            "D2 = (D1_0 - D1_1) / (r0 + r1) by phi3; Taylor-expanding the data prediction in lam gives "
            "D2 = h^2 q''/2 + O(h^3), whose exact weight is 2 phi3, which msdiff_fast uses. With phi3 the "
            "step is second order (see sampler_accuracy.md for msdiff_fast's measured ODE-3 order).",
            "- SDE with data prediction, off the integer grid: the official step weights mu by "
            "1 - (alpha_t / alpha_s) e^-2h - alpha_t phi1, msdiff_fast by 1 - (sigma_t / sigma_s) e^-h - alpha_t phi1 "
            "(the update's weights then sum to 1, so x = mu stays a fixed point). The two are equal where "
            "lam = log(alpha / sigma), i.e. at integer t: the linspace rows, all on the grid, agree to float32 "
            "rounding; between grid points the schedule interpolates lam separately from alpha and sigma and "
            "they drift apart (linear-lambda rows).",
            "- SDE with noise prediction: the noise variance sigma_t^2 (e^2h - 1) amplifies float32 rounding at "
            "low NFE (the unstable solver of the paper); with the official order rule the outputs agree to "
            "1e-4 or better.",
            "- Wall time: the exact model is cheap, so these timings measure the per-step host overhead; "
            "msdiff_fast.MRSampler evaluates its float64 schedule at every step (8 interpolations of "
            "MRSDE.from_irsde per step), dispatches a custom op and checks every step for NaN.",
            "",
        ]
    lines += ["## Largest differences", ""]
    for label, worst in summary:
        if isinstance(worst, dict):
            for (solver, order, prediction), (d_drop_in, d_native) in worst.items():
                lines.append(
                    f"- {label} {solver.upper()}-{order} {prediction} prediction: drop-in {d_drop_in:.2e}, MRSampler {d_native:.2e}"
                )
        else:
            lines.append(f"- {label}: {worst:.2e}")
    lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
