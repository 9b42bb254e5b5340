"""The trainer's throughput switches (TrainConfig.compile, channels_last, optimizer_impl): the same
training up to float rounding, exact resume, stored in checkpoints, validated."""

import dataclasses

import pytest
import torch
from test_trainer import StandInEstimator, _one_thread, assert_same_state, config, make_model, make_pairs  # noqa: F401

from msdiff_fast.training.checkpoint import read_state
from msdiff_fast.training.config import OPTIMIZER_IMPLS, TrainConfig, make_adam
from msdiff_fast.training.trainer import Trainer


def trained(out_dir, dropout=0.0, **settings):
    return Trainer(make_model(dropout=dropout), StandInEstimator(), make_pairs(), config(out_dir, **settings)).fit()


@pytest.mark.parametrize("impl", OPTIMIZER_IMPLS)
def test_every_optimizer_implementation_trains_the_same_weights(tmp_path, impl):
    reference = trained(tmp_path / "reference", optimizer_impl="for")
    run = trained(tmp_path / impl, optimizer_impl=impl)
    for p, q in zip(run.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_channels_last_trains_the_same_weights_with_the_fused_optimizer(tmp_path):
    """Fused Adam reads a parameter, its gradient and its moments as one flat array (torch 2.13 gives
    wrong updates when a gradient's layout differs from its parameter's): channels-last must keep
    every one of them in the same layout. Without dropout: its masks are drawn in memory order, so
    channels-last draws other ones."""
    reference = trained(tmp_path / "plain", optimizer_impl="for")
    run = trained(tmp_path / "cl", channels_last=True, optimizer_impl="fused")
    assert run.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(run.model.parameters(), reference.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    for p, q in zip(run.ema.parameters(), reference.ema.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_compiled_channels_last_run_resumes_bit_for_bit_and_stores_its_switches(tmp_path):
    switches = dict(compile=True, channels_last=True, optimizer_impl="fused")
    straight = trained(tmp_path / "a", dropout=0.2, **switches)
    interrupted = Trainer(make_model(dropout=0.2), StandInEstimator(interrupt_at=6), make_pairs(), config(tmp_path / "b", **switches))
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = Trainer(make_model(seed=99, dropout=0.2), StandInEstimator(), make_pairs(), config(tmp_path / "b", **switches))
    resumed.fit(resume=True)
    assert_same_state(straight, resumed)
    stored = read_state(tmp_path / "b" / "checkpoints" / "step_00000008")["config"]
    assert {name: stored[name] for name in switches} == switches
    # compiled and eager training agree to float rounding (without dropout: Inductor draws its masks
    # from its own generator)
    eager = Trainer(make_model(), StandInEstimator(), make_pairs(), config(tmp_path / "eager", steps=3)).fit()
    compiled = Trainer(make_model(), StandInEstimator(), make_pairs(), config(tmp_path / "compiled", steps=3, compile=True)).fit()
    for p, q in zip(compiled.model.parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_resuming_with_other_throughput_switches_continues_without_a_warning(tmp_path, recwarn):
    trained(tmp_path / "run", steps=4)
    Trainer(make_model(), StandInEstimator(), make_pairs(), config(tmp_path / "run", steps=6, channels_last=True,
                                                                    optimizer_impl="for")).fit(resume=True)
    assert not [w for w in recwarn if "changed settings" in str(w.message)]


@pytest.mark.parametrize("settings, field", [
    (dict(compile=1), "compile"), (dict(channels_last="yes"), "channels_last"), (dict(optimizer_impl="apex"), "optimizer_impl"),
])
def test_config_errors(settings, field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}"):
        TrainConfig(steps=4, batch_size=2, **settings)


def test_make_adam_follows_the_config():
    base = TrainConfig(steps=1, batch_size=1, lr=0.5, warmup=0, betas=(0.8, 0.9))
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    for impl, fused, foreach in (("auto", True, None), ("fused", True, None), ("foreach", None, True), ("for", None, False)):
        group = make_adam(parameters, dataclasses.replace(base, optimizer_impl=impl), torch.device("cpu")).param_groups[0]
        assert (group["fused"], group["foreach"], group["lr"], group["betas"]) == (fused, foreach, 0.5, (0.8, 0.9))
