"""Estimators: each loss against an independent plain-PyTorch formula on the same noise, DDP
offsets, VS-CMDE's schedule, a short training run, sampling wrappers and input validation.

``plain_conditional_loss`` / ``plain_mr_loss`` are the oracles; benchmarks/benchmark_training_step.py
imports ``plain_conditional_loss`` as its eager provider so both stay in sync.
"""

import math

import pytest
import torch
from torch import nn

from msdiff_fast import MRSampler, pc_sample
from msdiff_fast.estimators import CDE, CMDE, ESTIMATORS, VSCMDE, CDiffE, MeanReverting, make_estimator, vs_sigma_y_max
from msdiff_fast.estimators import base as estimators_module
from msdiff_fast.models import unet_preset
from msdiff_fast.ops import philox_normal
from msdiff_fast.samplers import convert
from msdiff_fast.sde import MRSDE, VESDE, VPSDE, MultiSpeedSDE
from msdiff_fast.training import SuperResolution, SyntheticImages

X_SHAPE, Y_SHAPE = (3, 8, 8), (1, 8, 8)
CONDITIONAL = ("cde", "cdiffe", "cmde", "vscmde")
# the GPU path (generator, schedule, fused kernels on the device) runs wherever a GPU is present
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------- oracles
def ve_weight(sde: VESDE) -> float:
    """g^2 / sigma^2 of a geometric VE SDE, written out."""
    return 2 * math.log(sde.sigma_max / sde.sigma_min)


def plain_conditional_loss(model, x0, y0, t, z_x, z_y, sigma_x, sigma_y, weight_x, weight_y):
    """The CDE/CDiffE/CMDE loss of cmde.md section 2 with explicit noise and torch.cat.

    sigma_*: [B] stds at t; weight_*: g^2 / sigma^2 per sample ([B] or float). z_y None: CDE
    (clean y, no y term, normalised by D_x); otherwise normalised by D_x + D_y.
    """
    per_sample = (-1,) + (1,) * (x0.ndim - 1)
    x_t = x0 + sigma_x.reshape(per_sample) * z_x
    y_t = y0 if z_y is None else y0 + sigma_y.reshape(per_sample) * z_y
    output = model(torch.cat([x_t, y_t], dim=1), t)
    channels = x0.shape[1]
    x_term = weight_x * (output[:, :channels] + z_x).square().flatten(1).sum(1)
    if z_y is None:
        return (x_term / x0[0].numel()).mean()
    y_term = weight_y * (output[:, channels:] + z_y).square().flatten(1).sum(1)
    return ((x_term + y_term) / (x0[0].numel() + y0[0].numel())).mean()


def plain_mr_loss(model, sde, target, x0, mu, t, z):
    per_sample = (-1,) + (1,) * (x0.ndim - 1)
    alpha = sde.alpha(t).to(x0.dtype).reshape(per_sample)
    sigma = sde.sigma(t).to(x0.dtype).reshape(per_sample)
    x_t = mu + alpha * (x0 - mu) + sigma * z
    output = model(torch.cat([x_t - mu, mu], dim=1), t)
    if target == "noise":
        wanted = z
    elif target == "data":
        wanted = x0
    elif target == "residual":
        wanted = x0 - mu
    else:
        scale = sde.velocity_scale
        wanted = (scale * alpha * z - (sigma / scale) * (x0 - mu)) / torch.sqrt(alpha**2 + (sigma / scale) ** 2)
    return (output - wanted).square().flatten(1).mean(1).mean()


def reference_draw(generator, batch, noise_per_sample, t_eps, T, dtype, offset_samples=0, global_batch=None):
    """t and the Philox noise the estimators document: rand(global_batch) then the seed."""
    global_batch = batch if global_batch is None else global_batch
    u = torch.rand(global_batch, generator=generator, dtype=torch.float64, device=generator.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    t = t_eps + (T - t_eps) * u[offset_samples : offset_samples + batch]
    z = philox_normal(seed, offset_samples * noise_per_sample, batch * noise_per_sample, dtype=dtype, device=generator.device)
    return t, z.view(batch, noise_per_sample)


class SmallNet(nn.Module):
    """A few convolutions with a time embedding: model(input, t) like the U-Net."""

    def __init__(self, in_channels, out_channels, width=32, frequencies=8):
        super().__init__()
        self.register_buffer("frequencies", torch.logspace(0, 3, frequencies))
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(4, width)
        self.time = nn.Linear(2 * frequencies, width)
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x, t):
        angles = t.to(x.dtype)[:, None] * self.frequencies.to(x.dtype)
        embedding = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.norm(self.conv_in(x)) + embedding[:, :, None, None]
        return self.conv_out(self.body(h))


