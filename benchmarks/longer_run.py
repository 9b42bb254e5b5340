"""How far must a demo model be trained? One `msdiff train` run far past the demo's budget, its
checkpoints scored on the demo's held-out photographs as they come.

The model is one of the demo's (same task, estimator, network, data, batch and learning rate);
the run is the exact `msdiff train` command printed in the report, with a checkpoint every
``--every`` steps. Each checkpoint restores the held-out photographs whole with the MR Sampler
(one sample at NFE 20; the mean of ``--average`` such samples; NFE 1, the posterior mean),
against the input baseline. Writes benchmarks/results/longer_run_<model>.md / .png / .json.

    python benchmarks/longer_run.py --model sr_cmde --steps 12000 --every 1000   # ~1.2 h on one idle core
    python benchmarks/longer_run.py --model sr_cmde --steps 200 --every 100       # a smoke test
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from msdiff_fast.demo import DemoSettings, demo_models
from msdiff_fast.demo.experiment import average_metrics, restore_pairs, test_pairs
from msdiff_fast.reports import cpu_model, markdown_table
from msdiff_fast.restoration import SamplerSpec, load_trained
from msdiff_fast.training.tasks import consistency_operator

RESULTS = Path(__file__).resolve().parent / "results"


def train_command(model, settings: DemoSettings, steps: int, every: int, out: Path) -> list:
    """The `msdiff train` command that trains the demo's ``model`` (its settings as flags)."""
    spec = model.spec
    command = [
        "msdiff",
        "train",
        "--task",
        spec.task,
        "--estimator",
        spec.estimator,
        "--data",
        settings.data,
        "--downscale",
        str(settings.downscale),
        "--image-size",
        str(spec.image_size),
        "--preset",
        spec.preset,
        "--steps",
        str(steps),
        "--batch-size",
        str(settings.batch_size),
        "--lr",
        str(settings.lr),
        "--warmup",
        str(settings.warmup),
        "--amp",
        settings.amp,
        "--seed",
        str(settings.seed),
        "--checkpoint-every",
        str(every),
        "--keep-checkpoints",
        "0",
        "--log-every",
        "100",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    options = spec.estimator_options
    if spec.task == "sr":
        command += ["--scale", str(spec.task_options["scale"]), "--upsample", spec.task_options["upsample"]]
    if spec.task == "denoise":
        command += ["--noise-sigma", str(spec.task_options["noise_sigma"])]
    if spec.estimator == "cmde":
        command += ["--sigma-y", str(options["sigma_y_max"])]
    if options.get("sigma_data") is not None:
        command += ["--sigma-data", str(options["sigma_data"])]
    if spec.estimator == "mr":
        command += ["--mr-sigma", str(round(options["lam_inf"] * 255, 6)), "--mr-target", options["target"]]
    return command


def score(checkpoint: Path, model, settings: DemoSettings, average: int) -> dict:
    trained_model = load_trained(checkpoint, torch.device("cpu"))
    trained = {"network": trained_model.network, "estimator": trained_model.estimator}
    pairs = test_pairs(model, settings)
    operator = consistency_operator(model.spec.task, model.spec.task_options)
    row = {
        "step": trained_model.step,
        "input": average_metrics({n: p["baseline"][None] for n, p in pairs.items()}, pairs, operator)["psnr"],
    }
    samples, _ = restore_pairs(
        trained, pairs, SamplerSpec("mr-sde", 20), average, settings.seed + 100, settings, torch.device("cpu")
    )
    row["sample"] = average_metrics({n: s[:1] for n, s in samples.items()}, pairs, operator)["psnr"]
    row[f"mean of {average} samples"] = average_metrics(
        {n: s.mean(0, keepdim=True) for n, s in samples.items()}, pairs, operator
    )["psnr"]
    if model.spec.estimator == "mr":  # one step from t = T is the posterior mean only where the condition is clean
        means, _ = restore_pairs(
            trained, pairs, SamplerSpec("mr-ode", 1, order=1), 1, settings.seed + 100, settings, torch.device("cpu")
        )
        row["NFE 1"] = average_metrics(means, pairs, operator)["psnr"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sr_cmde", choices=[m.key for m in demo_models(DemoSettings.full())])
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--average", type=int, default=4, help="samples averaged for the Monte-Carlo posterior mean")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--run", default=None, help="run directory (default: runs/longer_<model>; an existing run is resumed)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = DemoSettings.full()
    model = {m.key: m for m in demo_models(settings)}[args.model]
    run = Path(args.run or f"runs/longer_{args.model}")
    command = train_command(model, settings, args.steps, args.every, run)
    resume = ["--resume"] if (run / "checkpoints").is_dir() else []
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "msdiff_fast", *command[1:], *resume],
        check=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    training_minutes = (time.perf_counter() - started) / 60
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cpu_seconds = metrics[-1]["seconds"]
    rows = [score(step_dir, model, settings, args.average) for step_dir in sorted((run / "checkpoints").glob("step_*"))]
    out = Path(args.results) / f"longer_run_{args.model}"
    columns = [k for k in rows[0] if k != "step"]
    posterior_mean = ", and NFE 1 (the network's posterior mean)" if "NFE 1" in columns else ""
    text = (
        f"# {args.model}: PSNR against training steps\n\n{model.title}. Trained with\n\n```\n{shlex.join(command)}\n```\n\n"
        f"({cpu_model()}, {args.threads} thread; {metrics[-1]['step']} steps in {cpu_seconds / 60:.0f} min of training time, "
        f"{training_minutes:.0f} min this call; the demo trains {settings.train_steps} steps). Scored on the demo's held-out "
        f"photographs ({', '.join(test_pairs(model, settings))}) restored whole with the MR Sampler: one sample at NFE 20, "
        f"the mean of {args.average} such samples{posterior_mean}. PSNR in dB.\n\n"
        + markdown_table(["step", *columns], [[r["step"], *(r[c] for c in columns)] for r in rows])
    )
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "cpu_seconds": cpu_seconds, "rows": rows}, indent=2) + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for column in columns:
        axis.plot(
            [r["step"] for r in rows],
            [r[column] for r in rows],
            marker="o" if column != "input" else None,
            linestyle="--" if column == "input" else "-",
            label=column if column != "input" else "input (baseline)",
        )
    axis.axvline(settings.train_steps, color="grey", linewidth=0.8, linestyle=":", label="the demo's steps")
    axis.set_xlabel("training steps")
    axis.set_ylabel("PSNR (dB), held-out photographs")
    axis.set_title(f"{args.model}: quality against training", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    print(text)


if __name__ == "__main__":
    main()
