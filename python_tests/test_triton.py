"""What is specific to the Triton backend: its noise is the package's Philox stream, blocks that
cross sample boundaries, every term slot, the deterministic loss reduction, bf16 rounding on the
store, batch-strided views, availability reasons, and that every kernel compiles for real GPUs.
The cross-backend accuracy tests live in test_ops.py.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest.py before
triton is imported); run as a script (``python test_triton.py``) this file instead compiles every
kernel variant the launchers produce for sm_80 and sm_90, which needs no GPU.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import msdiff_fast  # noqa: E402
from msdiff_fast.ops import mr_step, noise_inject, philox_normal, reference, triton_kernels, weighted_score_loss  # noqa: E402
from msdiff_fast.ops.dispatch import reason_unavailable  # noqa: E402
from msdiff_fast.ops.philox import philox_words  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = triton_kernels.BLOCK

if __name__ != "__main__":
    _reason = reason_unavailable("mr_step", "triton", torch.device(DEVICE), torch.float32)
    pytestmark = pytest.mark.skipif(_reason is not None, reason=f"triton backend unavailable: {_reason}")

# (seed, offset): small values (32-bit kernel arguments, 1 is special-cased by Triton), a seed with
# both key halves set, and draws whose 64-bit counter carries into its high word mid-tensor.
SEEDS_AND_OFFSETS = [(0, 0), (1, 1), (2**62 + 987654321, 2**32 - 700), (2**31 + 5, 2**40 + 3)]


@triton.jit(do_not_specialize=["seed", "offset"])
def _philox_words_kernel(words_ptr, seed, offset, numel, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < numel
    w0, w1, w2, w3 = tl.randint4x(seed, offset.to(tl.int64) + index)
    # uint32 -> int64 zero-extends: the words arrive as the values philox_words returns.
    tl.store(words_ptr + index, w0.to(tl.int64), mask=mask)
    tl.store(words_ptr + numel + index, w1.to(tl.int64), mask=mask)
    tl.store(words_ptr + 2 * numel + index, w2.to(tl.int64), mask=mask)
    tl.store(words_ptr + 3 * numel + index, w3.to(tl.int64), mask=mask)


def f64(*shape):
    return torch.rand(*shape, dtype=torch.float64, device=DEVICE)


def assert_matches(got, want, atol, name):
    err = (got.double() - want.double()).abs()
    if err.max().item() > atol:
        index = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(f"{name}: max error {err.max().item():.3g} > {atol:.3g} at {index}: got {got[index].item()}, want {want[index].item()}")


# ----------------------------------------------------------------------------- the noise stream


@pytest.mark.parametrize("seed,offset", SEEDS_AND_OFFSETS)
def test_randint4x_words_are_the_package_philox_bit_for_bit(seed, offset):
    numel = 1500
    words = torch.empty(4, numel, dtype=torch.int64, device=DEVICE)
    _philox_words_kernel[(triton.cdiv(numel, BLOCK),)](words, seed, offset, numel, BLOCK=BLOCK)
    want = philox_words(seed, torch.arange(offset, offset + numel, dtype=torch.int64))
    for k in range(4):
        assert torch.equal(words[k].cpu(), want[k]), f"word {k} differs"


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("seed,offset", SEEDS_AND_OFFSETS)
def test_every_kernel_draws_the_package_noise(seed, offset, channels):
    """z from each op equals philox_normal to float32 rounding of log/cos, at the documented
    positions: with 4 channels (840 per sample) and offsets divisible by 4 every block starts on
    a Philox counter (one tl.randn4x per row), with 3 (630) or odd offsets it does not."""
    batch, shape = 2, (channels, 10, 21)
    numel = batch * channels * 210
    want32 = philox_normal(seed, offset, numel).to(DEVICE)
    want64 = philox_normal(seed, offset, numel, dtype=torch.float64).to(DEVICE)

    zeros = torch.zeros(batch, *shape, device=DEVICE)
    z_step = mr_step(zeros, [zeros], torch.zeros(batch, 2, dtype=torch.float64, device=DEVICE),
                     torch.ones(batch, dtype=torch.float64, device=DEVICE), seed=seed, offset=offset, backend="triton")

    # noise_inject: x then y per sample, i.e. the flat index of cat(x_t, y_t).
    x0, y0 = torch.zeros(batch, 2, 10, 21, device=DEVICE), torch.zeros(batch, channels - 2, 10, 21, device=DEVICE)
    pure_noise = torch.tensor([[0.0, 1.0]] * batch, dtype=torch.float64, device=DEVICE)
    x_t, y_t = noise_inject(x0, pure_noise, y0, pure_noise, seed=seed, offset=offset, backend="triton")
    z_inject = torch.cat([x_t, y_t], dim=1)

    # weighted_score_loss with w = 1, k = -1/2, output 0: residual z / 2, gradient z, loss sum z^2 / 4.
    output = torch.zeros(batch, *shape, device=DEVICE, requires_grad=True)
    coefs = torch.tensor([[[1.0, -0.5, 0.0]]] * batch, dtype=torch.float64, device=DEVICE)
    loss = weighted_score_loss(output, coefs, seed=seed, offset=offset, backend="triton")
    loss.sum().backward()
    z_loss = output.grad

    # Same uniforms bit for bit; log, cos and sqrt differ by an ulp or two (GPU: sqrt.approx, libdevice).
    for name, z in (("mr_step", z_step), ("noise_inject", z_inject), ("weighted_score_loss", z_loss)):
        assert_matches(z.flatten(), want32, 5e-6, name)
        assert_matches(z.flatten(), want64, 1e-5, name)
    assert_matches(loss, (want64.view(batch, -1) ** 2).sum(1) / 4, 1e-3, "loss")


# ----------------------------------------------------------------------------- blocks and samples


@pytest.mark.parametrize("per_sample", [37, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 37])
@pytest.mark.parametrize("noise_kind", [None, "philox", "explicit"])
def test_mr_step_blocks_crossing_samples(per_sample, noise_kind):
    """Per-sample coefficients where blocks hold many samples, exactly one, or straddle two,
    with a partial last block."""
    batch = 60 if per_sample < 100 else 3  # a few programs either way: Philox costs ~50 ms each interpreted
    x, t0, t1 = (torch.randn(batch, per_sample, device=DEVICE) for _ in range(3))
    coefs = torch.randn(batch, 3, dtype=torch.float64, device=DEVICE)
    noise_coef = f64(batch) + 0.5 if noise_kind else None
    noise = torch.randn(batch, per_sample, device=DEVICE) if noise_kind == "explicit" else None
    got = mr_step(x, [t0, t1], coefs, noise_coef, seed=77, offset=2**33, noise=noise, backend="triton")
    want = reference.mr_step(x.double(), [t0.double(), t1.double()], coefs, noise_coef, 77, 2**33,
                             None if noise is None else noise.double())
    assert_matches(got, want, 2e-5, "out")


@pytest.mark.parametrize("num_terms", range(1, 9))
def test_mr_step_every_term_slot(num_terms):
    """Independent random terms and coefficients: a slot paired with the wrong pointer or column shows."""
    batch, per_sample = 3, 50
    x = torch.randn(batch, per_sample, device=DEVICE)
    terms = [torch.randn(batch, per_sample, device=DEVICE) for _ in range(num_terms)]
    coefs = torch.randn(batch, num_terms + 1, dtype=torch.float64, device=DEVICE)
    got = mr_step(x, terms, coefs, backend="triton")
    want = reference.mr_step(x.double(), [t.double() for t in terms], coefs)
    assert_matches(got, want, 1e-5, f"{num_terms} terms")


def test_noise_inject_multi_block_samples():
    batch, x_shape, y_shape = 3, (2, 33, 33), (1, 20, 70)  # 2178 and 1400 elements: 3 and 2 blocks
    x0 = torch.randn(batch, *x_shape, device=DEVICE)
    mu = torch.randn(batch, *x_shape, device=DEVICE)
    y0 = torch.randn(batch, *y_shape, device=DEVICE)
    x_coefs, y_coefs = f64(batch, 2), f64(batch, 2)
    seed, offset = 2**40 + 1, 2**32 - 3000
    x_t, y_t = noise_inject(x0, x_coefs, y0, y_coefs, mu=mu, seed=seed, offset=offset, backend="triton")
    rx, ry = reference.noise_inject(x0.double(), x_coefs, y0.double(), y_coefs, mu.double(), seed, offset)
    assert_matches(x_t, rx, 2e-5, "x_t")
    assert_matches(y_t, ry, 2e-5, "y_t")


@pytest.mark.parametrize("split", [None, 5, BLOCK + 5])
def test_weighted_score_loss_multi_block_samples(split):
    batch, per_sample = 3, 2 * BLOCK + 37
    output = torch.randn(batch, per_sample, device=DEVICE, requires_grad=True)
    target = torch.randn(batch, per_sample, device=DEVICE)
    coefs = f64(batch, 1 if split is None else 2, 3)
    loss = weighted_score_loss(output, coefs, split=split, seed=9, offset=2**35, target=target, backend="triton")
    loss.sum().backward()
    want_loss, want_grad = reference.weighted_score_loss(output.detach().double(), coefs, split, 9, 2**35, None, target.double())
    assert_matches(loss, want_loss, 1e-5 * per_sample, "loss")
    assert_matches(output.grad, want_grad, 2e-5, "grad")


def test_loss_reduction_is_deterministic():
    batch, per_sample = 4, 3 * BLOCK + 11
    output = torch.randn(batch, per_sample, device=DEVICE)
    coefs = f64(batch, 2, 3)
    runs = [
        torch.ops.msdiff_fast.weighted_score_loss(output, coefs, BLOCK + 100, 123, 456, None, None, "triton")
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]), "loss differs between two identical runs"
    assert torch.equal(runs[0][1], runs[1][1]), "grad differs between two identical runs"


# ----------------------------------------------------------------------------- dtypes and layouts


def test_bfloat16_stores_round_to_nearest_even_like_torch():
    """hi + lo is exact in float32 (c0 = c1 = 1), so the only rounding is the store's.

    Subnormals are left out: the interpreter's bfloat16 conversions flush them (the GPU's do not).
    """
    values = torch.randn(4000, dtype=torch.float32) * torch.logspace(-30, 30, 4000)
    bf16_ulp_at_one = 2.0**-7
    ties = torch.tensor([1 + bf16_ulp_at_one + bf16_ulp_at_one / 2, 1 + bf16_ulp_at_one / 2, -(3 + 3 * bf16_ulp_at_one) * 1.5])
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.3961e38, -3.3961e38, 0.0, -0.0, 1.2e-38])
    values = torch.cat([values, ties, specials])
    hi = values.to(torch.bfloat16)
    lo = torch.where(torch.isfinite(values), values - hi.float(), torch.zeros_like(values)).to(torch.bfloat16)
    exact = hi.float() + lo.float()
    ones = torch.ones(1, 2, dtype=torch.float64, device=DEVICE)
    got = mr_step(hi.reshape(1, -1).to(DEVICE), [lo.reshape(1, -1).to(DEVICE)], ones, backend="triton").flatten().cpu()
    want = exact.to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])
    assert torch.equal(got.isnan(), want.isnan())


def test_batch_strided_views_and_broadcast_mu():
    """Slices of a cat buffer and a batch-broadcast mu (batch stride 0) are read through their batch stride."""
    batch = 3
    buffer = torch.randn(batch, 5, 6, 7, device=DEVICE)
    x0, noise_x = buffer[:, :3], buffer[:, 3:4].expand(batch, 3, 6, 7).contiguous()
    mu = torch.randn(1, 3, 6, 7, device=DEVICE).expand(batch, 3, 6, 7)
    coefs = f64(batch, 2)
    out = torch.full((batch, 4, 6, 7), float("nan"), device=DEVICE)
    y0 = buffer[:, 4:]
    x_t, y_t = noise_inject(x0, coefs, y0, None, mu=mu, noise=(noise_x, None), out=out, backend="triton")
    rx, ry = reference.noise_inject(x0.double(), coefs, y0.double(), None, mu.double(), noise=(noise_x.double(), None))
    assert_matches(x_t, rx, 2e-5, "x_t")
    assert torch.equal(y_t, y0) and torch.equal(out[:, 3:], y0)

    output, target, loss_coefs = buffer[:, 1:4], buffer[:, 2:5], f64(batch, 1, 3)
    loss = weighted_score_loss(output, loss_coefs, noise=noise_x, target=target, backend="triton")
    want, _ = reference.weighted_score_loss(output.double(), loss_coefs, None, noise=noise_x.double(), target=target.double())
    assert_matches(loss, want, 1e-4, "loss")


def test_outputs_that_are_not_sample_contiguous_are_refused():
    """The launcher raises instead of writing into a copy that nobody would read."""
    x0 = torch.randn(2, 3, 4, device=DEVICE)
    out_x = torch.empty(2, 4, 3, device=DEVICE).transpose(1, 2)
    with pytest.raises(ValueError, match="out_x"):
        triton_kernels._noise_inject(out_x, None, x0, f64(2, 2), None, None, None, 0, 0, None, None)


# ----------------------------------------------------------------------------- availability


def test_availability_reasons(monkeypatch):
    cpu = torch.device("cpu")
    assert "torch reference" in reason_unavailable("mr_step", "triton", cpu, torch.float64)
    on_cuda = reason_unavailable("mr_step", "triton", torch.device("cuda"), torch.bfloat16)
    assert on_cuda is None if torch.cuda.is_available() else on_cuda == "no CUDA device (torch.cuda.is_available() is False)"
    assert "triton runs on CUDA tensors" in reason_unavailable("mr_step", "triton", torch.device("meta"), torch.float32)
    monkeypatch.setattr(triton_kernels, "_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = reason_unavailable("noise_inject", "triton", cpu, torch.float32)
    assert reason.startswith("triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"), reason
    assert "set after msdiff_fast was imported" in reason


def _subprocess_env():
    """This environment, with the checkout that msdiff_fast was imported from first on the path."""
    env = dict(os.environ)
    checkout = str(Path(msdiff_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (checkout, env.get("PYTHONPATH")) if p)
    return env


def test_package_imports_and_explains_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, msdiff_fast.ops as ops\n"
        "print(ops.backends('cuda')['mr_step']['triton'])\n"
        "x = torch.ones(2, 3)\n"
        "print(ops.mr_step(x, [x], torch.ones(2, 2, dtype=torch.float64)).sum().item())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_subprocess_env())
    assert result.returncode == 0, result.stderr
    reason, total = result.stdout.strip().splitlines()
    assert reason.startswith("triton is not importable"), reason
    assert float(total) == 12.0


# ----------------------------------------------------------------------------- GPU compilation


@pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="this triton has no NVIDIA backend")
def test_every_kernel_variant_compiles_for_sm80_and_sm90():
    """Runs this file as a script without the interpreter: Triton's own ptxas builds the cubins."""
    env = {k: v for k, v in _subprocess_env().items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled" in result.stdout, result.stdout


def _record_launches():
    """Every (kernel, args, kwargs) the launchers pass, over cases covering each constexpr branch."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for name in ("_mr_step_kernel", "_noise_inject_kernel", "_weighted_score_loss_kernel"):
        setattr(triton_kernels, name, Recorder(getattr(triton_kernels, name)))

    def c64(*shape):
        return torch.rand(*shape, dtype=torch.float64)

    # Each constexpr branch at least once, each store dtype at least once (bfloat16 has its own
    # rounding path); fewer variants keep the uncached compile time down (~1 s per variant).
    # The stream's noise from offsets divisible by 4 (ALIGNED) and not, for each kernel.
    mr_step_cases = [
        (1, None, 4096, torch.bfloat16, 2**33),
        (8, "philox", 4096, torch.bfloat16, 2**33),
        (8, "philox", 4096, torch.float32, 2**33),
        (8, "philox", 4096, torch.float32, 2**33 + 1),
        (3, "explicit", 100, torch.float16, 2**33),
    ]
    for num_terms, noise_kind, per_sample, dtype, offset in mr_step_cases:
        x = torch.randn(2, per_sample).to(dtype)
        terms = [torch.randn(2, per_sample).to(dtype) for _ in range(num_terms)]
        noise = torch.randn(2, per_sample) if noise_kind == "explicit" else None
        triton_kernels._mr_step(torch.empty_like(x), x, terms, c64(2, num_terms + 1), c64(2) if noise_kind else None, 2**40, offset, noise)

    noisy = (torch.bfloat16, c64(2, 2), torch.randn(2, 3, 32, 32), None, (2**40, 2**33))
    noisy_unaligned = (torch.bfloat16, c64(2, 2), torch.randn(2, 3, 32, 32), None, (2**40, 2**33 + 2))
    clean = (torch.float32, None, None, torch.randn(2, 3, 32, 32), (5, 6))
    for dtype, y_coefs, mu, noise_x, (seed, offset) in (noisy, noisy_unaligned, clean):
        x0, y0 = torch.randn(2, 3, 32, 32).to(dtype), torch.randn(2, 1, 32, 32).to(dtype)
        mu = None if mu is None else mu.to(dtype)
        buffer = torch.empty(2, 4, 32, 32, dtype=dtype)
        triton_kernels._noise_inject(buffer[:, :3], buffer[:, 3:], x0, c64(2, 2), y0, y_coefs, mu, seed, offset, noise_x, None)

    output = torch.randn(2, 4, 32, 32)
    loss, grad = torch.empty(2), torch.empty_like(output)
    triton_kernels._weighted_score_loss(loss, grad.bfloat16(), output.bfloat16(), c64(2, 2, 3), 3072, 2**40, 7, None, output)
    triton_kernels._weighted_score_loss(loss, grad.bfloat16(), output.bfloat16(), c64(2, 2, 3), 3072, 2**40, 8, None, output)
    triton_kernels._weighted_score_loss(loss, grad, output, c64(2, 1, 3), None, 0, 0, output.double(), None)
    return launches


def _code_counts(binary) -> dict:
    """What a compiled kernel does, read from its TTGIR and PTX."""
    ttgir, ptx = binary.asm["ttgir"], binary.asm["ptx"]
    return {
        "layout conversions": ttgir.count("convert_layout"),
        "32-bit high multiplies (Philox)": len(re.findall(r"mul\.hi\.u32", ptx)),
        "16-byte loads": len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)),
    }


# Aligned blocks do a quarter of the Philox evaluations, but not always exactly a quarter of the
# multiplies: how many of an evaluation's multiplies triton folds varies by path and version
# (triton 3.9: 32 aligned, 128 per element; triton 3.7: 39 and 153); per-element draws in both
# paths would make the ratio 1.
ALIGNED_MULTIPLIES_RATIO = 0.3


def _check_noise_code(counts: dict) -> None:
    """ALIGNED variants evaluate one Philox per four elements (a quarter of the multiplies of the
    per-element path), flattening the noise tile moves nothing between threads, and loads stay
    16-byte vectors."""
    for name in ("_mr_step_kernel", "_noise_inject_kernel", "_weighted_score_loss_kernel"):
        multiplies = {}
        for aligned in (True, False):
            variants = [(dtype, c) for (kernel, a, dtype), cs in counts.items() if kernel == name and a == aligned for c in cs]
            multiplies[aligned] = min(c["32-bit high multiplies (Philox)"] for _, c in variants)
            for dtype, c in variants:
                assert c["layout conversions"] == 0, f"{name} ({dtype}): {c}"
                assert c["16-byte loads"] > 0, f"{name} ({dtype}): {c}"
        assert multiplies[True] <= ALIGNED_MULTIPLIES_RATIO * multiplies[False], f"{name}: Philox multiplies aligned {multiplies[True]}, unaligned {multiplies[False]}"


def _compile_for_gpus(archs=(80, 90)):
    """Compile each recorded launch as Triton's launcher would specialize it, for real GPU targets."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    compiled, counts = set(), {}
    for kernel, args, kwargs in _record_launches():
        kwargs = dict(kwargs)
        options = {"num_warps": kwargs.pop("num_warps")}
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(kernel.params):
            value = args[i] if i < len(args) else kwargs[param.name]
            specialized_one = isinstance(value, int) and not isinstance(value, bool) and value == 1 and not param.do_not_specialize
            if param.is_constexpr or specialized_one:
                signature[param.name], constexprs[param.name] = "constexpr", value
                continue
            signature[param.name] = mangle_type(value)
            if param.do_not_specialize_on_alignment:
                continue
            aligned = value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor) else value % 16 == 0
            if aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(attrs))
        if key in compiled:
            continue
        for arch in archs:
            binary = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options)
            assert binary.asm["cubin"], f"{kernel.__name__}: no cubin for sm_{arch}"
        compiled.add(key)
        if not constexprs.get("USE_EXPLICIT_NOISE", True) and constexprs.get("HAS_NOISE", True):
            dtype = next(signature[p] for p in ("out_ptr", "out_x_ptr", "grad_ptr") if p in signature)
            counts.setdefault((kernel.__name__, constexprs["ALIGNED"], dtype), []).append(_code_counts(binary))
    print(f"compiled {len(compiled)} kernel variants for sm_{', sm_'.join(map(str, archs))}")
    for (name, aligned, dtype), variants in sorted(counts.items()):
        print(f"{name} {dtype} {'aligned' if aligned else 'unaligned'}: {variants}")
    _check_noise_code(counts)


if __name__ == "__main__":
    _compile_for_gpus()
