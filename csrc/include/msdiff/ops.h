// The three fused ops: their arguments (plain pointers, sizes and per-sample strides, filled in
// by the bindings) and their per-element formulas. The CPU loops and the CUDA kernels evaluate
// these same functions, in the order the PyTorch reference (msdiff_fast/ops/reference.py) uses,
// so every backend rounds the same way up to FMA contraction.
//
// Storage: T is float, half_t or bf16_t; math is float32. "Side" inputs (explicit noise, target)
// are stored either as T or as float32 (the Python glue converts anything else to float32, which
// is what the reference does with them): `side_is_float` says which.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "common.h"
#include "philox.h"

namespace msdiff {

constexpr int kMaxTerms = 8;

enum class Storage : int { f32 = 0, f16 = 1, bf16 = 2 };

// Calls body(T{}) with the element type T that `storage` names: how the CPU loops and the CUDA
// launchers choose their instantiation. The bindings pass only these three; anything else throws.
template <class Body>
void for_storage(Storage storage, const Body& body) {
  switch (storage) {
    case Storage::f32: return body(float{});
    case Storage::f16: return body(half_t{});
    case Storage::bf16: return body(bf16_t{});
  }
  throw std::invalid_argument("msdiff_fast: unknown storage type");
}

// ------------------------------------------------------------------------------ arguments

// mr_step over a contiguous [batch, per_sample] array:
// out = coefs[b, 0] x + sum_k coefs[b, k + 1] terms[k] + noise_coef[b] z.
struct MrStepArgs {
  void* out;  // may be x: every element is read before it is written
  const void* x;
  const void* terms[kMaxTerms];
  int num_terms;
  const float* coefs;       // [batch, num_terms + 1]
  const float* noise_coef;  // [batch], or null: no noise term
  const void* noise;        // like x, or null: the Philox stream at offset + flat index
  bool side_is_float;
  int64_t batch, per_sample;
  uint64_t seed, offset;
  Storage storage;
};

// One tensor of a batch whose samples are each contiguous, sample b at data + b * batch_stride.
struct SampleRows {
  const void* data;  // null: absent
  int64_t batch_stride;
};
struct MutableSampleRows {
  void* data;
  int64_t batch_stride;
};

// noise_inject: x_t = a x0 + (1 - a) mu + s z_x and y_t = a_y y0 + s_y z_y per sample, or y_t = y0
// when y_coefs is null. Sample b draws x element j at offset + b D + j and y element k at
// offset + b D + x_numel + k, D = x_numel + (y_numel if y is noised else 0).
struct NoiseInjectArgs {
  int64_t batch;
  int64_t x_numel;  // per sample
  MutableSampleRows out_x;
  SampleRows x0, mu, noise_x;  // mu, noise_x may be absent
  const float* x_coefs;        // [batch, 2] = (a, s)
  int64_t y_numel;             // per sample; 0 without y
  MutableSampleRows out_y;     // data null: no y
  SampleRows y0, noise_y;
  const float* y_coefs;  // [batch, 2], or null: y0 is copied
  bool side_is_float;
  uint64_t seed, offset;
  Storage storage;
};

// weighted_score_loss over contiguous [batch, per_sample] arrays, elements [0, split) of each
// sample in segment 0 and [split, per_sample) in segment 1 (split == per_sample: one segment):
// r = output - (k_g z + c_g target), loss[b] = sum w_g r^2, grad = 2 w_g r.
struct WeightedScoreLossArgs {
  float* loss;  // [batch]
  void* grad;   // like output
  const void* output;
  const void* noise;   // like output, or null: the Philox stream at offset + b per_sample + j
  const void* target;  // like output, or null
  bool side_is_float;
  const float* coefs;  // [batch, segments, 3] = (w, k, c)
  int segments;
  int64_t batch, per_sample, split;
  uint64_t seed, offset;
  Storage storage;
};

// ------------------------------------------------------------------- per-element formulas

// mr_step, one term at a time: start with c0 x, then add c_k term_k and c_n z.
MSDIFF_HD float scaled(float coef, float value) { return coef * value; }
MSDIFF_HD float add_scaled(float accumulator, float coef, float value) { return accumulator + coef * value; }

// noise_inject: a x0 + s z, then + (1 - a) mu for a mean-reverting x.
struct Diffusion {
  float scale, std_dev;
  MSDIFF_HD float operator()(float clean, float z) const { return scale * clean + std_dev * z; }
  MSDIFF_HD float operator()(float clean, float z, float mean) const {
    return (scale * clean + std_dev * z) + (1.0f - scale) * mean;
  }
};

// weighted_score_loss: residual, its weighted square (the loss term) and its gradient.
struct ScoreResidual {
  float weight, noise_scale, target_scale;
  MSDIFF_HD float operator()(float output, float z) const { return output - noise_scale * z; }
  MSDIFF_HD float operator()(float output, float z, float target) const {
    return output - (noise_scale * z + target_scale * target);
  }
  MSDIFF_HD float loss_term(float residual) const { return weight * residual * residual; }
  MSDIFF_HD float gradient(float residual) const { return 2.0f * weight * residual; }
};

}  // namespace msdiff
