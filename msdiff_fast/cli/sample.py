"""``msdiff sample``: restore a folder of degraded images with a trained model."""

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path
from typing import Tuple

import torch

from ..distributed import ProcessGroup, distributed_env
from ..errors import UsageError, one_line
from ..models import FastNetwork
from ..restoration import SAMPLERS, TIMESTEPS, SamplerSpec, check_memory, load_trained, restore_images, sampling_memory
from ..training import write_image
from ..training.batches import stream_seed
from ..training.tasks import TASKS, upsample_condition
from .common import (
    add_command,
    add_common,
    check_apart,
    check_seed,
    device_from,
    list_images,
    load_image,
    output_folder,
    relative_names,
)

DESCRIPTION = """\
Restores every image under --input with a checkpoint of `msdiff train` and writes PNGs with the
same relative names under --out. Images larger than the training size are restored in
overlapping tiles of the training size, blended with a smooth window; smaller ones are padded.
For sr the inputs are the low-resolution images (upsampled by --scale here).
--out must be apart from --input (not it, not inside it, not holding it); an existing file is
never replaced without --overwrite, two names of one image (a.png, a.jpg) are refused before any
work, and a second run into the same --out fails while the first one writes there.

samplers (NFE = network evaluations per image):
  mr-sde     MR Sampler, reverse SDE, order 1-2 (fast; 5-20 NFE)
  mr-ode     MR Sampler, probability-flow ODE, order 1-3 (fast, deterministic given x_T)
  posterior  posterior sampling of IR-SDE / DA-CLIP (reference for mr models; usually 100)
  pc         predictor-corrector (reference for VE models; usually 2000 = 1000 steps x 2)
  euler      Euler-Maruyama on the reverse SDE"""

EPILOG = """\
examples:
  msdiff sample --checkpoint runs/sr --input low_res/ --out restored/ --nfe 10
  msdiff sample --checkpoint runs/dn --input noisy/ --out clean/ --sampler posterior --nfe 100
  msdiff sample --checkpoint runs/sr --input lr/ --out many/ --num-samples 5   # many/sample_0..4"""


def add_parser(commands) -> argparse.ArgumentParser:
    sample = add_command(commands, "sample", "restore a folder of degraded images with a trained model", DESCRIPTION, EPILOG)
    sample.add_argument(
        "--checkpoint",
        required=True,
        help="run directory of `msdiff train` (its latest checkpoint) or a checkpoints/step_* directory",
    )
    sample.add_argument("--input", required=True, help="folder of degraded images (searched recursively)")
    sample.add_argument("--out", required=True, help="folder for the restored PNGs")
    sample.add_argument("--sampler", choices=SAMPLERS, default="mr-sde", help="sampler")
    sample.add_argument("--nfe", type=int, default=10, help="network evaluations per image (pc: 2 per step)")
    sample.add_argument("--order", type=int, default=2, help="mr-sde: 1-2, mr-ode: 1-3")
    sample.add_argument(
        "--prediction", choices=("data", "noise"), default="data", help="mr-*: solve for the data or the noise prediction"
    )
    sample.add_argument("--timesteps", choices=TIMESTEPS, default="uniform_lambda", help="mr-*: time grid")
    sample.add_argument(
        "--conditioning",
        choices=("fresh", "clean", "consistent"),
        help="cdiffe/cmde/vscmde: how the condition is diffused at each call (default fresh; cde, mr: clean)",
    )
    sample.add_argument("--task", choices=sorted(TASKS), help="check that the checkpoint was trained for this task")
    sample.add_argument("--inputs-upsampled", action="store_true", help="sr: the inputs are already at the output size")
    sample.add_argument("--batch", type=int, default=16, help="tiles restored together")
    sample.add_argument("--overlap", type=int, help="tile overlap in pixels (default: a quarter of the tile)")
    sample.add_argument("--num-samples", type=int, default=1, help="samples per image; > 1 writes OUT/sample_K/")
    sample.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA ones")
    sample.add_argument("--seed", type=int, default=0, help="sampling seed")
    sample.add_argument(
        "--multistep",
        choices=("heun", "midpoint"),
        default="heun",
        help="mr-*: form of the second-order steps: heun (the MR Sampler code's) or midpoint (DPM-Solver++(2M)'s)",
    )
    sample.add_argument(
        "--loop",
        choices=("eager", "static", "graph", "compile"),
        default="static",
        help="mr-*: static precomputes every coefficient and checks for divergence once at the end (same output as eager); "
        "graph also captures the loop as one CUDA graph (CUDA only); compile torch.compiles the loop with the network "
        "(the first batch compiles for minutes); eager checks every step",
    )
    sample.add_argument(
        "--bf16", action="store_true", help="run the network under bfloat16 autocast (where the CPU/GPU has bfloat16 arithmetic)"
    )
    sample.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (the first call compiles for minutes on a CPU; later runs reuse the on-disk cache)",
    )
    sample.add_argument(
        "--no-channels-last",
        action="store_true",
        help="keep the network in the standard memory format (channels-last is faster and gives the same output)",
    )
    sample.add_argument(
        "--overwrite",
        action="store_true",
        help="replace restored images that already exist in --out (default: refuse before any work)",
    )
    add_common(sample)
    return sample


