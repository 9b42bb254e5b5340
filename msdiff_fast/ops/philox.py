"""The noise stream shared by every backend, in plain PyTorch.

Positions come in blocks of four: position p of a draw with seed s is normal p mod 4 of
Triton's ``tl.randn4x(s, p // 4)``. That is Philox4x32-10 with key (s mod 2**32, s >> 32) and
counter (c mod 2**32, c >> 32, 0, 0) for c = p // 4; its four words become uniforms in [0, 1)
through Triton's ``uint_to_uniform_float``, and Box-Muller turns words (0, 1) into normals 0 and
1, ``r cos(2 pi u1)`` and ``r sin(2 pi u1)`` with ``r = sqrt(-2 log max(u0, 1e-7))``, and words
(2, 3) into normals 2 and 3 the same way. An op drawing n values at offset o reads positions
o .. o + n - 1, so consecutive draws never overlap whatever their sizes.

The C++, CUDA and Triton kernels compute the same words bit for bit; the normals agree to float
rounding of log/sin/cos. Arithmetic here is in int64 with 16-bit limbs, so it runs on any device.
"""

import torch

MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10
MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586
NORMALS_PER_COUNTER = 4


def _mul_hi_lo(a: torch.Tensor, constant: int):
    """High and low 32-bit words of a * constant for uint32 values held in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_product = a_lo * constant
    mid = a_hi * constant + (lo_product >> 16)
    high = mid >> 16
    low = ((mid & 0xFFFF) << 16) | (lo_product & 0xFFFF)
    return high & MASK32, low & MASK32


def philox_words(seed: int, counters: torch.Tensor):
    """The four Philox4x32-10 output words (uint32 values in int64) for 64-bit counters."""
    counters = counters.to(torch.int64)
    c0 = counters & MASK32
    c1 = (counters >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: the word read as int32, negatives folded, times 2**-31."""
    signed = torch.where(words >= 2**31, words - 2**32, words)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def philox_normal(seed: int, offset: int, numel: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normals for stream positions offset .. offset + numel - 1, as a flat tensor.

    The uniforms are float32 as in every kernel; the Box-Muller map runs in ``dtype``
    (float64 gives the oracle the kernels are compared with).
    """
    check_seed_offset(seed, offset, numel)
    lead = offset % NORMALS_PER_COUNTER
    first_counter = offset // NORMALS_PER_COUNTER
    counters = -(-(lead + numel) // NORMALS_PER_COUNTER)
    words = philox_words(seed, torch.arange(first_counter, first_counter + counters, dtype=torch.int64, device=device))
    return counter_normals(words, dtype)[lead : lead + numel]


def counter_normals(words, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The four normals of each counter from its four words, flat in stream order: Box-Muller on
    words (0, 1) and (2, 3), float32 uniforms, the rest in ``dtype``."""
    normals = []
    for word_a, word_b in ((words[0], words[1]), (words[2], words[3])):
        u_a = uniform_from_words(word_a).to(dtype).clamp_min(MIN_UNIFORM)
        angle = torch.tensor(TWO_PI, dtype=dtype, device=u_a.device) * uniform_from_words(word_b).to(dtype)
        radius = torch.sqrt(-2.0 * torch.log(u_a))
        normals += [radius * torch.cos(angle), radius * torch.sin(angle)]
    return torch.stack(normals, dim=1).flatten()


def check_seed_offset(seed: int, offset: int, numel: int = 0) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset + numel >= 2**63:
        raise ValueError(f"offset: expected an int >= 0 with offset + numel < 2**63, got {offset!r}")


def draw_seed(generator=None) -> int:
    """A Philox seed for the fused ops, drawn from ``generator`` (None: torch's default one) on
    its device: one int64 draw in [0, 2**62)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
