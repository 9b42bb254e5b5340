// CUDA kernels of the fused ops. Layout shared by all of them: a 2-D grid, y over samples (so
// a block reads its sample's coefficients once) and x grid-striding over groups of 4 consecutive
// elements of the sample; a thread loads a group with one vector access (16 bytes of float32,
// 8 of float16/bfloat16) when the sample's pointers allow it, element by element otherwise (the
// last group of a sample, or a view whose samples start unaligned). A group's noise is one
// Philox block of the stream (four normals) when its first position is a multiple of 4, parts
// of two blocks otherwise.
#include "cuda/cuda_ops.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "msdiff/ops.h"

namespace msdiff::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 4;
constexpr int64_t kMaxGridX = 1 << 16;
constexpr int64_t kMaxGridY = 65535;
constexpr int kLossGroupsPerThread = static_cast<int>(kLossTile / (kThreads * kGroup));
static_assert(kLossTile % (kThreads * kGroup) == 0, "a loss tile is a whole number of groups per thread");
static_assert(kGroup == kNormalsPerCounter, "a group's noise comes from stream_normal_group");

template <class T>
struct alignas(sizeof(T) * kGroup) Pack {
  T v[kGroup];
};

template <class T>
__device__ __forceinline__ bool group_aligned(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// f[k] = p[k] widened, k < n; one vector load when `vector` (n == 4 and p aligned).
template <class T>
__device__ __forceinline__ void load_group(const T* p, int n, bool vector, float (&f)[kGroup]) {
  if (vector) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
    for (int k = 0; k < kGroup; ++k) f[k] = to_float(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) f[k] = k < n ? to_float(p[k]) : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void store_group(T* p, int n, bool vector, const float (&f)[kGroup]) {
  if (vector) {
    Pack<T> pack;
#pragma unroll
    for (int k = 0; k < kGroup; ++k) pack.v[k] = from_float<T>(f[k]);
    *reinterpret_cast<Pack<T>*>(p) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      if (k < n) p[k] = from_float<T>(f[k]);
    }
  }
}

// A side input (explicit noise, target) stored as T or as float32.
template <class T>
__device__ __forceinline__ void load_side_group(const void* base, bool side_is_float, int64_t index, int n, bool vector,
                                                float (&f)[kGroup]) {
  if (side_is_float) {
    load_group(static_cast<const float*>(base) + index, n, vector, f);
  } else {
    load_group(static_cast<const T*>(base) + index, n, vector, f);
  }
}

template <class T>
__device__ __forceinline__ bool side_aligned(const void* base, bool side_is_float, int64_t index) {
  if (base == nullptr) return true;
  return side_is_float ? group_aligned<float>(static_cast<const float*>(base) + index) : group_aligned<T>(static_cast<const T*>(base) + index);
}

// z[k] = the explicit noise or the stream at first + k, k < n.
template <class T>
__device__ __forceinline__ void noise_group(const void* explicit_noise, bool side_is_float, int64_t index, int n, bool vector,
                                            PhiloxKey key, uint64_t first, float (&z)[kGroup]) {
  if (explicit_noise != nullptr) {
    load_side_group<T>(explicit_noise, side_is_float, index, n, vector, z);
  } else {
    stream_normal_group(key, first, n, z);
  }
}

__device__ __forceinline__ int group_size(int64_t j, int64_t end) {
  return end - j < kGroup ? static_cast<int>(end - j) : kGroup;
}

// ------------------------------------------------------------------------------- mr_step

template <class T>
__global__ void __launch_bounds__(kThreads) mr_step_kernel(const MrStepArgs a) {
  const PhiloxKey key = philox_key(a.seed);
  const int64_t groups = (a.per_sample + kGroup - 1) / kGroup;
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t base = b * a.per_sample;
    const T* x = static_cast<const T*>(a.x) + base;
    T* out = static_cast<T*>(a.out) + base;
    bool aligned = group_aligned<T>(x) && group_aligned<T>(out) && side_aligned<T>(a.noise, a.side_is_float, base);
    for (int k = 0; k < a.num_terms; ++k) aligned = aligned && group_aligned<T>(static_cast<const T*>(a.terms[k]) + base);
    const float* row = a.coefs + b * (a.num_terms + 1);
    const float noise_coef = a.noise_coef != nullptr ? a.noise_coef[b] : 0.0f;
    for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t j = g * kGroup;
      const int n = group_size(j, a.per_sample);
      const bool vector = aligned && n == kGroup;
      float acc[kGroup], values[kGroup];
      load_group(x + j, n, vector, values);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) acc[k] = scaled(row[0], values[k]);
      for (int t = 0; t < a.num_terms; ++t) {
        load_group(static_cast<const T*>(a.terms[t]) + base + j, n, vector, values);
        const float coef = row[t + 1];
#pragma unroll
        for (int k = 0; k < kGroup; ++k) acc[k] = add_scaled(acc[k], coef, values[k]);
      }
      if (a.noise_coef != nullptr) {
        noise_group<T>(a.noise, a.side_is_float, base + j, n, vector, key, a.offset + static_cast<uint64_t>(base + j), values);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) acc[k] = add_scaled(acc[k], noise_coef, values[k]);
      }
      // out may be x or a term: this thread has read every element it writes.
      store_group(out + j, n, vector, acc);
    }
  }
}

