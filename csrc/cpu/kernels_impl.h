// The CPU loops, compiled once per instruction set: the including file defines MSDIFF_CPU_ISA
// (the namespace, e.g. baseline or avx2), MSDIFF_CPU_ISA_NAME and MSDIFF_PHILOX_LANES (see
// philox_lanes.h) and includes everything else first.
//
// Every hot loop is a plain counted loop over a tile of at most kTile elements with no calls,
// no branches the compiler cannot turn into selects, and no cross-iteration dependence, which
// is what GCC and Clang vectorise (the build's -fopt-info-vec report lists them). Reductions
// are written with explicit lanes because the compiler may not reassociate a float sum.
#if !defined(MSDIFF_CPU_ISA) || !defined(MSDIFF_CPU_ISA_NAME) || !defined(MSDIFF_PHILOX_LANES)
#error "define MSDIFF_CPU_ISA, MSDIFF_CPU_ISA_NAME and MSDIFF_PHILOX_LANES before including kernels_impl.h"
#endif

namespace msdiff::cpu::MSDIFF_CPU_ISA {
namespace {

// Lanes of the loss sum: four 4-double vectors.
constexpr int kSumLanes = 16;

int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

template <class T>
void widen(float* __restrict__ dst, const T* __restrict__ src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j]);
}

// n float32 values of a side input (explicit noise or target) stored as T or as float32: read
// where they lie when they are float32, widened into scratch otherwise.
template <class T>
const float* side_values(float* scratch, const void* src, bool side_is_float, int64_t n) {
  if (side_is_float || std::is_same_v<T, float>) return static_cast<const float*>(src);
  widen(scratch, static_cast<const T*>(src), n);
  return scratch;
}

#include "philox_lanes.h"

// A tile's noise: the stream at positions first .. first + n - 1 (n <= kTile) covers counters
// first / 4 .. (first + n - 1) / 4, whose normals fill a scratch array from index first % 4 on.
constexpr int64_t kNoiseScratch = kTile + 2 * kNormalsPerCounter;
constexpr int64_t kTileCounters = kNoiseScratch / kNormalsPerCounter;

// The stream at first + j, j < n <= kTile, written into scratch; returns where it starts. Philox
// on SIMD lanes where this instruction set has them (one at a time for the rest), then Box-Muller
// per pair of words, which the compiler vectorises.
const float* fill_normals(float* __restrict__ scratch, int64_t n, PhiloxKey key, uint64_t first) {
  alignas(64) uint32_t w0[kTileCounters];
  alignas(64) uint32_t w1[kTileCounters];
  alignas(64) uint32_t w2[kTileCounters];
  alignas(64) uint32_t w3[kTileCounters];
  const uint64_t first_counter = first >> 2;
  const int64_t lead = static_cast<int64_t>(first & 3u);
  const int64_t counters = (lead + n + kNormalsPerCounter - 1) / kNormalsPerCounter;
  int64_t c = 0;
#if MSDIFF_PHILOX_LANES > 0
  uint32_t* const words[4] = {w0, w1, w2, w3};
  c = philox_words_lanes(words, counters, key, first_counter);
#endif
  for (; c < counters; ++c) {
    const uint64_t counter = first_counter + static_cast<uint64_t>(c);
    const PhiloxWords block = philox4x32_10(key, static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32));
    w0[c] = block.w0;
    w1[c] = block.w1;
    w2[c] = block.w2;
    w3[c] = block.w3;
  }
  for (c = 0; c < counters; ++c) {
    float* __restrict__ z = scratch + kNormalsPerCounter * c;
    normals_from_words(w0[c], w1[c], z[0], z[1]);
    normals_from_words(w2[c], w3[c], z[2], z[3]);
  }
  return scratch + lead;
}

// The noise of a tile: the explicit tensor's values (side_values) or the stream's normals in
// scratch; returns where the tile's values start.
template <class T>
const float* fill_noise(float* scratch, int64_t n, const void* explicit_noise, bool side_is_float, PhiloxKey key, uint64_t first) {
  if (explicit_noise == nullptr) return fill_normals(scratch, n, key, first);
  return side_values<T>(scratch, explicit_noise, side_is_float, n);
}

// base + elements for a side input stored as T or as float32 (null stays null).
template <class T>
const void* advance_side(const void* base, bool side_is_float, int64_t elements) {
  if (base == nullptr) return nullptr;
  return side_is_float ? static_cast<const void*>(static_cast<const float*>(base) + elements)
                       : static_cast<const void*>(static_cast<const T*>(base) + elements);
}

