"""Trainer: exact resume, crash-safe checkpoints, DDP equivalence, schedules, AMP and bad inputs.

A tiny conv net and a stand-in estimator (same interface as msdiff_fast.estimators) keep every
run to a fraction of a second on the CPU.
"""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from msdiff_fast.training import ConditionalPairs, SyntheticImages, make_degradation
from msdiff_fast.training.batches import batch_positions
from msdiff_fast.training.checkpoint import atomic_write, latest_checkpoint, load_checkpoint
from msdiff_fast.training.config import TrainConfig
from msdiff_fast.training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]
# The GPU paths run wherever a GPU is present; the CPU cases always run.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
AMP_CASES = [("cpu", "bf16")] + ([("cuda", "bf16"), ("cuda", "fp16")] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _one_thread():
    """Tensors here are tiny: intra-op threads only add OpenMP spin-waits, which cost seconds per
    call when the cores are shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyDenoiser(nn.Module):
    """conv - time shift - swish - dropout - conv: enough structure for real gradients."""

    def __init__(self, channels: int = 3, width: int = 8, dropout: float = 0.0):
        super().__init__()
        self.conv_in = nn.Conv2d(2 * channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, inputs, t):
        hidden = F.silu(self.conv_in(inputs) + self.time(t[:, None].to(inputs.dtype))[:, :, None, None])
        return self.conv_out(self.dropout(hidden))


class StandInEstimator:
    """Noise-prediction loss on (x_t, y_t) with the trainer's estimator interface. Its y noise level
    decays with the number of on_step calls, so a resume that lost the estimator state diverges."""

    name = "stand-in"

    def __init__(self, interrupt_at=None):
        self.updates, self.sigma_y_max, self.interrupt_at = 0, 1.0, interrupt_at
        self.output_dtypes = set()

    def on_step(self, step):
        if step == self.interrupt_at:
            raise KeyboardInterrupt(f"simulated interruption at step {step}")
        self.updates += 1
        self.sigma_y_max = 1.0 / (1.0 + self.updates / 4)

    def state_dict(self):
        return {"updates": self.updates, "sigma_y_max": self.sigma_y_max}

    def load_state_dict(self, state):
        self.updates, self.sigma_y_max = state["updates"], state["sigma_y_max"]

    def loss(self, model, x0, y0, generator=None, step=None, offset_samples=0, global_batch=None):
        batch, total = x0.shape[0], global_batch or x0.shape[0]
        mine = slice(offset_samples, offset_samples + batch)  # this rank's part of the global draw
        t = torch.rand(total, generator=generator)[mine].to(x0.device)
        z = torch.randn((total,) + x0.shape[1:], generator=generator)[mine].to(x0.device)
        z_y = torch.randn((total,) + y0.shape[1:], generator=generator)[mine].to(x0.device)
        sigma = (0.1 + t).view(-1, 1, 1, 1)
        inputs = torch.cat([x0 + sigma * z, y0 + self.sigma_y_max * t.view(-1, 1, 1, 1) * z_y], dim=1)
        output = model(inputs, t)
        self.output_dtypes.add(output.dtype)
        return (output.float() + z).pow(2).mean()


class LinearLoss:
    """loss = scale * sum(w): a constant gradient, so Adam's steps are lr * g / (|g| + eps)."""

    name = "linear"

    def __init__(self, scale: float):
        self.scale = scale

    def on_step(self, step):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def loss(self, model, x0, y0, generator=None, step=None, offset_samples=0, global_batch=None):
        return self.scale * model.w.sum()


class Scalars(nn.Module):
    def __init__(self, size: int = 1):
        super().__init__()
        self.w = nn.Parameter(torch.ones(size))


def make_pairs(n: int = 10, size: int = 8):
    return ConditionalPairs(SyntheticImages(n, size=size, seed=1), make_degradation("noise", sigma=40.0), seed=3)


def make_model(seed: int = 0, dropout: float = 0.0, width: int = 8):
    torch.manual_seed(seed)
    return TinyDenoiser(width=width, dropout=dropout)


def config(out_dir, **settings):
    defaults = dict(steps=8, batch_size=4, lr=3e-3, warmup=3, ema_decay=0.9, seed=5, log_every=1,
                    checkpoint_every=4, out_dir=str(out_dir), device="cpu", progress=False)
    return TrainConfig(**dict(defaults, **settings))


def assert_same_state(a: Trainer, b: Trainer):
    for name in ("model", "ema"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), f"{name}.{key} differs"
    left, right = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert left["param_groups"] == right["param_groups"]
    for index, state in left["state"].items():
        for key, value in state.items():
            assert torch.equal(value, right["state"][index][key]), f"optimizer state {index}.{key} differs"
    assert a.estimator.state_dict() == b.estimator.state_dict()
    assert a.step == b.step


def metric_lines(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def tree_digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- data
def test_batches_cover_each_epoch_once_and_ranks_split_the_global_batch():
    dataset_size, batch = 10, 4
    stream = [p for step in range(5) for p in batch_positions(step, batch, dataset_size, seed=7)]
    for epoch in (0, 1):  # without replacement within an epoch; batches straddle epoch ends
        assert sorted(i for i, e in stream if e == epoch) == list(range(dataset_size))
    assert [i for i, e in stream if e == 0] != [i for i, e in stream if e == 1]
    for step in range(5):
        ranks = [batch_positions(step, batch, dataset_size, 7, rank, 2) for rank in (0, 1)]
        assert ranks[0] + ranks[1] == batch_positions(step, batch, dataset_size, 7)
    with pytest.raises(ValueError, match="multiple of world_size"):
        batch_positions(0, 3, dataset_size, 7, 0, 2)


# ---------------------------------------------------------------------------- resume
@pytest.mark.parametrize("device", DEVICES)
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # bitwise on a GPU needs it
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    dataset = make_pairs()
    straight = Trainer(make_model(dropout=0.2), StandInEstimator(), dataset, config(tmp_path / "a", device=device))
    straight.fit()

    interrupted = Trainer(make_model(dropout=0.2), StandInEstimator(interrupt_at=6), dataset,
                          config(tmp_path / "b", device=device))
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert interrupted.step == 6 and latest_checkpoint(tmp_path / "b").name == "step_00000004"

    # Another initialisation: everything must come from the checkpoint.
    resumed = Trainer(make_model(seed=99, dropout=0.2), StandInEstimator(), dataset,
                      config(tmp_path / "b", device=device))
    resumed.fit(resume=True)
    assert_same_state(straight, resumed)
    assert not any(torch.equal(p.cpu(), q) for p, q in zip(straight.model.parameters(), make_model().parameters()))
    # Metrics of the interrupted steps 5-6 were dropped and rewritten by the resumed run.
    losses = lambda run: [(m["step"], m["loss"], m["lr"], m["sigma_y_max"]) for m in metric_lines(tmp_path / run)]
    assert losses("a") == losses("b") and [s for s, *_ in losses("b")] == list(range(1, 9))


def test_checkpoint_failing_mid_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    dataset = make_pairs()
    straight = Trainer(make_model(), StandInEstimator(), dataset, config(tmp_path / "a")).fit()

    calls = {"n": 0}
    real_save = torch.save

    def disk_full_on_second_checkpoint(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoint 1 saves optimizer.pt + state.pt; checkpoint 2 dies in optimizer.pt
            handle.write(b"half a pickle")
            raise OSError("No space left on device (simulated)")
        return real_save(obj, handle, *args, **kwargs)

    run = tmp_path / "b"
    monkeypatch.setattr(torch, "save", disk_full_on_second_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        Trainer(make_model(), StandInEstimator(), dataset, config(run)).fit()
    monkeypatch.undo()
    folder = run / "checkpoints"
    assert (folder / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000004"]  # no partial left over
    # A writer killed mid-way (no chance to clean up) leaves a hidden partial directory: ignored.
    (folder / ".step_00000008.partial-999999").mkdir()
    (folder / ".step_00000008.partial-999999" / "model.safetensors").write_bytes(b"truncated")
    good = tree_digest(folder / "step_00000004")

    resumed = Trainer(make_model(seed=3), StandInEstimator(), dataset, config(run))
    resumed.fit(resume=True)
    assert_same_state(straight, resumed)
    assert tree_digest(folder / "step_00000004") == good
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000004", "step_00000008"]


def test_atomic_write_failure_leaves_old_content(tmp_path):
    target = tmp_path / "latest"
    atomic_write(target, lambda handle: handle.write(b"step_00000004\n"))

    def fail_half_way(handle):
        handle.write(b"step_000")
        raise OSError("simulated crash")

    with pytest.raises(OSError):
        atomic_write(target, fail_half_way)
    assert target.read_bytes() == b"step_00000004\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_load_checkpoint_for_sampling(tmp_path):
    trainer = Trainer(make_model(), StandInEstimator(), make_pairs(), config(tmp_path, steps=4),
                      description={"preset": "stand-in", "width": 8}).fit()
    sampler_model = make_model(seed=42)
    state = load_checkpoint(tmp_path, sampler_model, description={"preset": "stand-in", "width": 8})
    for p, q in zip(sampler_model.parameters(), trainer.ema.parameters()):
        assert torch.equal(p, q)
    assert state["step"] == 4 and state["estimator_name"] == "stand-in"
    assert state["estimator"]["sigma_y_max"] == trainer.estimator.sigma_y_max
    raw = load_checkpoint(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors", make_model(seed=1),
                          ema=False)
    assert raw["step"] == 4
    weights = safetensors.torch.load_file(str(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"))
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(weights[key], value)
    assert not all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), trainer.ema.parameters()))


# ---------------------------------------------------------------------------- DDP
DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_trainer import StandInEstimator, config, make_model, make_pairs
from msdiff_fast.training.trainer import train
train(make_model(), StandInEstimator(), make_pairs(), config(sys.argv[1], steps=3, checkpoint_every=0))
"""


def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    single = Trainer(make_model(), StandInEstimator(), make_pairs(), config(tmp_path / "one", steps=3,
                                                                            checkpoint_every=0)).fit()
    for file, module in (("model.safetensors", single.model), ("ema.safetensors", single.ema)):
        weights = safetensors.torch.load_file(str(tmp_path / "ddp" / "checkpoints" / "step_00000003" / file))
        for key, value in module.state_dict().items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=1e-6)
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step_00000003" / "state.pt", weights_only=True)
    assert state["world_size"] == 2
    moved = [not torch.allclose(p, q) for p, q in zip(single.model.parameters(), make_model().parameters())]
    assert all(moved)
    # The logged loss is the mean over both ranks, i.e. the single-process loss.
    ddp_losses = [m["loss"] for m in metric_lines(tmp_path / "ddp")]
    assert ddp_losses == pytest.approx([m["loss"] for m in metric_lines(tmp_path / "one")], rel=1e-5)


# ---------------------------------------------------------------------------- schedules
def test_warmup_schedule_and_adam_steps(tmp_path):
    settings = dict(lr=0.1, warmup=4, steps=6, batch_size=1, ema_warmup=False, grad_clip=None)
    trainer = Trainer(Scalars(), LinearLoss(1.0), [(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))],
                      config(tmp_path, **settings)).fit()
    assert [m["lr"] for m in metric_lines(tmp_path)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    # Constant gradient: Adam moves every step by lr exactly (bias-corrected m/sqrt(v) = 1).
    assert trainer.model.w.item() == pytest.approx(1 - (0.025 + 0.05 + 0.075 + 0.1 + 0.1 + 0.1), abs=1e-6)
    assert TrainConfig(steps=1, batch_size=1, warmup=0).lr_at(0) == 2e-4


def test_cosine_schedule_decays_to_zero_after_the_warmup():
    schedule = TrainConfig(steps=12, batch_size=1, lr=1.0, warmup=2, lr_schedule="cosine")
    rates = [schedule.lr_at(step) for step in range(13)]
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[7] == pytest.approx(0.5) and rates[12] == pytest.approx(0.0, abs=1e-12)
    assert all(later <= earlier for earlier, later in zip(rates[2:], rates[3:]))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(steps=1, batch_size=1, lr_schedule="linear")


def test_gradient_clipping(tmp_path):
    trainer = Trainer(Scalars(4), LinearLoss(10.0), [(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))],
                      config(tmp_path, steps=2, batch_size=1, grad_clip=1.0)).fit()
    for record in metric_lines(tmp_path):
        assert record["grad_norm"] == pytest.approx(20.0)  # |10 * ones(4)| before clipping
        assert record["grad_norm_clipped"] <= 1.0 + 1e-6
    assert trainer.model.w.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("ema_warmup, expected", [
    (False, [0.95, 0.875]),  # 0.5 * 1 + 0.5 * 0.9, then 0.5 * 0.95 + 0.5 * 0.8
    (True, [2 / 11 * 1 + 9 / 11 * 0.9, 3 / 12 * (2 / 11 * 1 + 9 / 11 * 0.9) + 9 / 12 * 0.8]),  # decay (1+n)/(10+n)
])
def test_ema_formula(tmp_path, ema_warmup, expected):
    values = []
    trainer = Trainer(Scalars(), LinearLoss(1.0), [(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))],
                      config(tmp_path, lr=0.1, warmup=0, steps=2, batch_size=1, ema_decay=0.5,
                             ema_warmup=ema_warmup, grad_clip=None, preview_every=1),
                      preview=lambda t, step: values.append((step, t.model.w.item(), t.ema.w.item())))
    trainer.fit()
    assert [step for step, _, _ in values] == [1, 2]
    assert [w for _, w, _ in values] == pytest.approx([0.9, 0.8], abs=1e-6)
    assert [e for _, _, e in values] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("device, amp", AMP_CASES)
def test_amp_trains(tmp_path, device, amp):
    dataset, estimator = make_pairs(n=8), StandInEstimator()
    model = make_model(width=16).to(device)
    x0 = torch.stack([dataset[i][0] for i in range(8)]).to(device)
    y0 = torch.stack([dataset[i][1] for i in range(8)]).to(device)

    def fixed_loss():  # fp32, fixed noise, a fresh estimator: only the weights change
        with torch.no_grad():
            return StandInEstimator().loss(model, x0, y0, generator=torch.Generator().manual_seed(0)).item()

    before = fixed_loss()
    trainer = Trainer(model, estimator, dataset, config(tmp_path, amp=amp, steps=20, batch_size=8, lr=1e-2, warmup=0,
                                                        log_every=5, checkpoint_every=0, device=device))
    trainer.fit()
    # autocast really ran the network in low precision
    assert estimator.output_dtypes == {torch.bfloat16 if amp == "bf16" else torch.float16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    after = fixed_loss()
    assert after < 0.5 * before, (before, after)
    logged = [m["loss"] for m in metric_lines(tmp_path)]
    assert logged[-1] < logged[0]


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("settings, field", [
    (dict(steps=0), "steps"), (dict(batch_size=-1), "batch_size"), (dict(steps=2.5), "steps"),
    (dict(lr=float("nan")), "lr"), (dict(lr=0.0), "lr"), (dict(betas=(1.0, 0.9)), "betas"),
    (dict(betas=(0.9,)), "betas"), (dict(warmup=-1), "warmup"), (dict(grad_clip=0.0), "grad_clip"),
    (dict(ema_decay=1.0), "ema_decay"), (dict(amp="fp8"), "amp"), (dict(amp="fp16", device="cpu"), "amp"),
    (dict(device="gpu0"), "device"), (dict(log_every=0), "log_every"), (dict(seed=True), "seed"),
    (dict(out_dir=""), "out_dir"),
])
def test_config_errors(settings, field):
    base = dict(steps=4, batch_size=2)
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}"):
        TrainConfig(**dict(base, **settings))


def test_bad_trainer_inputs(tmp_path):
    good = make_pairs(n=4)
    with pytest.raises(ValueError, match="empty data set"):
        Trainer(make_model(), StandInEstimator(), [], config(tmp_path))
    with pytest.raises(TypeError, match=r"pair \(x, y\)"):
        Trainer(make_model(), StandInEstimator(), [torch.zeros(3, 8, 8)], config(tmp_path))
    with pytest.raises(TypeError, match="estimator"):
        Trainer(make_model(), object(), good, config(tmp_path))
    with pytest.raises(TypeError, match="config"):
        Trainer(make_model(), StandInEstimator(), good, {"steps": 4})
    with pytest.raises(TypeError, match="description"):
        Trainer(make_model(), StandInEstimator(), good, config(tmp_path), description={"bad": object()})
    mixed = [(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)), (torch.zeros(3, 6, 6), torch.zeros(3, 6, 6))]
    with pytest.raises(ValueError, match="share their shapes"):
        Trainer(make_model(), StandInEstimator(), mixed, config(tmp_path, batch_size=2)).fit()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(make_model(), StandInEstimator(), good, config(tmp_path / "fresh")).fit(resume=True)


def test_diverging_loss_raises(tmp_path):
    with pytest.raises(FloatingPointError, match="diverged"):
        Trainer(Scalars(), LinearLoss(float("nan")), [(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))],
                config(tmp_path, steps=3, batch_size=1)).fit()
    assert latest_checkpoint(tmp_path) is None


def test_checkpoint_of_another_model_is_refused_and_nothing_changes(tmp_path):
    dataset = make_pairs(n=4)
    Trainer(make_model(), StandInEstimator(), dataset, config(tmp_path, steps=4),
            description={"preset": "tiny"}).fit()
    before = tree_digest(tmp_path)

    other_preset = make_model(seed=7)
    snapshot = [p.clone() for p in other_preset.parameters()]
    with pytest.raises(ValueError, match="preset: checkpoint 'tiny' vs expected 'small'"):
        Trainer(other_preset, StandInEstimator(), dataset, config(tmp_path, steps=8),
                description={"preset": "small"}).fit(resume=True)
    wider = make_model(width=12)
    with pytest.raises(ValueError, match="does not fit this model.*shape mismatch"):
        Trainer(wider, StandInEstimator(), dataset, config(tmp_path, steps=8),
                description={"preset": "tiny"}).fit(resume=True)
    with pytest.raises(ValueError, match="was trained with estimator 'stand-in'"):
        Trainer(Scalars(), LinearLoss(1.0), dataset, config(tmp_path, steps=8),
                description={"preset": "tiny"}).fit(resume=True)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(make_model(), StandInEstimator(), dataset, config(tmp_path, steps=8),
                description={"preset": "tiny"}).fit(resume=False)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(tmp_path, wider)
    assert tree_digest(tmp_path) == before
    assert all(torch.equal(p, q) for p, q in zip(other_preset.parameters(), snapshot))


def test_train_function_resumes_with_auto(tmp_path):
    dataset = make_pairs(n=4)
    first = train(make_model(), StandInEstimator(), dataset, config(tmp_path, steps=2), resume="auto")
    second = train(make_model(seed=5), StandInEstimator(), dataset, config(tmp_path, steps=4), resume="auto")
    straight = train(make_model(), StandInEstimator(), dataset, config(tmp_path / "straight", steps=4))
    assert first.step == 2 and second.step == 4
    assert_same_state(straight, second)


# ---------------------------------------------------------------------------- real estimators
def test_real_vscmde_with_tiny_unet_resumes_exactly(tmp_path):
    """The real estimator (VS-CMDE: CMDE whose sigma_y_max schedule is estimator state) and U-Net."""
    from msdiff_fast.estimators import make_estimator
    from msdiff_fast.models import unet_preset

    dataset = make_pairs(n=6, size=8)
    small = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)

    def run(out_dir, steps, resume=False, seed=0):
        torch.manual_seed(seed)
        model = unet_preset("tiny", "vscmde", image_channels=3, **small)
        estimator = make_estimator("vscmde", (3, 8, 8), (3, 8, 8), target_step=2, sigma_y_target=0.5)
        return train(model, estimator, dataset, config(out_dir, steps=steps, batch_size=2, checkpoint_every=1),
                     description={"preset": "tiny", "estimator": "vscmde"}, resume=resume)

    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 3, resume=True, seed=1)
    assert_same_state(straight, resumed)
    metrics = metric_lines(tmp_path / "b")
    assert all(math.isfinite(m["loss"]) for m in metrics)
    # The schedule is logged and restored: 1/sigma_y_max moves linearly from 1/sqrt(192) to 1/0.5 at step 2.
    start = 1 / math.sqrt(192)
    expected = [1 / (start + k / 2 * (2 - start)) for k in range(3)]
    assert [m["sigma_y_max"] for m in metrics] == pytest.approx(expected)
    state = load_checkpoint(tmp_path / "b", unet_preset("tiny", "vscmde", **small),
                            description={"preset": "tiny", "estimator": "vscmde"})
    assert state["step"] == 3 and state["estimator"]["sigma_y_max"] == pytest.approx(0.5)
