"""``msdiff train``: train a conditional diffusion model for one task into a run directory."""

import argparse
import sys
from pathlib import Path

import torch

from ..errors import UsageError, one_line
from ..models import PRESETS
from ..reports import format_number, json_text
from ..restoration import (
    ESTIMATOR_NAMES,
    ESTIMATOR_SETTINGS,
    ModelSpec,
    SamplerSpec,
    estimator_options,
    no_estimator_settings,
    restore_batch,
)
from ..training import ConditionalPairs, save_grid
from ..training.checkpoint import latest_checkpoint, read_optimizer_state, read_state, read_weights
from ..training.config import TrainConfig
from ..training.sources import describe_data, training_images
from ..training.tasks import TASK_OPTION_DEFAULTS, TASKS, task_options
from ..training.trainer import Trainer
from .common import add_command, add_common, add_task_options, check_seed, command_line, device_from, output_folder

ESTIMATORS_HELP = """\
estimators:
  cde     clean condition (Batzolis et al.)
  cdiffe  condition diffused like x
  cmde    condition diffused at its own, slower speed (--sigma-y)
  vscmde  cmde whose sigma_y falls during training
  mr      mean-reverting diffusion towards the degraded image (IR-SDE / DA-CLIP style)"""

EPILOG = """\
examples:
  msdiff train --task sr --scale 4 --estimator cmde --steps 20000 --out runs/sr4
  msdiff train --task denoise --estimator mr --data photos/ --image-size 64 --out runs/dn
  msdiff train --out runs/sr4 --resume --steps 40000     # continue a run (its settings are kept)"""


def add_parser(commands) -> argparse.ArgumentParser:
    tasks = "\n".join(f"  {task.name:<12} {task.summary}" for task in TASKS.values())
    train = add_command(
        commands,
        "train",
        "train a conditional diffusion model",
        (
            "Trains a conditional score model (or a mean-reverting model) for one task and writes\n"
            "atomic checkpoints to OUT/checkpoints (EMA weights are what `msdiff sample` uses).\n"
            "Data: a folder of images (--data; random crops of --image-size) or, by default, synthetic\n"
            "images that need no download. The condition y is made on the fly by the task's degradation.\n\n"
            f"tasks:\n{tasks}\n\n{ESTIMATORS_HELP}"
        ),
        EPILOG,
    )
    train.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, previews/")
    train.add_argument("--task", choices=sorted(TASKS), help="inverse problem (default sr)")
    add_task_options(train)
    train.add_argument("--estimator", choices=ESTIMATOR_NAMES, help="conditional score estimator (default cmde)")
    for setting in ESTIMATOR_SETTINGS:
        train.add_argument(setting.flag, type=setting.type, choices=setting.choices, help=setting.help)
    train.add_argument("--preset", help="U-Net preset: tiny, edges2shoes_64, celeba_inpaint_128, celeba_sr_x8_160 (default tiny)")
    train.add_argument("--image-size", type=int, help="training image size (default: the preset's)")
    train.add_argument("--channels", type=int, choices=(1, 3), help="1 grey or 3 RGB (default 3)")
    train.add_argument(
        "--data",
        help="training images: synthetic (made here, the default), photos (scikit-image's photographs: "
        "pip install scikit-image) or a folder; photos and folders give random patches of --image-size at the "
        "images' own resolution",
    )
    train.add_argument(
        "--data-resize",
        action="store_true",
        help="folder: resize each image so its shorter side is --image-size before cropping (for data meant to be seen "
        "whole, e.g. aligned faces); restoration models want the default native-resolution patches",
    )
    train.add_argument("--downscale", type=int, default=4, help="photos: average DxD pixel blocks first (the demo's scale)")
    train.add_argument("--synthetic-count", type=int, default=4096, help="number of synthetic images when --data is not given")
    train.add_argument("--steps", type=int, default=10000, help="total optimizer steps (a resumed run continues up to this)")
    train.add_argument("--batch-size", type=int, help="batch size (default 16)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default 2e-4)")
    train.add_argument("--warmup", type=int, help="linear warm-up steps (default 100)")
    train.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help="after the warm-up: constant, or a cosine decay to 0 at --steps (default constant)",
    )
    train.add_argument("--grad-clip", type=float, help="gradient-norm clip (default 1)")
    train.add_argument("--ema-decay", type=float, help="EMA decay (default 0.999, warmed up)")
    train.add_argument(
        "--amp",
        choices=("none", "bf16", "fp16"),
        help="mixed precision (default none; fp16 needs a GPU; bf16 "
        "autocast trains the demo's models 1.6x faster on this CPU family at the same quality)",
    )
    train.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the network (the first step compiles for minutes on a CPU; default off)",
    )
    train.add_argument(
        "--channels-last",
        action="store_true",
        default=None,
        help="train in channels-last memory format (default off; dropout masks then differ from a standard-layout run)",
    )
    train.add_argument(
        "--optimizer-impl",
        choices=("auto", "fused", "foreach", "for"),
        help="Adam's implementation (default auto: fused on CPU and CUDA)",
    )
    train.add_argument("--seed", type=int, help="seed of data and training (default 0)")
    train.add_argument("--log-every", type=int, default=50, help="steps between metrics.jsonl lines")
    train.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: only at the end)")
    train.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (0: all)")
    train.add_argument("--preview-every", type=int, default=0, help="steps between preview grids in OUT/previews (0: none)")
    train.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    add_common(train)
    return train


