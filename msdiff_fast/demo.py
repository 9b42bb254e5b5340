"""``msdiff demo``: the main job on real photographs, on a CPU in about fifteen minutes.

Trains three small restoration models on random patches of real photographs that scikit-image
ships inside its wheel (nothing is downloaded): a mean-reverting denoiser, a mean-reverting x2
super-resolution model (mu = the bicubic upsampling) and the paper's CMDE x2 super-resolution
model. Then restores whole photographs it never trained on, tile by tile, with the fast MR
Sampler at several NFEs and with each model's slow reference sampler (posterior sampling,
predictor-corrector), measures PSNR, SSIM, consistency and diversity against the input
baseline (the noisy image, bicubic upsampling), times every sampler, and writes report.md,
metrics.json, samples.png, nfe_curve.png and the checkpoints in runs/. ``--data synthetic``
runs the same on procedural images. Every random draw is seeded, so the same command on the
same machine (same thread count) reproduces the numbers.
"""

import dataclasses
import multiprocessing
import os
import platform
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .cli import (METRIC_LABELS, CLIError, ModelSpec, SamplerSpec, consistency_operator, cpu_model, format_number, image_metrics,
                  markdown_table, restore_images, write_json)
from .training.checkpoint import atomic_write

USUAL_NFE = {"pc": 2000, "posterior": 100}
DATA = ("photos", "synthetic")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo runs. ``full()`` fits about 15 minutes on 2 CPU cores, ``quick()`` about one.

    photos: training patches of ``image_size`` cut from scikit-image's training photographs, the
    held-out photographs restored whole; both ``downscale``d so that a whole photograph is a few
    dozen tiles. ``reference_images``: how many held-out images the predictor-corrector reference
    (2000 network evaluations per tile) restores; the CMDE model is evaluated on those only."""

    is_quick: bool
    data: str
    image_size: int
    downscale: int
    train_steps: int
    batch_size: int
    lr: float
    warmup: int
    amp: str
    test_images: int
    test_crop: Optional[int]
    reference_images: int
    nfe: Tuple[int, ...]
    samples_per_input: int
    pc_nfe: int
    posterior_nfe: int
    sr_scale: int = 2
    noise_sigma: float = 25.0
    seed: int = 0

    @classmethod
    def full(cls, data: str = "photos") -> "DemoSettings":
        if data == "synthetic":
            return cls(is_quick=False, data=data, image_size=16, downscale=1, train_steps=1500, batch_size=16, lr=1e-3, warmup=50,
                       amp="bf16", test_images=16, test_crop=None, reference_images=16, nfe=(1, 5, 10, 20), samples_per_input=2,
                       pc_nfe=2000, posterior_nfe=100)
        return cls(is_quick=False, data=data, image_size=32, downscale=4, train_steps=800, batch_size=16, lr=1e-3, warmup=50,
                   amp="bf16", test_images=2, test_crop=None, reference_images=1, nfe=(1, 5, 10, 20), samples_per_input=2,
                   pc_nfe=2000, posterior_nfe=100)

    @classmethod
    def quick(cls, data: str = "photos") -> "DemoSettings":
        return cls(is_quick=True, data=data, image_size=16, downscale=4, train_steps=20, batch_size=4, lr=1e-3, warmup=5, amp="bf16",
                   test_images=2, test_crop=24 if data == "photos" else None, reference_images=2, nfe=(1, 5, 10, 20),
                   samples_per_input=2, pc_nfe=10, posterior_nfe=5)

    def replace(self, **changes) -> "DemoSettings":
        settings = dataclasses.replace(self, **changes)
        settings.check()
        return settings

    def check(self) -> None:
        if self.data not in DATA:
            raise ValueError(f"--data: expected one of {', '.join(DATA)}, got {self.data!r}")
        for name in ("train_steps", "batch_size", "test_images", "reference_images", "posterior_nfe", "samples_per_input", "downscale"):
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
        from .samplers.timesteps import MAX_STEPS

        for name, value, most in (("nfe", max(self.nfe), MAX_STEPS), ("posterior-nfe", self.posterior_nfe, MAX_STEPS), ("pc-nfe", self.pc_nfe, 2 * MAX_STEPS)):
            if value > most:
                raise ValueError(f"--{name}: expected at most {most} ({MAX_STEPS} sampler steps), got {value}")
        if self.data == "synthetic" and self.test_images < 2:
            raise ValueError(f"--test-images: expected at least 2 synthetic images, got {self.test_images}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp: expected 'none' or 'bf16', got {self.amp!r}")


@dataclasses.dataclass
class DemoModel:
    key: str
    title: str
    spec: ModelSpec
    fast: Tuple[SamplerSpec, ...]
    reference: SamplerSpec
    baseline: str  # what the "input" row is


def demo_models(settings: DemoSettings) -> List[DemoModel]:
    """The three models, in the order the worker processes take them (the longest first)."""
    size, scale = settings.image_size, settings.sr_scale
    samples = tuple(SamplerSpec(name, nfe) for nfe in settings.nfe if nfe > 1 for name in ("mr-sde", "mr-ode"))
    # NFE 1, one first-order step from t = T, returns the network's clean-image estimate there: the
    # posterior mean for a mean-reverting model, whose condition mu is clean. A multi-speed model
    # sees y diffused to sigma_y_max at t = T, so its one-step estimate is not that mean.
    with_mean = ((SamplerSpec("mr-ode", 1, order=1),) if 1 in settings.nfe else ()) + samples
    # residual: the network predicts the clean image minus mu, so the untrained model restores to
    # mu and training learns the correction (a noise-predicting network needs days here, see the README)
    denoise = ModelSpec("denoise", {"noise_sigma": settings.noise_sigma}, "mr", {"lam_inf": 50.0 / 255.0, "target": "residual"}, "tiny", size, 3)
    sr_mr = ModelSpec("sr", {"scale": scale, "upsample": "bicubic"}, "mr", {"lam_inf": 50.0 / 255.0, "target": "residual"}, "tiny", size, 3)
    # EDM preconditioning (sigma_data): the paper's plain noise prediction turns a network error e
    # into an image error sigma e, sigma up to sqrt(D_x); after minutes of training such a model
    # gets the layout of the condition but not its colours
    sr_cmde = ModelSpec("sr", {"scale": scale, "upsample": "nearest"}, "cmde", {"sigma_y_max": 0.5, "sigma_data": 0.5}, "tiny", size, 3)
    return [
        DemoModel("sr_cmde", f"super-resolution x{scale}, CMDE (the paper's estimator: VE SDE, sigma_y_max 0.5, EDM preconditioning)",
                  sr_cmde, samples, SamplerSpec("pc", settings.pc_nfe), "bicubic upsampling of the low-resolution input"),
        DemoModel("denoise", f"denoising, Gaussian noise sigma {settings.noise_sigma:g}/255, mean-reverting SDE (residual prediction)",
                  denoise, with_mean, SamplerSpec("posterior", settings.posterior_nfe), "the noisy input"),
        DemoModel("sr_mr", f"super-resolution x{scale}, mean-reverting SDE from the bicubic upsampling (residual prediction)",
                  sr_mr, with_mean, SamplerSpec("posterior", settings.posterior_nfe), "bicubic upsampling of the low-resolution input"),
    ]


# ---------------------------------------------------------------------------- data
def training_data(model: DemoModel, settings: DemoSettings):
    from .training import ConditionalPairs, SyntheticImages
    from .training.data import ImagePatches
    from .training.photos import TRAINING_PHOTOS, load_photos

    spec = model.spec
    if settings.data == "synthetic":
        images = SyntheticImages(4096, spec.image_size, spec.channels, seed=settings.seed)
    else:
        photos = load_photos(TRAINING_PHOTOS, spec.channels, settings.downscale)
        images = ImagePatches(list(photos.values()), spec.image_size, "random", patches_per_image=64)
    return ConditionalPairs(images, spec.degradation(), seed=settings.seed)


def held_out_images(settings: DemoSettings) -> Dict[str, torch.Tensor]:
    """The clean images the demo restores (never trained on): name -> float [C, H, W], sizes
    cut to a multiple of the SR scale."""
    from .training import SyntheticImages
    from .training.photos import HELD_OUT_PHOTOS, load_photos

    if settings.data == "synthetic":
        images = SyntheticImages(settings.test_images, settings.image_size, 3, seed=settings.seed + 1_000_003)
        return {f"synthetic_{i}": images[i] for i in range(len(images))}
    multiple = settings.sr_scale
    chosen = {}
    for name, photo in load_photos(HELD_OUT_PHOTOS[: settings.test_images], 3, settings.downscale).items():
        height, width = photo.shape[1] // multiple * multiple, photo.shape[2] // multiple * multiple
        if settings.test_crop is not None:
            height, width = min(height, settings.test_crop), min(width, settings.test_crop)
        top, left = (photo.shape[1] - height) // 2, (photo.shape[2] - width) // 2
        chosen[name] = photo[:, top:top + height, left:left + width].float() / 255
    return chosen


def test_pairs(model: DemoModel, settings: DemoSettings) -> Dict[str, Dict[str, torch.Tensor]]:
    """name -> {truth, condition (what the model gets), baseline (the input row)} of the images
    this model is evaluated on."""
    from .training import make_degradation

    spec = model.spec
    images = held_out_images(settings)
    if model.reference.name == "pc":
        images = dict(list(images.items())[: settings.reference_images])
    pairs = {}
    for index, (name, clean) in enumerate(images.items()):
        generator = torch.Generator().manual_seed(settings.seed + 7 + index)
        condition = spec.degradation()(clean[None], generator=generator)[0]
        if spec.task == "sr":
            baseline = make_degradation("sr", factor=spec.task_options["scale"], up="bicubic")(clean[None])[0]
        else:
            baseline = condition
        pairs[name] = {"truth": clean, "condition": condition, "baseline": baseline}
    return pairs


# ---------------------------------------------------------------------------- progress
class _Progress:
    """Progress of one model, sent to the parent process, which alone writes to the terminal."""

    def __init__(self, key: str, channel):
        self.key, self.channel = key, channel

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.channel.put((self.key, stage, done, total))


class _Display:
    """One line per model: a tqdm bar each on a terminal, else a log line per tenth of a stage."""

    def __init__(self, keys: List[str], enabled: bool):
        from tqdm.auto import tqdm

        self.enabled, self.terminal = enabled, enabled and sys.stderr.isatty()
        self.bars = {key: tqdm(total=1, desc=key, position=i, leave=True, dynamic_ncols=True) for i, key in enumerate(keys)} if self.terminal else {}
        self.last: Dict[str, Tuple[str, int]] = {}

    def update(self, key: str, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.terminal:
            bar = self.bars[key]
            if self.last.get(key, ("",))[0] != stage:
                bar.reset(total=total)
                bar.set_description(f"{key}: {stage}")
            self.last[key] = (stage, done)
            bar.n = done
            bar.refresh()
            return
        tenth = 10 * done // max(total, 1)
        if self.last.get(key) != (stage, tenth):
            self.last[key] = (stage, tenth)
            _log(f"{key}: {stage} {done}/{total}")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _log(message: str) -> None:
    print(f"[msdiff demo] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- one model
def _train(model: DemoModel, settings: DemoSettings, out: Path, device: torch.device, progress) -> Dict:
    """Train one model into out/runs/<key>; ``progress(stage, done, total)`` is told every few steps."""
    from .training.checkpoint import latest_checkpoint
    from .training.trainer import TrainConfig, Trainer

    spec = model.spec
    run_dir = out / "runs" / model.key
    if latest_checkpoint(run_dir) is not None:
        raise CLIError(f"--out {out}: {run_dir} holds a run of an earlier demo; choose an empty --out")
    dataset = training_data(model, settings)
    network = spec.network(seed=settings.seed)
    estimator = spec.build_estimator()
    every = max(1, settings.train_steps // 50)
    config = TrainConfig(steps=settings.train_steps, batch_size=settings.batch_size, lr=settings.lr, warmup=settings.warmup,
                         ema_decay=0.999, amp=settings.amp, seed=settings.seed, log_every=max(1, min(50, settings.train_steps)),
                         checkpoint_every=0, keep_checkpoints=1, out_dir=str(run_dir), device=str(device), progress=False, preview_every=every)
    trainer = Trainer(network, estimator, dataset, config, preview=lambda trainer, step: progress("train", step, settings.train_steps),
                      description=spec.description())
    try:
        trainer.fit()
    finally:
        trainer.close()
    info = {"parameters": sum(p.numel() for p in network.parameters()), "seconds": trainer.seconds, "steps": settings.train_steps,
            "loss": trainer.last_metrics.get("loss"), "checkpoint": str(latest_checkpoint(run_dir))}
    return {"network": trainer.ema, "estimator": trainer.estimator, "info": info}


def _restore(trained: Dict, pairs: Dict, sampler: SamplerSpec, copies: int, seed: int, settings: DemoSettings,
             device: torch.device) -> Tuple[Dict[str, torch.Tensor], float]:
    """``copies`` samples of every condition: name -> [copies, C, H, W], and the seconds taken."""
    names = list(pairs)
    conditions = [pairs[name]["condition"].to(device) for _ in range(copies) for name in names]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    restored = restore_images(trained["network"], trained["estimator"], conditions, sampler, seed, settings.image_size,
                              settings.image_size // 4, batch=64)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    samples = {name: torch.stack([restored[c * len(names) + i].cpu() for c in range(copies)]) for i, name in enumerate(names)}
    return samples, seconds


def _metrics(samples: Dict[str, torch.Tensor], pairs: Dict, operator) -> Dict[str, Optional[float]]:
    """Metrics of every image (its samples [S, C, H, W] against its truth), averaged over the images."""
    per_image = [image_metrics(samples[name][:, None], pairs[name]["truth"][None], operator) for name in pairs]
    averaged = {}
    for key in ("psnr", "ssim", "consistency", "diversity"):
        values = [m[key] for m in per_image]
        averaged[key] = None if any(v is None for v in values) else sum(values) / len(values)
    averaged["per_image_psnr"] = {name: m["psnr"] for name, m in zip(pairs, per_image)}
    return averaged


def _evaluate(model: DemoModel, trained: Dict, settings: DemoSettings, device: torch.device, progress) -> Dict:
    pairs = test_pairs(model, settings)
    operator = consistency_operator(model.spec.task, model.spec.task_options)
    baseline = {name: pair["baseline"][None] for name, pair in pairs.items()}
    rows = [{"sampler": "input", "label": f"input ({model.baseline})", "nfe": 0, "seconds_per_image": None, "samples_per_input": 1,
             **_metrics(baseline, pairs, operator)}]
    examples = {name: {"input": pair["baseline"], "truth": pair["truth"]} for name, pair in pairs.items()}
    runs = [(sampler, settings.samples_per_input) for sampler in model.fast] + [(model.reference, 1)]
    pixels = sum(pair["truth"][0].numel() for pair in pairs.values())
    for index, (sampler, copies) in enumerate(runs):
        progress(f"sample {sampler.name} NFE {sampler.nfe}", index, len(runs))
        samples, seconds = _restore(trained, pairs, sampler, copies, settings.seed + 100 + index, settings, device)
        if not all(torch.isfinite(s).all() for s in samples.values()):
            raise FloatingPointError(f"{sampler.label} at NFE {sampler.nfe} produced non-finite samples")
        rows.append({"sampler": sampler.name, "label": sampler.label, "nfe": sampler.nfe, "order": sampler.order, "prediction": sampler.prediction,
                     "seconds": seconds, "seconds_per_image": seconds / (copies * len(pairs)),
                     "seconds_per_megapixel": seconds / (copies * pixels) * 1e6, "samples_per_input": copies,
                     **_metrics(samples, pairs, operator)})
        for name in pairs:
            if sampler == model.reference:
                examples[name]["reference"] = samples[name][0]
            elif sampler.nfe == 1:
                examples[name]["mean"] = samples[name][0]
            elif sampler.name == "mr-sde" and sampler.nfe == _middle(settings.nfe):
                examples[name]["fast"] = samples[name][0]
    progress("sampled", len(runs), len(runs))
    reference_time = rows[-1]["seconds_per_image"]
    for row in rows[1:]:
        row["speedup_vs_reference"] = reference_time / row["seconds_per_image"]
    return {"rows": rows, "examples": examples, "images": {name: tuple(pair["truth"].shape[1:]) for name, pair in pairs.items()}}


def _middle(nfes: Tuple[int, ...]) -> int:
    ordered = sorted(n for n in nfes if n > 1) or sorted(nfes)
    return ordered[len(ordered) // 2]


def run_model(key: str, settings: DemoSettings, out: Path, device_name: str, threads: int, channel) -> Dict:
    """Train, sample and evaluate the demo model ``key`` with ``threads`` CPU threads (a worker's job)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = {m.key: m for m in demo_models(settings)}[key]
    progress = _Progress(key, channel)
    trained = _train(model, settings, out, device, progress)
    started = time.perf_counter()
    results = _evaluate(model, trained, settings, device, progress)
    trained["info"]["evaluation_seconds"] = time.perf_counter() - started
    return {"training": trained["info"], **results}


# ---------------------------------------------------------------------------- figures and report
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("msdiff demo draws its figures with matplotlib: pip install matplotlib") from None
    return plt


def _picture(image: torch.Tensor):
    return image.float().clamp(0, 1).permute(1, 2, 0).numpy()


PANELS = (("input", "input"), ("mean", "MR Sampler NFE 1 (posterior mean)"), ("fast", "MR Sampler SDE-2, a sample"),
          ("reference", "reference sampler"), ("truth", "ground truth"))


def _samples_figure(path: Path, models: List[DemoModel], results: Dict, settings: DemoSettings) -> None:
    """Whole held-out images, one row per (model, image): input / posterior mean / fast sample / reference / truth."""
    plt = _pyplot()
    rows = [(model, name) for model in models for name in results[model.key]["examples"]]
    height, width = max(results[m.key]["images"][n][0] for m, n in rows), max(results[m.key]["images"][n][1] for m, n in rows)
    panel_width = 2.6
    panel_height = panel_width * height / width + 0.45
    figure, axes = plt.subplots(len(rows), len(PANELS), figsize=(panel_width * len(PANELS) + 0.3, panel_height * len(rows) + 0.5), squeeze=False)
    for axis_row, (model, name) in zip(axes, rows):
        example = results[model.key]["examples"][name]
        scored = _panel_rows(model, results[model.key]["rows"], settings)
        for axis, (panel, title) in zip(axis_row, PANELS):
            axis.set_axis_off()
            if panel not in example:
                if panel == "mean":
                    axis.text(0.5, 0.5, "no one-step posterior mean:\nthe condition is diffused too", ha="center", va="center", fontsize=7,
                              transform=axis.transAxes)
                continue
            axis.imshow(_picture(example[panel]), interpolation="nearest")
            if panel == "fast":
                title = f"MR Sampler SDE-2 NFE {_middle(settings.nfe)}, a sample"
            elif panel == "reference":
                title = f"{model.reference.name} NFE {model.reference.nfe} (reference)"
            elif panel == "input":
                title = f"{model.key}, {name}: input ({'bicubic' if model.spec.task == 'sr' else 'noisy'})"
            score = f"\n{scored[panel]['per_image_psnr'][name]:.2f} dB" if panel in scored else ""
            axis.set_title(title + score, fontsize=7)
    what = "held-out photographs (never trained on), restored whole" if settings.data == "photos" else "held-out synthetic images"
    figure.suptitle(f"msdiff demo: {what}; PSNR against the ground truth (mean over that image's samples)", fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, dpi=120, format="png"))
    plt.close(figure)