// -------------------------------------------------------------------------- noise_inject

template <class T>
__global__ void __launch_bounds__(kThreads) noise_inject_kernel(const NoiseInjectArgs a) {
  const PhiloxKey key = philox_key(a.seed);
  const int64_t x_groups = (a.x_numel + kGroup - 1) / kGroup;
  const int64_t y_groups = a.out_y.data != nullptr ? (a.y_numel + kGroup - 1) / kGroup : 0;
  const bool noisy_y = a.y_coefs != nullptr;
  const uint64_t positions_per_sample = static_cast<uint64_t>(a.x_numel + (noisy_y ? a.y_numel : 0));
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    T* out_x = static_cast<T*>(a.out_x.data) + b * a.out_x.batch_stride;
    const T* x0 = static_cast<const T*>(a.x0.data) + b * a.x0.batch_stride;
    const T* mu = a.mu.data != nullptr ? static_cast<const T*>(a.mu.data) + b * a.mu.batch_stride : nullptr;
    const int64_t noise_x_row = b * a.noise_x.batch_stride;
    const bool x_aligned = group_aligned<T>(out_x) && group_aligned<T>(x0) && group_aligned<T>(mu) &&
                           side_aligned<T>(a.noise_x.data, a.side_is_float, noise_x_row);
    T* out_y = y_groups ? static_cast<T*>(a.out_y.data) + b * a.out_y.batch_stride : nullptr;
    const T* y0 = y_groups ? static_cast<const T*>(a.y0.data) + b * a.y0.batch_stride : nullptr;
    const int64_t noise_y_row = b * a.noise_y.batch_stride;
    const bool y_aligned = group_aligned<T>(out_y) && group_aligned<T>(y0) && side_aligned<T>(a.noise_y.data, a.side_is_float, noise_y_row);
    const uint64_t first_position = a.offset + static_cast<uint64_t>(b) * positions_per_sample;
    const Diffusion x_diffusion{a.x_coefs[2 * b], a.x_coefs[2 * b + 1]};
    const Diffusion y_diffusion = noisy_y ? Diffusion{a.y_coefs[2 * b], a.y_coefs[2 * b + 1]} : Diffusion{1.0f, 0.0f};
    for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < x_groups + y_groups; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      float clean[kGroup], z[kGroup], result[kGroup];
      if (g < x_groups) {
        const int64_t j = g * kGroup;
        const int n = group_size(j, a.x_numel);
        const bool vector = x_aligned && n == kGroup;
        load_group(x0 + j, n, vector, clean);
        noise_group<T>(a.noise_x.data, a.side_is_float, noise_x_row + j, n, vector, key, first_position + static_cast<uint64_t>(j), z);
        if (mu != nullptr) {
          float mean[kGroup];
          load_group(mu + j, n, vector, mean);
#pragma unroll
          for (int k = 0; k < kGroup; ++k) result[k] = x_diffusion(clean[k], z[k], mean[k]);
        } else {
#pragma unroll
          for (int k = 0; k < kGroup; ++k) result[k] = x_diffusion(clean[k], z[k]);
        }
        store_group(out_x + j, n, vector, result);
      } else {
        const int64_t j = (g - x_groups) * kGroup;
        const int n = group_size(j, a.y_numel);
        const bool vector = y_aligned && n == kGroup;
        if (!noisy_y) {  // a clean condition: copied bit for bit
          for (int k = 0; k < n; ++k) out_y[j + k] = y0[j + k];
          continue;
        }
        load_group(y0 + j, n, vector, clean);
        noise_group<T>(a.noise_y.data, a.side_is_float, noise_y_row + j, n, vector, key,
                       first_position + static_cast<uint64_t>(a.x_numel + j), z);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) result[k] = y_diffusion(clean[k], z[k]);
        store_group(out_y + j, n, vector, result);
      }
    }
  }
}

