"""What is specific to the compiled backends (C++ ``cpu``, CUDA ``cuda``): the build (no torch in
the modules, the CUDA module built wherever nvcc is), their noise stream, tiles and groups that
cross sample boundaries, unaligned views, 16-bit rounding, determinism of the loss whatever the
thread count, and the modules' own argument checks. Cross-backend accuracy lives in test_ops.py.

CUDA cases run where a GPU is; elsewhere the CUDA module must still have been built (when nvcc was
there at install time) and must say why it cannot run.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from msdiff_fast.ops import backends, compiled, mr_step, noise_inject, philox_normal, reference, weighted_score_loss
from msdiff_fast.ops.dispatch import reason_unavailable
from msdiff_fast.ops.philox import philox_words

CASES = [("cpu", "cpu")] + ([("cuda", "cuda")] if torch.cuda.is_available() else [])
RUNNABLE = [pytest.param(b, d, id=b) for b, d in CASES if reason_unavailable("mr_step", b, torch.device(d), torch.float32) is None]
SEEDS_AND_OFFSETS = [(0, 0), (1, 1), (2**62 + 987654321, 2**32 - 700), (2**31 + 5, 2**40 + 3)]
TILE = 2048  # the CUDA kernels' tile; the CPU loops' blocks are 512 (tiles) and 4096 (loss)


def assert_matches(got, want, atol, name):
    err = (got.double().cpu() - want.double().cpu()).abs()
    if err.numel() and err.max().item() > atol:
        index = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{name}: max error {err.max().item():.3g} > {atol:.3g} at {index}: got {got[index].item()}, want {want[index].item()}")


def module(backend):
    return compiled._C if backend == "cpu" else compiled._C_cuda


def call_extra(backend, tensor):
    """The modules' last argument: num_threads on CPU, the stream on CUDA."""
    return torch.get_num_threads() if backend == "cpu" else torch.cuda.current_stream(tensor.device).cuda_stream


def f64(*shape, device="cpu"):
    return torch.rand(*shape, dtype=torch.float64, device=device)


# ----------------------------------------------------------------------------- the build


def test_cpu_module_is_built():
    assert compiled._CPU_FAILURE is None, compiled._CPU_FAILURE
    assert backends("cpu")["mr_step"]["cpu"] == "ok"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: the CUDA module is not built here")
def test_cuda_module_is_built_wherever_nvcc_is():
    if os.environ.get("MSDIFF_FAST_CUDA", "").upper() == "OFF":
        pytest.skip("built with MSDIFF_FAST_CUDA=OFF")
    assert compiled._CUDA_FAILURE is None, compiled._CUDA_FAILURE
    table = backends("cuda")
    if torch.cuda.is_available():
        assert table["mr_step"]["cuda"] == "ok"
    else:
        reason = table["mr_step"]["cuda"]
        assert reason != "ok" and "cuda" in reason.lower(), reason
        with pytest.raises(RuntimeError, match="cuda"):
            mr_step(torch.ones(2, 3), [torch.ones(2, 3)], torch.ones(2, 2, dtype=torch.float64), backend="cuda")