def _panel_rows(model: DemoModel, rows: List[Dict], settings: DemoSettings) -> Dict[str, Dict]:
    """The table row behind each panel of samples.png (the panels show the first sample of it)."""
    chosen = {"input": rows[0], "reference": rows[-1]}
    for row in rows[1:-1]:
        if row["nfe"] == 1:
            chosen["mean"] = row
        elif row["sampler"] == "mr-sde" and row["nfe"] == _middle(settings.nfe):
            chosen["fast"] = row
    return chosen


def _nfe_figure(path: Path, models: List[DemoModel], results: Dict) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 7), squeeze=False)
    for column, model in enumerate(models):
        rows = results[model.key]["rows"]
        for row_index, metric in enumerate(("psnr", "ssim")):
            axis = axes[row_index, column]
            for name in dict.fromkeys(s.name for s in model.fast):
                points = sorted((r["nfe"], r[metric]) for r in rows if r["sampler"] == name and r[metric] is not None)
                if name == "mr-sde":
                    points = sorted(points + [(r["nfe"], r[metric]) for r in rows if r["sampler"] == "mr-ode" and r["nfe"] == 1])
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            reference = rows[-1]
            axis.scatter([reference["nfe"]], [reference[metric]], marker="*", s=120, color="black", zorder=3, label=f"{reference['sampler']} (reference)")
            axis.axhline(reference[metric], color="black", linewidth=0.7, linestyle=":")
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
    figure.suptitle("quality vs NFE on held-out images (higher is better; NFE 1 is the posterior mean)", fontsize=10)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, dpi=110, format="png"))
    plt.close(figure)


