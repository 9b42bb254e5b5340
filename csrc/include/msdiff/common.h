// Shared by the CPU loops and the CUDA kernels: the host/device qualifier, bit casts, and the
// 16-bit float storage types with their conversions.
//
// float16 and bfloat16 are stored as raw bits (half_t, bf16_t) on both sides. Loads widen
// exactly; stores round to nearest even: on the GPU through the cvt.rn intrinsics, on the CPU
// through branch-free bit arithmetic (the algorithms c10 uses, so the bits equal torch's .to()),
// written so that the compiler can vectorise a loop of them.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MSDIFF_HD __host__ __device__ __forceinline__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#define MSDIFF_HD inline __attribute__((always_inline))
#endif

namespace msdiff {

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

MSDIFF_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

MSDIFF_HD uint32_t float_to_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
#endif
}

// IEEE half -> float, exact (Maratyszcza's FP16 library, as c10::detail::fp16_ieee_to_fp32_value).
MSDIFF_HD float half_to_float(half_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal halves: shift the exponent and mantissa into place and rescale the exponent bias.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormal halves: the mantissa as a float in [0.5, 1) minus 0.5 is exactly its value * 2^24.
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
#endif
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN stays NaN
// (c10::detail::fp16_ieee_from_fp32_value): the float addition does the rounding.
MSDIFF_HD half_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  return {__half_as_ushort(__float2half_rn(f))};
#else
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exponent_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exponent_bits + mantissa_bits;
  return {static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
#endif
}

MSDIFF_HD float bf16_to_float(bf16_t h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }

// float -> bfloat16, round to nearest even; NaN becomes the quiet NaN 0x7FC0 (c10's rule).
MSDIFF_HD bf16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return {__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  const uint32_t bits = float_to_bits(f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return {static_cast<uint16_t>(f != f ? 0x7FC0u : rounded)};
#endif
}

// to_float(v): a stored value widened to float32; from_float<T>(f): rounded once into T.
MSDIFF_HD float to_float(float v) { return v; }
MSDIFF_HD float to_float(half_t v) { return half_to_float(v); }
MSDIFF_HD float to_float(bf16_t v) { return bf16_to_float(v); }

template <class T> MSDIFF_HD T from_float(float f);
template <> MSDIFF_HD float from_float<float>(float f) { return f; }
template <> MSDIFF_HD half_t from_float<half_t>(float f) { return float_to_half(f); }
template <> MSDIFF_HD bf16_t from_float<bf16_t>(float f) { return float_to_bf16(f); }

}  // namespace msdiff
