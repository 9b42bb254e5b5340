// msdiff_fast._C_cuda: the CUDA kernels. Arrays arrive through DLPack (zero-copy views of torch
// tensors on one GPU); the kernels run on the stream handle passed from Python
// (torch.cuda.current_stream().cuda_stream), since nanobind knows nothing of streams. Importing
// touches no CUDA API, so the module imports on a machine without a GPU or driver and
// device_status() says why it cannot run there.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings/arrays.h"
#include "cuda/cuda_ops.h"

namespace nb = nanobind;
using namespace nb::literals;
using msdiff::bind::Input;
using msdiff::bind::OptionalInput;
using msdiff::bind::Output;

namespace {

// The GPU of the op's first tensor: every other array must be there too.
template <class Array>
msdiff::bind::Place gpu_of(const Array& a, const char* name) {
  if (a.device_type() != nb::device::cuda::value) {
    msdiff::bind::fail_value(name, "an array on a CUDA device", "DLPack device type " + std::to_string(a.device_type()));
  }
  return {nb::device::cuda::value, a.device_id()};
}

void mr_step(Output out, Input x, std::vector<Input> terms, Input coefs, OptionalInput noise_coef, OptionalInput noise, uint64_t seed,
             uint64_t offset, uintptr_t stream) {
  const msdiff::bind::Place gpu = gpu_of(x, "x");
  const msdiff::MrStepArgs args = msdiff::bind::mr_step_args(out, x, terms, coefs, noise_coef, noise, seed, offset, gpu);
  msdiff::cuda::set_device(gpu.device_id);
  msdiff::cuda::mr_step(args, stream);
}

void noise_inject(Output out_x, Input x0, Input x_coefs, OptionalInput mu, OptionalInput noise_x, std::optional<Output> out_y,
                  OptionalInput y0, OptionalInput y_coefs, OptionalInput noise_y, uint64_t seed, uint64_t offset, uintptr_t stream) {
  const msdiff::bind::Place gpu = gpu_of(x0, "x0");
  const msdiff::NoiseInjectArgs args =
      msdiff::bind::noise_inject_args(out_x, x0, x_coefs, mu, noise_x, out_y, y0, y_coefs, noise_y, seed, offset, gpu);
  msdiff::cuda::set_device(gpu.device_id);
  msdiff::cuda::noise_inject(args, stream);
}

void weighted_score_loss(Output loss, Output grad, Input output, Input coefs, int64_t split, OptionalInput noise, OptionalInput target,
                         Output partial_sums, uint64_t seed, uint64_t offset, uintptr_t stream) {
  const msdiff::bind::Place gpu = gpu_of(output, "output");
  const msdiff::WeightedScoreLossArgs args =
      msdiff::bind::weighted_score_loss_args(loss, grad, output, coefs, split, noise, target, seed, offset, gpu);
  const int64_t tiles = (args.per_sample + msdiff::cuda::kLossTile - 1) / msdiff::cuda::kLossTile;
  msdiff::bind::check_place(partial_sums, "partial_sums", gpu);
  const bool contiguous = partial_sums.ndim() == 1 && (partial_sums.shape(0) <= 1 || partial_sums.stride(0) == 1);
  if (partial_sums.dtype() != nb::dtype<float>() || !contiguous || static_cast<int64_t>(partial_sums.shape(0)) < args.batch * tiles) {
    msdiff::bind::fail_value("partial_sums", "a contiguous float32 array of at least " + std::to_string(args.batch * tiles) + " elements (batch * tiles)",
                             msdiff::bind::dtype_name(partial_sums.dtype()) + " of shape " + msdiff::bind::shape_of(partial_sums));
  }
  msdiff::cuda::set_device(gpu.device_id);
  msdiff::cuda::weighted_score_loss(args, static_cast<float*>(partial_sums.data()), stream);
}

void philox_normals(Output out, uint64_t seed, uint64_t offset, uintptr_t stream) {
  const msdiff::bind::Place gpu = gpu_of(out, "out");
  if (out.dtype() != nb::dtype<float>() || out.ndim() != 1 || (out.shape(0) > 1 && out.stride(0) != 1)) {
    msdiff::bind::fail_value("out", "a contiguous 1-d float32 array", msdiff::bind::dtype_name(out.dtype()) + " of shape " + msdiff::bind::shape_of(out));
  }
  msdiff::cuda::set_device(gpu.device_id);
  msdiff::cuda::philox_normals(static_cast<float*>(out.data()), static_cast<int64_t>(out.shape(0)), seed, offset, stream);
}

std::optional<std::string> device_status(int device) {
  std::string reason = msdiff::cuda::device_status(device);
  if (reason.empty()) return std::nullopt;
  return reason;
}

}  // namespace

NB_MODULE(_C_cuda, m) {
  m.doc() = "msdiff_fast's CUDA kernels (see msdiff_fast/ops/compiled.py for the torch-facing wrappers)";
  m.def("mr_step", &mr_step, "out"_a.noconvert(), "x"_a, "terms"_a, "coefs"_a, "noise_coef"_a.none(), "noise"_a.none(), "seed"_a,
        "offset"_a, "stream"_a,
        "out = coefs[:, 0] x + sum_k coefs[:, k + 1] terms[k] (+ noise_coef z) per sample, on `stream`.");
  m.def("noise_inject", &noise_inject, "out_x"_a.noconvert(), "x0"_a, "x_coefs"_a, "mu"_a.none(), "noise_x"_a.none(),
        "out_y"_a.noconvert().none(), "y0"_a.none(), "y_coefs"_a.none(), "noise_y"_a.none(), "seed"_a, "offset"_a, "stream"_a,
        "x_t = a x0 + (1 - a) mu + s z_x and y_t = a_y y0 + s_y z_y per sample, on `stream`.");
  m.def("weighted_score_loss", &weighted_score_loss, "loss"_a.noconvert(), "grad"_a.noconvert(), "output"_a, "coefs"_a, "split"_a,
        "noise"_a.none(), "target"_a.none(), "partial_sums"_a.noconvert(), "seed"_a, "offset"_a, "stream"_a,
        "loss[b] = sum w_g (output - k_g z - c_g target)^2 and grad = 2 w_g r, reduced deterministically through partial_sums.");
  m.def("philox_normals", &philox_normals, "out"_a.noconvert(), "seed"_a, "offset"_a, "stream"_a,
        "out[i] = the noise stream's normal at position offset + i, on `stream`.");
  m.def("device_status", &device_status, "device"_a, "None when the kernels can run on this GPU, else the reason.");
  m.attr("LOSS_TILE") = msdiff::cuda::kLossTile;
}