def _machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores"
    return f"{name}; {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}"


def _report(path: Path, settings: DemoSettings, models: List[DemoModel], trained: Dict, results: Dict, seconds: float,
            command: str, device: torch.device, workers: int) -> None:
    from .training.photos import HELD_OUT_PHOTOS, TRAINING_PHOTOS

    lines = ["# msdiff demo report", "", f"Command: `{command}`", "",
             f"Machine: {_machine(device)}. Total time: {seconds / 60:.1f} min ({seconds:.0f} s).", ""]
    if settings.is_quick:
        lines += ["**Quick mode** (a smoke test for CI): the models are trained for a few steps only, so the numbers below",
                  "show that everything runs and stays finite, not what the methods can do.", ""]
    if settings.data == "photos":
        data = (f"- Data: real photographs from scikit-image (shipped in its wheel, nothing downloaded), each averaged over"
                f" {settings.downscale}x{settings.downscale} pixel blocks. Training: random {settings.image_size}x{settings.image_size}"
                f" patches at that resolution of {', '.join(TRAINING_PHOTOS)}. Held out (never trained on, restored whole):"
                f" {', '.join(HELD_OUT_PHOTOS[: settings.test_images])}"
                + (f" (centre crops of {settings.test_crop} px in quick mode)" if settings.test_crop else "") + ".")
    else:
        data = (f"- Data: `SyntheticImages` (procedural shapes, gradients and stripes), {settings.image_size}x{settings.image_size} RGB;"
                f" {settings.test_images} held-out images of another seed.")
    lines += ["## What was run", "", data,
              f"- Training: tiny U-Net preset, Adam lr {settings.lr:g} (warm-up {settings.warmup}), batch {settings.batch_size},"
              f" {settings.train_steps} steps per model, {'bfloat16 autocast' if settings.amp == 'bf16' else 'float32'},"
              f" EMA 0.999 (warmed up); samples use the EMA weights in float32.",
              f"- Processes: {'the models were trained and evaluated in ' + str(workers) + ' worker processes, one thread each (timings are measured under that load)' if workers > 1 else 'one process, the models one after the other'}.",
              "- Restoration: whole images; the sampler's state and noise cover the whole image and only the network is evaluated"
              f" on overlapping {settings.image_size}px tiles (overlap {settings.image_size // 4}), blended (`msdiff_fast.tiling.TiledNetwork`)."]
    for model in models:
        info = trained[model.key]
        images = ", ".join(f"{name} ({h}x{w})" for name, (h, w) in results[model.key]["images"].items())
        lines.append(f"- **{model.key}**: {model.title}; {info['parameters'] / 1e6:.2f}M parameters; trained in {info['seconds']:.0f} s,"
                     f" last logged loss {format_number(info['loss'], 4)}; evaluated on {images}.")
    lines += [f"- Fast samplers: MR Sampler `mr-sde` (reverse SDE, order 2) and `mr-ode` (probability-flow ODE, order 2), data"
              f" prediction, uniform log-SNR steps, at NFE {', '.join(str(n) for n in settings.nfe if n > 1)}; for the mean-reverting"
              " models also NFE 1, one first-order step from t = T: the network's clean-image estimate, i.e. the posterior mean."
              f" {settings.samples_per_input} samples per input (for diversity).",
              "- Reference samplers: predictor-corrector (`pc`, reverse diffusion + Langevin, snr 0.15) for the VE model, posterior"
              " sampling for the mean-reverting ones; one sample per input."]
    for model in models:
        reference, usual = model.reference, USUAL_NFE[model.reference.name]
        if reference.nfe < usual:
            lines.append(f"- **Reduced reference**: `{reference.name}` ran at NFE {reference.nfe} instead of its usual {usual}.")
    lines += ["", "## Timings", "",
              markdown_table(["model", "training (s)", "sampling + metrics (s)", "slowest sampler (s / image)", "fastest sampler (s / image)"],
                             [[m.key, trained[m.key]["seconds"], trained[m.key]["evaluation_seconds"],
                               max(r["seconds_per_image"] for r in results[m.key]["rows"][1:]),
                               min(r["seconds_per_image"] for r in results[m.key]["rows"][1:])] for m in models]),
              "## Results", ""]
    header = ["sampler", "NFE", "PSNR (dB)", "SSIM", "consistency (dB)", "diversity", "s / image", "speed-up"]
    for model in models:
        rows = results[model.key]["rows"]
        lines += [f"### {model.key}: {model.title}", ""]
        table = [[row["label"] if row["nfe"] != 1 else f"{row['label']}: posterior mean", row["nfe"] or "-", row["psnr"], row["ssim"],
                  row["consistency"], row["diversity"], row["seconds_per_image"],
                  f"{row['speedup_vs_reference']:.1f}x" if row.get("speedup_vs_reference") is not None else "-"] for row in rows]
        lines.append(markdown_table(header, table))
        lines += _verdict(model, rows, settings)
        lines.append("")
    lines += ["## How to read this", "",
              "- PSNR and SSIM on the 0-255 scale against the held-out ground truth, averaged over the images (each over its samples).",
              f"- Consistency: PSNR(A(x_hat), A(x)) with A the bicubic x{settings.sr_scale} downsampling (super-resolution only), capped at 100 dB.",
              "- Diversity: the mean per-pixel standard deviation (0-255) over the samples of one input.",
              "- A sample of the posterior is not its mean: its error is the posterior's spread twice over (E|x_s - x|^2 = 2 E|m - x|^2"
              " for a calibrated model), about 3 dB of PSNR. The row with the highest PSNR is therefore the posterior mean (NFE 1)."
              " The samples add plausible detail, which PSNR penalises and the eye prefers: compare them in `samples.png`.",
              "- s / image: wall time of the sampler divided by the number of samples; speed-up relative to the reference sampler.",
              "- Numbers depend on the machine's thread count; the same command on the same machine reproduces them (every draw is seeded).",
              "", "Files: `samples.png` (input / posterior mean / a fast sample / the reference / ground truth, whole images),"
              " `nfe_curve.png` (PSNR and SSIM vs NFE), `metrics.json` (everything above), `runs/<model>/` (checkpoints:"
              " `msdiff sample --checkpoint runs/sr_mr --input LOW_RES_DIR --out RESTORED_DIR` restores your own images).", ""]
    report = "\n".join(lines).encode()
    atomic_write(path, lambda handle: handle.write(report))


