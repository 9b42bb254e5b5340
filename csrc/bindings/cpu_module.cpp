// msdiff_fast._C: the CPU kernels. Arrays arrive through DLPack (zero-copy views of torch
// tensors); the work runs with the GIL released, on num_threads threads at most.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "bindings/arrays.h"
#include "cpu/cpu_ops.h"
#include "cpu/kernels.h"

namespace nb = nanobind;
using namespace nb::literals;
using msdiff::bind::Input;
using msdiff::bind::OptionalInput;
using msdiff::bind::Output;

namespace {

const msdiff::bind::Place kHost{nb::device::cpu::value, 0};

int threads(int64_t num_threads) { return static_cast<int>(msdiff::bind::checked_int(num_threads, "num_threads", 1, 1 << 16)); }

void mr_step(Output out, Input x, std::vector<Input> terms, Input coefs, OptionalInput noise_coef, OptionalInput noise, uint64_t seed,
             uint64_t offset, int64_t num_threads) {
  const msdiff::MrStepArgs args = msdiff::bind::mr_step_args(out, x, terms, coefs, noise_coef, noise, seed, offset, kHost);
  const int workers = threads(num_threads);
  nb::gil_scoped_release release;
  msdiff::cpu::mr_step(args, workers);
}

void noise_inject(Output out_x, Input x0, Input x_coefs, OptionalInput mu, OptionalInput noise_x, std::optional<Output> out_y,
                  OptionalInput y0, OptionalInput y_coefs, OptionalInput noise_y, uint64_t seed, uint64_t offset, int64_t num_threads) {
  const msdiff::NoiseInjectArgs args =
      msdiff::bind::noise_inject_args(out_x, x0, x_coefs, mu, noise_x, out_y, y0, y_coefs, noise_y, seed, offset, kHost);
  const int workers = threads(num_threads);
  nb::gil_scoped_release release;
  msdiff::cpu::noise_inject(args, workers);
}

void weighted_score_loss(Output loss, Output grad, Input output, Input coefs, int64_t split, OptionalInput noise, OptionalInput target,
                         uint64_t seed, uint64_t offset, int64_t num_threads) {
  const msdiff::WeightedScoreLossArgs args =
      msdiff::bind::weighted_score_loss_args(loss, grad, output, coefs, split, noise, target, seed, offset, kHost);
  const int workers = threads(num_threads);
  nb::gil_scoped_release release;
  msdiff::cpu::weighted_score_loss(args, workers);
}

void check_normals_out(const Output& out) {
  msdiff::bind::check_place(out, "out", kHost);
  if (out.dtype() != nb::dtype<float>() || out.ndim() != 1 || (out.shape(0) > 1 && out.stride(0) != 1)) {
    msdiff::bind::fail_value("out", "a contiguous 1-d float32 array", msdiff::bind::dtype_name(out.dtype()) + " of shape " + msdiff::bind::shape_of(out));
  }
}

void philox_normals(Output out, uint64_t seed, uint64_t offset, int64_t num_threads) {
  check_normals_out(out);
  const int workers = threads(num_threads);
  nb::gil_scoped_release release;
  msdiff::cpu::philox_normals(static_cast<float*>(out.data()), static_cast<int64_t>(out.shape(0)), seed, offset, workers);
}

void philox_normal_groups(Output out, uint64_t seed, uint64_t offset) {
  check_normals_out(out);
  nb::gil_scoped_release release;
  msdiff::cpu::philox_normal_groups(static_cast<float*>(out.data()), static_cast<int64_t>(out.shape(0)), seed, offset);
}

void philox_words(Output out, uint64_t seed, uint64_t offset) {
  msdiff::bind::check_place(out, "out", kHost);
  const bool contiguous = out.ndim() == 2 && out.shape(0) == 4 && out.stride(1) == 1 && out.stride(0) == static_cast<int64_t>(out.shape(1));
  if (out.dtype() != nb::dtype<int64_t>() || !contiguous) {
    msdiff::bind::fail_value("out", "a contiguous int64 array of shape (4, n)", msdiff::bind::dtype_name(out.dtype()) + " of shape " + msdiff::bind::shape_of(out));
  }
  nb::gil_scoped_release release;
  msdiff::cpu::philox_words(static_cast<int64_t*>(out.data()), static_cast<int64_t>(out.shape(1)), seed, offset);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "msdiff_fast's CPU kernels (see msdiff_fast/ops/compiled.py for the torch-facing wrappers)";
  m.def("mr_step", &mr_step, "out"_a.noconvert(), "x"_a, "terms"_a, "coefs"_a, "noise_coef"_a.none(), "noise"_a.none(), "seed"_a,
        "offset"_a, "num_threads"_a,
        "out = coefs[:, 0] x + sum_k coefs[:, k + 1] terms[k] (+ noise_coef z) per sample; out may be x.");
  m.def("noise_inject", &noise_inject, "out_x"_a.noconvert(), "x0"_a, "x_coefs"_a, "mu"_a.none(), "noise_x"_a.none(),
        "out_y"_a.noconvert().none(), "y0"_a.none(), "y_coefs"_a.none(), "noise_y"_a.none(), "seed"_a, "offset"_a, "num_threads"_a,
        "x_t = a x0 + (1 - a) mu + s z_x and y_t = a_y y0 + s_y z_y per sample, into per-sample-contiguous outputs.");
  m.def("weighted_score_loss", &weighted_score_loss, "loss"_a.noconvert(), "grad"_a.noconvert(), "output"_a, "coefs"_a, "split"_a,
        "noise"_a.none(), "target"_a.none(), "seed"_a, "offset"_a, "num_threads"_a,
        "loss[b] = sum w_g (output - k_g z - c_g target)^2 and grad = 2 w_g r; split 0 = one segment.");
  m.def("philox_normals", &philox_normals, "out"_a.noconvert(), "seed"_a, "offset"_a, "num_threads"_a,
        "out[i] = the noise stream's normal at position offset + i.");
  m.def("philox_normal_groups", &philox_normal_groups, "out"_a.noconvert(), "seed"_a, "offset"_a,
        "philox_normals through the CUDA kernels' group-of-four function, compiled for the host (for tests).");
  m.def("philox_words", &philox_words, "out"_a.noconvert(), "seed"_a, "offset"_a,
        "out[w, i] = word w of Philox4x32-10 at counter offset + i.");
  m.def("instruction_sets", &msdiff::cpu::instruction_sets, "The kernel variants this build and CPU can run, best first.");
  m.def("instruction_set", &msdiff::cpu::instruction_set, "The kernel variant in use.");
  m.def("use_instruction_set", &msdiff::cpu::use_instruction_set, "name"_a, "Run the kernels of another variant (for tests).");
  m.def("thread_pool", &msdiff::cpu::thread_pool,
        "'openmp': the ops run on the team of the OpenMP runtime already loaded (torch's); 'threads': on helper threads of their own.");
  m.def("use_thread_pool", &msdiff::cpu::use_thread_pool, "name"_a, "'openmp' (default, when loaded) or 'threads' (for tests and benchmarks).");
  m.attr("TILE") = msdiff::cpu::kTile;
  m.attr("LOSS_BLOCK") = msdiff::cpu::kLossBlock;
}
