// float32 log, sin and cos for the Box-Muller transform, as straight-line code: no branches, no
// table lookups and no library calls, so a loop of them vectorises on the CPU (libm's logf/cosf
// are scalar calls that stop the vectoriser) and runs unchanged on the GPU.
//
// Both are specialised to the ranges Box-Muller feeds them, which is what keeps them short:
//   log_of_normal_float(x) for finite, positive, normal x (the uniform is clamped to >= 1e-7);
//   sincos_two_pi(u) = sin and cos of 2 pi u for u in [0, 1], reduced by quarter turns of u, which
//   is exact.
// Polynomials are Cephes' logf and sinf/cosf minimax fits (Moshier, Cephes Math Library).
// Checked against float64 for every float32 input of those ranges (with and without FMA
// contraction): log within 0.83 ulp, sin and cos within 1.1e-7 absolute, most of which is the float32
// rounding of 2 pi r. python_tests/test_compiled.py checks the resulting normals.
#pragma once

#include "common.h"

namespace msdiff {

constexpr float kSqrtHalf = 0.707106781186547524f;
// ln 2 split into a part with few mantissa bits (products with small integers are exact) and a rest.
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2Low = -2.12194440e-4f;
constexpr float kTwoPiFloat = 6.28318530717958647692f;

MSDIFF_HD float log_of_normal_float(float x) {
  // x = m 2^e with m in [sqrt(1/2), sqrt(2)); then log x = e ln 2 + log1p(m - 1).
  const uint32_t bits = float_to_bits(x);
  const float mantissa = bits_to_float((bits & 0x007FFFFFu) | 0x3F000000u);  // [0.5, 1)
  const int32_t exponent = static_cast<int32_t>(bits >> 23) - 126;
  const bool below = mantissa < kSqrtHalf;
  const float e = static_cast<float>(below ? exponent - 1 : exponent);
  // mantissa - 1 and 2 mantissa - 1 are exact (Sterbenz).
  const float t = below ? (mantissa + mantissa) - 1.0f : mantissa - 1.0f;
  const float t2 = t * t;
  float p = 7.0376836292e-2f;
  p = p * t - 1.1514610310e-1f;
  p = p * t + 1.1676998740e-1f;
  p = p * t - 1.2420140846e-1f;
  p = p * t + 1.4249322787e-1f;
  p = p * t - 1.6668057665e-1f;
  p = p * t + 2.0000714765e-1f;
  p = p * t - 2.4999993993e-1f;
  p = p * t + 3.3333331174e-1f;
  float y = t * t2 * p;
  y = y + kLn2Low * e;
  y = y - 0.5f * t2;
  return (t + y) + kLn2High * e;
}

// cos(2 pi u) and sin(2 pi u) for u in [0, 1]: one reduction, both polynomials.
MSDIFF_HD void sincos_two_pi(float u, float& sine, float& cosine) {
  // u = quarter / 4 + r with |r| <= 1/8: both the quarter count and r are exact in float32, so
  // the only rounding before the polynomials is that of 2 pi r (a relative 6e-8).
  const int32_t quarter = static_cast<int32_t>(4.0f * u + 0.5f);
  const float r = u - 0.25f * static_cast<float>(quarter);
  const float theta = kTwoPiFloat * r;  // |theta| <= pi / 4
  const float t2 = theta * theta;
  float cos_poly = 2.443315711809948e-5f;
  cos_poly = cos_poly * t2 - 1.388731625493765e-3f;
  cos_poly = cos_poly * t2 + 4.166664568298827e-2f;
  const float cos_theta = (1.0f - 0.5f * t2) + t2 * t2 * cos_poly;
  float sin_poly = -1.9515295891e-4f;
  sin_poly = sin_poly * t2 + 8.3321608736e-3f;
  sin_poly = sin_poly * t2 - 1.6666654611e-1f;
  const float sin_theta = theta + theta * t2 * sin_poly;
  // Adding quarter turns cycles (cos, sin) through (cos, sin), (-sin, cos), (-cos, -sin), (sin, -cos).
  const uint32_t turn = static_cast<uint32_t>(quarter) & 3u;
  const bool swapped = (turn & 1u) != 0u;
  const float cos_magnitude = swapped ? sin_theta : cos_theta;
  const float sin_magnitude = swapped ? cos_theta : sin_theta;
  cosine = (turn == 1u || turn == 2u) ? -cos_magnitude : cos_magnitude;
  sine = (turn >= 2u) ? -sin_magnitude : sin_magnitude;
}

}  // namespace msdiff