def _verdict(model: DemoModel, rows: List[Dict], settings: DemoSettings) -> List[str]:
    """What the table says: the best fast sampler against the input and against the reference."""
    base, reference = rows[0], rows[-1]
    fast = [r for r in rows[1:-1] if r["nfe"] <= 20]
    best = max(fast, key=lambda r: r["psnr"])
    samples = [r for r in fast if r["nfe"] > 1]
    best_sample = max(samples, key=lambda r: r["psnr"]) if samples else best
    lines = [f"Best fast restoration: {best['label']} at NFE {best['nfe']}: {best['psnr']:.2f} dB"
             f" ({best['psnr'] - base['psnr']:+.2f} dB against the input's {base['psnr']:.2f});"
             f" best fast sample: {best_sample['label']} at NFE {best_sample['nfe']}: {best_sample['psnr']:.2f} dB vs the reference's"
             f" {reference['psnr']:.2f} dB at NFE {reference['nfe']}, {best_sample['speedup_vs_reference']:.1f}x faster per image."]
    if best["psnr"] <= base["psnr"]:
        lines.append(f"\n**Below its input baseline** after {settings.train_steps} steps: `benchmarks/results/longer_run_{model.key}.md`"
                     f" shows how far this model must be trained (`python benchmarks/longer_run.py --model {model.key}`).")
    return lines