def run(args: argparse.Namespace) -> int:
    """Restore every image under --input. Under torchrun each process restores its share of the
    batches a single process would form (each batch seeded from its own index, so the files are
    the same whatever the number of processes); rank 0 holds the output folder's lock."""
    check_seed(args.seed)
    rank, local_rank, world = distributed_env()
    device = device_from(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    trained = load_trained(args.checkpoint, device, ema=not args.raw_weights)
    spec = trained.spec
    if args.task is not None and args.task != spec.task:
        raise UsageError(
            f"--task {args.task}: checkpoint {trained.path} was trained for task {spec.task!r}; "
            f"use a checkpoint trained for {args.task!r} or drop --task"
        )
    sampler = SamplerSpec(
        args.sampler, args.nfe, args.order, args.prediction, args.timesteps, args.conditioning, args.multistep, args.loop
    )
    sampler.check(trained.estimator)
    try:
        network = FastNetwork(trained.network, channels_last=not args.no_channels_last, bf16=args.bf16, compile=args.compile)
    except ValueError as err:
        raise UsageError(f"--bf16: {one_line(err)}", 2) from None
    tile = spec.image_size
    overlap = tile // 4 if args.overlap is None else args.overlap
    if not 0 <= overlap < tile:
        raise UsageError(f"--overlap: expected 0 <= overlap < tile size {tile}, got {overlap}", 2)
    if args.batch < 1 or args.num_samples < 1:
        raise UsageError(f"--batch, --num-samples: expected integers >= 1, got {args.batch}, {args.num_samples}", 2)
    files = list_images(args.input, "--input")
    check_apart(args.out, "--out", args.input, "--input")
    names = relative_names(files, args.input, "--input", suffix=".png")
    folders = [f"sample_{k}/" for k in range(args.num_samples)] if args.num_samples > 1 else [""]
    destinations = [folder + name for folder in folders for name in names]
    upsampling = spec.task_options["scale"] if spec.task == "sr" and not args.inputs_upsampled else 1
    sizes = [(height * upsampling, width * upsampling) for height, width in map(image_size, files)]
    largest = max(sizes, key=lambda size: size[0] * size[1])
    check_memory(
        sampling_memory(sizes, spec.channels, tile, overlap, args.batch),
        device,
        f"--input {args.input}: restoring {len(files)} images (the largest {largest[0]}x{largest[1]} after upsampling)",
    )
    with ProcessGroup(world, device) as group, contextlib.ExitStack() as stack:
        # rank 0 locks the folder and checks every destination before any work; the others
        # learn its verdict, so a refused run changes nothing and every process stops with it
        refusal = None
        if rank == 0:
            try:
                out = stack.enter_context(output_folder(args.out, overwrite=args.overwrite))
                out.check_new(destinations)
            except UsageError as err:
                refusal = err
        message = group.broadcast(None if refusal is None else str(refusal))
        if message is not None:
            raise refusal if refusal is not None else UsageError(message)
        conditions = []
        for path in files:
            image = load_image(path, spec.channels)
            if upsampling > 1:
                image = upsample_condition(image, upsampling, spec.task_options.get("upsample", "nearest"))
            conditions.append(image.to(device))
        if rank == 0:
            processes = f" x {world} processes" if world > 1 else ""
            print(
                f"msdiff sample: {len(files)} images from {args.input} with {sampler.label}, NFE {sampler.nfe}, "
                f"{spec.estimator} model for {spec.task} (step {trained.step}) on {device}{processes}, "
                f"tiles {tile}px overlap {overlap}",
                file=sys.stderr,
            )
        started = time.perf_counter()
        written = 0
        for sample_index, folder in enumerate(folders):
            restored = restore_images(
                network,
                trained.estimator,
                conditions,
                sampler,
                stream_seed(args.seed, sample_index),
                tile,
                overlap,
                args.batch,
                progress=not args.no_progress and rank == 0,
                description=f"sample {sample_index + 1}/{args.num_samples}",
                rank=rank,
                world_size=world,
            )
            for name, image in zip(names, restored):
                if image is None:  # another process's
                    continue
                destination = Path(args.out) / (folder + name)
                if rank == 0:
                    out.check_new([folder + name])
                try:
                    write_image(destination, image.cpu())
                except OSError as err:
                    raise UsageError(f"cannot write {destination}: {err.strerror or one_line(err)}") from None
                written += 1
        written = group.total(written)  # and every process has finished writing before rank 0 unlocks
    seconds = time.perf_counter() - started
    if rank == 0:
        print(f"wrote {written} images to {args.out} in {seconds:.1f} s ({sampler.nfe} network evaluations per tile)")
    return 0


def image_size(path: Path) -> Tuple[int, int]:
    """(height, width) of an image file from its header (nothing decoded)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # a huge size is refused when the image is read, with our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            return img.height, img.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"cannot read image {path}: {one_line(err)}; convert or remove that file") from None
