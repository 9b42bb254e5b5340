// The kernels for the build's baseline instruction set (SSE2 on x86-64, NEON on aarch64; or the
// host's own with MSDIFF_FAST_NATIVE=1), which every machine the wheel installs on has.
#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MSDIFF_PHILOX_LANES 16
#elif defined(__AVX2__)
#include <immintrin.h>
#define MSDIFF_PHILOX_LANES 8
#elif defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#define MSDIFF_PHILOX_LANES 4
#else
#define MSDIFF_PHILOX_LANES 0
#endif

#define MSDIFF_CPU_ISA baseline
#define MSDIFF_CPU_ISA_NAME "baseline"
#include "kernels_impl.h"