# ---------------------------------------------------------------------------- the whole demo
def _worker_count(device: torch.device, models: int) -> int:
    """Worker processes with one thread each when there are CPU threads to give: one thread each
    is far faster than several models' worth of work on shared threads, and no slower when idle."""
    return min(models, torch.get_num_threads()) if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def _run_models(models: List[DemoModel], settings: DemoSettings, out: Path, device: torch.device, workers: int, display: _Display) -> Dict:
    if workers == 1:
        channel = queue.SimpleQueue()
        results = {}
        for model in models:
            results[model.key] = _drain_while(lambda: run_model(model.key, settings, out, str(device), torch.get_num_threads(), channel), channel, display)
        return results
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        channel = manager.Queue()
        futures = {model.key: pool.submit(run_model, model.key, settings, out, str(device), 1, channel) for model in models}
        pending = set(futures.values())
        while pending:
            _, pending = wait(pending, timeout=0.2)
            _show(channel, display)
        _show(channel, display)
        return {key: future.result() for key, future in futures.items()}


def _drain_while(job, channel, display: _Display):
    """Run ``job`` in this process; its progress messages are shown as they come (the trainer and
    sampler call back synchronously, so each message is shown before the next step)."""
    original = channel.put

    def put(message):
        original(message)
        _show(channel, display)

    channel.put = put
    try:
        return job()
    finally:
        channel.put = original