// --------------------------------------------------------------------- weighted_score_loss

// The block's sum of `value`, in a fixed order (shuffle tree per warp, then over warps); valid
// in thread 0. Every thread of the block must call it.
__device__ float block_sum(float value) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int shift = 16; shift > 0; shift /= 2) value += __shfl_down_sync(0xFFFFFFFFu, value, shift);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  value = 0.0f;
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int shift = 16; shift > 0; shift /= 2) value += __shfl_down_sync(0xFFFFFFFFu, value, shift);
  }
  return value;
}

// partial_sums[b * tiles + tile] = sum of w r^2 over the tile; grad written.
template <class T>
__global__ void __launch_bounds__(kThreads) loss_tiles_kernel(const WeightedScoreLossArgs a, float* partial_sums, int64_t tiles) {
  const PhiloxKey key = philox_key(a.seed);
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const int64_t base = b * a.per_sample;
    const T* output = static_cast<const T*>(a.output) + base;
    T* grad = static_cast<T*>(a.grad) + base;
    const bool aligned = group_aligned<T>(output) && group_aligned<T>(grad) && side_aligned<T>(a.noise, a.side_is_float, base) &&
                         side_aligned<T>(a.target, a.side_is_float, base);
    const float* c = a.coefs + b * a.segments * 3;
    const ScoreResidual first{c[0], c[1], c[2]};
    const ScoreResidual second = a.segments == 2 ? ScoreResidual{c[3], c[4], c[5]} : first;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t tile_end = (tile + 1) * kLossTile < a.per_sample ? (tile + 1) * kLossTile : a.per_sample;
      float sum = 0.0f;
#pragma unroll
      for (int step = 0; step < kLossGroupsPerThread; ++step) {
        const int64_t j = tile * kLossTile + (static_cast<int64_t>(step) * kThreads + threadIdx.x) * kGroup;
        if (j >= tile_end) break;
        const int n = group_size(j, tile_end);
        const bool vector = aligned && n == kGroup;
        float out[kGroup], z[kGroup], target[kGroup], gradient[kGroup];
        load_group(output + j, n, vector, out);
        noise_group<T>(a.noise, a.side_is_float, base + j, n, vector, key, a.offset + static_cast<uint64_t>(base + j), z);
        if (a.target != nullptr) load_side_group<T>(a.target, a.side_is_float, base + j, n, vector, target);
#pragma unroll
        for (int k = 0; k < kGroup; ++k) {
          const ScoreResidual& segment = j + k < a.split ? first : second;
          const float residual = a.target != nullptr ? segment(out[k], z[k], target[k]) : segment(out[k], z[k]);
          gradient[k] = segment.gradient(residual);
          if (k < n) sum += segment.loss_term(residual);
        }
        store_group(grad + j, n, vector, gradient);
      }
      sum = block_sum(sum);
      if (threadIdx.x == 0) partial_sums[b * tiles + tile] = sum;
    }
  }
}

// loss[b] = the sum of sample b's tile sums, in a fixed order.
__global__ void __launch_bounds__(kThreads) loss_finish_kernel(const float* partial_sums, int64_t tiles, float* loss, int64_t batch) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    float sum = 0.0f;
    for (int64_t tile = threadIdx.x; tile < tiles; tile += kThreads) sum += partial_sums[b * tiles + tile];
    sum = block_sum(sum);
    if (threadIdx.x == 0) loss[b] = sum;
  }
}

__global__ void __launch_bounds__(kThreads) philox_normals_kernel(float* normals, int64_t numel, uint64_t seed, uint64_t offset) {
  const PhiloxKey key = philox_key(seed);
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  const bool aligned = group_aligned<float>(normals);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups; g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = g * kGroup;
    const int n = group_size(j, numel);
    float z[kGroup];
    stream_normal_group(key, offset + static_cast<uint64_t>(j), n, z);
    store_group(normals + j, n, aligned && n == kGroup, z);
  }
}

// ------------------------------------------------------------------------------- launching

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void check_launch(const char* kernel) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("msdiff_fast._C_cuda: ") + kernel + " failed: " + cudaGetErrorName(error) + " (" +
                             cudaGetErrorString(error) + ")");
  }
}

int64_t blocks_for(int64_t work, int64_t per_block, int64_t most) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return blocks < 1 ? 1 : (blocks > most ? most : blocks);
}

