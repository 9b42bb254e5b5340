// The CPU implementation of the fused ops, as called by the bindings: each op split over up to
// num_threads threads (torch's OpenMP team when it is loaded, else helper threads of our own),
// and only when every thread gets a large enough share, so small tensors stay on one thread.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "msdiff/ops.h"

namespace msdiff::cpu {

void mr_step(const MrStepArgs& args, int num_threads);
void noise_inject(const NoiseInjectArgs& args, int num_threads);
// Deterministic: each sample's loss is summed over fixed blocks in a fixed order, whatever num_threads.
void weighted_score_loss(const WeightedScoreLossArgs& args, int num_threads);
// normals[i] = the stream at offset + i.
void philox_normals(float* normals, int64_t numel, uint64_t seed, uint64_t offset, int num_threads);
// The same through msdiff/philox.h's stream_normal_group, four positions at a time as the CUDA
// kernels draw them: compiled for the host so that the tests can check it without a GPU.
void philox_normal_groups(float* normals, int64_t numel, uint64_t seed, uint64_t offset);
// words[w * numel + i] = word w of Philox4x32-10 at counter offset + i (the stream's raw bits).
void philox_words(int64_t* words, int64_t numel, uint64_t seed, uint64_t offset);

// The instruction sets this build and this CPU can run ("avx512", "avx2+fma", "baseline"), best first.
std::vector<std::string> instruction_sets();
// The one in use: the best one unless use_instruction_set chose another (tests compare them).
std::string instruction_set();
void use_instruction_set(const std::string& name);
// "openmp" when the ops run on the team of the OpenMP runtime already loaded (torch's),
// "threads" when they start helper threads of their own (no OpenMP loaded, or chosen).
std::string thread_pool();
// "openmp" (the default: used when loaded) or "threads" (for tests and benchmarks).
void use_thread_pool(const std::string& name);

}  // namespace msdiff::cpu
