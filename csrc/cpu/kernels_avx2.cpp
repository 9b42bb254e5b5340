// The same kernels for x86-64 CPUs with AVX2 and FMA, chosen at run time (cpu_ops.cpp) when
// the CPU has both: 8 float lanes instead of 4, and Philox on 8 lanes. Only this file's own
// functions get the target: the shared headers are included first, so their always-inline
// helpers are compiled into these functions, while any out-of-line copy of an inline function
// (which the linker may share with the baseline file) stays baseline code.
#include <immintrin.h>

#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define MSDIFF_CPU_ISA avx2
#define MSDIFF_CPU_ISA_NAME "avx2+fma"
#define MSDIFF_PHILOX_LANES 8
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