def make_model(est, dtype=torch.float64):
    return SmallNet(est.model_input_channels(), est.model_output_channels(), width=8).to(dtype)


def images(shape, batch=3, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, *shape), generator=generator, dtype=dtype)


def assert_close_relative(actual, expected, rtol, what):
    scale = expected.abs().max().clamp_min(1e-30)
    error = float((actual - expected).abs().max() / scale)
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol}"


def conditional_reference(est, model, x0, y0, seed, offset_samples=0, global_batch=None):
    batch, x_dim, y_dim = x0.shape[0], x0[0].numel(), y0[0].numel()
    clean = isinstance(est, CDE)
    per_sample = x_dim if clean else x_dim + y_dim
    t, z = reference_draw(torch.Generator(x0.device).manual_seed(seed), batch, per_sample, 1e-5, 1.0, x0.dtype, offset_samples, global_batch)
    z_x = z[:, :x_dim].reshape(x0.shape)
    z_y = None if clean else z[:, x_dim:].reshape(y0.shape)
    sigma_x = torch.exp(math.log(est.sde.x.sigma_min) + t * math.log(est.sde.x.sigma_max / est.sde.x.sigma_min)).to(x0.dtype)
    if clean:
        return plain_conditional_loss(model, x0, y0, t.to(x0.dtype), z_x, None, sigma_x, None, ve_weight(est.sde.x), None)
    y_sde = est.sde.y
    sigma_y = torch.exp(math.log(y_sde.sigma_min) + t * math.log(y_sde.sigma_max / y_sde.sigma_min)).to(x0.dtype)
    return plain_conditional_loss(model, x0, y0, t.to(x0.dtype), z_x, z_y, sigma_x, sigma_y, ve_weight(est.sde.x), ve_weight(y_sde))


def loss_and_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------------------- loss == formula
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CONDITIONAL)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_conditional_loss_and_gradient_match_plain_formula(name, dtype, rtol, device):
    est = make_estimator(name, X_SHAPE, Y_SHAPE)
    if name == "vscmde":
        est.on_step(60_000)
    model = make_model(est, dtype).to(device)
    x0, y0 = images(X_SHAPE, dtype=dtype).to(device), images(Y_SHAPE, dtype=dtype, seed=2).to(device)
    fused, fused_grads = loss_and_grads(model, est.loss(model, x0, y0, torch.Generator(device).manual_seed(7)))
    plain, plain_grads = loss_and_grads(model, conditional_reference(est, model, x0, y0, seed=7))
    assert_close_relative(fused, plain, rtol, f"{name} loss")
    for (param_name, _), got, want in zip(model.named_parameters(), fused_grads, plain_grads):
        assert_close_relative(got, want, rtol, f"{name} gradient of {param_name}")


