"""Smoke test of an installed msdiff_fast, run from outside the source tree against a wheel in a
fresh environment (scripts/check_compat.sh, cibuildwheel's test command).

Checks, in order, and stops at the first failure with one line saying what failed:
  1. the package imports (from site-packages, not a checkout) and ``backends()`` answers;
  2. the compiled CPU backend runs every op (and, with --expect-cuda-module, the CUDA module
     was built into the wheel: it must import even on a machine without a GPU);
  3. MRSampler on the compiled backend matches the same sampler on the torch reference;
  4. mr_step, noise_inject and weighted_score_loss on every backend that can run here (cpu, and
     triton under its interpreter when triton is installed) match the torch reference on an odd
     size, the same Philox noise included.

Usage: python smoke_test.py [--expect-cuda-module] [--require-triton]
"""

import argparse
import os
import sys

import torch

# Triton runs on CPU tensors only under its interpreter, which must be chosen before it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import msdiff_fast as mf  # noqa: E402
from msdiff_fast import ops  # noqa: E402
from msdiff_fast.ops import compiled  # noqa: E402
from msdiff_fast.sde import MRSDE  # noqa: E402

OPS = ("mr_step", "noise_inject", "weighted_score_loss")
# float32 kernels against the float32 reference: only the order of operations differs.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# The sampler's first data prediction divides by alpha(T) = 0.005, which turns that rounding into
# about 1e-4 after five steps.
SAMPLER_TOLERANCE = dict(rtol=1e-3, atol=1e-3)


class SmokeFailure(Exception):
    pass


def expect_close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance=TOLERANCE) -> None:
    if got.shape != want.shape or not torch.allclose(got, want, **tolerance):
        error = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise SmokeFailure(
            f"{name}: expected the reference's values (shape {tuple(want.shape)}), got shape {tuple(got.shape)}, max error {error:.3g}"
        )


def check_ops(backend: str) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, shape = 3, (3, 7, 5)  # odd sizes: no block or vector boundary lines up
    x = torch.randn(batch, *shape, generator=generator)
    terms = [torch.randn(batch, *shape, generator=generator) for _ in range(2)]
    coefs = torch.rand(batch, 3, generator=generator)
    noise_coef = torch.rand(batch, generator=generator)
    seed, offset = 1234, 5

    def both(op):
        return op("torch"), op(backend)

    want, got = both(lambda b: ops.mr_step(x, terms, coefs, noise_coef, seed=seed, offset=offset, backend=b))
    expect_close(f"mr_step on {backend}", got, want)

    y0 = torch.randn(batch, 2, 7, 5, generator=generator)
    x_coefs, y_coefs = torch.rand(batch, 2, generator=generator), torch.rand(batch, 2, generator=generator)
    want, got = both(lambda b: ops.noise_inject(x, x_coefs, y0, y_coefs, seed=seed, offset=offset, backend=b))
    expect_close(f"noise_inject (x_t) on {backend}", got[0], want[0])
    expect_close(f"noise_inject (y_t) on {backend}", got[1], want[1])

    output = torch.randn(batch, *shape, generator=generator, requires_grad=True)
    loss_coefs = torch.rand(batch, 1, 3, generator=generator)

    def loss_and_grad(b):
        loss = ops.weighted_score_loss(output, loss_coefs, seed=seed, offset=offset, backend=b)
        (grad,) = torch.autograd.grad(loss.sum(), output)
        return loss.detach(), grad

    (want_loss, want_grad), (got_loss, got_grad) = both(loss_and_grad)
    expect_close(f"weighted_score_loss on {backend}", got_loss, want_loss)
    expect_close(f"weighted_score_loss gradient on {backend}", got_grad, want_grad)


def check_sampler() -> None:
    sde = MRSDE.from_irsde(50, T=100, schedule="cosine", eps=0.005)
    mu = torch.rand(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))

    def model(x_t, t, cond):  # any callable works; a fixed linear map keeps the run deterministic
        return 0.1 * (x_t - cond)

    def run(backend):
        sampler = mf.MRSampler(sde, steps=5, solver="sde", order=2, backend=backend)
        return sampler.sample(model, mu=mu, generator=torch.Generator().manual_seed(2))

    expect_close("MRSampler(solver='sde', order=2) on the cpu backend", run("cpu"), run("torch"), SAMPLER_TOLERANCE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-cuda-module", action="store_true", help="fail unless msdiff_fast._C_cuda was built and imports")
    parser.add_argument("--require-triton", action="store_true", help="fail unless the triton backend runs here")
    args = parser.parse_args()

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton_version}, msdiff_fast {mf.__version__} from {os.path.dirname(mf.__file__)}"
    )
    try:
        table = mf.backends()
        for op in OPS:
            print(f"  {op}: " + ", ".join(f"{backend} {status}" for backend, status in table[op].items()))
        if compiled.CPU_IMPORT_ERROR is not None:
            raise SmokeFailure(f"compiled cpu backend: expected msdiff_fast._C to import, got: {compiled.CPU_IMPORT_ERROR}")
        if args.expect_cuda_module and compiled.CUDA_IMPORT_ERROR is not None:
            raise SmokeFailure(f"CUDA module: expected msdiff_fast._C_cuda in the wheel, got: {compiled.CUDA_IMPORT_ERROR}")
        backends = ["cpu"]
        if table["mr_step"]["triton"] == "ok":
            backends.append("triton")
        elif args.require_triton:
            raise SmokeFailure(f"triton backend: expected it to run here, got: {table['mr_step']['triton']}")
        for backend in backends:
            check_ops(backend)
        check_sampler()
    except SmokeFailure as failure:
        print(f"FAILED: {failure}")
        return 1
    print(f"OK: import, backends(), MRSampler on cpu, 3 ops against the reference on {' and '.join(backends)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
