"""Property-based tests of the three fused ops (Hypothesis): every backend that runs here against the
float64 reference on random shapes, strides, dtypes, batch sizes (0 included), term counts,
seeds/offsets and aliasing. The examples are derandomized and bounded, so CI is deterministic and
the whole file (150 examples per op) takes well under a minute of CPU (Triton under its interpreter on small tensors)."""
import math
import os
import tempfile

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

# Hypothesis keeps caches in ./.hypothesis; the suite leaves nothing in the checkout.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "msdiff-fast-hypothesis"))

import msdiff_fast  # noqa: E402
from msdiff_fast.ops import mr_step, noise_inject, reference, weighted_score_loss  # noqa: E402
from msdiff_fast.ops.mr_step import MAX_TERMS  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
EPS = {dtype: torch.finfo(dtype).eps for dtype in DTYPES}
BACKENDS = [name for name in ("torch", "cpu", "triton") if msdiff_fast.backends("cpu")["mr_step"][name] == "ok"]
PROPERTIES = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def _runs(backend: str, dtype: torch.dtype) -> bool:
    """The compiled backends leave float64 to the torch reference (and refuse it when forced)."""
    return backend == "torch" or dtype != torch.float64


@st.composite
def layouts(draw, batch_min: int = 0):
    """(shape, a function making a tensor of that shape: contiguous, or a strided / transposed view)."""
    batch = draw(st.integers(batch_min, 3))
    sample = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    return (batch, *sample), draw(st.sampled_from(["contiguous", "strided", "transposed"]))


def _tensor(shape, layout: str, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if layout == "strided":  # every other element of a wider tensor
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator)
        return wide[..., ::2].to(dtype)
    if layout == "transposed" and len(shape) >= 3:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=generator).transpose(-1, -2).to(dtype)
    return torch.randn(*shape, generator=generator).to(dtype)


def _close(got: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype) -> None:
    """|got - expected| <= 2 eps(dtype) (|terms| + 1): rounding to dtype plus float32 arithmetic on
    inputs of that size (noise: float32 Box-Muller against the float64 one)."""
    error = (got.double() - expected.double()).abs()
    bound = 2 * EPS[dtype] * (magnitude.double() + 1) + 1e-5 * magnitude.double()
    assert error.shape == bound.shape and bool((error <= bound).all()), float((error - bound).max())


seeds = st.integers(0, 2**63 - 1)
offsets = st.one_of(st.integers(0, 7), st.integers(0, 2**40))


@PROPERTIES
@given(layout=layouts(), terms=st.integers(1, MAX_TERMS), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       noisy=st.sampled_from(["none", "stream", "explicit"]), alias=st.booleans(), seed=seeds, offset=offsets, data=st.data())
def test_mr_step_matches_the_float64_reference(layout, terms, dtype, backend, noisy, alias, seed, offset, data):
    shape, kind = layout
    assume(_runs(backend, dtype))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x = _tensor(shape, kind, dtype, generator)
    term_list = [_tensor(shape, data.draw(st.sampled_from(["contiguous", "strided", "transposed"])), dtype, generator) for _ in range(terms)]
    coefs = (4 * torch.rand(shape[0], terms + 1, generator=generator, dtype=torch.float64) - 2).to(data.draw(st.sampled_from([torch.float32, torch.float64])))
    noise_coef = None if noisy == "none" else torch.rand(shape[0], generator=generator, dtype=torch.float64)
    noise = _tensor(shape, "contiguous", torch.float32, generator) if noisy == "explicit" else None
    expected = reference.mr_step(x.double(), [t.double() for t in term_list], coefs.double(), noise_coef, seed, offset,
                                 None if noise is None else noise.double())
    magnitude = coefs[:, :1].double().abs().reshape(-1, *[1] * (len(shape) - 1)) * x.double().abs()
    for k, t in enumerate(term_list):
        magnitude = magnitude + coefs[:, k + 1].double().abs().reshape(-1, *[1] * (len(shape) - 1)) * t.double().abs()
    if noise_coef is not None:
        magnitude = magnitude + 6 * noise_coef.reshape(-1, *[1] * (len(shape) - 1))
    if alias:  # out is x: each element read before it is written
        x = x.contiguous()
        got = mr_step(x, term_list, coefs, noise_coef, seed=seed, offset=offset, noise=noise, out=x, backend=backend)
        assert got is x
    else:
        got = mr_step(x, term_list, coefs, noise_coef, seed=seed, offset=offset, noise=noise, backend=backend)
    assert got.dtype == dtype and got.shape == shape
    _close(got, expected, magnitude, dtype)


@PROPERTIES
@given(layout=layouts(), y_channels=st.integers(0, 3), noisy_y=st.booleans(), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS),
       with_mu=st.booleans(), explicit=st.booleans(), into_buffer=st.booleans(), seed=seeds, offset=offsets, data=st.data())
