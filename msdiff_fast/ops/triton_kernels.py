"""Triton backends of the fused ops: @triton.jit kernels, then host launchers, then registration.

Every kernel loads its inputs in their own dtype, upcasts to float32 right after loading (bf16
arithmetic without it is silently wrong) and rounds once on the store. Noise is the package's
stream (see ``philox``): position p is normal p % 4 of ``tl.randn4x(seed, p // 4)``.

Launch shape, the same on GPU and under the interpreter: BLOCK = 1024 elements per program with
4 warps, i.e. 8 elements per thread: two 16-byte vector accesses per float32 stream (one for
16-bit dtypes; test_triton.py checks the PTX), and few programs, which is what the
interpreter's cost scales with. Where a block's first stream position is a multiple of 4
(ALIGNED: offsets and per-sample sizes divisible by 4, the usual case) its noise is one
tl.randn4x per four elements; otherwise each element evaluates its own counter
(``_stream_normal``). This is the common default for bandwidth-bound elementwise Triton kernels;
it is not autotuned, and the GPU speed of the four-normal draw is unmeasured (no GPU where this
was written).

The package imports without triton, or with a triton older than 3.2 (the first with
``do_not_specialize_on_alignment``, the one torch 2.6 pins): the backend then reports why it
cannot run.
"""

import contextlib
import os
from typing import Optional, Sequence, Tuple

import torch

from .dispatch import register, register_availability

MIN_TRITON = (3, 2)

try:
    import triton
    import triton.language as tl
except Exception as error:  # an absent or broken triton install must not break the package
    triton = None
    _IMPORT_FAILURE: Optional[str] = f"triton is not importable ({type(error).__name__}: {error})"
else:
    _IMPORT_FAILURE = None
    _TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if _TRITON_VERSION < MIN_TRITON:
        _IMPORT_FAILURE = f"triton >= {'.'.join(map(str, MIN_TRITON))} is needed, found {triton.__version__}"
        triton = None

BLOCK = 1024
NUM_WARPS = 4
# mr_step kernel has this many term pointer arguments (mr_step.MAX_TERMS); unused ones get x.
TERM_SLOTS = 8
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# seed and offset change every call: specializing on their value or alignment would recompile.
_RUNTIME_VALUES = dict(do_not_specialize=["seed", "offset"], do_not_specialize_on_alignment=["seed", "offset"])