@pytest.mark.parametrize("name", ["_C", "_C_cuda"])
def test_modules_load_without_torch(name):
    """The extension files import in a fresh interpreter that never imports torch (DLPack, not ATen)."""
    ext = getattr(compiled, name)
    if ext is None:
        pytest.skip(f"msdiff_fast.{name} is not built here")
    script = (
        "import importlib.machinery, importlib.util, sys\n"
        f"loader = importlib.machinery.ExtensionFileLoader({name!r}, {ext.__file__!r})\n"
        "spec = importlib.util.spec_from_loader(loader.name, loader)\n"
        "m = importlib.util.module_from_spec(spec); loader.exec_module(m)\n"
        "assert 'torch' not in sys.modules\n"
        "print(m.MAX_TERMS)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "8"
    with open(ext.__file__, "rb") as f:
        binary = f.read()
    for library in (b"libtorch", b"libc10", b"libcudart.so"):
        assert library not in binary, f"{name} links {library.decode()}"


# ----------------------------------------------------------------------------- the noise stream


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("seed,offset", SEEDS_AND_OFFSETS)
def test_philox_words_bit_for_bit(backend, device, seed, offset):
    numel = 1500
    words = torch.zeros(4, numel, dtype=torch.int64).to(torch.uint32).to(device)
    if backend == "cpu":
        module(backend).philox_words(words, seed, offset)
    else:
        module(backend).philox_words(words, seed, offset, call_extra(backend, words))
    want = philox_words(seed, torch.arange(offset, offset + numel, dtype=torch.int64))
    for k in range(4):
        assert torch.equal(words[k].cpu().to(torch.int64), want[k]), f"word {k} differs"


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("seed,offset", SEEDS_AND_OFFSETS)
def test_philox_normal_matches_the_reference(backend, device, seed, offset):
    numel = 5000
    for dtype, atol in ((torch.float32, 2e-6), (torch.float64, 1e-12)):
        normals = torch.empty(numel, dtype=dtype, device=device)
        module(backend).philox_normal(normals, seed, offset, call_extra(backend, normals))
        assert_matches(normals, philox_normal(seed, offset, numel, dtype=dtype), atol, str(dtype))


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_every_op_draws_the_package_noise_at_its_positions(backend, device):
    """z from each op is the stream at the documented positions: flat index (mr_step), the index in
    cat(x_t, y_t) (noise_inject), offset + b * D + j (weighted_score_loss)."""
    seed, offset, batch = 2**40 + 7, 2**32 - 3000, 3
    x0, y0 = torch.zeros(batch, 2, 33, 35, device=device), torch.zeros(batch, 1, 33, 35, device=device)
    pure = torch.tensor([[0.0, 1.0]] * batch, dtype=torch.float64, device=device)
    x_t, y_t = noise_inject(x0, pure, y0, pure, seed=seed, offset=offset, backend=backend)
    z_inject = torch.cat([x_t, y_t], dim=1).flatten()
    zeros = torch.zeros(batch, 3, 33, 35, device=device)
    z_step = mr_step(zeros, [zeros], torch.zeros(batch, 2, dtype=torch.float64, device=device),
                     torch.ones(batch, dtype=torch.float64, device=device), seed=seed, offset=offset, backend=backend).flatten()
    output = torch.zeros(batch, 3, 33, 35, device=device, requires_grad=True)
    coefs = torch.tensor([[[1.0, -0.5, 0.0]]] * batch, dtype=torch.float64, device=device)
    loss = weighted_score_loss(output, coefs, seed=seed, offset=offset, backend=backend)
    loss.sum().backward()
    z_loss = output.grad.flatten()
    want32 = philox_normal(seed, offset, z_inject.numel())
    want64 = philox_normal(seed, offset, z_inject.numel(), dtype=torch.float64)
    for name, z in (("noise_inject", z_inject), ("mr_step", z_step), ("weighted_score_loss", z_loss)):
        assert_matches(z, want32, 2e-6, name)
        assert_matches(z, want64, 1e-5, name)
    assert_matches(loss, (want64.view(batch, -1) ** 2).sum(1) / 4, 1e-3, "loss")


# ----------------------------------------------------------------------------- samples, tiles, groups


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("per_sample", [1, 3, 7, 37, 511, 513, TILE - 1, TILE, TILE + 1, 2 * TILE + 37])
@pytest.mark.parametrize("noise_kind", [None, "philox", "explicit"])
def test_mr_step_sample_boundaries(backend, device, per_sample, noise_kind):
    """Per-sample coefficients where a tile (or a 16-byte group) holds many samples, one, or two."""
    batch = max(3, 3 * TILE // per_sample + 1)
    g = torch.Generator().manual_seed(per_sample)
    x, t0, t1 = (torch.randn(batch, per_sample, generator=g).to(device) for _ in range(3))
    coefs = torch.randn(batch, 3, generator=g, dtype=torch.float64).to(device)
    noise_coef = torch.rand(batch, generator=g, dtype=torch.float64).to(device) + 0.5 if noise_kind else None
    noise = torch.randn(batch, per_sample, generator=g).to(device) if noise_kind == "explicit" else None
    got = mr_step(x, [t0, t1], coefs, noise_coef, seed=77, offset=2**33, noise=noise, backend=backend)
    want = reference.mr_step(x.double(), [t0.double(), t1.double()], coefs, noise_coef, 77, 2**33, None if noise is None else noise.double())
    assert_matches(got, want, 2e-5, "out")


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("num_terms", range(1, 9))
def test_mr_step_every_term_slot(backend, device, num_terms):
    batch, per_sample = 3, 50
    terms = [torch.full((batch, per_sample), float(k + 1), device=device) for k in range(num_terms)]
    x = torch.full((batch, per_sample), 0.5, device=device)
    coefs = torch.tensor([[4.0**-k * (b + 1) for k in range(num_terms + 1)] for b in range(batch)], dtype=torch.float64, device=device)
    got = mr_step(x, terms, coefs, backend=backend)
    want = reference.mr_step(x.double(), [t.double() for t in terms], coefs)
    assert_matches(got, want, 1e-6, f"{num_terms} terms")


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_unaligned_views(backend, device, dtype):
    """Views that start mid-way through a 16-byte group take the element-wise path, results unchanged."""
    flat = torch.randn(4 * 1000 + 1, device=device).to(dtype)
    x, term = flat[1:].view(4, 1000), flat[:-1].view(4, 1000)
    coefs = f64(4, 2, device=device)
    noise_coef = f64(4, device=device)
    out_buffer = torch.empty(4 * 1000 + 1, device=device, dtype=dtype)
    out = out_buffer[1:].view(4, 1000)
    mr_step(x, [term], coefs, noise_coef, seed=3, offset=5, out=out, backend=backend)
    want = reference.mr_step(x.double(), [term.double()], coefs, noise_coef, 3, 5)
    same = reference.mr_step(x, [term], coefs, noise_coef, 3, 5)
    atol = 2 * (same.double() - want).abs().max().item() + (1e-12 if dtype == torch.float64 else 2e-5)
    assert_matches(out, want, atol, "mr_step")

    x0, y0 = flat[1:4001].view(4, 2, 500), flat[:2000].view(4, 1, 500)
    buffer = torch.empty(4 * 3 * 500 + 3, device=device, dtype=dtype)[3:].view(4, 3, 500)
    x_coefs, y_coefs = f64(4, 2, device=device), f64(4, 2, device=device)
    x_t, y_t = noise_inject(x0, x_coefs, y0, y_coefs, mu=x0.flip(0), seed=1, offset=2, out=buffer, backend=backend)
    rx, ry = reference.noise_inject(x0.double(), x_coefs, y0.double(), y_coefs, x0.flip(0).double(), 1, 2)
    sx, sy = reference.noise_inject(x0, x_coefs, y0, y_coefs, x0.flip(0), 1, 2)
    tol = 2 * max((sx.double() - rx).abs().max().item(), (sy.double() - ry).abs().max().item()) + (1e-12 if dtype == torch.float64 else 2e-5)
    assert_matches(x_t, rx, tol, "x_t")
    assert_matches(y_t, ry, tol, "y_t")


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_noise_inject_multi_tile_samples_and_broadcast_mu(backend, device):
    batch, x_shape, y_shape = 3, (3, 41, 43), (1, 20, 173)  # 5289 and 3460 elements: several tiles each
    x0 = torch.randn(batch, *x_shape, device=device)
    mu = torch.randn(1, *x_shape, device=device).expand(batch, *x_shape)  # batch stride 0, read in place
    y0 = torch.randn(batch, *y_shape, device=device)
    x_coefs, y_coefs = f64(batch, 2, device=device), f64(batch, 2, device=device)
    seed, offset = 2**40 + 1, 2**32 - 3000
    x_t, y_t = noise_inject(x0, x_coefs, y0, y_coefs, mu=mu, seed=seed, offset=offset, backend=backend)
    rx, ry = reference.noise_inject(x0.double(), x_coefs, y0.double(), y_coefs, mu.double(), seed, offset)
    assert_matches(x_t, rx, 2e-5, "x_t")
    assert_matches(y_t, ry, 2e-5, "y_t")


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("x_dtype,noise_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                                 (torch.float32, torch.float64), (torch.float16, torch.float16)])
def test_explicit_noise_and_target_of_another_dtype(backend, device, x_dtype, noise_dtype):
    """Side inputs are read as the reference reads them: widened (or narrowed) to the compute dtype."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 77, generator=g).to(device=device, dtype=x_dtype)
    noise = torch.randn(3, 4, 77, generator=g).to(device=device, dtype=noise_dtype)
    coefs, noise_coef = f64(3, 2, device=device), f64(3, device=device)
    got = mr_step(x, [x], coefs, noise_coef, noise=noise, backend=backend)
    want = reference.mr_step(x, [x], coefs, noise_coef, noise=noise)
    assert_matches(got, want, 2e-2 if x_dtype != torch.float32 else 1e-6, "mr_step")

    x_t, _ = noise_inject(x, coefs, noise=(noise, None), backend=backend)
    rx, _ = reference.noise_inject(x, coefs, noise=(noise, None))
    assert_matches(x_t, rx, 2e-2 if x_dtype != torch.float32 else 1e-6, "noise_inject")

    target = torch.randn(3, 4, 77, generator=g).to(device=device, dtype=torch.float32)
    wsl_coefs = f64(3, 2, 3, device=device)
    loss = weighted_score_loss(x, wsl_coefs, split=100, noise=noise, target=target, backend=backend)
    want_loss, _ = reference.weighted_score_loss(x, wsl_coefs, 100, noise=noise, target=target)
    assert_matches(loss, want_loss, 1e-3 * want_loss.abs().max().item(), "loss")


# ----------------------------------------------------------------------------- weighted_score_loss


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("split", [None, 5, 4095, 4096, 4097, TILE + 5])
def test_weighted_score_loss_multi_block_samples(backend, device, split):
    batch, per_sample = 3, 3 * 4096 + 37
    output = torch.randn(batch, per_sample, device=device, requires_grad=True)
    target = torch.randn(batch, per_sample, device=device)
    coefs = f64(batch, 1 if split is None else 2, 3, device=device)
    loss = weighted_score_loss(output, coefs, split=split, seed=9, offset=2**35, target=target, backend=backend)
    loss.sum().backward()
    want_loss, want_grad = reference.weighted_score_loss(output.detach().double(), coefs, split, 9, 2**35, None, target.double())
    assert_matches(loss, want_loss, 1e-5 * per_sample, "loss")
    assert_matches(output.grad, want_grad, 2e-5, "grad")


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_loss_is_deterministic_whatever_the_thread_count(backend, device):
    output = torch.randn(4, 5 * 4096 + 11, device=device)
    coefs = f64(4, 2, 3, device=device)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3, 1, 4):
            torch.set_num_threads(threads)
            runs.append(torch.ops.msdiff_fast.weighted_score_loss(output, coefs, 4096 + 100, 123, 456, None, None, backend))
    finally:
        torch.set_num_threads(previous)
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]), "loss differs between runs"
        assert torch.equal(grad, runs[0][1]), "grad differs between runs"


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_results_do_not_depend_on_the_thread_count(backend, device):
    x = torch.randn(3, 50_001, device=device)
    coefs, noise_coef = f64(3, 3, device=device), f64(3, device=device)
    previous = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            step = mr_step(x, [x, x.flip(0)], coefs, noise_coef, seed=4, offset=9, backend=backend)
            x_t, y_t = noise_inject(x, coefs[:, :2], x[:, :777].contiguous(), coefs[:, 1:], seed=4, offset=9, backend=backend)
            outs.append((step, x_t, y_t))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- 16-bit rounding


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_stores_round_like_torch(backend, device, dtype):
    """hi + lo is exact in float32 (c0 = c1 = 1), so the only rounding is the store's: it must give
    torch's bits, ties to even, subnormals, overflow and NaN included."""
    values = torch.randn(6000, dtype=torch.float32) * torch.logspace(-45, 38, 6000)
    info = torch.finfo(dtype)
    ulp = info.eps
    ties = torch.tensor([1 + ulp + ulp / 2, 1 + ulp / 2, -(3 + 3 * ulp) * 1.5, info.max * (1 + ulp / 2), info.tiny / 3, info.tiny * 0.75])
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), info.max, -info.max, 0.0, -0.0, 1.2e-38, 70000.0, 65520.0])
    values = torch.cat([values, ties, specials])
    hi = values.to(dtype)
    lo = torch.where(torch.isfinite(values), values - hi.float(), torch.zeros_like(values)).to(dtype)
    exact = hi.float() + lo.float()
    ones = torch.ones(1, 2, dtype=torch.float64, device=device)
    got = mr_step(hi.reshape(1, -1).to(device), [lo.reshape(1, -1).to(device)], ones, backend=backend).flatten().cpu()
    want = exact.to(dtype)
    keep = ~want.isnan()
    assert torch.equal(got.view(torch.int16)[keep], want.view(torch.int16)[keep])
    assert torch.equal(got.isnan(), want.isnan())


