"""The demo's figures (samples.png, nfe_curve.png) and report.md."""

from pathlib import Path
from typing import Dict, List

import torch

from ..errors import UsageError
from ..reports import METRIC_LABELS, describe_machine, format_number, markdown_table, write_text
from ..training.checkpoint import atomic_write
from ..training.photos import HELD_OUT_PHOTOS, TRAINING_PHOTOS
from .experiment import middle_nfe
from .settings import USUAL_NFE, DemoModel, DemoSettings


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("msdiff demo draws its figures with matplotlib: pip install matplotlib") from None
    return plt


def _picture(image: torch.Tensor):
    return image.float().clamp(0, 1).permute(1, 2, 0).numpy()


PANELS = (
    ("input", "input"),
    ("mean", "MR Sampler NFE 1 (posterior mean)"),
    ("fast", "MR Sampler SDE-2, a sample"),
    ("reference", "reference sampler"),
    ("truth", "ground truth"),
)


def samples_figure(path: Path, models: List[DemoModel], results: Dict, settings: DemoSettings) -> None:
    """Whole held-out images, one row per (model, image): input / posterior mean / fast sample / reference / truth."""
    plt = pyplot()
    rows = [(model, name) for model in models for name in results[model.key]["examples"]]
    height, width = max(results[m.key]["images"][n][0] for m, n in rows), max(results[m.key]["images"][n][1] for m, n in rows)
    panel_width = 2.6
    panel_height = panel_width * height / width + 0.45
    figure, axes = plt.subplots(
        len(rows), len(PANELS), figsize=(panel_width * len(PANELS) + 0.3, panel_height * len(rows) + 0.5), squeeze=False
    )
    for axis_row, (model, name) in zip(axes, rows):
        example = results[model.key]["examples"][name]
        scored = _panel_rows(model, results[model.key]["rows"], settings)
        for axis, (panel, title) in zip(axis_row, PANELS):
            axis.set_axis_off()
            if panel not in example:
                if panel == "mean":
                    axis.text(
                        0.5,
                        0.5,
                        "no one-step posterior mean:\nthe condition is diffused too",
                        ha="center",
                        va="center",
                        fontsize=7,
                        transform=axis.transAxes,
                    )
                continue
            axis.imshow(_picture(example[panel]), interpolation="nearest")
            if panel == "fast":
                title = f"MR Sampler SDE-2 NFE {middle_nfe(settings.nfe)}, a sample"
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
        elif row["sampler"] == "mr-sde" and row["nfe"] == middle_nfe(settings.nfe):
            chosen["fast"] = row
    return chosen


def nfe_figure(path: Path, models: List[DemoModel], results: Dict) -> None:
    plt = pyplot()
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
            axis.scatter(
                [reference["nfe"]],
                [reference[metric]],
                marker="*",
                s=120,
                color="black",
                zorder=3,
                label=f"{reference['sampler']} (reference)",
            )
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


