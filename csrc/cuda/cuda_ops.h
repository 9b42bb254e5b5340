// The CUDA launchers of the fused ops, as called by the bindings. This header needs no CUDA
// headers (streams travel as integers), so the bindings compile with the host compiler alone.
// Every launcher runs on the calling thread's current device (set_device) and the given stream,
// and throws std::runtime_error naming the kernel when a launch fails.
#pragma once

#include <cstdint>
#include <string>

#include "msdiff/ops.h"

namespace msdiff::cuda {

// Elements of one sample summed by one block of the loss: partial_sums needs
// batch * ceil(per_sample / kLossTile) floats.
constexpr int64_t kLossTile = 4096;

void mr_step(const MrStepArgs& args, uintptr_t stream);
void noise_inject(const NoiseInjectArgs& args, uintptr_t stream);
// Deterministic: fixed tiles, fixed reduction trees, no atomics.
void weighted_score_loss(const WeightedScoreLossArgs& args, float* partial_sums, uintptr_t stream);
// normals[i] = the stream at offset + i.
void philox_normals(float* normals, int64_t numel, uint64_t seed, uint64_t offset, uintptr_t stream);

// Empty when the kernels can run on GPU `device`, else why not (no driver, no such device, or
// a GPU this build has no code for).
std::string device_status(int device);
void set_device(int device);

}  // namespace msdiff::cuda
