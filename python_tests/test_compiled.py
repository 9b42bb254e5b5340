"""What is specific to the compiled backends (C++ ``cpu``, CUDA ``cuda``): the modules and their
reasons, the raw Philox words, the polynomial log/cos of the normals, the CPU kernels' vector
tails, tiles and thread shares, 16-bit rounding, determinism of the loss, unaligned views, and the
modules' own argument checks. The generic cross-backend accuracy tests live in test_ops.py.

CUDA cases run where a GPU is; elsewhere the CUDA module must still import (when it was built)
and the backend must say why it cannot run.
"""

import shutil

import pytest
import torch

from msdiff_fast.ops import backends, compiled, mr_step, noise_inject, philox_normal, reference, weighted_score_loss
from msdiff_fast.ops.dispatch import reason_unavailable
from msdiff_fast.ops.philox import counter_normals, philox_words

needs_cpu_module = pytest.mark.skipif(compiled._C is None, reason=str(compiled.CPU_IMPORT_ERROR))
CASES = [("cpu", "cpu")] + ([("cuda", "cuda")] if torch.cuda.is_available() else [])
RUNNABLE = [pytest.param(b, d, id=b) for b, d in CASES if reason_unavailable("mr_step", b, torch.device(d), torch.float32) is None]
LOW_PRECISION = [torch.float16, torch.bfloat16]
SEEDS_AND_OFFSETS = [(0, 0), (1, 1), (2**62 + 987654321, 2**32 - 700), (2**31 + 5, 2**40 + 3), (2**63 - 1, 2**62)]


def instruction_sets():
    return compiled._C.instruction_sets() if compiled._C is not None else []


@pytest.fixture(params=instruction_sets() or [None])
def instruction_set(request):
    """Runs a CPU test once per kernel variant this build and CPU have (AVX2+FMA and baseline)."""
    if request.param is None:
        pytest.fail(f"msdiff_fast._C must be built for these tests: {compiled.CPU_IMPORT_ERROR}")
    previous = compiled._C.instruction_set()
    compiled._C.use_instruction_set(request.param)
    yield request.param
    compiled._C.use_instruction_set(previous)


def assert_matches(got, want, atol, name="out"):
    err = (got.double().cpu() - want.double().cpu()).abs()
    if err.numel() and err.max().item() > atol:
        index = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{name}: max error {err.max().item():.3g} > {atol:.3g} at {index}: got {got.cpu()[index].item()}, want {want.cpu()[index].item()}")


def coefs64(*shape, device="cpu", generator=None):
    return torch.rand(*shape, dtype=torch.float64, generator=generator).to(device)


# ----------------------------------------------------------------------------- the modules


@needs_cpu_module
def test_cpu_module_imports_and_the_backend_is_ready():
    assert backends("cpu")["mr_step"]["cpu"] == "ok"
    assert "baseline" in compiled._C.instruction_sets()
    assert compiled._C.instruction_set() == compiled._C.instruction_sets()[0]
    assert backends("cpu", torch.float64)["mr_step"]["cpu"] == "float64 runs on the torch reference backend"
    assert backends("cuda")["mr_step"]["cpu"] == "tensors are on cuda"
    with pytest.raises(ValueError, match="instruction set"):
        compiled._C.use_instruction_set("avx1024")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: the CUDA module is not built here")
def test_cuda_module_imports_wherever_nvcc_is_and_explains_itself():
    assert compiled.CUDA_IMPORT_ERROR is None, compiled.CUDA_IMPORT_ERROR
    assert backends("cpu")["mr_step"]["cuda"] == "tensors are on cpu"
    reason = backends("cuda")["mr_step"]["cuda"]
    if torch.cuda.is_available():
        assert reason == "ok"
    else:
        assert reason.startswith("no CUDA device: cudaGetDeviceCount returned"), reason
        assert compiled._C_cuda.device_status(0) == reason


# ----------------------------------------------------------------------------- the noise stream