def run(args: argparse.Namespace) -> int:
    # Every flag is checked before --out is created: a refused command leaves nothing behind.
    out = Path(args.out)
    check_seed(args.seed)
    existing = latest_checkpoint(out)
    if existing is not None and not args.resume:
        raise UsageError(
            f"--out {out} already holds a run (latest checkpoint {existing.name}); pass --resume to continue it or choose another --out"
        )
    if args.resume and existing is None:
        raise UsageError(f"--resume: no checkpoint under {out} to resume from; drop --resume to start a new run")
    if existing is None and (out / "msdiff_train.json").exists():
        raise UsageError(
            f"--out {out} holds msdiff_train.json of an earlier run that left no checkpoint; choose another --out or delete that run"
        )
    if existing is not None:  # every file of the checkpoint checked now, before anything is written
        read_optimizer_state(existing)
        read_weights(existing, ema=False)
        read_weights(existing, ema=True)
    stored_state = read_state(existing) if existing is not None else {}
    stored = ModelSpec.from_description(stored_state["description"], str(existing)) if existing is not None else None
    stored_config = stored_state.get("config", {}) if existing is not None else {}

    def chosen(name: str, default):
        """A flag's value; when resuming and the flag was not given, the run's stored value."""
        value = getattr(args, name)
        if value is not None:
            return value
        if stored is not None and hasattr(stored, name):
            return getattr(stored, name)
        if name in stored_config:
            return stored_config[name]
        return default

    task = chosen("task", "sr")
    estimator_name = chosen("estimator", "cmde")
    steps = args.steps
    given = vars(args)
    no_task_flags = all(given.get(name) is None for name in TASK_OPTION_DEFAULTS)
    spec = ModelSpec(
        task=task,
        task_options=stored.task_options if stored is not None and no_task_flags else task_options(task, given, estimator_name),
        estimator=estimator_name,
        estimator_options=stored.estimator_options
        if stored is not None and no_estimator_settings(given)
        else estimator_options(estimator_name, task, given, steps),
        preset=chosen("preset", "tiny"),
        image_size=chosen("image_size", None) or _preset_size(chosen("preset", "tiny")),
        channels=chosen("channels", 3),
    )
    if spec.image_size % 4:
        raise UsageError(
            f"--image-size: the U-Net halves the image twice, so it must be a multiple of 4, got {spec.image_size}", 2
        )
    if stored is not None:
        _check_resumed_spec(spec, stored, existing)
    device = device_from(args.device)
    try:
        config = TrainConfig(
            steps=steps,
            batch_size=chosen("batch_size", 16),
            lr=chosen("lr", 2e-4),
            warmup=chosen("warmup", 100),
            lr_schedule=chosen("lr_schedule", "constant"),
            compile=chosen("compile", False),
            channels_last=chosen("channels_last", False),
            optimizer_impl=chosen("optimizer_impl", "auto"),
            grad_clip=chosen("grad_clip", 1.0),
            ema_decay=chosen("ema_decay", 0.999),
            amp=chosen("amp", "none"),
            seed=chosen("seed", 0),
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            out_dir=str(out),
            device=str(device),
            num_workers=args.workers,
            progress=not args.no_progress,
            preview_every=args.preview_every,
        )
    except ValueError as err:
        raise UsageError(_flag_message(err), 2) from None
    images = training_images(args.data, spec, config.seed, args.synthetic_count, args.data_resize, args.downscale)
    dataset = ConditionalPairs(images, spec.degradation(), seed=config.seed)
    model = spec.network(seed=config.seed)
    estimator = spec.build_estimator()
    preview = _preview_writer(spec, dataset, out, device) if args.preview_every else None
    data_name = describe_data(args.data, args.synthetic_count, args.downscale)
    # Held for the whole run: a second `msdiff train` into the same --out fails at once.
    with output_folder(out, overwrite=bool(args.resume), overwrite_flag=None) as folder:
        record = {"command": command_line(), "spec": spec.description(), "data": data_name}
        folder.write_text("msdiff_train.json", json_text(record))
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        print(
            f"msdiff train: {spec.estimator} for {spec.task} on {data_name} "
            f"at {spec.image_size}x{spec.image_size}, {spec.preset} U-Net ({parameters:.2f}M parameters), "
            f"{config.steps} steps of {config.batch_size} on {device}",
            file=sys.stderr,
        )
        trainer = Trainer(model, estimator, dataset, config, preview=preview, description=spec.description())
        try:
            trainer.fit(resume=bool(args.resume))
        finally:
            trainer.close()
    checkpoint = latest_checkpoint(out)
    loss = trainer.last_metrics.get("loss")
    print(
        f"trained to step {trainer.step} in {trainer.seconds:.0f} s (last logged loss {format_number(loss, 4)}); checkpoint {checkpoint}"
    )
    print(f"next: msdiff sample --checkpoint {out} --input DEGRADED_IMAGES --out RESTORED")
    return 0