# ----------------------------------------------------------------------------- the modules' own checks


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_modules_refuse_outputs_they_cannot_write_in_place(backend, device):
    """nanobind would silently copy a converted output; the modules raise instead."""
    ext = module(backend)
    x = torch.randn(2, 6, device=device)
    coefs = torch.ones(2, 2, device=device)
    extra = call_extra(backend, x)
    cases = [
        (lambda: ext.mr_step(torch.empty(2, 6, dtype=torch.float64, device=device), x, [x], coefs, None, None, 0, 0, extra), TypeError, "out"),
        (lambda: ext.mr_step(torch.empty(6, 2, device=device).t(), x, [x], coefs, None, None, 0, 0, extra), ValueError, "out"),
        (lambda: ext.mr_step(torch.empty(2, 6, device=device), x, [x], coefs.double(), None, None, 0, 0, extra), TypeError, "coefs"),
        (lambda: ext.mr_step(torch.empty(2, 6, device=device), x, [x[:, :5]], coefs, None, None, 0, 0, extra), ValueError, "terms[0]"),
        (lambda: ext.mr_step(torch.empty(2, 6, device=device), x, [x], coefs, None, None, -1, 0, extra), ValueError, "seed"),
        (lambda: ext.mr_step(torch.empty(2, 6, device=device), x.long(), [x], coefs, None, None, 0, 0, extra), TypeError, "x"),
        (lambda: ext.noise_inject(torch.empty(1, 6, device=device).expand(2, 6), x, coefs, None, None, None, None, None, None, 0, 0, extra),
         ValueError, "out_x"),
        (lambda: ext.weighted_score_loss(torch.empty(2, dtype=torch.float64, device=device), torch.empty_like(x), x, torch.ones(2, 1, 3, device=device),
                                         0, None, None, *([torch.empty(2, device=device)] if backend == "cuda" else []), 0, 0, extra), TypeError, "loss"),
        (lambda: ext.weighted_score_loss(torch.empty(2, device=device), torch.empty_like(x), x, torch.ones(2, 2, 3, device=device),
                                         6, None, None, *([torch.empty(2, device=device)] if backend == "cuda" else []), 0, 0, extra), ValueError, "split"),
    ]
    for call, error, name in cases:
        with pytest.raises(error) as info:
            call()
        assert str(info.value).startswith(name + ":"), str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_module_refuses_cuda_tensors_and_cuda_module_cpu_tensors():
    x = torch.randn(2, 6, device="cuda")
    with pytest.raises(ValueError, match="x"):
        compiled._C.mr_step(torch.empty_like(x), x, [x], torch.ones(2, 2, device="cuda"), None, None, 0, 0, 1)
    with pytest.raises(ValueError, match="x"):
        compiled._C_cuda.mr_step(torch.empty(2, 6), x.cpu(), [x.cpu()], torch.ones(2, 2), None, None, 0, 0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_kernels_run_on_the_current_stream():
    stream = torch.cuda.Stream()
    x = torch.randn(64, 4096, device="cuda")
    coefs = f64(64, 2, device="cuda")
    with torch.cuda.stream(stream):
        out = mr_step(x, [x], coefs, backend="cuda")
    stream.synchronize()
    assert_matches(out, reference.mr_step(x.double(), [x.double()], coefs), 2e-5, "out")
