// The CPU kernels of one instruction set: each processes one range of its op's work, so that
// cpu_ops.cpp can split an op over threads. kernels_impl.h is compiled once per instruction set
// (kernels_baseline.cpp; kernels_avx2.cpp and kernels_avx512.cpp on x86-64) and cpu_ops.cpp picks
// one table at run time.
#pragma once

#include <cstdint>
#include <type_traits>

#include "msdiff/ops.h"

namespace msdiff::cpu {

// Elements per pass of the inner loops: float32 scratch tiles of this size stay in L1.
constexpr int64_t kTile = 1024;
// weighted_score_loss sums each sample in blocks of this many elements, in a fixed order, so
// the loss does not depend on the thread count.
constexpr int64_t kLossBlock = 4 * kTile;

struct Kernels {
  const char* name;
  // Elements [begin, end) of the flat [batch, per_sample] array.
  void (*mr_step)(const MrStepArgs& args, int64_t begin, int64_t end);
  // Elements [begin, end) of the batch laid out as [batch, x_numel + y_numel] (x part, then y).
  void (*noise_inject)(const NoiseInjectArgs& args, int64_t begin, int64_t end);
  // Loss blocks [begin, end) of [batch, ceil(per_sample / kLossBlock)]: grad written and each
  // block's sum of w r^2 stored in partial_sums[block].
  void (*weighted_score_loss)(const WeightedScoreLossArgs& args, double* partial_sums, int64_t begin, int64_t end);
  // normals[i] = the stream at offset + i for i in [begin, end).
  void (*philox_normals)(float* normals, uint64_t seed, uint64_t offset, int64_t begin, int64_t end);
};

namespace baseline {
extern const Kernels kernels;
}
#if defined(MSDIFF_HAVE_X86_KERNELS)
namespace avx2 {
extern const Kernels kernels;
}
namespace avx512 {
extern const Kernels kernels;
}
#endif

}  // namespace msdiff::cpu