@needs_cpu_module
@pytest.mark.parametrize("seed,offset", SEEDS_AND_OFFSETS)
def test_philox_words_are_bit_exact(seed, offset):
    numel = 3001
    words = torch.empty(4, numel, dtype=torch.int64)
    compiled._C.philox_words(words, seed, offset)
    want = philox_words(seed, torch.arange(offset, offset + numel, dtype=torch.int64))
    for w in range(4):
        assert torch.equal(words[w], want[w]), f"word {w} differs"


@needs_cpu_module
@pytest.mark.parametrize("numel", [4099, 85, 1109])
@pytest.mark.parametrize("seed,offset", SEEDS_AND_OFFSETS)
def test_normals_use_the_same_words_on_simd_lanes(instruction_set, seed, offset, numel):
    # Exactly the stream's positions, including the counter's low word wrapping inside a vector
    # (2**32 - 700 + 700): a wrong carry or lane order would make these errors O(1). Tiles of 85
    # elements run the interleaved vectors, then single vectors, then scalar code.
    got = torch.empty(numel)
    compiled._C.philox_normals(got, seed, offset, 2)
    assert_matches(got, philox_normal(seed, offset, numel, dtype=torch.float64), 2e-6)


@needs_cpu_module
def test_polynomial_log_sin_and_cos_are_float32_accurate(instruction_set):
    """Box-Muller with the kernels' own log/sin/cos against float64, over 2**21 draws: within 1e-6
    for |z| < 5 (float32 rounding of a value near 5 is 2.4e-7), and closer than torch's float32 formula."""
    numel, seed, offset = 2**21, 77, 2**33
    got = torch.empty(numel)
    compiled._C.philox_normals(got, seed, offset, 2)
    words = torch.empty(4, numel // 4, dtype=torch.int64)
    compiled._C.philox_words(words, seed, offset // 4)  # bit-exact: test_philox_words_are_bit_exact
    want = counter_normals(words, torch.float64)
    err = (got.double() - want).abs()
    assert err[want.abs() < 5].max().item() < 1e-6
    assert err.max().item() <= (counter_normals(words, torch.float32).double() - want).abs().max().item()


@needs_cpu_module
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 2**34 - 2])
@pytest.mark.parametrize("numel", [1, 2, 3, 5, 4098])
def test_cuda_group_noise_is_the_stream(offset, numel):
    # The CUDA kernels draw four consecutive positions per thread with stream_normal_group, one
    # Philox block when the first position is a multiple of 4 and two otherwise; this runs that
    # same header function on the host, at every alignment and with partial last groups.
    got = torch.full((numel,), float("nan"))
    compiled._C.philox_normal_groups(got, 31, offset)
    assert_matches(got, philox_normal(31, offset, numel, dtype=torch.float64), 2e-6)


@needs_cpu_module
def test_instruction_sets_agree():
    x = torch.randn(3, 5000)
    terms = [torch.randn(3, 5000) for _ in range(2)]
    coefs, noise_coef = coefs64(3, 3), coefs64(3)
    results = []
    for name in instruction_sets():
        previous = compiled._C.instruction_set()
        compiled._C.use_instruction_set(name)
        try:
            results.append(mr_step(x, terms, coefs, noise_coef, seed=9, offset=2**32 - 7000, backend="cpu"))
        finally:
            compiled._C.use_instruction_set(previous)
    for other in results[1:]:
        assert_matches(other, results[0], 2e-6)  # FMA contraction and float rounding only


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_noise_lines_up_with_the_cat_buffer(backend, device):
    x0, y0 = torch.zeros(3, 3, 5, 7, device=device), torch.zeros(3, 2, 5, 7, device=device)
    ones = torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64, device=device)
    out = torch.empty(3, 5, 5, 7, device=device)
    noise_inject(x0, ones, y0, ones, seed=5, offset=2**32 - 100, out=out, backend=backend)
    assert_matches(out.flatten(), philox_normal(5, 2**32 - 100, out.numel(), dtype=torch.float64), 2e-6)