def edm_noise_estimate(model, x_t, y_t, t, sigma, sigma_data):
    """EDM preconditioning written out for a VE x (alpha = 1): the noise estimate (x_t - D) / sigma."""
    per_sample = (-1,) + (1,) * (x_t.ndim - 1)
    sigma = sigma.reshape(per_sample)
    norm2 = sigma**2 + sigma_data**2
    c_in, c_skip, c_out = 1 / torch.sqrt(norm2), sigma_data**2 / norm2, sigma * sigma_data / torch.sqrt(norm2)
    output = model(torch.cat([c_in * x_t, y_t], dim=1), t)
    denoised = c_skip * x_t + c_out * output[:, : x_t.shape[1]]
    return (x_t - denoised) / sigma, output


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CONDITIONAL)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-6), (torch.float32, 2e-5)])
def test_preconditioned_loss_is_the_same_score_loss_in_the_edm_parameterisation(name, dtype, rtol, device):
    """With sigma_data the loss is still weight_x ||z - eps_hat||^2 (+ the y term), eps_hat now
    from the EDM denoiser; checked against that formula, loss and gradients."""
    sigma_data = 0.5
    est = make_estimator(name, X_SHAPE, Y_SHAPE, sigma_data=sigma_data)
    model = make_model(est, dtype).to(device)
    x0, y0 = images(X_SHAPE, dtype=dtype).to(device), images(Y_SHAPE, dtype=dtype, seed=2).to(device)
    fused, fused_grads = loss_and_grads(model, est.loss(model, x0, y0, torch.Generator(device).manual_seed(7)))

    batch, x_dim, y_dim = x0.shape[0], x0[0].numel(), y0[0].numel()
    clean = name == "cde"
    t, z = reference_draw(torch.Generator(device).manual_seed(7), batch, x_dim if clean else x_dim + y_dim, 1e-5, 1.0, dtype)
    z_x = z[:, :x_dim].reshape(x0.shape)
    sigma_x = est.sde.x.sigma(t).to(dtype)
    y_t = y0 if clean else y0 + est.sde.y.sigma(t).to(dtype).reshape(-1, 1, 1, 1) * z[:, x_dim:].reshape(y0.shape)
    eps, output = edm_noise_estimate(model, x0 + sigma_x.reshape(-1, 1, 1, 1) * z_x, y_t, t.to(dtype), sigma_x, sigma_data)
    per_sample = ve_weight(est.sde.x) * (z_x - eps).square().flatten(1).sum(1)
    if clean:
        plain = (per_sample / x_dim).mean()
    else:
        y_term = ve_weight(est.sde.y) * (output[:, 3:] + z[:, x_dim:].reshape(y0.shape)).square().flatten(1).sum(1)
        plain = ((per_sample + y_term) / (x_dim + y_dim)).mean()
    plain, plain_grads = loss_and_grads(model, plain)
    assert_close_relative(fused, plain, rtol, f"{name} loss")
    for (param_name, _), got, want in zip(model.named_parameters(), fused_grads, plain_grads):
        assert_close_relative(got, want, rtol, f"{name} gradient of {param_name}")


def test_preconditioned_sampling_model_is_the_edm_noise_estimate_and_round_trips():
    est = CDE.for_images(X_SHAPE, Y_SHAPE, sigma_data=0.5)
    model = make_model(est)
    y, x_t = images(Y_SHAPE, seed=2), 7.0 * images(X_SHAPE, seed=5)
    t = torch.tensor([0.1, 0.6, 1.0], dtype=torch.float64)
    want, _ = edm_noise_estimate(model, x_t, y, t, est.sde.x.sigma(t), 0.5)
    torch.testing.assert_close(est.sampling_model(model, y)(x_t, t, None), want)
    loaded = CDE.for_images(X_SHAPE, Y_SHAPE)
    loaded.load_state_dict(est.state_dict())
    assert loaded.sigma_data == 0.5
    torch.testing.assert_close(loaded.sampling_model(model, y)(x_t, t, None), want)
    legacy = {k: v for k, v in CDE.for_images(X_SHAPE, Y_SHAPE).state_dict().items() if k != "sigma_data"}
    loaded.load_state_dict(legacy)  # a checkpoint from before sigma_data: plain noise prediction
    assert loaded.sigma_data is None
    with pytest.raises(ValueError, match="sigma_data: expected a finite positive number, got -1"):
        CMDE.for_images(X_SHAPE, Y_SHAPE, sigma_data=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CONDITIONAL + ("mr",))
def test_cpu_stored_noise_gives_the_regenerated_loss_bit_for_bit(name, dtype, monkeypatch):
    """On the CPU the estimators draw the noise once and both ops read it: the same values as
    when each op regenerates it from (seed, offset), so the same loss and gradients exactly."""
    est = MeanReverting(MRSDE(10 / 255), "velocity", X_SHAPE) if name == "mr" else make_estimator(name, X_SHAPE, Y_SHAPE, sigma_data=0.5)
    y_shape = X_SHAPE if name == "mr" else Y_SHAPE
    model = make_model(est, torch.float32).to(dtype)
    x0, y0 = images(X_SHAPE, dtype=dtype), images(y_shape, dtype=dtype, seed=2)
    drawn = []
    real = estimators_module.stored_noise
    monkeypatch.setattr(estimators_module, "stored_noise", lambda *args: drawn.append(real(*args)) or drawn[-1])
    stored, stored_grads = loss_and_grads(model, est.loss(model, x0, y0, torch.Generator().manual_seed(3)))
    assert drawn and drawn[0] is not None
    monkeypatch.setattr(estimators_module, "stored_noise", lambda *args: None)
    regenerated, regenerated_grads = loss_and_grads(model, est.loss(model, x0, y0, torch.Generator().manual_seed(3)))
    assert torch.equal(stored, regenerated)
    for got, want in zip(stored_grads, regenerated_grads):
        assert torch.equal(got, want)