// ------------------------------------------------------------------------------- mr_step

// Loops whose output may be one of their inputs at the same index (mr_step's out = x): no
// iteration reads what another writes, so the compiler may vectorise without an overlap check
// (which an exact alias would fail, falling back to scalar code).
#if defined(__clang__)
#define MSDIFF_INDEPENDENT_ITERATIONS _Pragma("clang loop vectorize(assume_safety)")
#else
#define MSDIFF_INDEPENDENT_ITERATIONS _Pragma("GCC ivdep")
#endif

// out = c0 x + sum_k c_k term_k (+ cn z) over n elements in one pass, for kTerms known at
// compile time (the common 1 to 3): each element loaded once and stored once.
template <class T, int kTerms, bool kNoise>
void combine_in_one_pass(T* out, const T* x, const void* const* terms, int64_t start, const float* row, const float* z, float cn,
                         int64_t n) {
  const T* term[kTerms];
  float coef[kTerms];
  for (int k = 0; k < kTerms; ++k) {
    term[k] = static_cast<const T*>(terms[k]) + start;
    coef[k] = row[k + 1];
  }
  const float c0 = row[0];
  MSDIFF_INDEPENDENT_ITERATIONS
  for (int64_t j = 0; j < n; ++j) {
    float acc = scaled(c0, to_float(x[j]));
    for (int k = 0; k < kTerms; ++k) acc = add_scaled(acc, coef[k], to_float(term[k][j]));
    if constexpr (kNoise) acc = add_scaled(acc, cn, z[j]);
    out[j] = from_float<T>(acc);
  }
}

// Any term count: accumulate term by term in an L1 tile.
template <class T>
void combine_through_tile(T* out, const T* x, const void* const* terms, int num_terms, int64_t start, const float* row,
                          const float* z, float cn, int64_t n) {
  alignas(64) float acc[kTile];
  const float c0 = row[0];
  for (int64_t j = 0; j < n; ++j) acc[j] = scaled(c0, to_float(x[j]));
  for (int k = 0; k < num_terms; ++k) {
    const T* __restrict__ term = static_cast<const T*>(terms[k]) + start;
    const float ck = row[k + 1];
    for (int64_t j = 0; j < n; ++j) acc[j] = add_scaled(acc[j], ck, to_float(term[j]));
  }
  if (z != nullptr) {
    for (int64_t j = 0; j < n; ++j) acc[j] = add_scaled(acc[j], cn, z[j]);
  }
  // out may be x or a term: the whole tile has been read by now.
  for (int64_t j = 0; j < n; ++j) out[j] = from_float<T>(acc[j]);
}

template <class T, bool kNoise>
void combine(T* out, const T* x, const MrStepArgs& a, int64_t start, const float* row, const float* z, float cn, int64_t n) {
  switch (a.num_terms) {
    case 1: return combine_in_one_pass<T, 1, kNoise>(out, x, a.terms, start, row, z, cn, n);
    case 2: return combine_in_one_pass<T, 2, kNoise>(out, x, a.terms, start, row, z, cn, n);
    case 3: return combine_in_one_pass<T, 3, kNoise>(out, x, a.terms, start, row, z, cn, n);
    default: return combine_through_tile(out, x, a.terms, a.num_terms, start, row, kNoise ? z : nullptr, cn, n);
  }
}

template <class T>
void mr_step_range(const MrStepArgs& a, int64_t begin, int64_t end) {
  const PhiloxKey key = philox_key(a.seed);
  alignas(64) float scratch[kNoiseScratch];
  for (int64_t start = begin; start < end;) {
    const int64_t sample = start / a.per_sample;
    const int64_t stop = smaller(smaller(end, (sample + 1) * a.per_sample), start + kTile);
    const int64_t n = stop - start;
    const float* row = a.coefs + sample * (a.num_terms + 1);
    const T* x = static_cast<const T*>(a.x) + start;
    T* out = static_cast<T*>(a.out) + start;
    if (a.noise_coef != nullptr) {
      const float* z =
          fill_noise<T>(scratch, n, advance_side<T>(a.noise, a.side_is_float, start), a.side_is_float, key, a.offset + static_cast<uint64_t>(start));
      combine<T, true>(out, x, a, start, row, z, a.noise_coef[sample], n);
    } else {
      combine<T, false>(out, x, a, start, row, nullptr, 0.0f, n);
    }
    start = stop;
  }
}

