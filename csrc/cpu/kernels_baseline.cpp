// The kernels for the build's baseline instruction set (SSE2 on x86-64, NEON on aarch64; or the
// host's own with MSDIFF_FAST_NATIVE=1), which every machine the wheel installs on has.
#include "kernels.h"

#define MSDIFF_CPU_ISA baseline
#define MSDIFF_CPU_ISA_NAME "baseline"
#include "kernels_impl.h"