# ----------------------------------------------------------------------------- vector tails, tiles, threads


@needs_cpu_module
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1, 7), (3, 1), (2, 15), (2, 17), (3, 1025), (2, 2049)])
def test_cpu_tails_and_tiles_match_the_reference(instruction_set, dtype, shape):
    """Smaller than one vector, not a multiple of the vector width, samples shorter and longer
    than a tile (1024) with tiles that end inside a sample."""
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g).to(dtype)
    terms = [torch.randn(shape, generator=g).to(dtype) for _ in range(2)]
    coefs, noise_coef = coefs64(shape[0], 3, generator=g), coefs64(shape[0], generator=g)
    out = mr_step(x, terms, coefs, noise_coef, seed=3, offset=11, backend="cpu")
    want = reference.mr_step(x.double(), [t.double() for t in terms], coefs, noise_coef, 3, 11)
    assert_matches(out, want, 2 * (reference.mr_step(x, terms, coefs, noise_coef, 3, 11).double() - want).abs().max().item() + 2e-6)
    loss_coefs = coefs64(shape[0], 1, 3, generator=g)
    loss = weighted_score_loss(x, loss_coefs, seed=4, offset=2, backend="cpu")
    want_loss, _ = reference.weighted_score_loss(x.double(), loss_coefs, None, 4, 2)
    assert_matches(loss, want_loss, 1e-5 * want_loss.abs().max().item() + 1e-6, "loss")


@pytest.fixture(params=["openmp", "threads"])
def thread_pool(request):
    """Each CPU thread pool: torch's OpenMP team (the default under torch) and helper threads."""
    previous = compiled._C.thread_pool()
    compiled._C.use_thread_pool(request.param)
    yield request.param
    compiled._C.use_thread_pool("openmp" if previous == "openmp" else "threads")


@needs_cpu_module
def test_cpu_ops_share_torchs_openmp_team_when_torch_runs_on_openmp():
    uses_openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert compiled._C.thread_pool() == ("openmp" if uses_openmp else "threads")
    with pytest.raises(ValueError, match="thread pool: expected 'openmp'.*got 'tbb'"):
        compiled._C.use_thread_pool("tbb")


@needs_cpu_module
@pytest.mark.parametrize("with_noise", [False, True])
def test_cpu_thread_shares_with_a_remainder_give_identical_results(thread_pool, with_noise):
    # Chunks are >= 2**16 elements without noise and >= 2**13 with it: 3 chunks and a remainder.
    numel = 3 * (2**13 if with_noise else 2**16) + 17
    x, term = torch.randn(2, numel // 2 + 1), torch.randn(2, numel // 2 + 1)
    coefs = torch.rand(2, 2)
    noise_coef = torch.rand(2) if with_noise else None
    results = []
    for threads in (1, 2, 3, 7):
        out = torch.empty_like(x)
        compiled._C.mr_step(out, x, [term], coefs, noise_coef, None, 12, 2**32 - 5000, threads)
        results.append(out)
    for out in results[1:]:
        assert torch.equal(out, results[0])
    want = reference.mr_step(x.double(), [term.double()], coefs.double(), None if noise_coef is None else noise_coef.double(), 12, 2**32 - 5000)
    assert_matches(results[0], want, 2e-5)


@needs_cpu_module
def test_cpu_noise_inject_thread_shares_cross_samples_and_parts(thread_pool):
    g = torch.Generator().manual_seed(1)
    x0, y0 = torch.randn(5, 3, 33, 41, generator=g), torch.randn(5, 2, 33, 41, generator=g)
    x_coefs, y_coefs = torch.rand(5, 2, generator=g), torch.rand(5, 2, generator=g)
    outputs = []
    for threads in (1, 3):
        buffer = torch.empty(5, 5, 33, 41)
        compiled._C.noise_inject(buffer[:, :3], x0, x_coefs, None, None, buffer[:, 3:], y0, y_coefs, None, 8, 99, threads)
        outputs.append(buffer)
    assert torch.equal(outputs[0], outputs[1])
    want_x, want_y = reference.noise_inject(x0.double(), x_coefs.double(), y0.double(), y_coefs.double(), None, 8, 99)
    assert_matches(outputs[0], torch.cat([want_x, want_y], dim=1), 2e-5)


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_is_deterministic_and_independent_of_threads(thread_pool, backend, device, dtype):
    # Samples of several loss blocks/tiles (4096) with the split inside one of them.
    g = torch.Generator().manual_seed(2)
    output = torch.randn(3, 3, 61, 67, generator=g).to(device=device, dtype=dtype)
    coefs = coefs64(3, 2, 3, device=device, generator=g)
    split = 2 * 61 * 67 + 5
    runs = []
    original_threads = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)  # the CPU backend's thread count; CUDA runs repeat
            runs.append(weighted_score_loss(output, coefs, split=split, seed=1, offset=7, backend=backend))
    finally:
        torch.set_num_threads(original_threads)
    for loss in runs[1:]:
        assert torch.equal(loss, runs[0])
    want, _ = reference.weighted_score_loss(output.double().cpu(), coefs.cpu(), split, 1, 7)
    assert_matches(runs[0], want, 1e-5 * want.abs().max().item())


