"""Every backend that can run here against the float64 reference, the noise stream, opcheck,
torch.compile and input validation, for the three fused ops."""

import pytest
import torch

from msdiff_fast.ops import BACKENDS, mr_step, noise_inject, philox_normal, reference, weighted_score_loss
from msdiff_fast.ops.dispatch import reason_unavailable
from msdiff_fast.ops.philox import philox_words

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(1,), (7, 3), (3, 1023), (2, 3, 17, 19), (5, 2, 9, 13)]


def runnable(op):
    cases = []
    for device in DEVICES:
        for backend in BACKENDS:
            for dtype in DTYPES:
                if reason_unavailable(op, backend, torch.device(device), dtype) is None:
                    cases.append(pytest.param(backend, device, dtype, id=f"{backend}-{device}-{str(dtype)[6:]}"))
    return cases


def assert_close_to_oracle(out, ref_same_dtype, ref64, atol, name="out"):
    """flash-attention rule: the error against float64 is at most twice the same-dtype reference's."""
    err = (out.double() - ref64).abs()
    bound = 2 * (ref_same_dtype.double() - ref64).abs().max().item() + atol
    if err.max().item() > bound:
        index = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{name}: max error {err.max().item():.3g} > {bound:.3g} at {index}: got {out[index].item()}, want {ref64[index].item()}")


def atol_for(dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, 1e-3)


def make(shape, dtype, device, contiguous=True, generator=None):
    if contiguous:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    wide = torch.randn((*shape[:-1], shape[-1] * 2), generator=generator).to(device=device, dtype=dtype)
    return wide[..., ::2]


# ----------------------------------------------------------------------------- mr_step