def test_cmde_weights_are_the_paper_constants():
    est = CMDE.for_images((3, 160, 160), (3, 160, 160))
    coefs = est.loss_coefficients(torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64), 3 * 160 * 160, 3 * 160 * 160)
    total = 2 * 3 * 160 * 160
    # cmde.md: "x weight ~21.85 for SR; y weight 9.21 for sigma_y_max = 0.5"
    torch.testing.assert_close(coefs[:, 0, 0] * total, torch.full((3,), 2 * math.log(math.sqrt(3 * 160 * 160) / 5e-3), dtype=torch.float64))
    assert round(float(coefs[0, 0, 0]) * total, 2) == 21.85 and round(float(coefs[0, 1, 0]) * total, 2) == 9.21
    torch.testing.assert_close(coefs[:, 1, 0] * total, torch.full((3,), 2 * math.log(100), dtype=torch.float64))
    assert (coefs[:, :, 1] == -1).all() and (coefs[:, :, 2] == 0).all()


def test_non_ve_multi_speed_sde_uses_its_scale_and_weight():
    sde = MultiSpeedSDE(VPSDE(), VPSDE(0.1, 5.0))
    est = CMDE(sde, X_SHAPE, Y_SHAPE)
    model = make_model(est)
    x0, y0 = images(X_SHAPE), images(Y_SHAPE, seed=2)
    fused = est.loss(model, x0, y0, torch.Generator().manual_seed(3))
    x_dim, y_dim = x0[0].numel(), y0[0].numel()
    t, z = reference_draw(torch.Generator().manual_seed(3), 3, x_dim + y_dim, 1e-5, 1.0, torch.float64)
    z_x, z_y = z[:, :x_dim].reshape(x0.shape), z[:, x_dim:].reshape(y0.shape)
    b = (-1, 1, 1, 1)
    inp = torch.cat([sde.x.alpha(t).reshape(b) * x0 + sde.x.sigma(t).reshape(b) * z_x, sde.y.alpha(t).reshape(b) * y0 + sde.y.sigma(t).reshape(b) * z_y], 1)
    out = model(inp, t)
    # VP: g^2 = beta(t), so g^2 / sigma^2 = beta / (1 - alpha^2)
    w_x = (0.1 + t * 19.9) / (1 - sde.x.alpha(t) ** 2)
    w_y = (0.1 + t * 4.9) / (1 - sde.y.alpha(t) ** 2)
    plain = ((w_x * (out[:, :3] + z_x).square().flatten(1).sum(1) + w_y * (out[:, 3:] + z_y).square().flatten(1).sum(1)) / (x_dim + y_dim)).mean()
    assert_close_relative(fused.detach(), plain.detach(), 1e-6, "VP multi-speed loss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target", MeanReverting.TARGETS)
@pytest.mark.parametrize("sde", [MRSDE(10 / 255), MRSDE.from_irsde(50, T=100)], ids=["continuous", "irsde"])
def test_mr_loss_and_gradient_match_plain_formula(sde, target, device):
    est = MeanReverting(sde, target, X_SHAPE)
    model = make_model(est).to(device)
    x0, mu = images(X_SHAPE).to(device), images(X_SHAPE, seed=2).to(device)
    fused, fused_grads = loss_and_grads(model, est.loss(model, x0, mu, torch.Generator(device).manual_seed(11)))
    t, z = reference_draw(torch.Generator(device).manual_seed(11), 3, x0[0].numel(), 1e-5 * sde.T, float(sde.T), torch.float64)
    plain, plain_grads = loss_and_grads(model, plain_mr_loss(model, sde, target, x0, mu, t, z.reshape(x0.shape)))
    assert_close_relative(fused, plain, 1e-6, f"mr {target} loss")
    for got, want in zip(fused_grads, plain_grads):
        assert_close_relative(got, want, 1e-6, f"mr {target} gradient")


