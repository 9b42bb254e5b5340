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
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from ..errors import UsageError
from ..reports import describe_machine, write_json
from ..training.photos import load_photo
from .experiment import run_model
from .report import nfe_figure, pyplot, samples_figure, write_report
from .settings import DATA, DEMO_OUTPUTS, USUAL_NFE, DemoModel, DemoSettings, demo_models

__all__ = ["DATA", "DEMO_OUTPUTS", "DemoModel", "DemoSettings", "demo_models", "run_demo"]


class _Display:
    """One line per model: a tqdm bar each on a terminal, else a log line per tenth of a stage."""

    def __init__(self, keys: List[str], enabled: bool):
        from tqdm.auto import tqdm

        self.enabled, self.terminal = enabled, enabled and sys.stderr.isatty()
        self.bars = (
            {key: tqdm(total=1, desc=key, position=i, leave=True, dynamic_ncols=True) for i, key in enumerate(keys)}
            if self.terminal
            else {}
        )
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


def _worker_count(device: torch.device, models: int) -> int:
    """Worker processes with one thread each when there are CPU threads to give: one thread each
    is far faster than several models' worth of work on shared threads, and no slower when idle."""
    return min(models, torch.get_num_threads()) if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def _run_models(
    models: List[DemoModel], settings: DemoSettings, out: Path, device: torch.device, workers: int, display: _Display
) -> Dict:
    if workers == 1:
        channel = queue.SimpleQueue()
        results = {}
        for model in models:
            results[model.key] = _drain_while(
                lambda: run_model(model.key, settings, out, str(device), torch.get_num_threads(), channel), channel, display
            )
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


def run_demo(
    settings: DemoSettings, out: Path, device: torch.device, progress: bool = True, command: str = "msdiff demo"
) -> Dict:
    """Run the demo into ``out`` (which must be writable); return what metrics.json holds."""
    settings.check()
    if settings.data == "photos":
        try:
            load_photo("chelsea")
        except ImportError as err:
            raise UsageError(f"msdiff demo: {err}") from None
    started = time.perf_counter()
    models = demo_models(settings)
    pyplot()  # fail now, not after the training, when matplotlib is missing
    workers = _worker_count(device, len(models))
    _log(
        f"training and evaluating {', '.join(m.key for m in models)} on {settings.data} ({settings.train_steps} steps each, "
        f"{workers} worker process{'es' if workers > 1 else ''})"
    )
    display = _Display([m.key for m in models], progress)
    try:
        results = _run_models(models, settings, out, device, workers, display)
    finally:
        display.close()
    trained = {key: result["training"] for key, result in results.items()}
    samples_figure(out / "samples.png", models, results, settings)
    nfe_figure(out / "nfe_curve.png", models, results)
    seconds = time.perf_counter() - started
    metrics = {
        "command": command,
        "machine": describe_machine(device),
        "settings": dataclasses.asdict(settings),
        "seconds": seconds,
        "workers": workers,
        "models": {
            model.key: {
                "title": model.title,
                "description": model.spec.description(),
                "training": trained[model.key],
                "images": {name: list(size) for name, size in results[model.key]["images"].items()},
                "reference": {
                    "sampler": model.reference.name,
                    "nfe": model.reference.nfe,
                    "usual_nfe": USUAL_NFE[model.reference.name],
                },
                "rows": results[model.key]["rows"],
            }
            for model in models
        },
    }
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.md", settings, models, trained, results, seconds, command, device, workers)
    _log(
        f"done in {seconds / 60:.1f} min: {out / 'report.md'}, {out / 'metrics.json'}, {out / 'samples.png'}, {out / 'nfe_curve.png'}, {out / 'runs'}"
    )
    print(
        f"wrote {out / 'report.md'}, {out / 'metrics.json'}, {out / 'samples.png'}, {out / 'nfe_curve.png'} and the checkpoints in {out / 'runs'} in {seconds:.0f} s"
    )
    return metrics