@pytest.mark.parametrize("backend,device,dtype", runnable("mr_step"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_terms,noise_kind", [(1, None), (2, "philox"), (4, "explicit"), (3, "philox")])
def test_mr_step_matches_reference(backend, device, dtype, shape, num_terms, noise_kind):
    contiguous = shape[-1] % 2 == 1
    g = torch.Generator().manual_seed(hash((shape, num_terms)) % 2**31)
    x = make(shape, dtype, device, contiguous, g)
    terms = [make(shape, dtype, device, contiguous, g) for _ in range(num_terms)]
    batch = shape[0]
    coefs = torch.randn(batch, num_terms + 1, generator=g, dtype=torch.float64).to(device)
    noise_coef = torch.rand(batch, generator=g, dtype=torch.float64).to(device) if noise_kind else None
    noise = make(shape, dtype, device, True, g) if noise_kind == "explicit" else None
    seed, offset = 1234567 + num_terms, 2**33 + 5
    out = mr_step(x, terms, coefs, noise_coef, seed=seed, offset=offset, noise=noise, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    ref64 = reference.mr_step(x.double(), [t.double() for t in terms], coefs, noise_coef, seed, offset, None if noise is None else noise.double())
    ref_same = reference.mr_step(x, terms, coefs, noise_coef, seed, offset, noise)
    assert_close_to_oracle(out, ref_same, ref64, atol_for(dtype))


@pytest.mark.parametrize("backend,device,dtype", runnable("mr_step"))
def test_mr_step_out_and_in_place(backend, device, dtype):
    x = make((3, 5, 7), dtype, device)
    term = make((3, 5, 7), dtype, device)
    coefs = torch.tensor([[0.5, 2.0], [1.0, -1.0], [0.0, 3.0]], dtype=torch.float64, device=device)
    want = mr_step(x, [term], coefs, backend="torch")
    out = torch.empty_like(x)
    assert mr_step(x, [term], coefs, out=out, backend=backend) is out
    in_place = x.clone()
    mr_step(in_place, [term], coefs, out=in_place, backend=backend)
    for got in (out, in_place):
        assert_close_to_oracle(got, want, want.double(), atol_for(dtype))


@pytest.mark.parametrize("backend,device,dtype", [c for c in runnable("mr_step") if c.values[2] == torch.float32])
def test_noise_stream_identical_across_backends(backend, device, dtype):
    numel, seed, offset = 4099, 2**40 + 3, 2**32 - 17
    x = torch.zeros(1, numel, device=device)
    z = mr_step(x, [x], torch.zeros(1, 2, dtype=torch.float64, device=device), torch.ones(1, dtype=torch.float64, device=device), seed=seed, offset=offset, backend=backend)
    want = philox_normal(seed, offset, numel, dtype=torch.float64)
    assert (z.double().cpu().flatten() - want).abs().max().item() < 1e-5


def test_philox_words_known_answer():
    # Philox4x32-10 known-answer vector (Salmon et al., Random123 kat_vectors): counter 0, key 0.
    words = philox_words(0, torch.zeros(1, dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_noise_statistics():
    z = philox_normal(7, 0, 200_000, dtype=torch.float64)
    assert abs(z.mean().item()) < 4 / 200_000**0.5
    assert abs(z.std().item() - 1) < 0.01
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 0.01
    other = philox_normal(8, 0, 200_000, dtype=torch.float64)
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 0.01
    shifted = philox_normal(7, 100, 1000, dtype=torch.float64)
    assert torch.equal(shifted, z[100:1100])
    # A block's four normals (cos and sin of two Box-Muller pairs) and the next block's are
    # independent: neither the values nor their squares (which share a pair's radius) correlate.
    blocks = z.view(-1, 4)
    for a, b in ((0, 1), (2, 3), (0, 2), (1, 3)):
        assert abs(torch.corrcoef(torch.stack([blocks[:, a], blocks[:, b]]))[0, 1].item()) < 0.01
        assert abs(torch.corrcoef(torch.stack([blocks[:, a] ** 2, blocks[:, b] ** 2]))[0, 1].item()) < 0.015
    assert abs(torch.corrcoef(torch.stack([blocks[:-1, 3] ** 2, blocks[1:, 0] ** 2]))[0, 1].item()) < 0.015
    # Tail mass and symmetry of a standard normal.
    assert abs((z.abs() > 1.96).double().mean().item() - 0.05) < 0.003
    assert abs((z > 0).double().mean().item() - 0.5) < 0.005


# ----------------------------------------------------------------------------- noise_inject


@pytest.mark.parametrize("backend,device,dtype", runnable("noise_inject"))
@pytest.mark.parametrize("case", ["x_only", "x_mu", "xy_cat", "xy_other_shape", "clean_y", "explicit"])
def test_noise_inject_matches_reference(backend, device, dtype, case):
    g = torch.Generator().manual_seed(3)
    batch = 3
    x0 = make((batch, 3, 9, 11), dtype, device, contiguous=case != "x_mu", generator=g)
    x_coefs = torch.rand(batch, 2, generator=g, dtype=torch.float64).to(device)
    y0 = y_coefs = mu = noise = out = None
    if case == "x_mu":
        mu = make((batch, 3, 9, 11), dtype, device, generator=g)
    if case in ("xy_cat", "clean_y", "explicit"):
        y0 = make((batch, 2, 9, 11), dtype, device, generator=g)
        out = torch.full((batch, 5, 9, 11), float("nan"), dtype=dtype, device=device)
    if case == "xy_other_shape":
        y0 = make((batch, 1, 4, 5), dtype, device, generator=g)
    if y0 is not None and case != "clean_y":
        y_coefs = torch.rand(batch, 2, generator=g, dtype=torch.float64).to(device)
    if case == "explicit":
        noise = (make(x0.shape, dtype, device, generator=g), make(y0.shape, dtype, device, generator=g))
    seed, offset = 99, 12345
    x_t, y_t = noise_inject(x0, x_coefs, y0, y_coefs, mu=mu, seed=seed, offset=offset, noise=noise, out=out, backend=backend)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    noise64 = None if noise is None else (noise[0].double(), noise[1].double())
    rx64, ry64 = reference.noise_inject(x0.double(), x_coefs, up(y0), y_coefs, up(mu), seed, offset, noise64)
    rx, ry = reference.noise_inject(x0, x_coefs, y0, y_coefs, mu, seed, offset, noise)
    assert_close_to_oracle(x_t, rx, rx64, atol_for(dtype), "x_t")
    if y0 is not None:
        assert_close_to_oracle(y_t, ry, ry64, atol_for(dtype), "y_t")
    if out is not None:
        assert torch.equal(out[:, :3], x_t) and torch.equal(out[:, 3:], y_t)
        assert x_t.data_ptr() == out.data_ptr()


def test_noise_inject_noise_lines_up_with_the_cat_buffer():
    x0, y0 = torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4)
    ones = torch.tensor([[0.0, 1.0]] * 2, dtype=torch.float64)
    # Exact against the reference; the compiled backends (libm log/cos) in test_compiled.py.
    x_t, y_t = noise_inject(x0, ones, y0, ones, seed=5, offset=7, backend="torch")
    cat = torch.cat([x_t, y_t], dim=1)
    assert torch.equal(cat.flatten(), philox_normal(5, 7, cat.numel()))


# ----------------------------------------------------------------------------- weighted_score_loss


@pytest.mark.parametrize("backend,device,dtype", runnable("weighted_score_loss"))
@pytest.mark.parametrize("shape,split", [((1, 7), None), ((3, 6, 9, 11), 3 * 99), ((2, 1023), None), ((4, 2, 5, 17), 17)])
@pytest.mark.parametrize("with_target", [False, True])
def test_weighted_score_loss_matches_reference(backend, device, dtype, shape, split, with_target):
    g = torch.Generator().manual_seed(11)
    output = make(shape, dtype, device, contiguous=not with_target, generator=g)
    segments = 1 if split is None else 2
    coefs = torch.rand(shape[0], segments, 3, generator=g, dtype=torch.float64).to(device) * 2 - 0.5
    target = make(shape, dtype, device, generator=g) if with_target else None
    seed, offset = 2024, 3
    leaf = output.detach().clone().requires_grad_()
    loss = weighted_score_loss(leaf, coefs, split=split, seed=seed, offset=offset, target=target, backend=backend)
    weights = torch.rand(shape[0], generator=g, dtype=loss.dtype).to(device)
    (loss * weights).sum().backward()
    l64, g64 = reference.weighted_score_loss(output.double(), coefs, split, seed, offset, None, None if target is None else target.double())
    l_same, g_same = reference.weighted_score_loss(output, coefs, split, seed, offset, None, target)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_oracle(loss, l_same, l64, atol_for(dtype) * shape[-1] * 10, "loss")
    scale = weights.reshape(-1, *([1] * (len(shape) - 1)))
    assert_close_to_oracle(leaf.grad, (scale * g_same).to(dtype), scale.double() * g64, atol_for(dtype), "grad")


@pytest.mark.parametrize("backend,device,dtype", [c for c in runnable("weighted_score_loss") if c.values[2] == torch.float32])
def test_weighted_score_loss_backward_of_a_plain_sum_and_repeated_backward(backend, device, dtype):
    """The saved gradient serves every backward: a second one through the retained graph adds
    the same gradient again."""
    g = torch.Generator().manual_seed(5)
    output = torch.randn(3, 2, 7, 9, generator=g).to(device).requires_grad_()
    coefs = torch.rand(3, 1, 3, generator=g, dtype=torch.float64).to(device)
    loss = weighted_score_loss(output, coefs, seed=9, offset=4, backend=backend)
    _, want = reference.weighted_score_loss(output.detach().double(), coefs, None, 9, 4)
    loss.sum().backward(retain_graph=True)
    first = output.grad.clone()
    assert (first.double().cpu() - want).abs().max().item() < 1e-5
    loss.sum().backward()
    assert (output.grad.double().cpu() - 2 * want).abs().max().item() < 2e-5


def test_weighted_score_loss_gradient_equals_autograd_of_the_formula():
    output = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    coefs = torch.rand(3, 2, 3, dtype=torch.float64)
    noise = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    target = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    loss = weighted_score_loss(output, coefs, split=25, noise=noise, target=target)
    flat_out, flat_noise, flat_target = output.reshape(3, 50), noise.reshape(3, 50), target.reshape(3, 50)
    parts = []
    for g, sl in enumerate((slice(0, 25), slice(25, 50))):
        c = coefs[:, g]
        r = flat_out[:, sl] - c[:, 1:2] * flat_noise[:, sl] - c[:, 2:3] * flat_target[:, sl]
        parts.append(c[:, 0] * (r * r).sum(1))
    want = parts[0] + parts[1]
    assert torch.allclose(loss, want, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda o: weighted_score_loss(o, coefs, split=25, noise=noise, target=target), (output,))


# ----------------------------------------------------------------------------- opcheck, compile


def _op_args(op, backend, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = make((2, 3, 5), dtype, device, generator=g)
    c64 = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    if op == "mr_step":
        return torch.ops.msdiff_fast.mr_step.default, (x.requires_grad_(), [make((2, 3, 5), dtype, device, generator=g).requires_grad_()], c64(2, 2), c64(2), None, 3, 4, backend)
    if op == "noise_inject":
        buf = torch.empty(2, 5, 5, dtype=dtype, device=device)
        y = make((2, 2, 5), dtype, device, generator=g)
        return torch.ops.msdiff_fast.noise_inject.default, (buf[:, :3], buf[:, 3:], x, c64(2, 2), y, c64(2, 2), None, 3, 4, None, None, backend)
    in_place = op == "weighted_score_loss, grad scaled in place"
    return torch.ops.msdiff_fast.weighted_score_loss.default, (x.requires_grad_(), c64(2, 2, 3), 6, 3, 4, None, None, backend, in_place)


OPCHECK_CASES = [
    pytest.param(op, *case.values, id=f"{op}-{case.id}")
    for op in ("mr_step", "noise_inject", "weighted_score_loss", "weighted_score_loss, grad scaled in place")
    for case in runnable(op.split(",")[0])
    if case.values[2] in (torch.float32, torch.float64)
]


@pytest.mark.parametrize("op,backend,device,dtype", OPCHECK_CASES)
def test_opcheck(op, backend, device, dtype):
    fn, args = _op_args(op, backend, device, dtype)
    torch.library.opcheck(fn, args)


def test_torch_compile_fullgraph():
    def step(x, term, coefs, noise_coef, x0, out):
        y = mr_step(x, [term], coefs, noise_coef, seed=1, offset=2)
        x_t, _ = noise_inject(x0, coefs, seed=3)
        loss = weighted_score_loss(out, coefs[:, None, :].repeat(1, 1, 2)[:, :, :3].contiguous(), seed=4)
        return y, x_t, loss

    x, term, x0, out = (torch.randn(2, 3, 4) for _ in range(4))
    coefs, noise_coef = torch.rand(2, 2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, term, coefs, noise_coef, x0, out), step(x, term, coefs, noise_coef, x0, out)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors_and_write_nothing():
    x = torch.randn(2, 3)
    coefs = torch.ones(2, 2, dtype=torch.float64)
    out = torch.full_like(x, 7.0)
    cases = [
        (lambda: mr_step(x, [torch.randn(2, 4)], coefs, out=out), ValueError, "terms[0]"),
        (lambda: mr_step(x, [x.double()], coefs, out=out), TypeError, "terms[0]"),
        (lambda: mr_step(x, [x], torch.ones(2, 3, dtype=torch.float64), out=out), ValueError, "coefs"),
        (lambda: mr_step(x, [x], torch.ones(2, 2, device="meta", dtype=torch.float64), out=out), ValueError, "coefs"),
        (lambda: mr_step(x, [x], coefs * float("nan"), out=out), ValueError, "coefs"),
        (lambda: mr_step(x, [], coefs, out=out), ValueError, "terms"),
        (lambda: mr_step(x, [x], coefs, out=torch.empty(2, 3, dtype=torch.float64)), TypeError, "out"),
        (lambda: mr_step(x, [x], coefs, torch.ones(3, dtype=torch.float64), out=out), ValueError, "noise_coef"),
        (lambda: mr_step(x, [x], coefs, torch.ones(2, dtype=torch.float64), seed=-1, out=out), ValueError, "seed"),
        (lambda: mr_step(x.long(), [x], coefs), TypeError, "x"),
        (lambda: mr_step(x, [x], coefs, backend="nope", out=out), ValueError, "backend"),
        (lambda: noise_inject(x[0], torch.ones(2, 2, dtype=torch.float64)), ValueError, "x0"),
        (lambda: noise_inject(x[:, :, None], torch.ones(2, 3, dtype=torch.float64)), ValueError, "x_coefs"),
        (lambda: noise_inject(x[:, :, None], coefs, torch.randn(3, 1, 1), coefs), ValueError, "y0"),
        (lambda: weighted_score_loss(x, torch.ones(2, 1, 3, dtype=torch.float64), split=3), ValueError, "split"),
        (lambda: weighted_score_loss(x, torch.ones(2, 2, 3, dtype=torch.float64)), ValueError, "coefs"),
    ]
    for call, error, name in cases:
        with pytest.raises(error) as info:
            call()
        assert name in str(info.value), str(info.value)
        assert torch.equal(out, torch.full_like(x, 7.0))


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    x = torch.randn(2, 3, dtype=torch.float64)
    coefs = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="cuda"):
        mr_step(x, [x], coefs, backend="cuda")
    monkeypatch.setenv("MSDIFF_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        mr_step(x, [x], coefs)
    monkeypatch.setenv("MSDIFF_FAST_BACKEND", "torch")
    assert torch.equal(mr_step(x, [x], coefs), 2 * x)


@pytest.mark.parametrize("backend,device,dtype", [c for c in runnable("weighted_score_loss") if c.values[2] != torch.float64])
def test_weighted_score_loss_reductions(backend, device, dtype):
    """mean and sum are the per-sample losses' mean and sum, with the same gradients (the forward's
    own, scaled in place, so a retained graph refuses a second backward); a weighted sum of the
    per-sample losses rescales the forward's gradient per sample."""
    g = torch.Generator().manual_seed(6)
    output = torch.randn(5, 3, 4, 7, generator=g).to(device, dtype).requires_grad_()
    coefs = torch.rand(5, 1, 3, generator=g, dtype=torch.float64).to(device)
    _, grad64 = reference.weighted_score_loss(output.detach().double(), coefs, None, 2, 3)
    per_sample = weighted_score_loss(output, coefs, seed=2, offset=3, backend=backend)
    (per_sample_grad,) = torch.autograd.grad(per_sample.mean(), output, retain_graph=True)
    mean = weighted_score_loss(output, coefs, seed=2, offset=3, reduction="mean", backend=backend)
    (mean_grad,) = torch.autograd.grad(mean, output)
    assert mean.shape == ()
    assert abs(mean.item() - per_sample.mean().item()) <= 1e-6 * per_sample.mean().item()
    assert_close_to_oracle(mean_grad, per_sample_grad, grad64.to(device) / 5, atol_for(dtype))

    _, forward_grad = torch.ops.msdiff_fast.weighted_score_loss(output.detach(), coefs, None, 2, 3, None, None, backend)
    summed = weighted_score_loss(output, coefs, seed=2, offset=3, reduction="sum", backend=backend)
    (sum_grad,) = torch.autograd.grad(summed, output, retain_graph=True)
    assert torch.equal(sum_grad, forward_grad)
    with pytest.raises(RuntimeError, match="inplace operation"):
        torch.autograd.grad(summed, output)
    scale = torch.arange(1.0, 6.0, device=device).view(5, 1, 1, 1)
    (scaled_grad,) = torch.autograd.grad((per_sample * scale.flatten()).sum(), output)
    assert_close_to_oracle(scaled_grad, (forward_grad * scale).to(dtype), grad64.to(device) * scale.double(), atol_for(dtype))
    with pytest.raises(ValueError, match="reduction"):
        weighted_score_loss(output, coefs, reduction="avg")


def test_weighted_score_loss_reduction_backward_can_be_differentiated():
    """create_graph=True records the backward: the reduced loss then scales out of place, and the
    gradient's own derivative with respect to the upstream scale is the forward's gradient."""
    output = torch.randn(3, 2, 5, requires_grad=True)
    coefs = torch.rand(3, 1, 3, dtype=torch.float64)
    scale = torch.tensor(2.0, requires_grad=True)
    loss = weighted_score_loss(output, coefs, seed=4, offset=8, reduction="sum", backend="cpu")
    (grad,) = torch.autograd.grad(loss * scale, output, create_graph=True)
    _, forward_grad = torch.ops.msdiff_fast.weighted_score_loss(output.detach(), coefs, None, 4, 8, None, None, "cpu")
    assert torch.allclose(grad, 2 * forward_grad)
    (d_scale,) = torch.autograd.grad(grad.sum(), scale)
    assert torch.allclose(d_scale, forward_grad.sum())
    (again,) = torch.autograd.grad(loss, output)  # the saved gradient was left untouched
    assert torch.equal(again, forward_grad)
