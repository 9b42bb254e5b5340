// The same kernels for x86-64 CPUs with AVX-512 (F, VL, DQ, BW), chosen at run time
// (cpu_ops.cpp) when the CPU has them: 16 float lanes, and Philox on 16 lanes with a
// two-instruction word shuffle (vpermt2d) and three-way xors (vpternlogd). The target attribute
// is applied as in kernels_avx2.cpp: to this file's own functions only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's _mm512_undefined_epi32 (used inside _mm512_mul_epu32 and _mm512_srli_epi64) trips
// -Wmaybe-uninitialized on every use: a false positive fixed in GCC 13 (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#endif

#define MSDIFF_CPU_ISA avx512
#define MSDIFF_CPU_ISA_NAME "avx512"
#define MSDIFF_PHILOX_LANES 16
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