// -------------------------------------------------------------------------- noise_inject

// Elements [begin, end) of one sample's x (or y) part; coefs null copies src.
template <class T>
void diffuse_part(T* out, const T* src, const T* mean, const void* noise, bool side_is_float, const float* coefs,
                  int64_t begin, int64_t end, PhiloxKey key, uint64_t first_position) {
  alignas(64) float scratch[kNoiseScratch];
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t n = smaller(kTile, end - start);
    T* __restrict__ dst = out + start;
    const T* __restrict__ clean = src + start;
    if (coefs == nullptr) {  // a clean condition: copied bit for bit
      std::memcpy(dst, clean, static_cast<size_t>(n) * sizeof(T));
      continue;
    }
    const Diffusion diffusion{coefs[0], coefs[1]};
    const float* __restrict__ z =
        fill_noise<T>(scratch, n, advance_side<T>(noise, side_is_float, start), side_is_float, key, first_position + static_cast<uint64_t>(start));
    if (mean != nullptr) {
      const T* __restrict__ mu = mean + start;
      for (int64_t j = 0; j < n; ++j) dst[j] = from_float<T>(diffusion(to_float(clean[j]), z[j], to_float(mu[j])));
    } else {
      for (int64_t j = 0; j < n; ++j) dst[j] = from_float<T>(diffusion(to_float(clean[j]), z[j]));
    }
  }
}

template <class T>
T* row_of(const MutableSampleRows& rows, int64_t sample) {
  return static_cast<T*>(rows.data) + sample * rows.batch_stride;
}

template <class T>
const T* row_of(const SampleRows& rows, int64_t sample) {
  return rows.data == nullptr ? nullptr : static_cast<const T*>(rows.data) + sample * rows.batch_stride;
}

template <class T>
const void* side_row_of(const SampleRows& rows, int64_t sample, bool side_is_float) {
  if (rows.data == nullptr) return nullptr;
  return side_is_float ? static_cast<const void*>(row_of<float>(rows, sample)) : static_cast<const void*>(row_of<T>(rows, sample));
}

template <class T>
void noise_inject_range(const NoiseInjectArgs& a, int64_t begin, int64_t end) {
  const PhiloxKey key = philox_key(a.seed);
  const int64_t per_sample = a.x_numel + a.y_numel;
  const uint64_t positions_per_sample = static_cast<uint64_t>(a.x_numel + (a.y_coefs != nullptr ? a.y_numel : 0));
  for (int64_t index = begin; index < end;) {
    const int64_t b = index / per_sample;
    const int64_t column = index - b * per_sample;
    const int64_t stop = smaller(per_sample, column + (end - index));
    const uint64_t first_position = a.offset + static_cast<uint64_t>(b) * positions_per_sample;
    if (column < a.x_numel) {
      const int64_t x_stop = smaller(stop, a.x_numel);
      diffuse_part<T>(row_of<T>(a.out_x, b), row_of<T>(a.x0, b), row_of<T>(a.mu, b), side_row_of<T>(a.noise_x, b, a.side_is_float),
                      a.side_is_float, a.x_coefs + 2 * b, column, x_stop, key, first_position);
      index += x_stop - column;
    } else {
      const int64_t y_begin = column - a.x_numel, y_stop = stop - a.x_numel;
      const bool noisy = a.y_coefs != nullptr;
      diffuse_part<T>(row_of<T>(a.out_y, b), row_of<T>(a.y0, b), nullptr, noisy ? side_row_of<T>(a.noise_y, b, a.side_is_float) : nullptr,
                      a.side_is_float, noisy ? a.y_coefs + 2 * b : nullptr, y_begin, y_stop, key,
                      first_position + static_cast<uint64_t>(a.x_numel));
      index += y_stop - y_begin;
    }
  }
}

// --------------------------------------------------------------------- weighted_score_loss

