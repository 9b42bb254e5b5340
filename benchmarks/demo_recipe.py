"""What each choice of the demo's training recipe buys, measured at the demo's own scale.

Every variant changes one thing of the recipe that `msdiff demo` uses (real-photo patches at
their own resolution, residual prediction for the mean-reverting models, EDM preconditioning for
CMDE, bfloat16 autocast, EMA, constant learning rate) and is trained with the demo's steps,
batch and seed, then restores the demo's held-out photographs whole. Reported: the seconds per
training step, the PSNR of the posterior mean (MR Sampler NFE 1) and of one sample (MR Sampler
SDE-2 NFE 10), against the input baseline.

    python benchmarks/demo_recipe.py                  # about 30 min on 2 cores (two variants at a time)
    python benchmarks/demo_recipe.py --steps 100 --only sr_mr   # a quick look

Writes benchmarks/results/demo_recipe.md (and .json).
"""

import argparse
import dataclasses
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from msdiff_fast.demo import DemoSettings, demo_models
from msdiff_fast.demo.experiment import average_metrics, restore_pairs, test_pairs, training_data
from msdiff_fast.reports import cpu_model, markdown_table
from msdiff_fast.restoration import SamplerSpec
from msdiff_fast.training.tasks import consistency_operator

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Variant:
    model: str  # demo model key
    name: str
    change: str
    estimator_options: dict = dataclasses.field(default_factory=dict)
    amp: str = "bf16"
    lr_schedule: str = "constant"
    ema: bool = True
    thumbnails: bool = False
    width: int = 32


VARIANTS = [
    Variant("sr_mr", "recipe", "the demo's recipe"),
    Variant("sr_mr", "data target", "the network predicts the clean image instead of its difference from mu", {"target": "data"}),
    Variant("sr_mr", "noise target", "the network predicts the noise (IR-SDE / DA-CLIP)", {"target": "noise"}),
    Variant(
        "sr_mr",
        "thumbnails",
        "training images are whole photographs resized to the patch size (the old --data path)",
        thumbnails=True,
    ),
    Variant("sr_mr", "float32", "float32 training instead of bfloat16 autocast", amp="none"),
    Variant("sr_mr", "no EMA", "samples from the raw weights instead of their moving average", ema=False),
    Variant("sr_mr", "cosine lr", "learning rate decayed to 0 along a cosine", lr_schedule="cosine"),
    Variant("sr_mr", "wider", "U-Net width 48 instead of 32", width=48),
    Variant(
        "sr_mr",
        "less noise",
        "stationary noise lam_inf 10/255 instead of 50/255 (about the size of the residual)",
        {"lam_inf": 10 / 255},
    ),
    Variant("denoise", "recipe", "the demo's recipe"),
    Variant("denoise", "data target", "the network predicts the clean image", {"target": "data"}),
    Variant("sr_cmde", "recipe", "the demo's recipe"),
    Variant("sr_cmde", "no preconditioning", "the paper's plain noise prediction (no sigma_data)", {"sigma_data": None}),
]


