// DLPack arrays in, the plain argument structs of msdiff/ops.h out, for both modules. Every
// check names the argument and says what was expected and what came (flash-attention's CHECK_*
// macros, as functions). msdiff_fast/ops/compiled.py prepares arguments that pass; these checks
// stop a caller that reaches the modules directly before a kernel reads or writes out of bounds.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <optional>
#include <string>

#include "msdiff/ops.h"

namespace msdiff::bind {

namespace nb = nanobind;
// Outputs are bound with .noconvert(): an array nanobind would have to copy is refused instead
// of being written in a copy that nobody sees.
using Output = nb::ndarray<>;
using Input = nb::ndarray<nb::ro>;
using OptionalInput = std::optional<Input>;

template <class Array>
std::string shape_of(const Array& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

[[noreturn]] inline void fail_value(const char* name, const std::string& expected, const std::string& got) {
  throw nb::value_error((std::string(name) + ": expected " + expected + ", got " + got).c_str());
}

[[noreturn]] inline void fail_type(const char* name, const std::string& expected, const std::string& got) {
  throw nb::type_error((std::string(name) + ": expected " + expected + ", got " + got).c_str());
}

inline std::string dtype_name(nb::dlpack::dtype d) {
  using code = nb::dlpack::dtype_code;
  const char* kind = d.code == static_cast<uint8_t>(code::Float)    ? "float"
                     : d.code == static_cast<uint8_t>(code::Bfloat) ? "bfloat"
                     : d.code == static_cast<uint8_t>(code::Int)    ? "int"
                     : d.code == static_cast<uint8_t>(code::UInt)   ? "uint"
                     : d.code == static_cast<uint8_t>(code::Bool)   ? "bool"
                                                                    : "other";
  return std::string(kind) + std::to_string(d.bits) + (d.lanes == 1 ? "" : "x" + std::to_string(d.lanes));
}

inline const char* storage_name(Storage s) {
  switch (s) {
    case Storage::f32: return "float32";
    case Storage::f16: return "float16";
    case Storage::bf16: return "bfloat16";
  }
  return "unknown";
}

template <class Array>
Storage storage_of(const Array& a, const char* name) {
  const nb::dlpack::dtype d = a.dtype();
  if (d == nb::dtype<float>()) return Storage::f32;
  if (d.lanes == 1 && d.bits == 16 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Float)) return Storage::f16;
  if (d.lanes == 1 && d.bits == 16 && d.code == static_cast<uint8_t>(nb::dlpack::dtype_code::Bfloat)) return Storage::bf16;
  fail_type(name, "float32, float16 or bfloat16 (float64 runs on the torch backend)", dtype_name(d));
}

template <class Array>
void check_storage(const Array& a, const char* name, Storage want) {
  const Storage got = storage_of(a, name);
  if (got != want) fail_type(name, std::string(storage_name(want)) + " (like the op's first tensor)", storage_name(got));
}

// A side input (explicit noise, target) may be stored like the op's tensors or as float32.
inline bool side_is_float(const OptionalInput& a, const OptionalInput& b, const char* name_a, const char* name_b, Storage storage) {
  std::optional<bool> is_float;
  for (auto [array, name] : {std::pair{&a, name_a}, std::pair{&b, name_b}}) {
    if (!array->has_value()) continue;
    const Storage s = storage_of(**array, name);
    if (s != storage && s != Storage::f32) {
      fail_type(name, std::string(storage_name(storage)) + " or float32", storage_name(s));
    }
    if (is_float.has_value() && *is_float != (s == Storage::f32)) {
      fail_type(name, std::string("the dtype of ") + name_a, storage_name(s));
    }
    is_float = s == Storage::f32;
  }
  return is_float.value_or(false);
}

// Where a module's arrays must live: kDLCPU for _C; kDLCUDA and one device id for _C_cuda.
struct Place {
  int32_t device_type;
  int32_t device_id;
};

template <class Array>
void check_place(const Array& a, const char* name, const Place& place) {
  const bool cpu = place.device_type == nb::device::cpu::value;
  if (a.device_type() != place.device_type || (!cpu && a.device_id() != place.device_id)) {
    const auto where = [](int32_t type, int32_t id) {
      return type == nb::device::cpu::value ? std::string("cpu") : type == nb::device::cuda::value ? "cuda:" + std::to_string(id) : "DLPack device " + std::to_string(type);
    };
    fail_value(name, "an array on " + where(place.device_type, place.device_id), "one on " + where(a.device_type(), a.device_id()));
  }
}

// Elements per sample of a [batch, ...] array whose samples are each contiguous (size-1 dims aside).
template <class Array>
int64_t sample_numel(const Array& a, const char* name, int64_t batch) {
  if (a.ndim() < 1 || static_cast<int64_t>(a.shape(0)) != batch) {
    fail_value(name, "an array of " + std::to_string(batch) + " samples", "shape " + shape_of(a));
  }
  int64_t expected_stride = 1;
  for (size_t i = a.ndim(); i-- > 1;) {
    if (a.shape(i) != 1 && a.stride(i) != expected_stride) {
      fail_value(name, "each sample contiguous", "stride " + std::to_string(a.stride(i)) + " in dim " + std::to_string(i) + " of shape " + shape_of(a));
    }
    expected_stride *= static_cast<int64_t>(a.shape(i));
  }
  return expected_stride;
}

template <class Array>
int64_t batch_stride(const Array& a) {
  return a.shape(0) > 1 ? static_cast<int64_t>(a.stride(0)) : 0;
}

// An array like `reference` (same samples, same per-sample size) with each sample contiguous.
template <class Array>
int64_t check_rows(const Array& a, const char* name, int64_t batch, int64_t per_sample, const Place& place) {
  check_place(a, name, place);
  const int64_t numel = sample_numel(a, name, batch);
  if (numel != per_sample) fail_value(name, std::to_string(per_sample) + " elements per sample", "shape " + shape_of(a));
  return batch_stride(a);
}

// A fully contiguous [batch, per_sample...] array.
template <class Array>
void check_contiguous(const Array& a, const char* name, int64_t batch, int64_t per_sample, const Place& place) {
  const int64_t stride = check_rows(a, name, batch, per_sample, place);
  if (batch > 1 && stride != per_sample) {
    fail_value(name, "a contiguous array (batch stride " + std::to_string(per_sample) + ")", "batch stride " + std::to_string(stride));
  }
}

// An output batch: each sample contiguous, and samples that do not overlap.
inline int64_t check_output_rows(const Output& a, const char* name, int64_t batch, int64_t per_sample, const Place& place) {
  const int64_t stride = check_rows(a, name, batch, per_sample, place);
  if (batch > 1 && stride < per_sample) {
    fail_value(name, "samples that do not overlap (batch stride >= " + std::to_string(per_sample) + ")", "batch stride " + std::to_string(stride));
  }
  return stride;
}

// Per-sample coefficients: float32, contiguous, exactly this shape.
inline const float* coefficients(const Input& a, const char* name, std::initializer_list<int64_t> shape, const Place& place) {
  check_place(a, name, place);
  if (a.dtype() != nb::dtype<float>()) fail_type(name, "float32 coefficients", dtype_name(a.dtype()));
  bool matches = a.ndim() == shape.size();
  int64_t expected_stride = 1;
  std::string wanted = "(";
  size_t i = 0;
  for (int64_t extent : shape) wanted += (i++ ? ", " : "") + std::to_string(extent);
  wanted += shape.size() == 1 ? ",)" : ")";
  for (size_t dim = shape.size(); matches && dim-- > 0;) {
    const int64_t extent = *(shape.begin() + dim);
    matches = static_cast<int64_t>(a.shape(dim)) == extent && (extent == 1 || a.stride(dim) == expected_stride);
    expected_stride *= extent;
  }
  if (!matches) fail_value(name, "a contiguous float32 array of shape " + wanted, "shape " + shape_of(a));
  return static_cast<const float*>(a.data());
}

inline int64_t checked_int(int64_t value, const char* name, int64_t low, int64_t high) {
  if (value < low || value > high) {
    fail_value(name, "an int in [" + std::to_string(low) + ", " + std::to_string(high) + "]", std::to_string(value));
  }
  return value;
}

// ------------------------------------------------------------------ op arguments from arrays

inline MrStepArgs mr_step_args(const Output& out, const Input& x, const std::vector<Input>& terms, const Input& coefs,
                               const OptionalInput& noise_coef, const OptionalInput& noise, uint64_t seed, uint64_t offset,
                               const Place& place) {
  MrStepArgs args{};
  args.storage = storage_of(x, "x");
  if (x.ndim() < 1) fail_value("x", "an array with a batch dimension", "a 0-dim array");
  args.batch = static_cast<int64_t>(x.shape(0));
  args.per_sample = args.batch ? static_cast<int64_t>(x.size()) / args.batch : 0;
  check_contiguous(x, "x", args.batch, args.per_sample, place);
  check_storage(out, "out", args.storage);
  check_contiguous(out, "out", args.batch, args.per_sample, place);
  if (terms.empty() || terms.size() > static_cast<size_t>(kMaxTerms)) {
    fail_value("terms", "1 to " + std::to_string(kMaxTerms) + " arrays", std::to_string(terms.size()));
  }
  args.num_terms = static_cast<int>(terms.size());
  for (size_t k = 0; k < terms.size(); ++k) {
    const std::string name = "terms[" + std::to_string(k) + "]";
    check_storage(terms[k], name.c_str(), args.storage);
    check_contiguous(terms[k], name.c_str(), args.batch, args.per_sample, place);
    args.terms[k] = terms[k].data();
  }
  args.coefs = coefficients(coefs, "coefs", {args.batch, args.num_terms + 1}, place);
  args.noise_coef = noise_coef ? coefficients(*noise_coef, "noise_coef", {args.batch}, place) : nullptr;
  if (noise) {
    if (!noise_coef) fail_value("noise", "None when noise_coef is None", "an array");
    check_contiguous(*noise, "noise", args.batch, args.per_sample, place);
  }
  args.side_is_float = side_is_float(noise, std::nullopt, "noise", "noise", args.storage);
  args.out = out.data();
  args.x = x.data();
  args.noise = noise ? noise->data() : nullptr;
  args.seed = seed;
  args.offset = offset;
  return args;
}

inline NoiseInjectArgs noise_inject_args(const Output& out_x, const Input& x0, const Input& x_coefs, const OptionalInput& mu,
                                         const OptionalInput& noise_x, const std::optional<Output>& out_y, const OptionalInput& y0,
                                         const OptionalInput& y_coefs, const OptionalInput& noise_y, uint64_t seed, uint64_t offset,
                                         const Place& place) {
  NoiseInjectArgs args{};
  args.storage = storage_of(x0, "x0");
  if (x0.ndim() < 1) fail_value("x0", "an array with a batch dimension", "a 0-dim array");
  args.batch = static_cast<int64_t>(x0.shape(0));
  args.x_numel = args.batch ? static_cast<int64_t>(x0.size()) / args.batch : 0;
  args.x0 = {x0.data(), check_rows(x0, "x0", args.batch, args.x_numel, place)};
  check_storage(out_x, "out_x", args.storage);
  args.out_x = {out_x.data(), check_output_rows(out_x, "out_x", args.batch, args.x_numel, place)};
  args.x_coefs = coefficients(x_coefs, "x_coefs", {args.batch, 2}, place);
  if (mu) {
    check_storage(*mu, "mu", args.storage);
    args.mu = {mu->data(), check_rows(*mu, "mu", args.batch, args.x_numel, place)};
  }
  if (out_y.has_value() != y0.has_value()) fail_value("out_y", "an array exactly when y0 is given", out_y ? "an array" : "None");
  if (y_coefs && !y0) fail_value("y_coefs", "None when y0 is None", "an array");
  if (noise_y && !y_coefs) fail_value("noise_y", "None when y is not noised (y_coefs None)", "an array");
  if (y_coefs && (noise_x.has_value() != noise_y.has_value())) fail_value("noise_y", "an array exactly when noise_x is given", noise_y ? "an array" : "None");
  if (y0) {
    check_storage(*y0, "y0", args.storage);
    args.y_numel = args.batch ? static_cast<int64_t>(y0->size()) / args.batch : 0;
    args.y0 = {y0->data(), check_rows(*y0, "y0", args.batch, args.y_numel, place)};
    check_storage(*out_y, "out_y", args.storage);
    args.out_y = {out_y->data(), check_output_rows(*out_y, "out_y", args.batch, args.y_numel, place)};
    if (y_coefs) args.y_coefs = coefficients(*y_coefs, "y_coefs", {args.batch, 2}, place);
  }
  args.side_is_float = side_is_float(noise_x, noise_y, "noise_x", "noise_y", args.storage);
  if (noise_x) args.noise_x = {noise_x->data(), check_rows(*noise_x, "noise_x", args.batch, args.x_numel, place)};
  if (noise_y) args.noise_y = {noise_y->data(), check_rows(*noise_y, "noise_y", args.batch, args.y_numel, place)};
  args.seed = seed;
  args.offset = offset;
  return args;
}

inline WeightedScoreLossArgs weighted_score_loss_args(const Output& loss, const Output& grad, const Input& output, const Input& coefs,
                                                      int64_t split, const OptionalInput& noise, const OptionalInput& target,
                                                      uint64_t seed, uint64_t offset, const Place& place) {
  WeightedScoreLossArgs args{};
  args.storage = storage_of(output, "output");
  if (output.ndim() < 1) fail_value("output", "an array with a batch dimension", "a 0-dim array");
  args.batch = static_cast<int64_t>(output.shape(0));
  args.per_sample = args.batch ? static_cast<int64_t>(output.size()) / args.batch : 0;
  check_contiguous(output, "output", args.batch, args.per_sample, place);
  check_storage(grad, "grad", args.storage);
  check_contiguous(grad, "grad", args.batch, args.per_sample, place);
  check_place(loss, "loss", place);
  if (loss.dtype() != nb::dtype<float>() || loss.ndim() != 1 || static_cast<int64_t>(loss.shape(0)) != args.batch ||
      (args.batch > 1 && loss.stride(0) != 1)) {
    fail_value("loss", "a contiguous float32 array of shape (" + std::to_string(args.batch) + ",)", dtype_name(loss.dtype()) + " of shape " + shape_of(loss));
  }
  args.segments = split > 0 ? 2 : 1;
  args.split = split > 0 ? checked_int(split, "split", 1, args.per_sample - 1) : args.per_sample;
  args.coefs = coefficients(coefs, "coefs", {args.batch, args.segments, 3}, place);
  if (noise) check_contiguous(*noise, "noise", args.batch, args.per_sample, place);
  if (target) check_contiguous(*target, "target", args.batch, args.per_sample, place);
  args.side_is_float = side_is_float(noise, target, "noise", "target", args.storage);
  args.loss = static_cast<float*>(loss.data());
  args.grad = grad.data();
  args.output = output.data();
  args.noise = noise ? noise->data() : nullptr;
  args.target = target ? target->data() : nullptr;
  args.seed = seed;
  args.offset = offset;
  return args;
}

}  // namespace msdiff::bind