@pytest.mark.parametrize("target", MeanReverting.TARGETS)
@pytest.mark.parametrize("sde", [MRSDE(10 / 255, "linear"), MRSDE.from_irsde(50, T=100)], ids=["continuous", "irsde"])
def test_mr_targets_are_what_the_sampler_converts(sde, target):
    """The exact training target, converted by the samplers' parameterisation, gives back x0."""
    est = MeanReverting(sde, target)
    x0, mu, z = images(X_SHAPE, seed=3), images(X_SHAPE, seed=4), torch.randn(3, *X_SHAPE, dtype=torch.float64)
    t = torch.tensor([0.37, 0.5, 0.93], dtype=torch.float64) * sde.T  # off IR-SDE's grid
    b = (-1, 1, 1, 1)
    x_t = mu + sde.alpha(t).reshape(b) * (x0 - mu) + sde.sigma(t).reshape(b) * z
    coefs = est.loss_coefficients(t, x0[0].numel())[:, 0]
    wanted = coefs[:, 1].reshape(b) * z + coefs[:, 2].reshape(b) * {"noise": x0, "data": x0, "residual": x0 - mu, "velocity": x0 - mu}[target]
    model = est.sampling_model(lambda network_input, time: wanted)
    for i in range(3):
        output = model(x_t, t, mu)[i : i + 1]  # what the samplers receive: the model_output kind
        recovered = convert(output, est.model_output, "data", sde, x_t[i : i + 1], float(t[i]), mu[i : i + 1])
        torch.testing.assert_close(recovered, x0[i : i + 1], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------- data parallel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["cde", "cmde", "mr"])
def test_two_ranks_reproduce_one_process(name, device):
    est = make_estimator(name, X_SHAPE, X_SHAPE if name == "mr" else Y_SHAPE)
    model = make_model(est).to(device)
    x0, y0 = images(X_SHAPE, batch=4).to(device), images(X_SHAPE if name == "mr" else Y_SHAPE, batch=4, seed=2).to(device)
    full = est.loss(model, x0, y0, torch.Generator(device).manual_seed(5))
    halves = [est.loss(model, x0[r * 2 : r * 2 + 2], y0[r * 2 : r * 2 + 2], torch.Generator(device).manual_seed(5), offset_samples=2 * r, global_batch=4) for r in range(2)]
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2, rtol=1e-12, atol=0)
    shifted = est.loss(model, x0[2:], y0[2:], torch.Generator(device).manual_seed(5), offset_samples=0, global_batch=4)
    assert not torch.isclose(shifted, halves[1]), "the offset must select other noise and times"


def test_ddp_offsets_match_the_oracle_draw():
    est = CMDE.for_images(X_SHAPE, Y_SHAPE)
    model = make_model(est)
    x0, y0 = images(X_SHAPE, batch=2), images(Y_SHAPE, batch=2, seed=2)
    fused = est.loss(model, x0, y0, torch.Generator().manual_seed(9), offset_samples=4, global_batch=6)
    plain = conditional_reference(est, model, x0, y0, seed=9, offset_samples=4, global_batch=6)
    assert_close_relative(fused.detach(), plain.detach(), 1e-6, "rank-2 loss")


