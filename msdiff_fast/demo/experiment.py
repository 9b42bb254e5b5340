"""One demo model's experiment, run in a worker process: its data, training, restoration of the
held-out images with every sampler, and the metrics of each."""

import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..errors import UsageError
from ..metrics import image_metrics
from ..restoration import SamplerSpec, restore_images
from ..training import ConditionalPairs, SyntheticImages, make_degradation
from ..training.checkpoint import latest_checkpoint
from ..training.data import ImagePatches
from ..training.photos import HELD_OUT_PHOTOS, TRAINING_PHOTOS, load_photos
from ..training.tasks import consistency_operator
from ..training.trainer import Trainer
from .settings import DemoModel, DemoSettings, demo_models


def training_data(model: DemoModel, settings: DemoSettings):
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
        chosen[name] = photo[:, top : top + height, left : left + width].float() / 255
    return chosen


def test_pairs(model: DemoModel, settings: DemoSettings) -> Dict[str, Dict[str, torch.Tensor]]:
    """name -> {truth, condition (what the model gets), baseline (the input row)} of the images
    this model is evaluated on."""
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


class Progress:
    """Progress of one model, sent to the parent process, which alone writes to the terminal."""

    def __init__(self, key: str, channel):
        self.key, self.channel = key, channel

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.channel.put((self.key, stage, done, total))


def train_model(model: DemoModel, settings: DemoSettings, out: Path, device: torch.device, progress) -> Dict:
    """Train one model into out/runs/<key>; ``progress(stage, done, total)`` is told every few steps."""
    spec = model.spec
    run_dir = out / "runs" / model.key
    if latest_checkpoint(run_dir) is not None:
        raise UsageError(f"--out {out}: {run_dir} holds a run of an earlier demo; choose an empty --out")
    dataset = training_data(model, settings)
    network = spec.network(seed=settings.seed)
    estimator = spec.build_estimator()
    every = max(1, settings.train_steps // 50)
    config = settings.train_config(
        log_every=max(1, min(50, settings.train_steps)),
        keep_checkpoints=1,
        out_dir=str(run_dir),
        device=str(device),
        preview_every=every,
    )
    trainer = Trainer(
        network,
        estimator,
        dataset,
        config,
        preview=lambda trainer, step: progress("train", step, settings.train_steps),
        description=spec.description(),
    )
    try:
        trainer.fit()
    finally:
        trainer.close()
    info = {
        "parameters": sum(p.numel() for p in network.parameters()),
        "seconds": trainer.seconds,
        "steps": settings.train_steps,
        "loss": trainer.last_metrics.get("loss"),
        "checkpoint": str(latest_checkpoint(run_dir)),
    }
    return {"network": trainer.ema, "estimator": trainer.estimator, "info": info}


def restore_pairs(
    trained: Dict, pairs: Dict, sampler: SamplerSpec, copies: int, seed: int, settings: DemoSettings, device: torch.device
) -> Tuple[Dict[str, torch.Tensor], float]:
    """``copies`` samples of every condition: name -> [copies, C, H, W], and the seconds taken."""
    names = list(pairs)
    conditions = [pairs[name]["condition"].to(device) for _ in range(copies) for name in names]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    restored = restore_images(
        trained["network"],
        trained["estimator"],
        conditions,
        sampler,
        seed,
        settings.image_size,
        settings.image_size // 4,
        batch=64,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    samples = {name: torch.stack([restored[c * len(names) + i].cpu() for c in range(copies)]) for i, name in enumerate(names)}
    return samples, seconds


def average_metrics(samples: Dict[str, torch.Tensor], pairs: Dict, operator) -> Dict[str, Optional[float]]:
    """Metrics of every image (its samples [S, C, H, W] against its truth), averaged over the images."""
    per_image = [image_metrics(samples[name][:, None], pairs[name]["truth"][None], operator) for name in pairs]
    averaged = {}
    for key in ("psnr", "ssim", "consistency", "diversity"):
        values = [m[key] for m in per_image]
        averaged[key] = None if any(v is None for v in values) else sum(values) / len(values)
    averaged["per_image_psnr"] = {name: m["psnr"] for name, m in zip(pairs, per_image)}
    return averaged


def evaluate_model(model: DemoModel, trained: Dict, settings: DemoSettings, device: torch.device, progress) -> Dict:
    pairs = test_pairs(model, settings)
    operator = consistency_operator(model.spec.task, model.spec.task_options)
    baseline = {name: pair["baseline"][None] for name, pair in pairs.items()}
    rows = [
        {
            "sampler": "input",
            "label": f"input ({model.baseline})",
            "nfe": 0,
            "seconds_per_image": None,
            "samples_per_input": 1,
            **average_metrics(baseline, pairs, operator),
        }
    ]
    examples = {name: {"input": pair["baseline"], "truth": pair["truth"]} for name, pair in pairs.items()}
    runs = [(sampler, settings.samples_per_input) for sampler in model.fast] + [(model.reference, 1)]
    pixels = sum(pair["truth"][0].numel() for pair in pairs.values())
    for index, (sampler, copies) in enumerate(runs):
        progress(f"sample {sampler.name} NFE {sampler.nfe}", index, len(runs))
        samples, seconds = restore_pairs(trained, pairs, sampler, copies, settings.seed + 100 + index, settings, device)
        if not all(torch.isfinite(s).all() for s in samples.values()):
            raise FloatingPointError(f"{sampler.label} at NFE {sampler.nfe} produced non-finite samples")
        rows.append(
            {
                "sampler": sampler.name,
                "label": sampler.label,
                "nfe": sampler.nfe,
                "order": sampler.order,
                "prediction": sampler.prediction,
                "seconds": seconds,
                "seconds_per_image": seconds / (copies * len(pairs)),
                "seconds_per_megapixel": seconds / (copies * pixels) * 1e6,
                "samples_per_input": copies,
                **average_metrics(samples, pairs, operator),
            }
        )
        for name in pairs:
            if sampler == model.reference:
                examples[name]["reference"] = samples[name][0]
            elif sampler.nfe == 1:
                examples[name]["mean"] = samples[name][0]
            elif sampler.name == "mr-sde" and sampler.nfe == middle_nfe(settings.nfe):
                examples[name]["fast"] = samples[name][0]
    progress("sampled", len(runs), len(runs))
    reference_time = rows[-1]["seconds_per_image"]
    for row in rows[1:]:
        row["speedup_vs_reference"] = reference_time / row["seconds_per_image"]
    return {"rows": rows, "examples": examples, "images": {name: tuple(pair["truth"].shape[1:]) for name, pair in pairs.items()}}


def middle_nfe(nfes: Tuple[int, ...]) -> int:
    ordered = sorted(n for n in nfes if n > 1) or sorted(nfes)
    return ordered[len(ordered) // 2]


def run_model(key: str, settings: DemoSettings, out: Path, device_name: str, threads: int, channel) -> Dict:
    """Train, sample and evaluate the demo model ``key`` with ``threads`` CPU threads (a worker's job)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    model = {m.key: m for m in demo_models(settings)}[key]
    progress = Progress(key, channel)
    trained = train_model(model, settings, out, device, progress)
    started = time.perf_counter()
    results = evaluate_model(model, trained, settings, device, progress)
    trained["info"]["evaluation_seconds"] = time.perf_counter() - started
    return {"training": trained["info"], **results}