if triton is not None:

    @triton.jit
    def _store_rounded(ptr, value, mask):
        """Store float32 ``value`` into ptr's dtype, rounding to nearest even.

        For bfloat16 the rounding is done on the float32 bits, so the cast itself is exact:
        the GPU (cvt.rn) and the interpreter (whose float32 -> bfloat16 cast truncates) agree.
        """
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
            # NaN payloads such as the GPU's 0x7FFFFFFF would carry into the sign bit: keep NaN.
            value = tl.where(value != value, value, rounded)
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _philox_words(seed, counters):
        """tl.randint4x(seed, counters) for int64 counters, as triton >= 3.4 computes it:
        Philox4x32-10 on the counter's low and high 32-bit halves.

        Spelled out because triton 3.2 and 3.3 (pinned by torch 2.6 and 2.7) run a 64-bit Philox
        variant on int64 counters instead, a different stream from every other backend's.
        """
        low = counters.to(tl.uint32)
        high = (counters >> 32).to(tl.uint32)
        zero = low * 0
        return tl.philox(seed, low, high, zero, zero)

    @triton.jit
    def _normals4x(seed, counters):
        """tl.randn4x(seed, counters) on _philox_words: two Box-Muller pairs per counter."""
        w0, w1, w2, w3 = _philox_words(seed, counters)
        n0, n1 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(w0), tl.random.uint_to_uniform_float(w1))
        n2, n3 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(w2), tl.random.uint_to_uniform_float(w3))
        return n0, n1, n2, n3

    @triton.jit
    def _stream_normal(seed, positions):
        """The stream at int64 positions: normal positions % 4 of tl.randn4x(seed, positions // 4).

        Each element evaluates its block's Philox and keeps one Box-Muller value, the same work
        per element as one tl.randn: the path for blocks whose first position is not a multiple of 4.
        """
        w0, w1, w2, w3 = _philox_words(seed, positions >> 2)
        lane = positions & 3
        second_pair = lane >= 2
        u_radius = tl.maximum(1.0e-7, tl.random.uint_to_uniform_float(tl.where(second_pair, w2, w0)))
        u_angle = tl.random.uint_to_uniform_float(tl.where(second_pair, w3, w1))
        # Odd positions are the sin normals: sin(2 pi u) = cos(2 pi (u - 1/4)), one cos for all.
        turns = u_angle - 0.25 * (lane & 1).to(tl.float32)
        return tl.sqrt(-2.0 * tl.log(u_radius)) * tl.cos(6.283185307179586 * turns)

    @triton.jit
    def _block_noise(seed, first_position, block_start, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        """The stream at first_position + block_start + 0 .. BLOCK - 1.

        ALIGNED (first_position + block_start a multiple of 4): one tl.randn4x per four positions,
        a quarter of the Philox work and half the logarithms of a draw per element. Drawn as a
        [BLOCK // 4, 4] tile with the counters as a column, so that a thread evaluates the Philox
        of the rows it holds, then flattened in order: the compiled code moves nothing between
        threads (test_triton.py checks the TTGIR and PTX).
        """
        start = first_position + block_start
        if ALIGNED:
            n0, n1, n2, n3 = _normals4x(seed, (start >> 2) + tl.arange(0, BLOCK // 4)[:, None])
            lane = tl.arange(0, 4)[None, :]
            tile = tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))
            return tl.reshape(tile, [BLOCK])
        else:
            return _stream_normal(seed, start + tl.arange(0, BLOCK))

    @triton.jit
    def _per_sample_coef(
        coefs_ptr,
        row_stride,
        column,
        sample,
        first_sample,
        in_next_sample,
        has_next_sample,
        mask,
        SAMPLE_SPANS_BLOCK: tl.constexpr,
    ):
        """coefs[sample, column] for every element of the block.

        When a sample is at least a block long the block touches at most two samples: two scalar
        loads and a select. Shorter samples take a gather (a few distinct, cached addresses).
        """
        if SAMPLE_SPANS_BLOCK:
            first = tl.load(coefs_ptr + first_sample * row_stride + column)
            following = tl.load(coefs_ptr + (first_sample + 1) * row_stride + column, mask=has_next_sample, other=0.0)
            return tl.where(in_next_sample, following, first)
        else:
            return tl.load(coefs_ptr + sample * row_stride + column, mask=mask, other=0.0)

    @triton.jit(**_RUNTIME_VALUES)
    def _mr_step_kernel(
        out_ptr,
        x_ptr,
        term0_ptr,
        term1_ptr,
        term2_ptr,
        term3_ptr,
        term4_ptr,
        term5_ptr,
        term6_ptr,
        term7_ptr,
        coefs_ptr,
        noise_coef_ptr,
        noise_ptr,
        numel,
        per_sample_numel,
        batch,
        seed,
        offset,
        NUM_TERMS: tl.constexpr,
        HAS_NOISE: tl.constexpr,
        USE_EXPLICIT_NOISE: tl.constexpr,
        SAMPLE_SPANS_BLOCK: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """out = coefs[b, 0] x + sum_k coefs[b, k + 1] term_k (+ noise_coef[b] z) over flat x.

        Flat indexing keeps every lane busy even for tiny samples; a block may cross sample
        boundaries, so element i uses the row of sample i // per_sample_numel. That division is
        done once per program on the block start; per element only a compare (long samples) or
        a small 32-bit division (samples shorter than a block) remains.
        """
        pid = tl.program_id(0).to(tl.int64)
        block_start = pid * BLOCK
        offsets = block_start + tl.arange(0, BLOCK)
        mask = offsets < numel
        first_sample = block_start // per_sample_numel
        within_first = (block_start - first_sample * per_sample_numel) + tl.arange(0, BLOCK)
        in_next_sample = within_first >= per_sample_numel
        has_next_sample = first_sample + 1 < batch
        if SAMPLE_SPANS_BLOCK:
            sample = first_sample + in_next_sample.to(tl.int64)
        else:
            sample = first_sample + (within_first.to(tl.int32) // per_sample_numel).to(tl.int64)
        row_stride = NUM_TERMS + 1

        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc = x * _per_sample_coef(
            coefs_ptr, row_stride, 0, sample, first_sample, in_next_sample, has_next_sample, mask, SAMPLE_SPANS_BLOCK
        )
        for k in tl.static_range(1, NUM_TERMS + 1):
            # Term k - 1 of the eight pointer slots; the unused slots are never read.
            if k == 1:
                term_ptr = term0_ptr
            elif k == 2:
                term_ptr = term1_ptr
            elif k == 3:
                term_ptr = term2_ptr
            elif k == 4:
                term_ptr = term3_ptr
            elif k == 5:
                term_ptr = term4_ptr
            elif k == 6:
                term_ptr = term5_ptr
            elif k == 7:
                term_ptr = term6_ptr
            else:
                term_ptr = term7_ptr
            term = tl.load(term_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            coef = _per_sample_coef(
                coefs_ptr, row_stride, k, sample, first_sample, in_next_sample, has_next_sample, mask, SAMPLE_SPANS_BLOCK
            )
            acc = acc + coef * term
        if HAS_NOISE:
            if USE_EXPLICIT_NOISE:
                z = tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            else:
                z = _block_noise(seed, offset.to(tl.int64), block_start, ALIGNED, BLOCK)
            coef = _per_sample_coef(
                noise_coef_ptr, 1, 0, sample, first_sample, in_next_sample, has_next_sample, mask, SAMPLE_SPANS_BLOCK
            )
            acc = acc + coef * z
        _store_rounded(out_ptr + offsets, acc, mask)

    @triton.jit
    def _diffuse_block(
        dst_ptr,
        dst_batch_stride,
        src_ptr,
        src_batch_stride,
        mu_ptr,
        mu_batch_stride,
        noise_ptr,
        noise_batch_stride,
        coefs_ptr,
        sample,
        block,
        numel,
        first_position,
        seed,
        HAS_MU: tl.constexpr,
        NOISY: tl.constexpr,
        USE_EXPLICIT_NOISE: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One block of one sample: a src + (1 - a) mu + s z, or a plain copy when not NOISY."""
        columns = block * BLOCK + tl.arange(0, BLOCK)
        mask = columns < numel
        value = tl.load(src_ptr + sample * src_batch_stride + columns, mask=mask, other=0.0).to(tl.float32)
        if NOISY:
            scale = tl.load(coefs_ptr + 2 * sample)
            std = tl.load(coefs_ptr + 2 * sample + 1)
            if USE_EXPLICIT_NOISE:
                z = tl.load(noise_ptr + sample * noise_batch_stride + columns, mask=mask, other=0.0).to(tl.float32)
            else:
                z = _block_noise(seed, first_position, block * BLOCK, ALIGNED, BLOCK)
            value = scale * value + std * z
            if HAS_MU:
                mu = tl.load(mu_ptr + sample * mu_batch_stride + columns, mask=mask, other=0.0).to(tl.float32)
                value = value + (1.0 - scale) * mu
        _store_rounded(dst_ptr + sample * dst_batch_stride + columns, value, mask)

    @triton.jit(**_RUNTIME_VALUES)
    def _noise_inject_kernel(
        out_x_ptr,
        out_x_batch_stride,
        x_ptr,
        x_batch_stride,
        mu_ptr,
        mu_batch_stride,
        noise_x_ptr,
        noise_x_batch_stride,
        x_coefs_ptr,
        x_numel,
        x_blocks,
        out_y_ptr,
        out_y_batch_stride,
        y_ptr,
        y_batch_stride,
        noise_y_ptr,
        noise_y_batch_stride,
        y_coefs_ptr,
        y_numel,
        y_blocks,
        positions_per_sample,
        seed,
        offset,
        HAS_MU: tl.constexpr,
        NOISY_Y: tl.constexpr,
        USE_EXPLICIT_NOISE: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program p handles block p % (x_blocks + y_blocks) of sample p // (x_blocks + y_blocks).

        A 1-D grid has no 65535 limit on either the batch or the blocks per sample. Sample b's
        stream positions start at offset + b * positions_per_sample: x first, then y (when
        noised), as in the concatenated network input.
        """
        pid = tl.program_id(0).to(tl.int64)
        blocks_per_sample = x_blocks + y_blocks
        sample = pid // blocks_per_sample
        block = pid % blocks_per_sample
        first_position = offset.to(tl.int64) + sample * positions_per_sample
        if block < x_blocks:
            _diffuse_block(
                out_x_ptr,
                out_x_batch_stride,
                x_ptr,
                x_batch_stride,
                mu_ptr,
                mu_batch_stride,
                noise_x_ptr,
                noise_x_batch_stride,
                x_coefs_ptr,
                sample,
                block,
                x_numel,
                first_position,
                seed,
                HAS_MU=HAS_MU,
                NOISY=True,
                USE_EXPLICIT_NOISE=USE_EXPLICIT_NOISE,
                ALIGNED=ALIGNED,
                BLOCK=BLOCK,
            )
        else:
            _diffuse_block(
                out_y_ptr,
                out_y_batch_stride,
                y_ptr,
                y_batch_stride,
                y_ptr,
                y_batch_stride,
                noise_y_ptr,
                noise_y_batch_stride,
                y_coefs_ptr,
                sample,
                block - x_blocks,
                y_numel,
                first_position + x_numel,
                seed,
                HAS_MU=False,
                NOISY=NOISY_Y,
                USE_EXPLICIT_NOISE=USE_EXPLICIT_NOISE,
                ALIGNED=ALIGNED,
                BLOCK=BLOCK,
            )

    @triton.jit(**_RUNTIME_VALUES)
    def _weighted_score_loss_kernel(
        partial_loss_ptr,
        grad_ptr,
        grad_batch_stride,
        output_ptr,
        output_batch_stride,
        coefs_ptr,
        coefs_batch_stride,
        noise_ptr,
        noise_batch_stride,
        target_ptr,
        target_batch_stride,
        numel,
        blocks_per_sample,
        split,
        seed,
        offset,
        HAS_SPLIT: tl.constexpr,
        USE_EXPLICIT_NOISE: tl.constexpr,
        HAS_TARGET: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Gradient of one block and its partial loss, stored at partial_loss[sample, block].

        No atomics: the host sums the partials in a fixed order, so the loss is reproducible.
        """
        pid = tl.program_id(0).to(tl.int64)
        sample = pid // blocks_per_sample
        block = pid % blocks_per_sample
        columns = block * BLOCK + tl.arange(0, BLOCK)
        mask = columns < numel

        output = tl.load(output_ptr + sample * output_batch_stride + columns, mask=mask, other=0.0).to(tl.float32)
        if USE_EXPLICIT_NOISE:
            z = tl.load(noise_ptr + sample * noise_batch_stride + columns, mask=mask, other=0.0).to(tl.float32)
        else:
            z = _block_noise(seed, offset.to(tl.int64) + sample * numel, block * BLOCK, ALIGNED, BLOCK)

        row = coefs_ptr + sample * coefs_batch_stride
        weight = tl.load(row)
        noise_scale = tl.load(row + 1)
        target_scale = tl.load(row + 2)
        if HAS_SPLIT:
            in_first_segment = columns < split
            weight = tl.where(in_first_segment, weight, tl.load(row + 3))
            noise_scale = tl.where(in_first_segment, noise_scale, tl.load(row + 4))
            target_scale = tl.where(in_first_segment, target_scale, tl.load(row + 5))

        wanted = noise_scale * z
        if HAS_TARGET:
            target = tl.load(target_ptr + sample * target_batch_stride + columns, mask=mask, other=0.0).to(tl.float32)
            wanted = wanted + target_scale * target
        # Lanes past the end drew noise for positions that are not theirs: zero them out of the sum.
        residual = tl.where(mask, output - wanted, 0.0)
        grad = 2.0 * weight * residual
        _store_rounded(grad_ptr + sample * grad_batch_stride + columns, grad, mask)
        tl.store(partial_loss_ptr + pid, tl.sum(weight * residual * residual, axis=0))

    _INTERPRETED = type(_mr_step_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


# ----------------------------------------------------------------------------- host side


def _availability(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if _IMPORT_FAILURE is not None:
        return _IMPORT_FAILURE
    if dtype == torch.float64:
        return "float64 runs on the torch reference backend"
    if dtype not in SUPPORTED_DTYPES:
        return f"triton kernels take float32, float16 or bfloat16, got {dtype}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if device.type == "cuda" or (device.type == "cpu" and _INTERPRETED):
        return None
    reason = f"triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type} tensors"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        reason += "; TRITON_INTERPRET=1 was set after msdiff_fast was imported, it must be set before"
    return reason


def _on_device(tensor: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _sample_rows(tensor: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """The tensor with each sample contiguous, and its batch stride.

    Per-sample-contiguous views (slices of a cat buffer, a batch-expanded mu) are read in place;
    anything else is copied once.
    """
    if tensor.shape[0] and not tensor[0].is_contiguous():
        tensor = tensor.contiguous()
    return tensor, tensor.stride(0)


def _check_output_rows(tensor: torch.Tensor, name: str) -> int:
    """Batch stride of an output; outputs are written in place, never into a silent copy."""
    if tensor.shape[0] and not tensor[0].is_contiguous():
        raise ValueError(f"{name}: expected each sample contiguous, got strides {tensor.stride()}")
    return tensor.stride(0)


def _float32(coefficients: torch.Tensor) -> torch.Tensor:
    return coefficients.to(torch.float32).contiguous()


def _mr_step(out, x, terms: Sequence[torch.Tensor], coefs, noise_coef, seed: int, offset: int, noise):
    numel = x.numel()
    if numel == 0:
        return
    if not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous tensor, got strides {out.stride()}")
    if not 1 <= len(terms) <= TERM_SLOTS:
        raise ValueError(f"terms: expected 1 to {TERM_SLOTS} tensors, got {len(terms)}")
    # out may be x itself: each element is read before it is written, by the same program.
    x = x.contiguous()
    term_slots = [term.contiguous() for term in terms] + [x] * (TERM_SLOTS - len(terms))
    coefs = _float32(coefs)
    has_noise = noise_coef is not None
    noise_coef = _float32(noise_coef) if has_noise else coefs
    use_explicit_noise = noise is not None
    noise = noise.contiguous() if use_explicit_noise else x
    batch = x.shape[0]
    per_sample_numel = numel // batch
    grid = (triton.cdiv(numel, BLOCK),)
    with _on_device(x):
        _mr_step_kernel[grid](
            out,
            x,
            *term_slots,
            coefs,
            noise_coef,
            noise,
            numel,
            per_sample_numel,
            batch,
            seed,
            offset,
            NUM_TERMS=len(terms),
            HAS_NOISE=has_noise,
            USE_EXPLICIT_NOISE=use_explicit_noise,
            SAMPLE_SPANS_BLOCK=per_sample_numel >= BLOCK,
            ALIGNED=offset % 4 == 0,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )


def _noise_inject(out_x, out_y, x0, x_coefs, y0, y_coefs, mu, seed: int, offset: int, noise_x, noise_y):
    batch = x0.shape[0]
    if batch == 0:
        return
    out_x_stride = _check_output_rows(out_x, "out_x")
    x0, x_stride = _sample_rows(x0)
    x_numel = x0.numel() // batch
    x_coefs = _float32(x_coefs)
    has_mu = mu is not None
    mu, mu_stride = _sample_rows(mu) if has_mu else (x0, x_stride)
    use_explicit_noise = noise_x is not None
    noise_x, noise_x_stride = _sample_rows(noise_x) if use_explicit_noise else (x0, x_stride)

    noisy_y = y0 is not None and y_coefs is not None
    if y0 is None:
        out_y, out_y_stride, y0, y_stride, y_numel, y_coefs = out_x, out_x_stride, x0, x_stride, 0, x_coefs
    else:
        out_y_stride = _check_output_rows(out_y, "out_y")
        y0, y_stride = _sample_rows(y0)
        y_numel = y0.numel() // batch
        y_coefs = _float32(y_coefs) if noisy_y else x_coefs
    if use_explicit_noise and noisy_y:
        noise_y, noise_y_stride = _sample_rows(noise_y)
    else:
        noise_y, noise_y_stride = y0, y_stride

    x_blocks, y_blocks = triton.cdiv(x_numel, BLOCK), triton.cdiv(y_numel, BLOCK)
    grid = (batch * (x_blocks + y_blocks),)
    if grid[0] == 0:
        return
    positions_per_sample = x_numel + (y_numel if noisy_y else 0)
    with _on_device(x0):
        _noise_inject_kernel[grid](
            out_x,
            out_x_stride,
            x0,
            x_stride,
            mu,
            mu_stride,
            noise_x,
            noise_x_stride,
            x_coefs,
            x_numel,
            x_blocks,
            out_y,
            out_y_stride,
            y0,
            y_stride,
            noise_y,
            noise_y_stride,
            y_coefs,
            y_numel,
            y_blocks,
            positions_per_sample,
            seed,
            offset,
            HAS_MU=has_mu,
            NOISY_Y=noisy_y,
            USE_EXPLICIT_NOISE=use_explicit_noise,
            ALIGNED=offset % 4 == 0 and positions_per_sample % 4 == 0 and x_numel % 4 == 0,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )


def _weighted_score_loss(loss, grad, output, coefs, split: Optional[int], seed: int, offset: int, noise, target):
    batch = output.shape[0]
    if batch == 0:
        return
    numel = output.numel() // batch
    grad_stride = _check_output_rows(grad, "grad")
    output, output_stride = _sample_rows(output)
    coefs = _float32(coefs)
    use_explicit_noise = noise is not None
    noise, noise_stride = _sample_rows(noise) if use_explicit_noise else (output, output_stride)
    has_target = target is not None
    target, target_stride = _sample_rows(target) if has_target else (output, output_stride)
    blocks_per_sample = triton.cdiv(numel, BLOCK)
    partial_loss = torch.zeros(batch, blocks_per_sample, dtype=torch.float32, device=output.device)
    if blocks_per_sample:
        with _on_device(output):
            _weighted_score_loss_kernel[(batch * blocks_per_sample,)](
                partial_loss,
                grad,
                grad_stride,
                output,
                output_stride,
                coefs,
                coefs.stride(0),
                noise,
                noise_stride,
                target,
                target_stride,
                numel,
                blocks_per_sample,
                0 if split is None else split,
                seed,
                offset,
                HAS_SPLIT=split is not None,
                USE_EXPLICIT_NOISE=use_explicit_noise,
                HAS_TARGET=has_target,
                ALIGNED=offset % 4 == 0 and numel % 4 == 0,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
    # A fixed-order sum over the [batch, blocks] partials: bitwise reproducible, unlike atomics.
    torch.sum(partial_loss, dim=1, out=loss)


register("mr_step", "triton", _mr_step)
register("noise_inject", "triton", _noise_inject)
register("weighted_score_loss", "triton", _weighted_score_loss)
register_availability("triton", _availability)
