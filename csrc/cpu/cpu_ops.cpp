#include "cpu_ops.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <system_error>
#include <thread>

#include "kernels.h"

namespace msdiff::cpu {
namespace {

// Least work per thread: starting a thread costs ~20 us, which this much work repays. Loops
// that only move memory need more elements than loops that also run Philox and Box-Muller.
constexpr int64_t kGrainMemoryBound = int64_t{1} << 16;
constexpr int64_t kGrainWithNoise = int64_t{1} << 13;
// Thread shares start on multiples of this many elements (whole cache lines, aligned tiles).
constexpr int64_t kShareAlignment = 64;

std::vector<const Kernels*> supported_kernels() {
  std::vector<const Kernels*> tables;
#if defined(MSDIFF_HAVE_X86_KERNELS)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw")) {
    tables.push_back(&avx512::kernels);
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) tables.push_back(&avx2::kernels);
#endif
  tables.push_back(&baseline::kernels);
  return tables;
}

std::atomic<const Kernels*>& active_kernels() {
  static std::atomic<const Kernels*> active{supported_kernels().front()};
  return active;
}

const Kernels& kernels() { return *active_kernels().load(std::memory_order_relaxed); }

// body(begin, end) over [0, total) in at most num_threads contiguous shares of at least `grain`
// units; the calling thread takes the first share.
template <class Body>
void parallel_for(int64_t total, int64_t grain, int64_t alignment, int num_threads, const Body& body) {
  if (total <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(num_threads, total / std::max<int64_t>(grain, 1)));
  if (workers == 1) {
    body(0, total);
    return;
  }
  int64_t share = (total + workers - 1) / workers;
  share = (share + alignment - 1) / alignment * alignment;
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  int64_t begin = share;
  for (; begin < total; begin += share) {
    const int64_t end = std::min(total, begin + share);
    try {
      threads.emplace_back([&body, begin, end] { body(begin, end); });
    } catch (const std::system_error&) {  // no thread to be had: this one does the rest
      body(begin, total);
      break;
    }
  }
  body(0, std::min(total, share));
  for (auto& thread : threads) thread.join();
}

}  // namespace

void mr_step(const MrStepArgs& args, int num_threads) {
  const bool draws_noise = args.noise_coef != nullptr && args.noise == nullptr;
  parallel_for(args.batch * args.per_sample, draws_noise ? kGrainWithNoise : kGrainMemoryBound, kShareAlignment, num_threads,
               [&](int64_t begin, int64_t end) { kernels().mr_step(args, begin, end); });
}

void noise_inject(const NoiseInjectArgs& args, int num_threads) {
  const bool draws_noise = args.noise_x.data == nullptr;
  parallel_for(args.batch * (args.x_numel + args.y_numel), draws_noise ? kGrainWithNoise : kGrainMemoryBound, kShareAlignment,
               num_threads, [&](int64_t begin, int64_t end) { kernels().noise_inject(args, begin, end); });
}

void weighted_score_loss(const WeightedScoreLossArgs& args, int num_threads) {
  const int64_t blocks_per_sample = (args.per_sample + kLossBlock - 1) / kLossBlock;
  std::vector<double> partial_sums(static_cast<size_t>(args.batch * blocks_per_sample));
  const Kernels& table = kernels();
  parallel_for(args.batch * blocks_per_sample, (kGrainWithNoise + kLossBlock - 1) / kLossBlock, 1, num_threads,
               [&](int64_t begin, int64_t end) { table.weighted_score_loss(args, partial_sums.data(), begin, end); });
  for (int64_t b = 0; b < args.batch; ++b) {
    double sum = 0.0;
    for (int64_t block = 0; block < blocks_per_sample; ++block) sum += partial_sums[b * blocks_per_sample + block];
    args.loss[b] = static_cast<float>(sum);
  }
}

void philox_normals(float* normals, int64_t numel, uint64_t seed, uint64_t offset, int num_threads) {
  parallel_for(numel, kGrainWithNoise, kShareAlignment, num_threads,
               [&](int64_t begin, int64_t end) { kernels().philox_normals(normals, seed, offset, begin, end); });
}

void philox_words(int64_t* words, int64_t numel, uint64_t seed, uint64_t offset) {
  const PhiloxKey key = philox_key(seed);
  for (int64_t i = 0; i < numel; ++i) {
    const uint64_t counter = offset + static_cast<uint64_t>(i);
    const PhiloxWords w = philox4x32_10(key, static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32));
    words[i] = w.w0;
    words[numel + i] = w.w1;
    words[2 * numel + i] = w.w2;
    words[3 * numel + i] = w.w3;
  }
}

std::vector<std::string> instruction_sets() {
  std::vector<std::string> names;
  for (const Kernels* table : supported_kernels()) names.emplace_back(table->name);
  return names;
}

std::string instruction_set() { return kernels().name; }

void use_instruction_set(const std::string& name) {
  for (const Kernels* table : supported_kernels()) {
    if (name == table->name) {
      active_kernels().store(table, std::memory_order_relaxed);
      return;
    }
  }
  std::string known;
  for (const std::string& supported : instruction_sets()) known += (known.empty() ? "" : ", ") + supported;
  throw std::invalid_argument("instruction set: expected one of " + known + " (what this build and CPU support), got '" + name + "'");
}

}  // namespace msdiff::cpu