def _check_resumed_spec(spec: ModelSpec, stored: ModelSpec, checkpoint: Path) -> None:
    """A resumed run must train the model it holds: name every flag that asks for another one."""
    found, wanted = stored.description(), spec.description()
    differences = [
        f"{key} {found[key]!r} (asked: {wanted[key]!r})" for key in found if key != "format" and found[key] != wanted[key]
    ]
    if differences:
        raise UsageError(
            f"--resume: the run in {checkpoint.parent.parent} was trained with {', '.join(differences)}; drop those "
            f"flags to continue it, or train the new model into another --out",
            2,
        )


def _preset_size(preset: str) -> int:
    if preset not in PRESETS:
        raise UsageError(f"--preset: expected one of {', '.join(sorted(PRESETS))}, got {preset!r}", 2)
    return PRESETS[preset].image_size


def _flag_message(error: ValueError) -> str:
    """TrainConfig.batch_size: ... -> --batch-size: ..."""
    text = one_line(error)
    if text.startswith("TrainConfig."):
        name, _, rest = text[len("TrainConfig.") :].partition(":")
        return f"--{'workers' if name == 'num_workers' else name.replace('_', '-')}:{rest}"
    return text


def _preview_writer(spec: ModelSpec, dataset, out: Path, device: torch.device):
    """A preview(trainer, step) that writes previews/step_N.png: condition / EMA sample (mr-sde, NFE 10) / truth."""
    count = min(8, len(dataset))
    truth = torch.stack([dataset[i][0] for i in range(count)])
    condition = torch.stack([dataset[i][1] for i in range(count)])
    sampler = SamplerSpec("mr-sde", 10)

    def preview(trainer, step: int) -> None:
        generator = torch.Generator().manual_seed(0)
        sample = restore_batch(trainer.ema, trainer.estimator, condition.to(device), sampler, generator).cpu()
        save_grid(out / "previews" / f"step_{step:08d}.png", [condition, sample, truth])

    return preview
