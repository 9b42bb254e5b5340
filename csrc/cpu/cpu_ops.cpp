#include "cpu_ops.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>

#include "kernels.h"

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>

#include <cstring>
#endif

namespace msdiff::cpu {
namespace {

// Least work per thread: starting a thread costs ~20 us, which this much work repays. Loops
// that only move memory need more elements than loops that also run Philox and Box-Muller.
constexpr int64_t kGrainMemoryBound = int64_t{1} << 16;
constexpr int64_t kGrainWithNoise = int64_t{1} << 13;
// Chunks start on multiples of this many elements (whole cache lines, aligned tiles).
constexpr int64_t kChunkAlignment = 64;

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

// Work is cut into chunks that the threads claim from a shared counter, and the caller waits
// only for the chunks that were claimed. Why not fixed shares: right after a torch op, torch's
// OpenMP workers spin on the other cores for a while, and a helper thread given a fixed share
// may wait a whole scheduler time slice before it runs (on 2 cores that made a 0.3 ms op take
// over 1 ms). Here a helper that starts late finds nothing left and the call costs what one
// thread would. Helpers are detached and share the queue, so the caller never waits for one to
// start; a helper touches the body only after claiming a chunk, which happens before the
// caller's wait can end.
class ChunkQueue {
 public:
  using Run = void (*)(const void* body, int64_t begin, int64_t end);

  ChunkQueue(int64_t total, int64_t chunk, const void* body, Run run)
      : total_(total), chunk_(chunk), chunks_((total + chunk - 1) / chunk), body_(body), run_(run) {}

  // Runs chunks until none is left.
  void work() {
    for (int64_t c = next_.fetch_add(1); c < chunks_; c = next_.fetch_add(1)) {
      run_(body_, c * chunk_, std::min(total_, (c + 1) * chunk_));
      std::lock_guard<std::mutex> lock(mutex_);
      if (++done_ == chunks_) all_done_.notify_all();
    }
  }

  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    all_done_.wait(lock, [this] { return done_ == chunks_; });
  }

 private:
  const int64_t total_, chunk_, chunks_;
  const void* const body_;
  const Run run_;
  std::atomic<int64_t> next_{0};
  std::mutex mutex_;
  std::condition_variable all_done_;
  int64_t done_ = 0;
};

// Chunks per thread: enough that a late or slow thread costs at most a small part of the work.
constexpr int64_t kChunksPerThread = 8;

// GOMP_parallel(fn, data, num_threads, flags): run fn(data) on a team of threads and return
// when all are done. It is the entry point compilers emit for `#pragma omp parallel`, exported
// by GNU libgomp and, for compatibility, by LLVM's libomp and Intel's libiomp5.
using OpenMPParallel = void (*)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);

std::atomic<bool>& share_openmp_threads() {
  static std::atomic<bool> share{true};
  return share;
}

#if defined(__linux__)
int find_openmp_parallel(struct dl_phdr_info* info, size_t, void* found) {
  const char* slash = std::strrchr(info->dlpi_name, '/');
  const char* name = slash != nullptr ? slash + 1 : info->dlpi_name;
  if (std::strncmp(name, "libgomp", 7) != 0 && std::strncmp(name, "libomp", 6) != 0 && std::strncmp(name, "libiomp", 7) != 0) {
    return 0;
  }
  void* library = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);  // a reference to the loaded copy, never a new one
  void* symbol = library != nullptr ? dlsym(library, "GOMP_parallel") : nullptr;
  if (symbol == nullptr) return 0;
  *static_cast<OpenMPParallel*>(found) = reinterpret_cast<OpenMPParallel>(symbol);
  return 1;
}
#endif

