// Philox4x32-10 on SIMD lanes, for the CPU kernels. kernels_impl.h includes this inside its
// instruction-set namespace, after the translation unit has included <immintrin.h> and chosen
// MSDIFF_PHILOX_LANES (16: AVX-512, 8: AVX2, 4: SSE2, 0: none, the plain loop in kernels_impl.h).
//
// Why intrinsics here when every other loop is left to the compiler: Philox needs the high and
// low words of 32x32-bit products, and GCC vectorises (uint64_t)a * b >> 32 by widening every
// lane to 64 bits and packing back (mostly shuffles: 3x slower). pmuludq on the even lanes and
// on the odd lanes shifted down, then two blends (or permutes), is the whole multiply. The
// arithmetic is philox4x32_10's in msdiff/philox.h, which the tests check word for word.

#if MSDIFF_PHILOX_LANES == 16

struct PhiloxLanes {
  using V = __m512i;
  static constexpr int kWidth = 16;
  static V broadcast(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
  static V lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static V add(V a, V b) { return _mm512_add_epi32(a, b); }
  // high + 1 where low < start (the low counter word wrapped), high elsewhere.
  static V add_carry(V high, V low, V start) {
    return _mm512_mask_add_epi32(high, _mm512_cmplt_epu32_mask(low, start), high, broadcast(1));
  }
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static void multiply_wide(V a, V constant, V& high, V& low) {
    const V even = _mm512_mul_epu32(a, constant);                        // products of lanes 0, 2, ...
    const V odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), constant);  // products of lanes 1, 3, ...
    // Dword i of the result from `even` (index < 16) or `odd` (index >= 16).
    const V low_words = _mm512_setr_epi32(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
    const V high_words = _mm512_setr_epi32(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    low = _mm512_permutex2var_epi32(even, low_words, odd);
    high = _mm512_permutex2var_epi32(even, high_words, odd);
  }
  static void store(uint32_t* p, V v) { _mm512_storeu_si512(p, v); }
};

#elif MSDIFF_PHILOX_LANES == 8

struct PhiloxLanes {
  using V = __m256i;
  static constexpr int kWidth = 8;
  static V broadcast(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
  static V lane_index() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static V add(V a, V b) { return _mm256_add_epi32(a, b); }
  // Unsigned low < start as a signed compare after flipping the sign bits: all ones (-1) where
  // the low word wrapped, so subtracting it carries into the high word.
  static V add_carry(V high, V low, V start) {
    const V sign = broadcast(0x80000000u);
    return _mm256_sub_epi32(high, _mm256_cmpgt_epi32(_mm256_xor_si256(start, sign), _mm256_xor_si256(low, sign)));
  }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static void multiply_wide(V a, V constant, V& high, V& low) {
    const V even = _mm256_mul_epu32(a, constant);
    const V odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), constant);
    high = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    low = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
  static void store(uint32_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<V*>(p), v); }
};

#elif MSDIFF_PHILOX_LANES == 4

struct PhiloxLanes {
  using V = __m128i;
  static constexpr int kWidth = 4;
  static V broadcast(uint32_t v) { return _mm_set1_epi32(static_cast<int>(v)); }
  static V lane_index() { return _mm_setr_epi32(0, 1, 2, 3); }
  static V add(V a, V b) { return _mm_add_epi32(a, b); }
  static V add_carry(V high, V low, V start) {
    const V sign = broadcast(0x80000000u);
    return _mm_sub_epi32(high, _mm_cmpgt_epi32(_mm_xor_si128(start, sign), _mm_xor_si128(low, sign)));
  }
  static V xor3(V a, V b, V c) { return _mm_xor_si128(_mm_xor_si128(a, b), c); }
  // SSE2 has no dword blend: mask and or instead.
  static void multiply_wide(V a, V constant, V& high, V& low) {
    const V even = _mm_mul_epu32(a, constant);
    const V odd = _mm_mul_epu32(_mm_srli_epi64(a, 32), constant);
    const V high_dwords = _mm_set1_epi64x(static_cast<long long>(0xFFFFFFFF00000000ull));
    high = _mm_or_si128(_mm_srli_epi64(even, 32), _mm_and_si128(odd, high_dwords));
    low = _mm_or_si128(_mm_andnot_si128(high_dwords, even), _mm_slli_epi64(odd, 32));
  }
  static void store(uint32_t* p, V v) { _mm_storeu_si128(reinterpret_cast<V*>(p), v); }
};

