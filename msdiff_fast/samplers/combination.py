"""Linear combinations of tensors, evaluated by one fused ``mr_step`` call.

Samplers write each update as sum_k c_k * tensor_k (+ c_z * z) with scalar coefficients from
float64 schedule math; this class collects them (merging repeated tensors) and hands them to the
fused op, so one sampler step is one elementwise pass however many terms it has.
"""

import math
from typing import List, Optional, Tuple

import torch

from ..ops import mr_step


class Combination:
    def __init__(self, pairs=()):
        self.pairs: List[Tuple[torch.Tensor, float]] = []
        for tensor, coef in pairs:
            self.add(tensor, coef)

    def add(self, tensor: Optional[torch.Tensor], coef: float) -> "Combination":
        """Adds coef * tensor; a None tensor (no mu for VE/VP SDEs) adds nothing."""
        if tensor is None:
            return self
        coef = float(coef)
        for k, (existing, c) in enumerate(self.pairs):
            if existing is tensor:
                self.pairs[k] = (existing, c + coef)
                return self
        self.pairs.append((tensor, coef))
        return self

    def __add__(self, other: "Combination") -> "Combination":
        result = Combination(self.pairs)
        for tensor, coef in other.pairs:
            result.add(tensor, coef)
        return result

    def scaled(self, factor: float) -> "Combination":
        return Combination((t, c * factor) for t, c in self.pairs)

    def operands(self, like):
        """(x, terms, coefficients) of the ``mr_step`` call that evaluates the combination: the
        terms with non-zero coefficients, the first one as x (``like`` times 0 when none is left)."""
        pairs = [(t, c) for t, c in self.pairs if c != 0.0] or [(like, 0.0)]
        head, *rest = pairs
        if not rest:
            rest = [(head[0], 0.0)]
        return head[0], [t for t, _ in rest], [head[1]] + [c for _, c in rest]

    def evaluate(
        self,
        like: torch.Tensor,
        noise_coef: float = 0.0,
        seed: int = 0,
        offset: int = 0,
        backend: str = "auto",
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The combination as a tensor shaped like ``like`` (one mr_step call)."""
        x, terms, coefficients = self.operands(like)
        check_coefficients(coefficients, noise_coef)
        batch = like.shape[0]
        coefs = torch.tensor([coefficients], dtype=torch.float64).expand(batch, -1)
        coefs = coefs.to(like.device, non_blocking=True)
        noise = None
        if noise_coef != 0.0:
            noise = torch.full((batch,), noise_coef, dtype=torch.float64).to(like.device, non_blocking=True)
        return mr_step(x, terms, coefs, noise, seed=seed, offset=offset, out=out, backend=backend)


def check_coefficients(coefficients: List[float], noise_coef: float = 0.0) -> None:
    bad = [c for c in coefficients if not math.isfinite(c)] + ([noise_coef] if not math.isfinite(noise_coef) else [])
    if bad:
        raise FloatingPointError(
            f"sampler coefficients are not finite ({bad}); the time grid reaches a point where the schedule is singular"
        )