def _show(channel, display: _Display) -> None:
    while True:
        try:
            key, stage, done, total = channel.get_nowait()
        except queue.Empty:
            return
        display.update(key, stage, done, total)


def run_demo(settings: DemoSettings, out: Path, device: torch.device, progress: bool = True, command: str = "msdiff demo") -> Dict:
    """Run the demo into ``out`` (which must be writable); return what metrics.json holds."""
    settings.check()
    if settings.data == "photos":
        from .training.photos import load_photo

        try:
            load_photo("chelsea")
        except ImportError as err:
            raise CLIError(f"msdiff demo: {err}") from None
    started = time.perf_counter()
    models = demo_models(settings)
    _pyplot()  # fail now, not after the training, when matplotlib is missing
    workers = _worker_count(device, len(models))
    _log(f"training and evaluating {', '.join(m.key for m in models)} on {settings.data} ({settings.train_steps} steps each, "
         f"{workers} worker process{'es' if workers > 1 else ''})")
    display = _Display([m.key for m in models], progress)
    try:
        results = _run_models(models, settings, out, device, workers, display)
    finally:
        display.close()
    trained = {key: result["training"] for key, result in results.items()}
    _samples_figure(out / "samples.png", models, results, settings)
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
                "images": {name: list(size) for name, size in results[model.key]["images"].items()},
                "reference": {"sampler": model.reference.name, "nfe": model.reference.nfe, "usual_nfe": USUAL_NFE[model.reference.name]},
                "rows": results[model.key]["rows"],
            }
            for model in models
        },
    }
    write_json(out / "metrics.json", metrics)
    _report(out / "report.md", settings, models, trained, results, seconds, command, device, workers)
    _log(f"done in {seconds / 60:.1f} min: {out / 'report.md'}, {out / 'metrics.json'}, {out / 'samples.png'}, {out / 'nfe_curve.png'}, {out / 'runs'}")
    print(f"wrote {out / 'report.md'}, {out / 'metrics.json'}, {out / 'samples.png'}, {out / 'nfe_curve.png'} and the checkpoints in {out / 'runs'} in {seconds:.0f} s")
    return metrics