// The grid of a per-sample kernel: x over groups of a sample, y over samples.
dim3 sample_grid(int64_t groups_per_sample, int64_t batch) {
  return dim3(static_cast<unsigned>(blocks_for(groups_per_sample, kThreads, kMaxGridX)), static_cast<unsigned>(blocks_for(batch, 1, kMaxGridY)));
}

}  // namespace

void mr_step(const MrStepArgs& args, uintptr_t stream) {
  if (args.batch == 0 || args.per_sample == 0) return;
  const dim3 grid = sample_grid((args.per_sample + kGroup - 1) / kGroup, args.batch);
  for_storage(args.storage, [&](auto tag) { mr_step_kernel<decltype(tag)><<<grid, kThreads, 0, as_stream(stream)>>>(args); });
  check_launch("mr_step_kernel");
}

void noise_inject(const NoiseInjectArgs& args, uintptr_t stream) {
  const int64_t groups = (args.x_numel + kGroup - 1) / kGroup + (args.out_y.data != nullptr ? (args.y_numel + kGroup - 1) / kGroup : 0);
  if (args.batch == 0 || groups == 0) return;
  const dim3 grid = sample_grid(groups, args.batch);
  for_storage(args.storage, [&](auto tag) { noise_inject_kernel<decltype(tag)><<<grid, kThreads, 0, as_stream(stream)>>>(args); });
  check_launch("noise_inject_kernel");
}

void weighted_score_loss(const WeightedScoreLossArgs& args, float* partial_sums, uintptr_t stream) {
  if (args.batch == 0) return;
  if (args.per_sample == 0) {
    const cudaError_t error = cudaMemsetAsync(args.loss, 0, sizeof(float) * args.batch, as_stream(stream));
    if (error != cudaSuccess) throw std::runtime_error(std::string("msdiff_fast._C_cuda: zeroing the loss failed: ") + cudaGetErrorString(error));
    return;
  }
  const int64_t tiles = (args.per_sample + kLossTile - 1) / kLossTile;
  const dim3 grid(static_cast<unsigned>(blocks_for(tiles, 1, kMaxGridX)), static_cast<unsigned>(blocks_for(args.batch, 1, kMaxGridY)));
  for_storage(args.storage, [&](auto tag) {
    loss_tiles_kernel<decltype(tag)><<<grid, kThreads, 0, as_stream(stream)>>>(args, partial_sums, tiles);
  });
  check_launch("loss_tiles_kernel");
  loss_finish_kernel<<<static_cast<unsigned>(blocks_for(args.batch, 1, kMaxGridY)), kThreads, 0, as_stream(stream)>>>(partial_sums, tiles, args.loss,
                                                                                                                    args.batch);
  check_launch("loss_finish_kernel");
}

void philox_normals(float* normals, int64_t numel, uint64_t seed, uint64_t offset, uintptr_t stream) {
  if (numel == 0) return;
  const int64_t groups = (numel + kGroup - 1) / kGroup;
  philox_normals_kernel<<<static_cast<unsigned>(blocks_for(groups, kThreads, kMaxGridX)), kThreads, 0, as_stream(stream)>>>(normals, numel, seed,
                                                                                                                         offset);
  check_launch("philox_normals_kernel");
}

std::string device_status(int device) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear it: the next runtime call must not report it again
    return std::string("no CUDA device: cudaGetDeviceCount returned ") + std::to_string(static_cast<int>(error)) + " (" +
           cudaGetErrorName(error) + ": " + cudaGetErrorString(error) + ")";
  }
  if (device < 0 || device >= count) {
    return "no CUDA device " + std::to_string(device) + ": cudaGetDeviceCount found " + std::to_string(count);
  }
  error = cudaSetDevice(device);
  cudaFuncAttributes attributes;
  if (error == cudaSuccess) error = cudaFuncGetAttributes(&attributes, mr_step_kernel<float>);
  if (error != cudaSuccess) {
    cudaGetLastError();
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    return "the CUDA kernels cannot run on GPU " + std::to_string(device) + " (compute capability " + std::to_string(major) + "." +
           std::to_string(minor) + "): " + cudaGetErrorName(error) + " (" + cudaGetErrorString(error) +
           "); rebuild with MSDIFF_FAST_CUDA_ARCHS including " + std::to_string(major) + std::to_string(minor);
  }
  return "";
}

void set_device(int device) {
  const cudaError_t error = cudaSetDevice(device);
  if (error != cudaSuccess) {
    throw std::runtime_error("msdiff_fast._C_cuda: cudaSetDevice(" + std::to_string(device) + ") failed: " + cudaGetErrorName(error) + " (" +
                             cudaGetErrorString(error) + ")");
  }
}

}  // namespace msdiff::cuda