# ---------------------------------------------------------------------------- VS-CMDE
def test_vs_sigma_y_max_matches_the_paper_numbers():
    start = math.sqrt(3 * 160 * 160)
    assert round(start, 2) == 277.13
    assert round(vs_sigma_y_max(50_000, start, 0.5, 250_000, clamp=False), 2) == 2.48
    assert round(vs_sigma_y_max(447_000, start, 0.5, 250_000, clamp=False), 2) == 0.28
    assert vs_sigma_y_max(0, start, 0.5, 250_000) == pytest.approx(start)
    assert vs_sigma_y_max(250_000, start, 0.5, 250_000) == pytest.approx(0.5)
    for step in (250_001, 447_000, 10**7):
        assert vs_sigma_y_max(step, start, 0.5, 250_000) == pytest.approx(0.5)
    values = [vs_sigma_y_max(k, start, 0.5, 250_000) for k in range(0, 250_001, 10_000)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_vscmde_on_step_changes_the_y_sde_and_round_trips():
    est = VSCMDE.for_images((3, 160, 160), (3, 160, 160))
    assert est.sde.y.sigma_max == pytest.approx(277.128, abs=1e-3)
    est.on_step(50_000)
    assert est.sde.y.sigma_max == pytest.approx(2.48, abs=5e-3) and est.sigma_y_max == est.sde.y.sigma_max
    assert est.sde.x.sigma_max == pytest.approx(277.128, abs=1e-3)
    state = est.state_dict()
    fresh = VSCMDE.for_images((3, 160, 160), (3, 160, 160))
    fresh.load_state_dict(state)
    assert fresh.step == 50_000 and fresh.sde.y.sigma_max == est.sde.y.sigma_max
    est.on_step(400_000)
    assert est.sde.y.sigma_max == pytest.approx(0.5)
    unclamped = VSCMDE.for_images((3, 160, 160), (3, 160, 160), clamp=False)
    unclamped.on_step(447_000)
    assert round(unclamped.sde.y.sigma_max, 2) == 0.28


def test_vscmde_loss_step_applies_the_schedule():
    est = VSCMDE.for_images(X_SHAPE, Y_SHAPE, sigma_y_target=0.1, target_step=100)
    model = make_model(est)
    x0, y0 = images(X_SHAPE), images(Y_SHAPE, seed=2)
    early = est.loss(model, x0, y0, torch.Generator().manual_seed(1), step=0)
    late = est.loss(model, x0, y0, torch.Generator().manual_seed(1), step=100)
    assert est.step == 100 and est.sde.y.sigma_max == pytest.approx(0.1)
    assert not torch.isclose(early, late)


def test_state_dicts_round_trip_the_sdes():
    cmde = CMDE.for_images(X_SHAPE, Y_SHAPE, sigma_y_max=1.0)
    other = CMDE.for_images(X_SHAPE, Y_SHAPE)
    other.load_state_dict(cmde.state_dict())
    assert other.sde.y.sigma_max == 1.0 and other.sde.x.sigma_max == cmde.sde.x.sigma_max
    with pytest.raises(ValueError, match="state"):
        CDE.for_images(X_SHAPE, Y_SHAPE).load_state_dict(cmde.state_dict())
    mr = MeanReverting(MRSDE(10 / 255), "velocity")
    with pytest.raises(ValueError, match="target"):
        MeanReverting(MRSDE(10 / 255), "noise").load_state_dict(mr.state_dict())
    with pytest.raises(ValueError, match="sde"):
        MeanReverting(MRSDE(20 / 255), "velocity").load_state_dict(mr.state_dict())


# ---------------------------------------------------------------------------- shapes and sampling
@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_channels_match_unet_preset(name):
    cond = 3 if name == "mr" else 1
    est = make_estimator(name, (3, 16, 16), (cond, 16, 16))
    net = unet_preset("tiny", estimator=name, image_channels=3, cond_channels=cond)
    assert (net.in_channels, net.out_channels) == (est.model_input_channels(3, cond), est.model_output_channels(3, cond))
    assert (est.model_input_channels(), est.model_output_channels()) == (net.in_channels, net.out_channels)


def test_paper_defaults():
    x, y = (3, 160, 160), (3, 160, 160)
    assert CMDE.for_images(x, y).sde.x.sigma_max == pytest.approx(277.128, abs=1e-3)
    assert CMDE.for_images(x, y).sde.y.sigma_max == 0.5 and CMDE.for_images(x, y).sde.y.sigma_min == 5e-3
    assert CDiffE.for_images(x, y).sde.y.sigma_max == CDiffE.for_images(x, y).sde.x.sigma_max
    assert CDE.for_images(x, y).sde.y is None and CDE.for_images(x, y).sde.x.sigma_min == 5e-3
    assert VSCMDE.for_images(x, (1, 160, 160)).sde.y.sigma_max == pytest.approx(160.0)


@pytest.mark.parametrize("mode", ["fresh", "clean", "consistent"])
def test_sampling_model_returns_minus_the_x_output(mode):
    est = CMDE.for_images(X_SHAPE, Y_SHAPE)
    model = make_model(est)
    y = images(Y_SHAPE, seed=2)
    times = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64)
    wrapped = est.sampling_model(model, y, mode=mode, generator=torch.Generator().manual_seed(0), times=times)
    x_t, t = images(X_SHAPE, seed=5), torch.full((3,), 0.6, dtype=torch.float64)
    eps = wrapped(x_t, t, None)
    assert eps.shape == x_t.shape
    if mode == "clean":
        torch.testing.assert_close(eps, -model(torch.cat([x_t, y], 1), t)[:, :3])
    else:
        # y_t = y + sigma_y(0.6) z: the network sees a noisy y, not the clean one
        assert not torch.allclose(eps, -model(torch.cat([x_t, y], 1), t)[:, :3])