// The OpenMP runtime loaded into this process (torch's: its CPU ops run on OpenMP, and
// msdiff_fast imports torch before this module), or null. Why share it: after each parallel
// region OpenMP's workers spin for a while before they sleep, so threads of our own would
// compete with them for the same cores. On torch's team they are the ones that pick up our
// work, at once. Looked up once.
OpenMPParallel loaded_openmp() {
  static const OpenMPParallel found = [] {
    OpenMPParallel parallel = nullptr;
#if defined(__linux__)
    dl_iterate_phdr(find_openmp_parallel, &parallel);
#endif
    return parallel;
  }();
  return found;
}

// body(begin, end) over [0, total) in chunks of at least `grain` units (a multiple of
// `alignment`), on up to num_threads threads including the calling one: torch's OpenMP team
// when there is one (see loaded_openmp), otherwise detached helper threads (see ChunkQueue).
template <class Body>
void parallel_for(int64_t total, int64_t grain, int64_t alignment, int num_threads, const Body& body) {
  if (total <= 0) return;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, total / std::max<int64_t>(grain, 1)));
  if (threads == 1) {
    body(0, total);
    return;
  }
  int64_t chunk = std::max(grain, (total + threads * kChunksPerThread - 1) / (threads * kChunksPerThread));
  chunk = (chunk + alignment - 1) / alignment * alignment;
  const auto run = [](const void* f, int64_t begin, int64_t end) { (*static_cast<const Body*>(f))(begin, end); };
  const auto queue = std::make_shared<ChunkQueue>(total, chunk, &body, run);
  const OpenMPParallel openmp = share_openmp_threads().load(std::memory_order_relaxed) ? loaded_openmp() : nullptr;
  if (openmp != nullptr) {
    openmp([](void* q) { static_cast<ChunkQueue*>(q)->work(); }, queue.get(), static_cast<unsigned>(threads), 0);
    return;  // GOMP_parallel returns after its team's closing barrier: every chunk is done
  }
  for (int64_t helper = 1; helper < threads; ++helper) {
    try {
      std::thread([queue] { queue->work(); }).detach();
    } catch (const std::system_error&) {  // no thread to be had: the others do the work
      break;
    }
  }
  queue->work();
  queue->wait();
}

}  // namespace

void mr_step(const MrStepArgs& args, int num_threads) {
  const bool draws_noise = args.noise_coef != nullptr && args.noise == nullptr;
  parallel_for(args.batch * args.per_sample, draws_noise ? kGrainWithNoise : kGrainMemoryBound, kChunkAlignment, num_threads,
               [&](int64_t begin, int64_t end) { kernels().mr_step(args, begin, end); });
}

void noise_inject(const NoiseInjectArgs& args, int num_threads) {
  const bool draws_noise = args.noise_x.data == nullptr;
  parallel_for(args.batch * (args.x_numel + args.y_numel), draws_noise ? kGrainWithNoise : kGrainMemoryBound, kChunkAlignment,
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
  parallel_for(numel, kGrainWithNoise, kChunkAlignment, num_threads,
               [&](int64_t begin, int64_t end) { kernels().philox_normals(normals, seed, offset, begin, end); });
}

void philox_normal_groups(float* normals, int64_t numel, uint64_t seed, uint64_t offset) {
  const PhiloxKey key = philox_key(seed);
  for (int64_t j = 0; j < numel; j += kNormalsPerCounter) {
    const int n = static_cast<int>(numel - j < kNormalsPerCounter ? numel - j : kNormalsPerCounter);
    float z[kNormalsPerCounter];
    stream_normal_group(key, offset + static_cast<uint64_t>(j), n, z);
    for (int k = 0; k < n; ++k) normals[j + k] = z[k];
  }
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

std::string thread_pool() {
  return share_openmp_threads().load() && loaded_openmp() != nullptr ? "openmp" : "threads";
}

void use_thread_pool(const std::string& name) {
  if (name != "openmp" && name != "threads") {
    throw std::invalid_argument("thread pool: expected 'openmp' (the loaded OpenMP runtime's team, when there is one) or 'threads' (helper threads of our own), got '" + name + "'");
  }
  share_openmp_threads().store(name == "openmp");
}

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
