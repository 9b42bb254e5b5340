"""``msdiff demo``: the whole system on a CPU in about fifteen minutes.

Trains two small conditional models on synthetic images (no download): a CMDE super-resolution
model and a mean-reverting denoising model, both with the tiny U-Net. Then restores held-out
images with the fast MR Sampler solvers at several NFEs and with the reference samplers
(predictor-corrector for the VE model, posterior sampling for the mean-reverting one), measures
PSNR, SSIM, consistency, diversity and a SmallFeatureNet FID, times every sampler, and writes
report.md, metrics.json, samples.png and nfe_curve.png. Every random draw is seeded, so the same
command on the same machine (same thread count) reproduces the numbers.
"""

import dataclasses
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

from .cli import (METRIC_LABELS, CLIError, ModelSpec, SamplerSpec, consistency_operator, cpu_model, format_number, image_metrics,
                  markdown_table, restore_batch, write_json)

USUAL_NFE = {"pc": 2000, "posterior": 100}


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo runs. ``full()`` fits about 15 minutes on 2 CPU cores, ``quick()`` under 2.

    16x16 images: on a CPU the budget buys four times more training steps than at 32x32, and the
    models need every one of them."""

    is_quick: bool
    image_size: int
    train_steps: int
    batch_size: int
    lr: float
    warmup: int
    train_images: int
    test_images: int
    nfe: Tuple[int, ...]
    samples_per_input: int
    pc_nfe: int
    posterior_nfe: int
    sr_scale: int = 2
    noise_sigma: float = 25.0
    seed: int = 0

    @classmethod
    def full(cls) -> "DemoSettings":
        return cls(is_quick=False, image_size=16, train_steps=2500, batch_size=16, lr=1e-3, warmup=100, train_images=4096,
                   test_images=16, nfe=(5, 10, 20), samples_per_input=4, pc_nfe=2000, posterior_nfe=100)

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(is_quick=True, image_size=16, train_steps=20, batch_size=4, lr=1e-3, warmup=5, train_images=64,
                   test_images=2, nfe=(5, 10, 20), samples_per_input=2, pc_nfe=10, posterior_nfe=5)

    def replace(self, **changes) -> "DemoSettings":
        settings = dataclasses.replace(self, **changes)
        settings.check()
        return settings

    def check(self) -> None:
        for name in ("train_steps", "batch_size", "train_images", "test_images", "posterior_nfe", "samples_per_input"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.image_size, int) or self.image_size < 12 or self.image_size % 4:
            raise ValueError(f"--image-size: expected a multiple of 4 >= 12 (SSIM needs 11 pixels), got {self.image_size!r}")
        if self.image_size % (2 * self.sr_scale):
            raise ValueError(f"--image-size: expected a multiple of {2 * self.sr_scale} for x{self.sr_scale} super-resolution, got {self.image_size}")
        if not self.nfe or any(not isinstance(n, int) or n < 1 for n in self.nfe):
            raise ValueError(f"--nfe: expected integers >= 1, got {list(self.nfe)}")
        if not isinstance(self.pc_nfe, int) or self.pc_nfe < 2 or self.pc_nfe % 2:
            raise ValueError(f"--pc-nfe: expected an even integer >= 2 (2 network calls per step), got {self.pc_nfe!r}")
        if self.test_images < 2:
            raise ValueError(f"--test-images: expected at least 2 (FID needs two), got {self.test_images}")


@dataclasses.dataclass
class DemoModel:
    key: str
    title: str
    spec: ModelSpec
    fast: Tuple[SamplerSpec, ...]
    reference: SamplerSpec
    baseline: str  # what the "input" row is


def demo_models(settings: DemoSettings) -> List[DemoModel]:
    size, scale = settings.image_size, settings.sr_scale
    # EDM preconditioning (sigma_data): the paper's plain noise prediction turns a network error e
    # into an image error sigma e, and sigma reaches sqrt(D_x) = 28 here; after minutes of training
    # such a model gets the layout of the condition but not its colours (PSNR ~10 dB vs 33 for
    # bicubic in an earlier run of this demo). The loss and the samplers are the same.
    sr = ModelSpec("sr", {"scale": scale}, "cmde", {"sigma_y_max": 0.5, "sigma_data": 0.5}, "tiny", size, 3)
    # The network predicts the clean image ("data" target): a noise-predicting network's x0 estimate
    # near t = T is (x_t - mu - sigma eps) / alpha with alpha_T = 0.005, which multiplies its error
    # by 40 and more, far too much for a model trained for minutes (DA-CLIP trains for days).
    denoise = ModelSpec("denoise", {"noise_sigma": settings.noise_sigma}, "mr", {"lam_inf": 50.0 / 255.0, "target": "data"}, "tiny", size, 3)
    fast = ("mr-sde", "mr-ode")
    return [
        DemoModel("sr", f"super-resolution x{scale}, CMDE (VE SDE, sigma_y_max 0.5, EDM preconditioning)", sr,
                  tuple(SamplerSpec(name, nfe) for name in fast for nfe in settings.nfe), SamplerSpec("pc", settings.pc_nfe),
                  "bicubic upsampling of the low-resolution input"),
        DemoModel("denoise", f"denoising, Gaussian noise sigma {settings.noise_sigma:g}/255, mean-reverting SDE (lam_inf 50/255, data prediction)", denoise,
                  tuple(SamplerSpec(name, nfe) for name in fast for nfe in settings.nfe), SamplerSpec("posterior", settings.posterior_nfe),
                  "the noisy input"),
    ]


def _log(message: str) -> None:
    print(f"[msdiff demo] {message}", file=sys.stderr, flush=True)


def _train(model: DemoModel, settings: DemoSettings, out: Path, device: torch.device, progress: bool, bar: bool) -> Dict:
    """Train one model into out/runs/<key>. bar: a tqdm bar (one process) or a log line every tenth of the run."""
    from .training import ConditionalPairs, SyntheticImages
    from .training.checkpoint import latest_checkpoint
    from .training.trainer import TrainConfig, Trainer

    spec = model.spec
    run_dir = out / "runs" / model.key
    if latest_checkpoint(run_dir) is not None:
        raise CLIError(f"--out {out}: {run_dir} holds a run of an earlier demo; choose an empty --out")
    images = SyntheticImages(settings.train_images, spec.image_size, spec.channels, seed=settings.seed)
    dataset = ConditionalPairs(images, spec.degradation(), seed=settings.seed)
    network = spec.network(seed=settings.seed)
    estimator = spec.build_estimator()
    report_every = max(1, settings.train_steps // 10)
    config = TrainConfig(steps=settings.train_steps, batch_size=settings.batch_size, lr=settings.lr, warmup=settings.warmup,
                         ema_decay=0.999, seed=settings.seed, log_every=max(1, min(50, settings.train_steps)), checkpoint_every=0,
                         keep_checkpoints=1, out_dir=str(run_dir), device=str(device), progress=progress and bar,
                         preview_every=0 if bar or not progress else report_every)

    def report(trainer, step: int) -> None:
        loss = trainer.last_metrics.get("loss")
        _log(f"{model.key}: step {step}/{settings.train_steps}, loss {format_number(loss, 4)}, {trainer.seconds:.0f} s")

    torch.manual_seed(settings.seed)
    trainer = Trainer(network, estimator, dataset, config, preview=report, description=spec.description())
    try:
        trainer.fit()
    finally:
        trainer.close()
    info = {"parameters": sum(p.numel() for p in network.parameters()), "seconds": trainer.seconds,
            "loss": trainer.last_metrics.get("loss"), "checkpoint": str(latest_checkpoint(run_dir))}
    return {"network": trainer.ema, "estimator": trainer.estimator, "info": info}


def _test_pairs(model: DemoModel, settings: DemoSettings) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean x, condition y, baseline) of the held-out images: a seed the training set never uses."""
    from .training import SyntheticImages

    spec = model.spec
    images = SyntheticImages(settings.test_images, spec.image_size, spec.channels, seed=settings.seed + 1_000_003)
    clean = torch.stack([images[i] for i in range(len(images))])
    condition = spec.degradation()(clean, generator=torch.Generator().manual_seed(settings.seed + 7))
    if spec.task == "sr":
        scale = spec.task_options["scale"]
        small = F.interpolate(clean, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        baseline = F.interpolate(small, size=clean.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    else:
        baseline = condition
    return clean, condition, baseline


def _sample_many(trained: Dict, condition: torch.Tensor, sampler: SamplerSpec, copies: int, seed: int, device: torch.device) -> Tuple[torch.Tensor, float]:
    """``copies`` samples of every condition in one batch: [copies, B, C, H, W] and the seconds taken."""
    batch = condition.repeat(copies, 1, 1, 1).to(device)
    generator = torch.Generator().manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    samples = restore_batch(trained["network"], trained["estimator"], batch, sampler, generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return samples.cpu().reshape(copies, *condition.shape), seconds


def _evaluate_model(model: DemoModel, trained: Dict, settings: DemoSettings, device: torch.device, progress: bool) -> Dict:
    from tqdm.auto import tqdm

    from .metrics import SmallFeatureNet

    clean, condition, baseline = _test_pairs(model, settings)
    operator = consistency_operator(model.spec.task, model.spec.task_options)
    feature_net = SmallFeatureNet(model.spec.channels)
    rows = [{"sampler": "input", "label": f"input ({model.baseline})", "nfe": 0, "seconds_per_image": None, "samples_per_input": 1,
             **image_metrics(baseline[None], clean, operator, feature_net)}]
    examples = {"condition": condition, "truth": clean}
    runs = [(sampler, settings.samples_per_input) for sampler in model.fast] + [(model.reference, 1)]
    for index, (sampler, copies) in enumerate(tqdm(runs, desc=f"sample {model.key}", unit="sampler", disable=not progress)):
        samples, seconds = _sample_many(trained, condition, sampler, copies, settings.seed + 100 + index, device)
        if not torch.isfinite(samples).all():
            raise FloatingPointError(f"{sampler.label} at NFE {sampler.nfe} produced non-finite samples")
        metrics = image_metrics(samples, clean, operator, feature_net)
        rows.append({"sampler": sampler.name, "label": sampler.label, "nfe": sampler.nfe, "order": sampler.order, "prediction": sampler.prediction,
                     "seconds": seconds, "seconds_per_image": seconds / (copies * clean.shape[0]), "samples_per_input": copies, **metrics})
        if sampler == model.reference or (sampler.name == model.fast[0].name and sampler.nfe == _middle(settings.nfe)):
            examples[f"{sampler.name} NFE {sampler.nfe}"] = samples[0]
    reference_time = rows[-1]["seconds_per_image"]
    for row in rows[1:]:
        row["speedup_vs_reference"] = reference_time / row["seconds_per_image"]
    return {"rows": rows, "examples": examples}


def _middle(nfes: Tuple[int, ...]) -> int:
    ordered = sorted(nfes)
    return ordered[len(ordered) // 2]


def _strip(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [H, B * (W + pad) - pad, 3] for imshow, white gaps."""
    images = images.float().clamp(0, 1)
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    parts = []
    for i, image in enumerate(images):
        parts.append(image)
        if i < images.shape[0] - 1:
            parts.append(torch.ones(3, image.shape[1], pad))
    return torch.cat(parts, dim=2).permute(1, 2, 0).numpy()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("msdiff demo draws its figures with matplotlib: pip install matplotlib") from None
    return plt


def _samples_figure(path: Path, models: List[DemoModel], results: Dict, columns: int) -> None:
    plt = _pyplot()
    rows = []
    for model in models:
        examples = results[model.key]["examples"]
        for name, images in examples.items():
            if name == "truth":
                continue
            label = "condition" if name == "condition" else name
            rows.append((f"{model.key}: {label}", images[:columns]))
        rows.append((f"{model.key}: ground truth", examples["truth"][:columns]))
    width = 1.1 * columns
    figure, axes = plt.subplots(len(rows), 1, figsize=(width + 2.4, 1.15 * len(rows) + 0.5), squeeze=False)
    for axis, (label, images) in zip(axes[:, 0], rows):
        axis.imshow(_strip(images), interpolation="nearest")
        axis.set_axis_off()
        axis.text(-0.03, 0.5, label, transform=axis.transAxes, ha="right", va="center", fontsize=8)
    figure.subplots_adjust(left=2.3 / (width + 2.4), right=0.98, top=1 - 0.45 / (1.15 * len(rows) + 0.5), bottom=0.01, hspace=0.12)
    figure.suptitle("condition / samples / ground truth (held-out synthetic images)", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _nfe_figure(path: Path, models: List[DemoModel], results: Dict) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        rows = results[model.key]["rows"]
        for row_index, metric in enumerate(("psnr", "ssim")):
            axis = axes[row_index, column]
            for name in dict.fromkeys(s.name for s in model.fast):
                points = sorted((r["nfe"], r[metric]) for r in rows if r["sampler"] == name and r[metric] is not None)
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            reference = rows[-1]
            if reference[metric] is not None:
                axis.scatter([reference["nfe"]], [reference[metric]], marker="*", s=120, color="black", zorder=3,
                             label=f"{reference['sampler']} (reference)")
                axis.axhline(reference[metric], color="black", linewidth=0.7, linestyle=":")
            if rows[0][metric] is not None:
                axis.axhline(rows[0][metric], color="grey", linestyle="--", label="input")
            axis.set_xscale("log")
            ticks = sorted({r["nfe"] for r in rows[1:]})
            axis.set_xticks(ticks, [str(t) for t in ticks])
            axis.minorticks_off()
            axis.set_xlabel("NFE (network evaluations per image)")
            axis.set_ylabel(METRIC_LABELS[metric])
            axis.set_title(model.key if row_index == 0 else "", fontsize=10)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle("quality vs NFE on held-out images (higher is better)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{name}; {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}"


def _report(path: Path, settings: DemoSettings, models: List[DemoModel], trained: Dict, results: Dict, seconds: float,
            command: str, device: torch.device, workers: int) -> None:
    lines = [
        "# msdiff demo report",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {_machine(device)}. Total time: {seconds / 60:.1f} min ({seconds:.0f} s).",
        "",
    ]
    if settings.is_quick:
        lines += ["**Quick mode** (a smoke test for CI): the models are trained for a few steps only, so the numbers below",
                  "show that everything runs and stays finite, not what the methods can do.", ""]
    lines += [
        "## What was run",
        "",
        f"- Data: `SyntheticImages` (procedural shapes, gradients and stripes; no download), {settings.image_size}x{settings.image_size} RGB,"
        f" {settings.train_images} training images, {settings.test_images} held-out test images (another seed).",
        f"- Training: tiny U-Net preset, Adam lr {settings.lr:g} (warm-up {settings.warmup}), batch {settings.batch_size},"
        f" {settings.train_steps} steps per model, EMA 0.999 (warmed up); samples use the EMA weights.",
        f"- Processes: {'the two models were trained and evaluated at the same time in two worker processes, one thread each (timings are measured under that load)' if workers > 1 else 'one process, the models one after the other'}.",
    ]
    for model in models:
        info = trained[model.key]
        lines.append(f"- **{model.key}**: {model.title}; {info['parameters'] / 1e6:.2f}M parameters; trained in {info['seconds']:.0f} s,"
                     f" last logged loss {format_number(info['loss'], 4)}.")
    lines += [
        f"- Fast samplers: MR Sampler `mr-sde` (reverse SDE) and `mr-ode` (probability-flow ODE), order 2, data prediction, uniform log-SNR"
        f" steps, at NFE {', '.join(map(str, settings.nfe))}; {settings.samples_per_input} samples per input (for diversity).",
        f"- Reference samplers: predictor-corrector (`pc`, reverse diffusion + Langevin, snr 0.15) for the VE model and posterior sampling"
        f" for the mean-reverting model; one sample per input.",
    ]
    for model in models:
        reference = model.reference
        usual = USUAL_NFE[reference.name]
        if reference.nfe < usual:
            lines.append(f"- **Reduced reference**: `{reference.name}` ran at NFE {reference.nfe} instead of its usual {usual}"
                         f" to fit the demo's time budget (its quality at {usual} would be at least as good; its time would be"
                         f" {usual / reference.nfe:.1f}x longer, and so would the speed-ups below).")
    lines += ["", "## Timings", "",
              markdown_table(["model", "training (s)", "sampling + metrics (s)", "slowest sampler (s / image)", "fastest sampler (s / image)"],
                             [[model.key, trained[model.key]["seconds"], trained[model.key]["evaluation_seconds"],
                               max(r["seconds_per_image"] for r in results[model.key]["rows"][1:]),
                               min(r["seconds_per_image"] for r in results[model.key]["rows"][1:])] for model in models]),
              "## Results", ""]
    header = ["sampler", "NFE", "PSNR (dB)", "SSIM", "consistency (dB)", "diversity", "FID (SmallFeatureNet)", "s / image", "speed-up"]
    for model in models:
        rows = results[model.key]["rows"]
        lines += [f"### {model.key}: {model.title}", ""]
        table = []
        for row in rows:
            speedup = row.get("speedup_vs_reference")
            table.append([row["label"], row["nfe"] or "-", row["psnr"], row["ssim"], row["consistency"], row["diversity"], row["fid_small"],
                          row["seconds_per_image"], f"{speedup:.1f}x" if speedup is not None else "-"])
        lines.append(markdown_table(header, table))
        best = max((r for r in rows[1:-1]), key=lambda r: r["psnr"])
        reference = rows[-1]
        lines.append(f"Best fast sampler: {best['label']} at NFE {best['nfe']}: {best['psnr']:.2f} dB vs the reference's"
                     f" {reference['psnr']:.2f} dB at NFE {reference['nfe']}, {best['speedup_vs_reference']:.1f}x faster per image.")
        if best["psnr"] < rows[0]["psnr"]:
            lines.append(f"\n**This model is far from converged**: after {settings.train_steps} steps (the paper trains for hundreds of"
                         f" thousands) its samples score below the input baseline ({rows[0]['psnr']:.2f} dB). Compare the samplers"
                         f" with each other here, not with the baseline; `samples.png` shows what it has learnt so far.")
            if model.spec.estimator != "mr" and model.spec.estimator_options.get("sigma_data") is None:
                lines.append("Why: a VE model's clean-image estimate at noise level sigma is x_t - sigma eps_hat, so the network's"
                             " noise-prediction error is multiplied by sigma (up to sqrt(D) here). The coarse content, above all the"
                             " colours, is decided at those high noise levels, where a briefly trained network is not yet precise:"
                             " the samples get the structure of the condition but not its colours (`msdiff train --sigma-data 0.5`"
                             " preconditions the network against this).")
        lines.append("")
    lines += [
        "## How to read this",
        "",
        "- PSNR and SSIM are computed on the 0-255 scale against the held-out ground truth, averaged over every sample.",
        "- Consistency is PSNR(A(x_hat), A(x)) with A the task's forward operator (bicubic x"
        f"{settings.sr_scale} downsampling for super-resolution; denoising has none: n/a), capped at 100 dB.",
        "- Diversity is the mean per-pixel standard deviation (0-255) over the samples of one input; n/a with one sample.",
        "- **FID (SmallFeatureNet)** uses a small fixed random network, not Inception: it only compares the rows of this report and is NOT"
        " comparable with published FID numbers. With this few images it is also noisy.",
        "- s / image is the wall time of the sampler divided by the number of samples; speed-up is relative to the reference sampler row.",
        "- Numbers depend on the machine's thread count; the same command on the same machine reproduces them (every draw is seeded).",
        "",
        "Files: `samples.png` (condition / samples / ground truth), `nfe_curve.png` (PSNR and SSIM vs NFE), `metrics.json` (everything above),"
        " `runs/<model>/` (checkpoints: `msdiff sample --checkpoint runs/sr ...` restores your own images).",
        "",
    ]
    path.write_text("\n".join(lines))


def run_model(key: str, settings: DemoSettings, out: Path, device_name: str, threads: int, progress: bool, bar: bool) -> Dict:
    """Train, sample and evaluate the demo model ``key`` with ``threads`` CPU threads (a worker's job)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = {m.key: m for m in demo_models(settings)}[key]
    _log(f"training {model.key}: {model.title} ({settings.train_steps} steps of {settings.batch_size} on {device}, {threads} thread(s))")
    trained = _train(model, settings, out, device, progress, bar)
    _log(f"sampling {model.key}: fast samplers at NFE {list(settings.nfe)}, reference {model.reference.name} at NFE {model.reference.nfe}")
    started = time.perf_counter()
    results = _evaluate_model(model, trained, settings, device, progress and bar)
    trained["info"]["evaluation_seconds"] = time.perf_counter() - started
    _log(f"{model.key} done")
    return {"training": trained["info"], **results}


def _worker_count(device: torch.device) -> int:
    """Two models, two workers when there are two CPU threads to give: one thread each is far
    faster than two processes' worth of work on two shared threads, and no slower when idle."""
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def run_demo(settings: DemoSettings, out: Path, device: torch.device, progress: bool = True, command: str = "msdiff demo") -> Dict:
    """Run the demo into ``out`` (which must be writable); return what metrics.json holds."""
    settings.check()
    started = time.perf_counter()
    models = demo_models(settings)
    _pyplot()  # fail now, not after the training, when matplotlib is missing
    workers = _worker_count(device)
    if workers > 1:
        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {model.key: pool.submit(run_model, model.key, settings, out, str(device), threads, progress, False) for model in models}
            results = {key: future.result() for key, future in futures.items()}
    else:
        results = {model.key: run_model(model.key, settings, out, str(device), torch.get_num_threads(), progress, True) for model in models}
    trained = {key: result["training"] for key, result in results.items()}
    _samples_figure(out / "samples.png", models, results, columns=min(8, settings.test_images))
    _nfe_figure(out / "nfe_curve.png", models, results)
    seconds = time.perf_counter() - started
    metrics = {
        "command": command,
        "machine": _machine(device),
        "settings": dataclasses.asdict(settings),
        "seconds": seconds,
        "workers": workers,
        "models": {
            model.key: {
                "title": model.title,
                "description": model.spec.description(),
                "training": trained[model.key],
                "reference": {"sampler": model.reference.name, "nfe": model.reference.nfe, "usual_nfe": USUAL_NFE[model.reference.name]},
                "rows": results[model.key]["rows"],
            }
            for model in models
        },
        "notes": {"fid_small": "FID with SmallFeatureNet (fixed random network): not comparable with published FID"},
    }
    write_json(out / "metrics.json", metrics)
    _report(out / "report.md", settings, models, trained, results, seconds, command, device, workers)
    _log(f"done in {seconds / 60:.1f} min: {out / 'report.md'}, {out / 'metrics.json'}, {out / 'samples.png'}, {out / 'nfe_curve.png'}")
    print(f"wrote {out / 'report.md'}, {out / 'metrics.json'}, {out / 'samples.png'} and {out / 'nfe_curve.png'} in {seconds:.0f} s")
    return metrics