// Elements [begin, end) of one sample, all in one segment: grad written, sum of w r^2 added to
// lanes. `segment` by value: a reference might alias a float32 grad, which stops vectorisation.
template <class T>
void score_piece(const WeightedScoreLossArgs& a, const ScoreResidual segment, int64_t sample, int64_t begin, int64_t end,
                 PhiloxKey key, double* __restrict__ lanes) {
  alignas(64) float scratch[kNoiseScratch];
  alignas(64) float target_scratch[kTile];
  alignas(64) float squares[kTile];
  const int64_t sample_start = sample * a.per_sample;
  for (int64_t start = sample_start + begin; start < sample_start + end; start += kTile) {
    const int64_t n = smaller(kTile, sample_start + end - start);
    const float* __restrict__ z =
        fill_noise<T>(scratch, n, advance_side<T>(a.noise, a.side_is_float, start), a.side_is_float, key, a.offset + static_cast<uint64_t>(start));
    const T* __restrict__ output = static_cast<const T*>(a.output) + start;
    T* __restrict__ grad = static_cast<T*>(a.grad) + start;
    if (a.target != nullptr) {
      const float* __restrict__ target = side_values<T>(target_scratch, advance_side<T>(a.target, a.side_is_float, start), a.side_is_float, n);
      for (int64_t j = 0; j < n; ++j) {
        const float residual = segment(to_float(output[j]), z[j], target[j]);
        grad[j] = from_float<T>(segment.gradient(residual));
        squares[j] = segment.loss_term(residual);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float residual = segment(to_float(output[j]), z[j]);
        grad[j] = from_float<T>(segment.gradient(residual));
        squares[j] = segment.loss_term(residual);
      }
    }
    int64_t j = 0;
    for (; j + kSumLanes <= n; j += kSumLanes) {
      for (int lane = 0; lane < kSumLanes; ++lane) lanes[lane] += static_cast<double>(squares[j + lane]);
    }
    for (int lane = 0; j + lane < n; ++lane) lanes[lane] += static_cast<double>(squares[j + lane]);
  }
}

template <class T>
void weighted_score_loss_blocks(const WeightedScoreLossArgs& a, double* partial_sums, int64_t begin, int64_t end) {
  const PhiloxKey key = philox_key(a.seed);
  const int64_t blocks_per_sample = (a.per_sample + kLossBlock - 1) / kLossBlock;
  for (int64_t block = begin; block < end; ++block) {
    const int64_t sample = block / blocks_per_sample;
    const int64_t first = (block - sample * blocks_per_sample) * kLossBlock;
    const int64_t last = smaller(a.per_sample, first + kLossBlock);
    alignas(64) double lanes[kSumLanes] = {};
    for (int segment_index = 0; segment_index < a.segments; ++segment_index) {
      const int64_t segment_begin = segment_index == 0 ? 0 : a.split;
      const int64_t segment_end = segment_index + 1 == a.segments ? a.per_sample : a.split;
      const int64_t piece_begin = first > segment_begin ? first : segment_begin;
      const int64_t piece_end = smaller(last, segment_end);
      if (piece_begin >= piece_end) continue;
      const float* c = a.coefs + (sample * a.segments + segment_index) * 3;
      score_piece<T>(a, ScoreResidual{c[0], c[1], c[2]}, sample, piece_begin, piece_end, key, lanes);
    }
    double sum = 0.0;
    for (int lane = 0; lane < kSumLanes; ++lane) sum += lanes[lane];
    partial_sums[block] = sum;
  }
}

// ------------------------------------------------------------------------------ dispatch

void mr_step(const MrStepArgs& args, int64_t begin, int64_t end) {
  for_storage(args.storage, [&](auto tag) { mr_step_range<decltype(tag)>(args, begin, end); });
}

void noise_inject(const NoiseInjectArgs& args, int64_t begin, int64_t end) {
  for_storage(args.storage, [&](auto tag) { noise_inject_range<decltype(tag)>(args, begin, end); });
}

void weighted_score_loss(const WeightedScoreLossArgs& args, double* partial_sums, int64_t begin, int64_t end) {
  for_storage(args.storage, [&](auto tag) { weighted_score_loss_blocks<decltype(tag)>(args, partial_sums, begin, end); });
}

void philox_normals(float* normals, uint64_t seed, uint64_t offset, int64_t begin, int64_t end) {
  const PhiloxKey key = philox_key(seed);
  alignas(64) float scratch[kNoiseScratch];
  for (int64_t start = begin; start < end; start += kTile) {
    const int64_t n = smaller(kTile, end - start);
    std::memcpy(normals + start, fill_normals(scratch, n, key, offset + static_cast<uint64_t>(start)), static_cast<size_t>(n) * sizeof(float));
  }
}

}  // namespace

const Kernels kernels = {MSDIFF_CPU_ISA_NAME, mr_step, noise_inject, weighted_score_loss, philox_normals};

}  // namespace msdiff::cpu::MSDIFF_CPU_ISA