def test_noise_inject_matches_the_float64_reference(layout, y_channels, noisy_y, dtype, backend, with_mu, explicit, into_buffer, seed, offset, data):
    shape, kind = layout
    assume(_runs(backend, dtype) and len(shape) >= 2)
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    x0 = _tensor(shape, kind, dtype, generator)
    batch = shape[0]
    x_coefs = torch.rand(batch, 2, generator=generator, dtype=torch.float64).float()
    y0 = _tensor((batch, y_channels, *shape[2:]), "contiguous", dtype, generator) if y_channels else None
    y_coefs = torch.rand(batch, 2, generator=generator, dtype=torch.float64).float() if y0 is not None and noisy_y else None
    mu = _tensor(shape, "contiguous", dtype, generator) if with_mu else None
    noise = None
    if explicit:
        noise = (_tensor(shape, "contiguous", torch.float32, generator),
                 _tensor(y0.shape, "contiguous", torch.float32, generator) if y_coefs is not None else None)
    expected_x, expected_y = reference.noise_inject(x0.double(), x_coefs, None if y0 is None else y0.double(), y_coefs,
                                                    None if mu is None else mu.double(), seed, offset,
                                                    None if noise is None else tuple(None if z is None else z.double() for z in noise))
    out = torch.empty(batch, shape[1] + y_channels, *shape[2:], dtype=dtype) if into_buffer else None
    got_x, got_y = noise_inject(x0, x_coefs, y0, y_coefs, mu=mu, seed=seed, offset=offset, noise=noise, out=out, backend=backend)
    per_sample = (-1, *[1] * (len(shape) - 1))
    scale, std = x_coefs[:, 0].double().reshape(per_sample), x_coefs[:, 1].double().reshape(per_sample)
    magnitude = scale * x0.double().abs() + (0 if mu is None else (1 - scale) * mu.double().abs()) + 6 * std
    _close(got_x, expected_x, magnitude, dtype)
    assert (got_y is None) == (y0 is None)
    if y0 is not None:
        y_magnitude = y0.double().abs() + (0 if y_coefs is None else 6 * y_coefs[:, 1].double().reshape(per_sample))
        _close(got_y, expected_y, y_magnitude, dtype)
    if into_buffer:
        assert got_x.data_ptr() == out.data_ptr()


@PROPERTIES
@given(layout=layouts(batch_min=0), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(BACKENDS), split=st.booleans(),
       explicit=st.booleans(), with_target=st.booleans(), reduction=st.sampled_from(["none", "sum", "mean"]), seed=seeds, offset=offsets,
       data=st.data())
def test_weighted_score_loss_and_its_gradient_match_the_float64_reference(layout, dtype, backend, split, explicit, with_target, reduction,
                                                                            seed, offset, data):
    shape, kind = layout
    dim = math.prod(shape[1:])
    assume(_runs(backend, dtype) and not (split and dim < 2) and not (reduction == "mean" and shape[0] == 0))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    output = _tensor(shape, kind, dtype, generator).requires_grad_(True)
    split_at = data.draw(st.integers(1, dim - 1)) if split else None
    coefs = torch.rand(shape[0], 2 if split else 1, 3, generator=generator, dtype=torch.float64).float()
    noise = _tensor(shape, "contiguous", torch.float32, generator) if explicit else None
    target = _tensor(shape, "contiguous", dtype, generator) if with_target else None
    loss, grad = reference.weighted_score_loss(output.detach().double(), coefs.double(), split_at, seed, offset,
                                               None if noise is None else noise.double(), None if target is None else target.double())
    got = weighted_score_loss(output, coefs, split=split_at, seed=seed, offset=offset, noise=noise, target=target, reduction=reduction, backend=backend)
    expected = {"none": loss, "sum": loss.sum(), "mean": loss.sum() / max(shape[0], 1)}[reduction]
    assert got.shape == expected.shape
    # a float32 sum of D squared residuals: relative error a few D * eps(float32), at most 1e-4 here
    assert bool(((got.double() - expected).abs() <= 1e-4 * (expected.abs() + 1)).all())
    if shape[0] == 0:
        return
    got.sum().backward()
    scale = 1.0 / shape[0] if reduction == "mean" else 1.0
    per_sample = (-1, *[1] * (len(shape) - 1))
    weight = coefs[:, :, 0].double().max(dim=1).values.reshape(per_sample)
    scales = coefs[:, :, 1:].double().abs().amax(dim=(1, 2)).reshape(per_sample)
    size = output.detach().double().abs() + scales * (6 + (0 if target is None else target.double().abs()))
    _close(output.grad, scale * grad, 2 * scale * weight * size, dtype)