@torch.no_grad()
def test_sampling_models_drive_the_samplers():
    est = CMDE.for_images(X_SHAPE, Y_SHAPE)
    model = make_model(est, torch.float32)
    y = images(Y_SHAPE, dtype=torch.float32, seed=2)
    wrapped = est.sampling_model(model, y, generator=torch.Generator().manual_seed(0))
    sample = MRSampler(est.sde.x, 4, model_output="noise").sample(wrapped, None, shape=(3, *X_SHAPE), generator=torch.Generator().manual_seed(1))
    assert sample.shape == (3, *X_SHAPE) and torch.isfinite(sample).all()
    sample = pc_sample(wrapped, est.sde.x, y, 3, model_output="noise", shape=(3, *X_SHAPE), generator=torch.Generator().manual_seed(1))
    assert sample.shape == (3, *X_SHAPE) and torch.isfinite(sample).all()
    cde = CDE.for_images(X_SHAPE, Y_SHAPE)
    with pytest.raises(ValueError, match="mode"):
        cde.sampling_model(make_model(cde), y, mode="fresh")
    mr = MeanReverting(MRSDE(10 / 255), "data", X_SHAPE)
    mr_model = make_model(mr, torch.float32)
    mu = images(X_SHAPE, dtype=torch.float32, seed=3)
    restored = MRSampler(mr.sampler_sde, 4, model_output=mr.model_output).sample(mr.sampling_model(mr_model), mu, generator=torch.Generator().manual_seed(1))
    assert restored.shape == mu.shape and torch.isfinite(restored).all()
    torch.testing.assert_close(mr.sampling_model(mr_model)(mu, torch.ones(3), mu), mr_model(torch.cat([mu * 0, mu], 1), torch.ones(3)))


