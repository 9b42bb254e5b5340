// The package's noise stream (msdiff_fast/ops/philox.py is the same in PyTorch): element n of a
// draw with seed s is Triton's tl.randn(s, n), i.e. Philox4x32-10 with key (s mod 2^32, s >> 32)
// and counter (n mod 2^32, n >> 32, 0, 0); words 0 and 1 become uniforms through Triton's
// uint_to_uniform_float and one Box-Muller normal is kept.
//
// The words are bit-exact everywhere. The normals use fastmath.h's log and cos, so they differ
// from a float64 evaluation by float32 rounding only (about 1e-6 absolute for |z| < 5).
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

// Box-Muller on the first two words: sqrt(-2 log max(u1, 1e-7)) cos(2 pi u2).
MSDIFF_HD float normal_from_words(uint32_t w0, uint32_t w1) {
  float u1 = uniform_from_word(w0);
  u1 = u1 < kMinUniform ? kMinUniform : u1;
  const float u2 = uniform_from_word(w1);
#if defined(__CUDA_ARCH__)
  const float radius = sqrtf(-2.0f * log_of_normal_float(u1));
#else
  const float radius = __builtin_sqrtf(-2.0f * log_of_normal_float(u1));
#endif
  return radius * cos_two_pi(u2);
}

// The stream's normal at 64-bit position `position`.
MSDIFF_HD float philox_normal(PhiloxKey key, uint64_t position) {
  const PhiloxWords words =
      philox4x32_10(key, static_cast<uint32_t>(position), static_cast<uint32_t>(position >> 32));
  return normal_from_words(words.w0, words.w1);
}

}  // namespace msdiff
