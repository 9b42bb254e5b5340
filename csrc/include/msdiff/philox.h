// The package's noise stream (msdiff_fast/ops/philox.py is the same in PyTorch). Positions come
// in blocks of four: position p of a draw with seed s is normal p mod 4 of Triton's
// tl.randn4x(s, p / 4), i.e. Philox4x32-10 with key (s mod 2^32, s >> 32) and counter
// (c mod 2^32, c >> 32, 0, 0) for c = p / 4; its four words become uniforms through Triton's
// uint_to_uniform_float, and Box-Muller turns words (0, 1) into normals 0 (cos) and 1 (sin),
// words (2, 3) into normals 2 and 3. One Philox call and two logarithms per four normals: a
// quarter of the Philox work and half the Box-Muller work of one tl.randn call per position.
//
// The words are bit-exact everywhere. The normals use fastmath.h's log, sin and cos, so they
// differ from a float64 evaluation by float32 rounding only (about 1e-6 absolute for |z| < 5).
#pragma once

#include <cstdint>

#include "common.h"
#include "fastmath.h"

namespace msdiff {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;  // 2^-31 as Triton writes it
constexpr float kMinUniform = 1.0e-7f;

struct PhiloxKey {
  uint32_t low, high;
};

MSDIFF_HD PhiloxKey philox_key(uint64_t seed) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

// The 64-bit product a * b as (high word, low word): one widening multiply, which x86 vectorises
// (pmuludq) and the GPU has as mul.hi / mul.lo.
MSDIFF_HD void multiply_wide(uint32_t a, uint32_t b, uint32_t& high, uint32_t& low) {
#if defined(__CUDA_ARCH__)
  high = __umulhi(a, b);
  low = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  high = static_cast<uint32_t>(product >> 32);
  low = static_cast<uint32_t>(product);
#endif
}

// Philox4x32-10 of the counter (counter_low, counter_high, 0, 0).
MSDIFF_HD PhiloxWords philox4x32_10(PhiloxKey key, uint32_t counter_low, uint32_t counter_high) {
  uint32_t c0 = counter_low, c1 = counter_high, c2 = 0, c3 = 0;
  uint32_t k0 = key.low, k1 = key.high;
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t high_b, low_b, high_a, low_a;
    multiply_wide(kPhiloxRoundB, c2, high_b, low_b);
    multiply_wide(kPhiloxRoundA, c0, high_a, low_a);
    c0 = high_b ^ c1 ^ k0;
    c1 = low_b;
    c2 = high_a ^ c3 ^ k1;
    c3 = low_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float: the word read as int32, negatives folded onto [0, 2^31) with
// ~x, times 2^-31, all in float32.
MSDIFF_HD float uniform_from_word(uint32_t word) {
  const int32_t signed_word = static_cast<int32_t>(word);
  const int32_t folded = signed_word ^ (signed_word >> 31);  // ~x for negative x, x otherwise
  return static_cast<float>(folded) * kUniformScale;
}

// Box-Muller: radius sqrt(-2 log max(u_a, 1e-7)), angle 2 pi u_b; the cos and sin normals.
MSDIFF_HD void normals_from_words(uint32_t word_a, uint32_t word_b, float& cos_normal, float& sin_normal) {
  float u_a = uniform_from_word(word_a);
  u_a = u_a < kMinUniform ? kMinUniform : u_a;
#if defined(__CUDA_ARCH__)
  const float radius = sqrtf(-2.0f * log_of_normal_float(u_a));
#else
  const float radius = __builtin_sqrtf(-2.0f * log_of_normal_float(u_a));
#endif
  float sine, cosine;
  sincos_two_pi(uniform_from_word(word_b), sine, cosine);
  cos_normal = radius * cosine;
  sin_normal = radius * sine;
}

constexpr int kNormalsPerCounter = 4;

// The four normals of counter `counter`: stream positions 4 counter .. 4 counter + 3.
MSDIFF_HD void philox_block_normals(PhiloxKey key, uint64_t counter, float (&z)[kNormalsPerCounter]) {
  const PhiloxWords words = philox4x32_10(key, static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32));
  normals_from_words(words.w0, words.w1, z[0], z[1]);
  normals_from_words(words.w2, words.w3, z[2], z[3]);
}

// z[index] for a runtime index in [0, 4) as selects, which keep z in registers on the GPU.
MSDIFF_HD float select_normal(const float (&z)[kNormalsPerCounter], uint32_t index) {
  return index == 0u ? z[0] : index == 1u ? z[1] : index == 2u ? z[2] : z[3];
}

// z[k] = the stream at first + k for k < n <= 4, 0 for k >= n: the CUDA kernels' groups of four
// consecutive elements. One Philox call when first is a multiple of 4, two otherwise.
MSDIFF_HD void stream_normal_group(PhiloxKey key, uint64_t first, int n, float (&z)[kNormalsPerCounter]) {
  const uint32_t lead = static_cast<uint32_t>(first) & 3u;
  float current[kNormalsPerCounter], next[kNormalsPerCounter] = {0.0f, 0.0f, 0.0f, 0.0f};
  philox_block_normals(key, first >> 2, current);
  if (lead != 0u && static_cast<uint32_t>(n) > kNormalsPerCounter - lead) philox_block_normals(key, (first >> 2) + 1, next);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < kNormalsPerCounter; ++k) {
    const uint32_t index = lead + static_cast<uint32_t>(k);
    const float value = index < kNormalsPerCounter ? select_normal(current, index) : select_normal(next, index - kNormalsPerCounter);
    z[k] = k < n ? value : 0.0f;
  }
}

}  // namespace msdiff