@needs_cpu_module
def test_in_place_output_over_many_tiles():
    x = torch.randn(2, 5000)
    term = torch.randn(2, 5000)
    coefs = torch.tensor([[0.5, 2.0], [-1.0, 0.25]], dtype=torch.float64)
    want = reference.mr_step(x.double(), [term.double()], coefs)
    mr_step(x, [term], coefs, out=x, backend="cpu")
    assert_matches(x, want, 1e-5)
    want = reference.mr_step(x.double(), [term.double()], coefs)
    mr_step(x, [term], coefs, out=term, backend="cpu")  # out aliasing a term
    assert_matches(term, want, 1e-5)


# ----------------------------------------------------------------------------- 16-bit rounding


def rounding_cases(dtype, numel, generator):
    """x, t [3, numel] of `dtype` and coefs [3, 2] for which c0 x + c1 t is exact in float32, so
    that torch's rounding of it is the answer: row 0 random sums that are often exactly halfway
    between two `dtype` numbers, row 1 overflow / NaN / inf / halfway cases, row 2 halves of odd
    subnormals (halfway between two subnormals)."""
    sign = torch.randint(-1, 2, (numel,), generator=generator).to(dtype)
    random_x = (1 + torch.rand(numel, generator=generator)).to(dtype) * sign
    random_t = (1 + torch.rand(numel, generator=generator)).to(dtype)
    if dtype == torch.float16:
        special_x = [65504.0, -65504.0, 65504.0, 2.0**-14, float("nan"), float("inf"), 1.0]
        special_t = [16.0, -16.0, 8.0, 2.0**-24, 1.0, 1.0, 2.0**-11]
        smallest = 2.0**-24
    else:
        special_x = [3.3895313892515355e38, -3.3895313892515355e38, 2.0**-120, 2.0**-133, float("nan"), float("-inf"), 1.0]
        special_t = [2.0**120, -(2.0**120), 2.0**-128, 2.0**-133, 1.0, 1.0, 2.0**-8]
        smallest = 2.0**-133
    padding = [0.0] * (numel - len(special_x))
    odd_subnormals = (2 * torch.randint(0, 64, (numel,), generator=generator) + 1).double() * smallest
    x = torch.stack([random_x, torch.tensor(special_x + padding).to(dtype), odd_subnormals.to(dtype)])
    t = torch.stack([random_t, torch.tensor(special_t + padding).to(dtype), torch.zeros(numel, dtype=dtype)])
    coefs = torch.tensor([[1.0, 1.0 / 256], [1.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    return x, t, coefs


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_16_bit_stores_round_to_nearest_even_like_torch(backend, device, dtype):
    x, t, coefs = rounding_cases(dtype, 4093, torch.Generator().manual_seed(4))
    exact = x.float() * coefs[:, :1].float() + t.float() * coefs[:, 1:].float()
    want = exact.to(dtype)
    got = mr_step(x.to(device), [t.to(device)], coefs.to(device), backend=backend).cpu()
    # NaN payloads differ between CPU and GPU conversions (0x7E00 vs 0x7FFF): compare NaN-ness.
    assert torch.equal(got.isnan(), want.isnan())
    numbers = ~want.isnan()
    mismatch = got[numbers].view(torch.int16) != want[numbers].view(torch.int16)
    assert not mismatch.any(), f"{int(mismatch.sum())} values rounded differently, e.g. {got[numbers][mismatch][:4]} vs {want[numbers][mismatch][:4]}"


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("side_dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_explicit_noise_and_target_of_another_dtype(backend, device, dtype, side_dtype):
    """16-bit tensors with float32 (read as stored) or float64 (converted) noise and targets, over
    samples of several CPU tiles (1024) so that the side input's own element size matters."""
    g = torch.Generator().manual_seed(6)
    shape = (2, 3, 29, 31)
    make = lambda d: torch.randn(shape, generator=g).to(device=device, dtype=d)  # noqa: E731
    x, term, mu, y0, noise_x, noise_y, target = make(dtype), make(dtype), make(dtype), make(dtype), make(side_dtype), make(side_dtype), make(side_dtype)
    coefs, loss_coefs = coefs64(2, 2, device=device, generator=g), coefs64(2, 2, 3, device=device, generator=g)
    tolerance = lambda want: 2 * torch.finfo(dtype).eps * want.abs().max().item()  # noqa: E731  one rounding step, FMA aside

    got = mr_step(x, [term], coefs, coefs[:, 0], noise=noise_x, backend=backend)
    want = reference.mr_step(x, [term], coefs, coefs[:, 0], noise=noise_x)
    assert_matches(got, want, tolerance(want), "mr_step")
    x_t, y_t = noise_inject(x, coefs, y0, coefs.flip(1), mu=mu, noise=(noise_x, noise_y), backend=backend)
    want_x, want_y = reference.noise_inject(x, coefs, y0, coefs.flip(1), mu, noise=(noise_x, noise_y))
    assert_matches(x_t, want_x, tolerance(want_x), "x_t")
    assert_matches(y_t, want_y, tolerance(want_y), "y_t")
    leaf = x.detach().clone().requires_grad_()
    loss = weighted_score_loss(leaf, loss_coefs, split=1000, noise=noise_x, target=target, backend=backend)
    loss.sum().backward()
    want_loss, want_grad = reference.weighted_score_loss(x, loss_coefs, 1000, noise=noise_x, target=target)
    assert_matches(loss, want_loss, 1e-5 * want_loss.abs().max().item(), "loss")
    assert_matches(leaf.grad, want_grad, tolerance(want_grad), "grad")


# ----------------------------------------------------------------------------- views, alignment, big batches


@pytest.mark.parametrize("backend,device", RUNNABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noise_inject_into_unaligned_views(backend, device, dtype):
    # 3 channels of 5x7: the y half of every sample starts at an odd element, so neither the
    # CPU tiles nor the CUDA vector loads may assume alignment; the other half must stay NaN-free.
    g = torch.Generator().manual_seed(7)
    x0, y0 = torch.randn(4, 3, 5, 7, generator=g).to(device, dtype), torch.randn(4, 2, 5, 7, generator=g).to(device, dtype)
    mu = torch.randn(4, 3, 5, 7, generator=g).to(device, dtype)
    x_coefs, y_coefs = coefs64(4, 2, device=device, generator=g), coefs64(4, 2, device=device, generator=g)
    out = torch.full((4, 5, 5, 7), float("nan"), dtype=dtype, device=device)
    x_t, y_t = noise_inject(x0, x_coefs, y0, y_coefs, mu=mu, seed=3, offset=1, out=out, backend=backend)
    want_x, want_y = reference.noise_inject(x0, x_coefs, y0, y_coefs, mu, 3, 1)
    tolerance = 2e-6 if dtype == torch.float32 else 2e-3
    assert_matches(x_t, want_x, tolerance, "x_t")
    assert_matches(y_t, want_y, tolerance, "y_t")
    assert not out.isnan().any()


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_inputs_that_are_views_of_a_batch(backend, device):
    # x0 with a batch stride (a view into a cat buffer) is read in place; a transposed one is copied.
    g = torch.Generator().manual_seed(8)
    buffer = torch.randn(3, 5, 4, 6, generator=g).to(device)
    x0 = buffer[:, 1:4]
    transposed = torch.randn(3, 3, 6, 4, generator=g).to(device).transpose(2, 3)
    coefs = coefs64(3, 2, device=device, generator=g)
    for source in (x0, transposed):
        x_t, _ = noise_inject(source, coefs, seed=2, backend=backend)
        want, _ = reference.noise_inject(source, coefs, seed=2)
        assert_matches(x_t, want, 2e-6)


@pytest.mark.parametrize("backend,device", RUNNABLE)
def test_batches_larger_than_a_cuda_grid_dimension(backend, device):
    batch = 70_000  # > 65535 blocks in a CUDA grid's y dimension: the kernels loop over samples
    x = torch.randn(batch, 3, device=device)
    coefs, noise_coef = coefs64(batch, 2, device=device), coefs64(batch, device=device)
    out = mr_step(x, [x], coefs, noise_coef, seed=1, backend=backend)
    assert_matches(out, reference.mr_step(x.double(), [x.double()], coefs, noise_coef, 1), 2e-5)
    loss = weighted_score_loss(x, coefs64(batch, 1, 3, device=device), seed=1, backend=backend)
    assert loss.shape == (batch,) and torch.isfinite(loss).all()


# ----------------------------------------------------------------------------- the modules' own checks


@needs_cpu_module
def test_module_refuses_rather_than_copies_outputs():
    x = torch.randn(2, 6)
    coefs = torch.ones(2, 2)
    sentinel = torch.full((6, 2), 7.0)
    cases = [
        (lambda: compiled._C.mr_step(sentinel.t(), x, [x], coefs, None, None, 0, 0, 1), ValueError, "out: expected each sample contiguous"),
        (lambda: compiled._C.mr_step(torch.empty(2, 6, dtype=torch.float64), x, [x], coefs, None, None, 0, 0, 1), TypeError, "out: expected float32"),
        (lambda: compiled._C.mr_step(x.clone(), x.double(), [x], coefs, None, None, 0, 0, 1), TypeError, "float64 runs on the torch backend"),
        (lambda: compiled._C.mr_step(x.clone(), x, [x[:, :5]], coefs, None, None, 0, 0, 1), ValueError, "terms[0]"),
        (lambda: compiled._C.mr_step(x.clone(), x, [x], coefs.double(), None, None, 0, 0, 1), TypeError, "coefs"),
        (lambda: compiled._C.mr_step(x.clone(), x, [x], coefs, None, None, 0, 0, 0), ValueError, "num_threads"),
        (lambda: compiled._C.weighted_score_loss(torch.empty(2), torch.empty(2, 6), x, torch.ones(2, 2, 3), 6, None, None, 0, 0, 1), ValueError, "split"),
        (lambda: compiled._C.noise_inject(torch.empty(2, 6), x, torch.ones(2, 2), None, None, None, x, None, None, 0, 0, 1), ValueError, "out_y"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as info:
            call()
        assert message in str(info.value), str(info.value)
    assert torch.equal(sentinel, torch.full((6, 2), 7.0))
