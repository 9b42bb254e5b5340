"""A jointly Gaussian inverse problem in which every conditional score is known in closed form.

x0 ~ N(m, S) in R^d is observed as y = A x0 + n, n ~ N(0, gamma^2 I_m). Under linear SDEs without
mu (VE, VP, sub-VP), x_t = alpha_x x0 + sigma_x z and y_t = alpha_y y + sigma_y z' are jointly
Gaussian for every t, which gives the population minimisers of the conditional estimators'
objectives (Batzolis et al., arXiv 2111.13606) exactly:

- CDE regresses the x-noise on (x_t, y): its minimiser is the true conditional score
  grad log p_t(x_t | y) (their Theorem 1), whose reverse diffusion ends at the posterior p(x0 | y);
- CDiffE and CMDE regress the x-noise on (x_t, y_t): their minimiser is grad_x log p_t(x_t | y_t)
  of the joint diffusion, for any y-speed (CDiffE: y diffuses like x; CMDE: slower). Sampling plugs
  a diffusion y_t of the observed y into it, which is not grad log p_t(x_t | y): the bias that
  CMDE's slower y-speed shrinks (their Theorem 3) and that vanishes as sigma_y -> 0 (CDE).

Every score here is affine, score(x_t, v) = -P (x_t - b - G v) with v the observed y or y_t, so a
sampler driven by it keeps x Gaussian: ``sampling_moments`` propagates the mean and covariance of
the continuous-time reverse SDE or probability-flow ODE exactly (linear moment equations), and the
estimators' error is a distance between Gaussians (``gaussian_w2``, ``gaussian_kl``) with no
network and no Monte-Carlo error.
"""

import math
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ..sde import LinearSDE, MultiSpeedSDE, as_time, check_sde

F64 = torch.float64
CONDITIONINGS = ("clean", "fresh", "consistent")


class AffineScore(NamedTuple):
    """score(x, v) = -precision (x - offset - gain v), batched over times: [K, d, d], [K, d], [K, d, m]."""

    precision: torch.Tensor
    offset: torch.Tensor
    gain: torch.Tensor