#endif

#if MSDIFF_PHILOX_LANES > 0

// The four words of Philox4x32-10 for kChains vectors of counters first + c + lane,
// interleaved: one Philox chain is a sequence of dependent multiplies, several keep the
// multiplier busy.
template <int kChains>
void philox_words_vectors(uint32_t* const (&words)[4], int64_t c, const PhiloxLanes::V (&keys)[2][10], PhiloxLanes::V low_start,
                          PhiloxLanes::V high_start) {
  using L = PhiloxLanes;
  using V = L::V;
  const V round_a = L::broadcast(kPhiloxRoundA), round_b = L::broadcast(kPhiloxRoundB), zero = L::broadcast(0);
  V c0[kChains], c1[kChains], c2[kChains], c3[kChains];
  for (int v = 0; v < kChains; ++v) {
    c0[v] = L::add(low_start, L::add(L::broadcast(static_cast<uint32_t>(c + v * L::kWidth)), L::lane_index()));
    c1[v] = L::add_carry(high_start, c0[v], low_start);
    // Round 0 with c2 = c3 = 0, whose product with round_b is 0.
    V high_a, low_a;
    L::multiply_wide(c0[v], round_a, high_a, low_a);
    c0[v] = L::xor3(zero, c1[v], keys[0][0]);
    c1[v] = zero;
    c2[v] = L::xor3(high_a, zero, keys[1][0]);
    c3[v] = low_a;
  }
  for (int round = 1; round < 10; ++round) {
    for (int v = 0; v < kChains; ++v) {
      V high_a, low_a, high_b, low_b;
      L::multiply_wide(c2[v], round_b, high_b, low_b);
      L::multiply_wide(c0[v], round_a, high_a, low_a);
      c0[v] = L::xor3(high_b, c1[v], keys[0][round]);
      c1[v] = low_b;
      c2[v] = L::xor3(high_a, c3[v], keys[1][round]);
      c3[v] = low_a;
    }
  }
  for (int v = 0; v < kChains; ++v) {
    const int64_t at = c + v * L::kWidth;
    L::store(words[0] + at, c0[v]);
    L::store(words[1] + at, c1[v]);
    L::store(words[2] + at, c2[v]);
    L::store(words[3] + at, c3[v]);
  }
}

// The words of counters first + c, c in [0, n): the lanes do whole vectors and return how many
// counters they did; the caller finishes the rest one at a time.
int64_t philox_words_lanes(uint32_t* const (&words)[4], int64_t n, PhiloxKey key, uint64_t first) {
  using L = PhiloxLanes;
  using V = L::V;
  constexpr int kChains = 4;
  V keys[2][10];
  uint32_t k0 = key.low, k1 = key.high;
  for (int round = 0; round < 10; ++round, k0 += kPhiloxKeyA, k1 += kPhiloxKeyB) {
    keys[0][round] = L::broadcast(k0);
    keys[1][round] = L::broadcast(k1);
  }
  const V low_start = L::broadcast(static_cast<uint32_t>(first)), high_start = L::broadcast(static_cast<uint32_t>(first >> 32));
  int64_t c = 0;
  for (; c + kChains * L::kWidth <= n; c += kChains * L::kWidth) philox_words_vectors<kChains>(words, c, keys, low_start, high_start);
  for (; c + L::kWidth <= n; c += L::kWidth) philox_words_vectors<1>(words, c, keys, low_start, high_start);
  return c;
}

#endif