# ---------------------------------------------------------------------------- training
@pytest.fixture
def one_thread():
    # a small model on a shared machine: one thread avoids spinning against other processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_a_small_model_lowers_the_loss(one_thread):
    data = SyntheticImages(48, size=16, seed=0)
    x_all = torch.stack([data[i] for i in range(len(data))])
    y_all = SuperResolution(2)(x_all)
    est = CMDE.for_images((3, 16, 16), (3, 16, 16))
    model = SmallNet(est.model_input_channels(), est.model_output_channels(), width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(1)

    def evaluate():
        with torch.no_grad():
            return float(sum(est.loss(model, x_all[i : i + 16], y_all[i : i + 16], torch.Generator().manual_seed(i)) for i in range(0, 48, 16)) / 3)

    before = evaluate()
    losses = []
    for step in range(200):
        index = torch.randint(0, 48, (16,), generator=batches)
        loss = est.loss(model, x_all[index], y_all[index], noise, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    after = evaluate()
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    # measured: 11.8 -> 6.7 (training) and 13.4 -> 6.3 (evaluation); an untrained model stays at ~1x
    assert last < 0.75 * first, f"training loss {first:.3f} -> {last:.3f}"
    assert after < 0.6 * before, f"fixed evaluation loss {before:.3f} -> {after:.3f}"


# ---------------------------------------------------------------------------- validation
def _bad_calls():
    est = CMDE.for_images(X_SHAPE, Y_SHAPE)
    model = make_model(est, torch.float32)
    x0, y0 = images(X_SHAPE, dtype=torch.float32), images(Y_SHAPE, dtype=torch.float32, seed=2)
    nan = x0.clone()
    nan[0, 0, 0, 0] = float("nan")
    wrong_head = SmallNet(4, 3, width=8)
    return {
        "x0 shape": (lambda: est.loss(model, x0[:, :2], y0), ValueError, r"x0: expected \[B, 3, 8, 8\]"),
        "y0 shape": (lambda: est.loss(model, x0, images((1, 4, 4), dtype=torch.float32)), ValueError, "y0: expected"),
        "y0 batch": (lambda: est.loss(model, x0, y0[:2]), ValueError, "y0: expected batch 3"),
        "x0 non-finite": (lambda: est.loss(model, nan, y0), ValueError, "x0: expected finite"),
        "x0 dtype": (lambda: est.loss(model, (x0 * 255).to(torch.uint8), y0), TypeError, "x0: expected a floating dtype"),
        "y0 dtype": (lambda: est.loss(model, x0, y0.double()), TypeError, "y0: expected dtype torch.float32"),
        "x0 type": (lambda: est.loss(model, x0.numpy(), y0), TypeError, "x0: expected a torch.Tensor"),
        "model output": (lambda: est.loss(wrong_head, x0, y0), ValueError, r"model: expected an output of shape \(3, 4, 8, 8\) \(3 x-score \+ 1 y-score channels"),
        "model": (lambda: est.loss(None, x0, y0), TypeError, "model: expected a callable"),
        "generator": (lambda: est.loss(model, x0, y0, generator=3), TypeError, "generator"),
        "offset_samples": (lambda: est.loss(model, x0, y0, offset_samples=-1), ValueError, "offset_samples"),
        "global_batch missing": (lambda: est.loss(model, x0, y0, offset_samples=3), ValueError, "global_batch"),
        "global_batch small": (lambda: est.loss(model, x0, y0, offset_samples=3, global_batch=5), ValueError, "global_batch: expected an int >= offset_samples \\+ batch = 6"),
        "step": (lambda: est.loss(model, x0, y0, step=-1), ValueError, "step"),
        "x_shape": (lambda: CMDE.for_images((3, 8), Y_SHAPE), ValueError, "x_shape"),
        "y_shape spatial": (lambda: CMDE.for_images(X_SHAPE, (1, 4, 4)), ValueError, "y_shape"),
        "sigma_y_max": (lambda: CMDE.for_images(X_SHAPE, Y_SHAPE, sigma_y_max=1e-3), ValueError, "sigma_y_max"),
        "sde": (lambda: CMDE(VESDE(), X_SHAPE, Y_SHAPE), TypeError, "sde: expected a MultiSpeedSDE"),
        "mr sde": (lambda: MeanReverting(VESDE()), TypeError, "sde: expected a mean-reverting SDE"),
        "mr target": (lambda: MeanReverting(MRSDE(0.1), "score"), ValueError, "target"),
        "mr mu shape": (lambda: MeanReverting(MRSDE(0.1)).loss(make_model(MeanReverting(MRSDE(0.1), x_shape=X_SHAPE), torch.float32), x0, y0), ValueError, "y0: expected mu shaped like x0"),
        "vs target_step": (lambda: vs_sigma_y_max(10, 277.0, 0.5, 0), ValueError, "target_step"),
        "vs step": (lambda: vs_sigma_y_max(1.5, 277.0, 0.5, 10), ValueError, "step"),
        "vs start": (lambda: vs_sigma_y_max(1, -1.0, 0.5, 10), ValueError, "start"),
        "name": (lambda: make_estimator("cmd", X_SHAPE, Y_SHAPE), ValueError, "name: expected one of"),
        "sampling y": (lambda: est.sampling_model(model, torch.cat([y0, y0], dim=1)), ValueError, r"y: expected \[B, 1, H, W\]"),
    }


@pytest.mark.parametrize("case", sorted(_bad_calls()))
def test_bad_inputs_raise_naming_the_argument(case):
    call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


def test_sampling_model_checks_the_output_channels():
    est = CMDE.for_images(X_SHAPE, Y_SHAPE)
    wrapped = est.sampling_model(SmallNet(4, 3, width=8), images(Y_SHAPE, dtype=torch.float32), mode="clean")
    with pytest.raises(ValueError, match="4 channels|3 x-score"):
        wrapped(images(X_SHAPE, dtype=torch.float32), torch.ones(3), None)