def write_report(
    path: Path,
    settings: DemoSettings,
    models: List[DemoModel],
    trained: Dict,
    results: Dict,
    seconds: float,
    command: str,
    device: torch.device,
    workers: int,
) -> None:
    lines = [
        "# msdiff demo report",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {describe_machine(device)}. Total time: {seconds / 60:.1f} min ({seconds:.0f} s).",
        "",
    ]
    if settings.is_quick:
        lines += [
            "**Quick mode** (a smoke test for CI): the models are trained for a few steps only, so the numbers below",
            "show that everything runs and stays finite, not what the methods can do.",
            "",
        ]
    if settings.data == "photos":
        data = (
            f"- Data: real photographs from scikit-image (shipped in its wheel, nothing downloaded), each averaged over"
            f" {settings.downscale}x{settings.downscale} pixel blocks. Training: random {settings.image_size}x{settings.image_size}"
            f" patches at that resolution of {', '.join(TRAINING_PHOTOS)}. Held out (never trained on, restored whole):"
            f" {', '.join(HELD_OUT_PHOTOS[: settings.test_images])}"
            + (f" (centre crops of {settings.test_crop} px in quick mode)" if settings.test_crop else "")
            + "."
        )
    else:
        data = (
            f"- Data: `SyntheticImages` (procedural shapes, gradients and stripes), {settings.image_size}x{settings.image_size} RGB;"
            f" {settings.test_images} held-out images of another seed."
        )
    lines += [
        "## What was run",
        "",
        data,
        f"- Training: tiny U-Net preset, Adam lr {settings.lr:g} (warm-up {settings.warmup}), batch {settings.batch_size},"
        f" {settings.train_steps} steps per model, {'bfloat16 autocast' if settings.amp == 'bf16' else 'float32'},"
        f" EMA 0.999 (warmed up); samples use the EMA weights in float32.",
        "- Processes: "
        + (
            f"the models were trained and evaluated in {workers} worker processes, one thread each (timings are measured under that load)"
            if workers > 1
            else "one process, the models one after the other"
        )
        + ".",
        "- Restoration: whole images; the sampler's state and noise cover the whole image and only the network is evaluated"
        f" on overlapping {settings.image_size}px tiles (overlap {settings.image_size // 4}), blended (`msdiff_fast.tiling.TiledNetwork`).",
    ]
    for model in models:
        info = trained[model.key]
        images = ", ".join(f"{name} ({h}x{w})" for name, (h, w) in results[model.key]["images"].items())
        lines.append(
            f"- **{model.key}**: {model.title}; {info['parameters'] / 1e6:.2f}M parameters; trained in {info['seconds']:.0f} s,"
            f" last logged loss {format_number(info['loss'], 4)}; evaluated on {images}."
        )
    lines += [
        f"- Fast samplers: MR Sampler `mr-sde` (reverse SDE, order 2) and `mr-ode` (probability-flow ODE, order 2), data"
        f" prediction, uniform log-SNR steps, at NFE {', '.join(str(n) for n in settings.nfe if n > 1)}; for the mean-reverting"
        " models also NFE 1, one first-order step from t = T: the network's clean-image estimate, i.e. the posterior mean."
        f" {settings.samples_per_input} samples per input (for diversity).",
        "- Reference samplers: predictor-corrector (`pc`, reverse diffusion + Langevin, snr 0.15) for the VE model, posterior"
        " sampling for the mean-reverting ones; one sample per input.",
    ]
    for model in models:
        reference, usual = model.reference, USUAL_NFE[model.reference.name]
        if reference.nfe < usual:
            lines.append(f"- **Reduced reference**: `{reference.name}` ran at NFE {reference.nfe} instead of its usual {usual}.")
    lines += [
        "",
        "## Timings",
        "",
        markdown_table(
            ["model", "training (s)", "sampling + metrics (s)", "slowest sampler (s / image)", "fastest sampler (s / image)"],
            [
                [
                    m.key,
                    trained[m.key]["seconds"],
                    trained[m.key]["evaluation_seconds"],
                    max(r["seconds_per_image"] for r in results[m.key]["rows"][1:]),
                    min(r["seconds_per_image"] for r in results[m.key]["rows"][1:]),
                ]
                for m in models
            ],
        ),
        "## Results",
        "",
    ]
    header = ["sampler", "NFE", "PSNR (dB)", "SSIM", "consistency (dB)", "diversity", "s / image", "speed-up"]
    for model in models:
        rows = results[model.key]["rows"]
        lines += [f"### {model.key}: {model.title}", ""]
        table = [
            [
                row["label"] if row["nfe"] != 1 else f"{row['label']}: posterior mean",
                row["nfe"] or "-",
                row["psnr"],
                row["ssim"],
                row["consistency"],
                row["diversity"],
                row["seconds_per_image"],
                f"{row['speedup_vs_reference']:.1f}x" if row.get("speedup_vs_reference") is not None else "-",
            ]
            for row in rows
        ]
        lines.append(markdown_table(header, table))
        lines += _verdict(model, rows, settings)
        lines.append("")
    lines += [
        "## How to read this",
        "",
        "- PSNR and SSIM on the 0-255 scale against the held-out ground truth, averaged over the images (each over its samples).",
        f"- Consistency: PSNR(A(x_hat), A(x)) with A the bicubic x{settings.sr_scale} downsampling (super-resolution only), capped at 100 dB.",
        "- Diversity: the mean per-pixel standard deviation (0-255) over the samples of one input.",
        "- A sample of the posterior is not its mean: its error is the posterior's spread twice over (E|x_s - x|^2 = 2 E|m - x|^2"
        " for a calibrated model), about 3 dB of PSNR. The row with the highest PSNR is therefore the posterior mean (NFE 1)."
        " The samples add plausible detail, which PSNR penalises and the eye prefers: compare them in `samples.png`.",
        "- s / image: wall time of the sampler divided by the number of samples; speed-up relative to the reference sampler.",
        "- Numbers depend on the machine's thread count; the same command on the same machine reproduces them (every draw is seeded).",
        "",
        "Files: `samples.png` (input / posterior mean / a fast sample / the reference / ground truth, whole images),"
        " `nfe_curve.png` (PSNR and SSIM vs NFE), `metrics.json` (everything above), `runs/<model>/` (checkpoints:"
        " `msdiff sample --checkpoint runs/sr_mr --input LOW_RES_DIR --out RESTORED_DIR` restores your own images).",
        "",
    ]
    write_text(path, "\n".join(lines))


def _verdict(model: DemoModel, rows: List[Dict], settings: DemoSettings) -> List[str]:
    """What the table says: the best fast sampler against the input and against the reference."""
    base, reference = rows[0], rows[-1]
    fast = [r for r in rows[1:-1] if r["nfe"] <= 20]
    best = max(fast, key=lambda r: r["psnr"])
    samples = [r for r in fast if r["nfe"] > 1]
    best_sample = max(samples, key=lambda r: r["psnr"]) if samples else best
    lines = [
        f"Best fast restoration: {best['label']} at NFE {best['nfe']}: {best['psnr']:.2f} dB"
        f" ({best['psnr'] - base['psnr']:+.2f} dB against the input's {base['psnr']:.2f});"
        f" best fast sample: {best_sample['label']} at NFE {best_sample['nfe']}: {best_sample['psnr']:.2f} dB vs the reference's"
        f" {reference['psnr']:.2f} dB at NFE {reference['nfe']}, {best_sample['speedup_vs_reference']:.1f}x faster per image."
    ]
    if best["psnr"] <= base["psnr"]:
        lines.append(
            f"\n**Below its input baseline** after {settings.train_steps} steps: `benchmarks/results/longer_run_{model.key}.md`"
            f" shows how far this model must be trained (`python benchmarks/longer_run.py --model {model.key}`)."
        )
    return lines