def thumbnail_data(model, settings: DemoSettings):
    """The old data path: each training photograph shrunk so its shorter side is the patch size."""
    from msdiff_fast.training import ConditionalPairs
    from msdiff_fast.training.data import ImagePatches
    from msdiff_fast.training.photos import TRAINING_PHOTOS, load_photos

    thumbnails = []
    for photo in load_photos(TRAINING_PHOTOS, 3, settings.downscale).values():
        scale = settings.image_size / min(photo.shape[1:])
        size = (max(settings.image_size, round(photo.shape[1] * scale)), max(settings.image_size, round(photo.shape[2] * scale)))
        thumbnails.append(
            F.interpolate(photo[None].float() / 255, size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp(
                0, 1
            )
        )
    return ConditionalPairs(
        ImagePatches(thumbnails, settings.image_size, "random", patches_per_image=64),
        model.spec.degradation(),
        seed=settings.seed,
    )


def run_variant(variant: Variant, settings: DemoSettings) -> dict:
    from msdiff_fast.models import unet_preset
    from msdiff_fast.training.trainer import Trainer

    torch.set_num_threads(1)
    model = {m.key: m for m in demo_models(settings)}[variant.model]
    options = {k: v for k, v in {**model.spec.estimator_options, **variant.estimator_options}.items() if v is not None}
    spec = dataclasses.replace(model.spec, estimator_options=options)
    model = dataclasses.replace(model, spec=spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        network = unet_preset(spec.preset, spec.estimator, image_size=spec.image_size, nf=variant.width)
    estimator = spec.build_estimator()
    data = thumbnail_data(model, settings) if variant.thumbnails else training_data(model, settings)
    with tempfile.TemporaryDirectory() as out:
        config = settings.train_config(lr_schedule=variant.lr_schedule, amp=variant.amp, out_dir=out, device="cpu")
        trainer = Trainer(network, estimator, data, config)
        trainer.fit()
    trained = {"network": trainer.ema if variant.ema else trainer.model.eval(), "estimator": trainer.estimator}
    pairs = test_pairs(model, settings)
    operator = consistency_operator(spec.task, spec.task_options)
    row = {
        "model": variant.model,
        "variant": variant.name,
        "change": variant.change,
        "seconds_per_step": trainer.seconds / settings.train_steps,
        "input": average_metrics({name: pair["baseline"][None] for name, pair in pairs.items()}, pairs, operator)["psnr"],
    }
    # one step from t = T is the posterior mean only where the condition is clean (mean-reverting models)
    samplers = {"mean": SamplerSpec("mr-ode", 1, order=1), "sample": SamplerSpec("mr-sde", 10)}
    for label, sampler in samplers.items():
        if label == "mean" and spec.estimator != "mr":
            row[label] = None
            continue
        samples, _ = restore_pairs(trained, pairs, sampler, 1, settings.seed + 100, settings, torch.device("cpu"))
        row[label] = average_metrics(samples, pairs, operator)["psnr"]
    print(f"{variant.model} / {variant.name}: {row}", file=sys.stderr, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="training steps (default: the demo's)")
    parser.add_argument("--only", nargs="+", help="demo models to run (default: all)")
    parser.add_argument("--variants", nargs="+", help="variant names to run (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "demo_recipe.md"))
    args = parser.parse_args()
    settings = DemoSettings.full()
    if args.steps:
        settings = settings.replace(train_steps=args.steps)
    variants = [v for v in VARIANTS if (not args.only or v.model in args.only) and (not args.variants or v.name in args.variants)]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = list(pool.map(run_variant, variants, [settings] * len(variants)))
    command = " ".join(["python", *sys.argv])
    run = {
        "command": command,
        "machine": cpu_model(),
        "torch": torch.__version__,
        "workers": args.workers,
        "minutes": (time.perf_counter() - started) / 60,
        "variants": [row["variant"] for row in rows],
    }
    # a run with --only / --variants replaces its rows and keeps the others', with every run's command
    store_path = Path(args.out).with_suffix(".json")
    store = json.loads(store_path.read_text()) if store_path.exists() else {"runs": [], "rows": []}
    settings_json = json.loads(json.dumps(dataclasses.asdict(settings)))
    if store.get("settings", settings_json) != settings_json:
        raise SystemExit(f"{store_path} holds rows measured with other settings; pass another --out")
    measured = {(row["model"], row["variant"]) for row in rows}
    kept = [row for row in store["rows"] if (row["model"], row["variant"]) not in measured]
    order = {(v.model, v.name): i for i, v in enumerate(VARIANTS)}
    rows = sorted(kept + rows, key=lambda row: order.get((row["model"], row["variant"]), len(order)))
    store = {"settings": settings_json, "runs": store["runs"] + [run], "rows": rows}
    recipe = {row["model"]: row for row in rows if row["variant"] == "recipe"}

    def versus(row, key):
        return None if row[key] is None or row["model"] not in recipe else row[key] - recipe[row["model"]][key]

    table = [
        [
            r["model"],
            r["variant"],
            r["change"],
            r["seconds_per_step"],
            r["input"],
            r["mean"],
            r["sample"],
            versus(r, "mean"),
            versus(r, "sample"),
        ]
        for r in rows
    ]
    runs = "; ".join(f"`{r['command']}` ({r['minutes']:.0f} min, {r['workers']} at a time)" for r in store["runs"])
    text = (
        f"# What the demo's training recipe buys\n\n{cpu_model()}, one thread per variant, {settings.train_steps} steps of batch "
        f"{settings.batch_size} at {settings.image_size}px, torch {torch.__version__}. Runs: {runs}. PSNR (dB) on the demo's held-out "
        "photographs restored whole: the posterior mean (MR Sampler NFE 1; mean-reverting models only: a multi-speed model's "
        "condition is diffused at t = T) and one sample (MR Sampler SDE-2, NFE 10), against the input baseline (bicubic / the "
        "noisy image). s / step is measured with the other variants (and any other work) running beside it: compare it within one run.\n\n"
        + markdown_table(
            [
                "model",
                "variant",
                "what changes",
                "s / step",
                "input",
                "posterior mean",
                "sample",
                "mean vs recipe",
                "sample vs recipe",
            ],
            table,
        )
    )
    Path(args.out).write_text(text)
    store_path.write_text(json.dumps(store, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