class GaussianInverseProblem:
    """x0 ~ N(mean, cov) in R^d observed as y = operator x0 + n, n ~ N(0, noise_std^2 I_m); float64.

    ``super_resolution`` and ``inpainting`` build image-like instances (smooth random fields on a
    square grid, observed through average pooling or a mask). Samples are flat vectors [B, d].
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor, operator: torch.Tensor, noise_std: float):
        for name, value, ndim in (("mean", mean, 1), ("cov", cov, 2), ("operator", operator, 2)):
            if not isinstance(value, torch.Tensor) or value.ndim != ndim or not value.is_floating_point():
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}: expected a {ndim}-D floating-point tensor, got {got}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name}: expected finite values, found NaN or inf")
        d = mean.shape[0]
        if cov.shape != (d, d) or operator.shape[1] != d:
            raise ValueError(
                f"cov, operator: expected shapes ({d}, {d}) and (m, {d}) for a mean of size {d}, got {tuple(cov.shape)} and {tuple(operator.shape)}"
            )
        cov = cov.to(F64)
        if not torch.allclose(cov, cov.T) or float(torch.linalg.eigvalsh(cov)[0]) <= 0:
            raise ValueError("cov: expected a symmetric positive definite matrix")
        if (
            not isinstance(noise_std, (int, float))
            or isinstance(noise_std, bool)
            or not math.isfinite(noise_std)
            or noise_std < 0
        ):
            raise ValueError(f"noise_std: expected a finite number >= 0, got {noise_std!r}")
        self.mean, self.cov, self.operator = mean.to(F64), cov, operator.to(F64)
        self.noise_std = float(noise_std)
        self.dim, self.obs_dim = d, operator.shape[0]
        # Cov(y), the one matrix every conditioning step needs
        self.obs_cov = self.operator @ self.cov @ self.operator.T + self.noise_std**2 * torch.eye(self.obs_dim, dtype=F64)

    def __repr__(self):
        return f"GaussianInverseProblem(dim={self.dim}, obs_dim={self.obs_dim}, noise_std={self.noise_std})"

    @classmethod
    def super_resolution(cls, size: int = 8, factor: int = 2, **field) -> "GaussianInverseProblem":
        """A size x size smooth field observed through factor x factor average pooling (``smooth_field`` options)."""
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1 or not isinstance(size, int) or size % factor:
            raise ValueError(f"size, factor: expected ints with factor >= 1 dividing size, got {size!r}, {factor!r}")
        low = size // factor
        rows = torch.arange(size * size) // size // factor * low + torch.arange(size * size) % size // factor
        operator = torch.zeros(low * low, size * size, dtype=F64)
        operator[rows, torch.arange(size * size)] = 1.0 / factor**2
        return cls(*smooth_field(size, **_field_options(field)), operator, field.get("noise_std", 0.02))

    @classmethod
    def inpainting(cls, size: int = 8, hole: int = 4, **field) -> "GaussianInverseProblem":
        """A size x size smooth field observed outside a central hole x hole square (``smooth_field`` options)."""
        if not isinstance(hole, int) or isinstance(hole, bool) or not isinstance(size, int) or not 0 < hole < size:
            raise ValueError(f"size, hole: expected ints with 0 < hole < size, got {size!r}, {hole!r}")
        start = (size - hole) // 2
        inside = torch.zeros(size, size, dtype=torch.bool)
        inside[start : start + hole, start : start + hole] = True
        operator = torch.eye(size * size, dtype=F64)[~inside.flatten()]
        return cls(*smooth_field(size, **_field_options(field)), operator, field.get("noise_std", 0.02))

    def sample(self, batch: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(x0 [batch, d], y [batch, m]) drawn from the joint distribution."""
        x0 = self.mean + torch.randn(batch, self.dim, generator=generator, dtype=F64) @ torch.linalg.cholesky(self.cov).T
        return x0, x0 @ self.operator.T + self.noise_std * torch.randn(batch, self.obs_dim, generator=generator, dtype=F64)

    def posterior(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean [d], cov [d, d]) of p(x0 | y) for one observation y [m]."""
        y = self._check_observation(y)
        gain = torch.linalg.solve(self.obs_cov, self.operator @ self.cov).T
        return self.mean + gain @ (y - self.operator @ self.mean), self.cov - gain @ self.operator @ self.cov

    def score_coefficients(self, x_sde: LinearSDE, t, y_sde: Optional[LinearSDE] = None) -> AffineScore:
        """grad_x log p_t(x_t | v) at times t (a float or [K]) as an AffineScore.

        v is y itself when ``y_sde`` is None (CDE's clean condition), else y_t diffused by ``y_sde``.
        Conditioning the joint Gaussian of (x_t, v): G = C_xv C_vv^-1, P = (C_xx - G C_vx)^-1,
        b = E[x_t] - G E[v].
        """
        _check_sde(x_sde, "x_sde")
        if y_sde is not None:
            _check_sde(y_sde, "y_sde")
        t = as_time(t).reshape(-1)
        eye_x = torch.eye(self.dim, dtype=F64)
        eye_y = torch.eye(self.obs_dim, dtype=F64)
        alpha_x, sigma_x = (v.reshape(-1, 1, 1) for v in (x_sde.alpha(t), x_sde.sigma(t)))
        alpha_y, sigma_y = (
            (torch.ones_like(alpha_x), torch.zeros_like(sigma_x))
            if y_sde is None
            else (v.reshape(-1, 1, 1) for v in (y_sde.alpha(t), y_sde.sigma(t)))
        )
        cov_xx = alpha_x**2 * self.cov + sigma_x**2 * eye_x
        cov_xv = alpha_x * alpha_y * (self.cov @ self.operator.T)
        cov_vv = alpha_y**2 * self.obs_cov + sigma_y**2 * eye_y
        gain = torch.linalg.solve(cov_vv, cov_xv.transpose(1, 2)).transpose(1, 2)
        precision = torch.linalg.inv(cov_xx - gain @ cov_xv.transpose(1, 2))
        precision = 0.5 * (precision + precision.transpose(1, 2))
        offset = alpha_x[:, :, 0] * self.mean - alpha_y[:, :, 0] * (gain @ (self.operator @ self.mean))
        return AffineScore(precision, offset, gain)

    def conditional_score(self, x_sde: LinearSDE, y: torch.Tensor) -> Callable:
        """CDE's ideal score: model(x_t [B, d], t [B], cond) -> grad log p_t(x_t | y) (cond ignored)."""
        y = self._check_observation(y)
        _check_sde(x_sde, "x_sde")
        return lambda x_t, t, cond=None: self._apply(x_sde, None, x_t, t, y.expand(x_t.shape[0], -1))

    def joint_score(self, sde: MultiSpeedSDE) -> Callable:
        """CDiffE's / CMDE's ideal score: model(x_t [B, d], t [B], y_t [B, m]) -> grad_x log p_t(x_t | y_t).

        For ``samplers.conditioned_model`` and ``pc_sample``, like the estimators' sampling models.
        """
        if not isinstance(sde, MultiSpeedSDE) or sde.y is None:
            raise TypeError(f"sde: expected a MultiSpeedSDE(x_sde, y_sde), got {sde!r}")
        _check_sde(sde.x, "sde.x")
        _check_sde(sde.y, "sde.y")
        return lambda x_t, t, y_t: self._apply(sde.x, sde.y, x_t, t, y_t)

    def _apply(self, x_sde, y_sde, x_t, t, v):
        if x_t.ndim != 2 or x_t.shape[1] != self.dim or v.shape != (x_t.shape[0], self.obs_dim):
            raise ValueError(
                f"x_t, y: expected [B, {self.dim}] and [B, {self.obs_dim}], got {tuple(x_t.shape)} and {tuple(v.shape)}"
            )
        t = as_time(t).reshape(-1).expand(x_t.shape[0])
        x, v = x_t.to(F64), v.to(F64)
        # samplers call with one time for the whole batch: one set of coefficients per distinct t
        times, index = torch.unique(t, return_inverse=True)
        P, b, G = self.score_coefficients(x_sde, times, y_sde)
        if times.numel() == 1:
            return ((b[0] + v @ G[0].T - x) @ P[0]).to(x_t.dtype)
        centre = b[index] + torch.einsum("bdm,bm->bd", G[index], v)
        return torch.einsum("bd,bde->be", centre - x, P[index]).to(x_t.dtype)

    def sampling_moments(
        self,
        y: torch.Tensor,
        x_sde: LinearSDE,
        y_sde: Optional[LinearSDE] = None,
        conditioning: Optional[str] = None,
        solver: str = "sde",
        steps: int = 400,
        t_end: Optional[float] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean [d], cov [d, d]) of x at t_end for the continuous-time sampler driven by an ideal score.

        The sampler starts from x_sde's prior N(0, prior_std^2 I) at T and runs the reverse SDE
        dx = [f x - g^2 s] dt + g dw (solver "sde", what predictor-corrector, Euler-Maruyama and MR
        Sampler SDE solvers discretise) or the probability-flow ODE dx = [f x - g^2 s / 2] dt ("ode").
        s is CDE's score (``y_sde`` None, conditioning "clean") or the joint score of (x, y_sde) at
        y_t = (conditioning, default "fresh"):
          "clean": the observed y;
          "fresh": a new draw from p(y_t | y) at every call. The score is affine in y_t and the draws
            are independent, so their effect on x vanishes with the step size: the continuous-time
            limit is y_t = E[y_t | y] = alpha_y y (for VE the same as "clean");
          "consistent": one path y_t = alpha_y (y + w_t), w a Brownian motion in sigma_y^2 / alpha_y^2,
            which enters the state (x, w) of the moment equations.
        The linear moment equations m' = J m + k, C' = J C + C J^T + Q are integrated by RK4 on
        ``steps`` equal steps of the half log-SNR of x_sde (scale-free: |J| stays O(1) per unit).
        """
        y = self._check_observation(y)
        _check_sde(x_sde, "x_sde")
        if conditioning is None:
            conditioning = "clean" if y_sde is None else "fresh"
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}")
        if y_sde is None and conditioning != "clean":
            raise ValueError(f"conditioning: expected 'clean' without y_sde (CDE never diffuses y), got {conditioning!r}")
        if solver not in ("sde", "ode"):
            raise ValueError(f"solver: expected 'sde' or 'ode', got {solver!r}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        t_end = float(x_sde.t_end if t_end is None else t_end)
        if not 0 < t_end < x_sde.T or not math.isfinite(float(x_sde.lam(t_end))):
            raise ValueError(f"t_end: expected a time in (0, T = {x_sde.T}) with sigma > 0, got {t_end}")

        lams = torch.linspace(float(x_sde.lam(x_sde.T)), float(x_sde.lam(t_end)), 2 * steps + 1, dtype=F64)
        times = x_sde.t_of_lam(lams)
        times[0], times[-1] = x_sde.T, t_end
        score = self.score_coefficients(x_sde, times, y_sde)
        weight = 1.0 if solver == "sde" else 0.5
        # d tau / d lam with tau = T - t: the reverse process runs forward in tau while lam grows
        dtau = (-1.0 / (x_sde.f(times) - x_sde.dsigma2_dt(times) / (2 * x_sde.sigma(times) ** 2))).reshape(-1, 1, 1)
        f, g2 = x_sde.f(times).reshape(-1, 1, 1), x_sde.g2(times).reshape(-1, 1, 1)
        d, m = self.dim, self.obs_dim
        with_path = conditioning == "consistent"
        n = d + (m if with_path else 0)
        jacobian = torch.zeros(times.numel(), n, n, dtype=F64)
        forcing = torch.zeros(times.numel(), n, dtype=F64)
        diffusion = torch.zeros(times.numel(), n, n, dtype=F64)
        pull = weight * g2 * score.precision
        jacobian[:, :d, :d] = -(f * torch.eye(d, dtype=F64) + pull)
        alpha_y = torch.ones_like(times) if y_sde is None or conditioning == "clean" else y_sde.alpha(times)
        centre = score.offset + torch.einsum("kdm,k,m->kd", score.gain, alpha_y, y)
        forcing[:, :d] = torch.einsum("kde,ke->kd", pull, centre)
        if solver == "sde":
            diffusion[:, :d, :d] = g2 * torch.eye(d, dtype=F64)
        if with_path:
            # y_t = alpha_y (y + w): backwards in time w is a Brownian bridge to 0 in v = sigma_y^2 / alpha_y^2,
            # dw = -(v' / v) w dtau + sqrt(v') dB with v' = g_y^2 / alpha_y^2
            g2_y, sigma_y = y_sde.g2(times).reshape(-1, 1, 1), y_sde.sigma(times).reshape(-1, 1, 1)
            jacobian[:, :d, d:] = pull @ score.gain * alpha_y.reshape(-1, 1, 1)
            jacobian[:, d:, d:] = -(g2_y / sigma_y**2) * torch.eye(m, dtype=F64)
            diffusion[:, d:, d:] = g2_y / alpha_y.reshape(-1, 1, 1) ** 2 * torch.eye(m, dtype=F64)
        jacobian, forcing, diffusion = jacobian * dtau, forcing * dtau[..., 0], diffusion * dtau

        def derivative(node, mean, cov):
            flow = jacobian[node] @ cov
            return jacobian[node] @ mean + forcing[node], flow + flow.T + diffusion[node]

        mean = torch.zeros(n, dtype=F64)
        cov = torch.zeros(n, n, dtype=F64)
        cov[:d, :d] = x_sde.prior_std**2 * torch.eye(d, dtype=F64)
        if with_path:
            cov[d:, d:] = float(y_sde.sigma(x_sde.T) / y_sde.alpha(x_sde.T)) ** 2 * torch.eye(m, dtype=F64)
        h = float(lams[-1] - lams[0]) / steps
        for step in range(steps):
            node = 2 * step
            k1 = derivative(node, mean, cov)
            k2 = derivative(node + 1, mean + 0.5 * h * k1[0], cov + 0.5 * h * k1[1])
            k3 = derivative(node + 1, mean + 0.5 * h * k2[0], cov + 0.5 * h * k2[1])
            k4 = derivative(node + 2, mean + h * k3[0], cov + h * k3[1])
            mean = mean + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            cov = cov + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        cov = cov[:d, :d]
        return mean[:d], 0.5 * (cov + cov.T)

    def _check_observation(self, y) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.shape != (self.obs_dim,) or not torch.isfinite(y).all():
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected one finite observation of shape ({self.obs_dim},), got {got}")
        return y.to(F64)


def smooth_field(
    size: int, mean: float = 0.5, std: float = 0.25, length_scale: float = 1.5, nugget: float = 1e-3
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], cov [d, d]) of an image-like Gaussian field on a size x size grid (d = size^2):
    squared-exponential correlation with ``length_scale`` pixels plus independent pixel noise of
    variance ``nugget`` (which keeps the covariance, and every posterior, well conditioned)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    for name, value in (("std", std), ("length_scale", length_scale), ("nugget", nugget)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).reshape(-1, 2).to(F64)
    squared = ((grid[:, None] - grid[None]) ** 2).sum(-1)
    cov = std**2 * torch.exp(-squared / (2 * length_scale**2)) + nugget * torch.eye(size * size, dtype=F64)
    return torch.full((size * size,), float(mean), dtype=F64), cov


def _field_options(options: dict) -> dict:
    allowed = {"mean", "std", "length_scale", "nugget", "noise_std"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; expected some of {sorted(allowed)}")
    return {k: v for k, v in options.items() if k != "noise_std"}


def _check_sde(sde, name: str) -> None:
    check_sde(sde, name)
    if sde.mean_reverting:
        raise ValueError(f"{name}: expected an SDE without mu (VE, VP, sub-VP), got {sde!r}")


def gaussian_w2(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """2-Wasserstein distance between N(mean1, cov1) and N(mean2, cov2):
    W2^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2)."""
    root2 = _sqrtm(cov2.to(F64))
    cross = _sqrtm(root2 @ cov1.to(F64) @ root2)
    squared = float(((mean1 - mean2).to(F64) ** 2).sum() + torch.trace(cov1.to(F64) + cov2.to(F64) - 2 * cross))
    return math.sqrt(max(squared, 0.0))


def gaussian_kl(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """KL(N(mean1, cov1) || N(mean2, cov2)) in nats."""
    cov1, cov2 = cov1.to(F64), cov2.to(F64)
    delta = (mean2 - mean1).to(F64)
    chol2 = torch.linalg.cholesky(cov2)
    trace = torch.cholesky_solve(cov1, chol2).diagonal().sum()
    mahalanobis = delta @ torch.cholesky_solve(delta[:, None], chol2)[:, 0]
    log_det = 2 * torch.log(chol2.diagonal()).sum() - torch.logdet(cov1)
    return 0.5 * float(trace + mahalanobis - delta.numel() + log_det)


def _sqrtm(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T
