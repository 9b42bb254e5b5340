"""Image-restoration metrics of the paper (cmde.md section 5): PSNR, SSIM, consistency,
diversity, FID / joint FID and LPIPS.

Images are float tensors [B, C, H, W] in [0, data_range] (default [0, 1]); per-image metrics
return float64 tensors [B]. PSNR and SSIM are computed on the 0-255 scale like the paper.
Nothing is ever downloaded: pretrained networks are read from files the user already has.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .training.checkpoint import file_in, load_data

PathLike = Union[str, "os.PathLike[str]"]
INCEPTION_FILE = "inception-2015-12-05.pt"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision ImageNet AlexNet
LPIPS_ALEX_FILE = "alex.pth"  # LPIPS v0.1 linear heads


# ---------------------------------------------------------------------------- input checks
def _check_image(name: str, t, ndim: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def _check_pair(name_a: str, a, name_b: str, b) -> None:
    _check_image(name_a, a)
    _check_image(name_b, b)
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction: expected 'none' or 'mean', got {reduction!r}")


def _to_255(x, data_range, crop_border, y_channel, quantize) -> torch.Tensor:
    """Float64 copy on the 0-255 scale, optionally quantised, Y-only and border-cropped."""
    x = x.to(torch.float64) * (255.0 / data_range)
    if quantize:  # the uint8 round trip most papers' saved PNGs go through
        x = x.round().clamp(0, 255)
    if y_channel:
        if x.shape[1] != 3:
            raise ValueError(f"y_channel=True needs 3 RGB channels, got {x.shape[1]}")
        # ITU-R BT.601 luma as in MATLAB rgb2ycbcr (the SR convention): range [16, 235].
        coeffs = x.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255.0
        x = 16.0 + (x * coeffs).sum(dim=1, keepdim=True)
    if crop_border:
        x = x[..., crop_border:-crop_border, crop_border:-crop_border]
    return x


# ---------------------------------------------------------------------------- PSNR / SSIM
def psnr(x, y, *, data_range=1.0, crop_border=0, y_channel=False, quantize=False, reduction="none") -> torch.Tensor:
    """Per-image PSNR in dB on the 0-255 scale; identical images give +inf (no cap)."""
    _check_pair("x", x, "y", y)
    a = _to_255(x, data_range, crop_border, y_channel, quantize)
    b = _to_255(y, data_range, crop_border, y_channel, quantize)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return _reduce(10.0 * torch.log10(255.0**2 / mse), reduction)


def _gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # separable: outer(g, g) is MATLAB's fspecial('gaussian', 11, 1.5)


def ssim(x, y, *, data_range=1.0, crop_border=0, y_channel=False, quantize=False, reduction="none") -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, MATLAB ssim_index): 11x11 Gaussian window, sigma 1.5,
    K1=0.01, K2=0.03, L=255, 'valid' filtering, mean over pixels then channels; float64."""
    _check_pair("x", x, "y", y)
    a = _to_255(x, data_range, crop_border, y_channel, quantize)
    b = _to_255(y, data_range, crop_border, y_channel, quantize)
    size, channels = 11, a.shape[1]
    if min(a.shape[-2:]) < size:
        raise ValueError(f"x: SSIM needs H, W >= {size} after cropping, got {tuple(a.shape[-2:])}")
    g = _gaussian_window(size, 1.5, a.device)
    # All five local moments in one grouped, separable 'valid' convolution.
    stack = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    groups = stack.shape[1]
    stack = F.conv2d(stack, g.view(1, 1, size, 1).expand(groups, 1, size, 1), groups=groups)
    stack = F.conv2d(stack, g.view(1, 1, 1, size).expand(groups, 1, 1, size), groups=groups)
    mu_a, mu_b, e_aa, e_bb, e_ab = stack.split(channels, dim=1)
    var_a, var_b, cov = e_aa - mu_a**2, e_bb - mu_b**2, e_ab - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return _reduce(ssim_map.mean(dim=(2, 3)).mean(dim=1), reduction)


def consistency(x_hat, x, operator: Callable[[torch.Tensor], torch.Tensor], **psnr_kwargs):
    """Measurement consistency: PSNR of operator(x_hat) vs operator(x), per image."""
    _check_pair("x", x, "x_hat", x_hat)
    measured_hat, measured = operator(x_hat), operator(x)
    _check_pair("operator(x)", measured, "operator(x_hat)", measured_hat)
    return psnr(measured_hat, measured, **psnr_kwargs)


def diversity(samples, *, data_range=1.0, unbiased=False) -> torch.Tensor:
    """samples [S, B, C, H, W]: mean over pixels of the per-pixel std over the S samples,
    on the 0-255 scale, per input [B]. Population std (numpy's default) unless unbiased."""
    _check_image("samples", samples, ndim=5)
    if samples.shape[0] < 2:
        raise ValueError(f"samples: expected at least 2 samples along dim 0, got {samples.shape[0]}")
    s = samples.to(torch.float64) * (255.0 / data_range)
    return s.std(dim=0, correction=int(unbiased)).flatten(1).mean(dim=1)


def image_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor,
    operator: Optional[Callable] = None,
    feature_net: Optional[Callable] = None,
    lpips_net: Optional[Callable] = None,
    inception: Optional[Callable] = None,
) -> Dict[str, Optional[float]]:
    """Metrics of restored ``samples`` [S, B, C, H, W] (S samples of each of B inputs) against
    ``reference`` [B, C, H, W]: PSNR / SSIM / consistency / LPIPS averaged over every sample,
    diversity (mean per-pixel std over the S samples, 0-255; None when S = 1), FID of all samples
    vs the references with the SmallFeatureNet (``feature_net``; a demo statistic, not comparable
    with published FID) and with Inception (``inception``). Missing metrics are None."""
    count = samples.shape[0]
    flat = samples.reshape(-1, *samples.shape[2:]).float()
    repeated = reference.float().repeat(count, 1, 1, 1)
    enough_for_fid = reference.shape[0] >= 2
    return {
        "psnr": float(psnr(flat, repeated).mean()),
        "ssim": float(ssim(flat, repeated).mean()) if min(reference.shape[-2:]) >= 11 else None,
        "consistency": float(consistency(flat, repeated, operator).clamp(max=100).mean()) if operator is not None else None,
        "diversity": float(diversity(samples.float()).mean()) if count > 1 else None,
        "fid_small": fid(reference.float(), flat, feature_net) if feature_net is not None and enough_for_fid else None,
        "fid_inception": fid(reference.float(), flat, inception) if inception is not None and enough_for_fid else None,
        "lpips": float(torch.cat([lpips_net(flat[i : i + 16], repeated[i : i + 16]) for i in range(0, flat.shape[0], 16)]).mean())
        if lpips_net is not None
        else None,
    }


# ---------------------------------------------------------------------------- Fréchet distance
def feature_statistics(features) -> Tuple[torch.Tensor, torch.Tensor]:
    """features [N, D] -> (mean [D], unbiased covariance [D, D]) in float64."""
    f = torch.as_tensor(features).to(torch.float64)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected [N>=2, D], got shape {tuple(f.shape)}")
    mean = f.mean(dim=0)
    centred = f - mean
    return mean, centred.T @ centred / (f.shape[0] - 1)


def _psd_eigvalsh(m: torch.Tensor, with_vectors: bool = False):
    """Eigen-decomposition of a symmetric PSD matrix with round-off eigenvalues set to 0.

    Eigenvalues below dim * eps * largest are noise (negative or not); left in, the sqrt
    would turn each 1e-16 into 1e-8 and singular covariances (N <= D) would give FID != 0
    for identical sets."""
    eigval, eigvec = torch.linalg.eigh((m + m.T) / 2)
    tol = m.shape[0] * torch.finfo(m.dtype).eps * eigval.abs().max()
    eigval = torch.where(eigval > tol, eigval, torch.zeros_like(eigval))
    return (eigval, eigvec) if with_vectors else eigval


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    eigval, eigvec = _psd_eigvalsh(m, with_vectors=True)
    return (eigvec * eigval.sqrt()) @ eigvec.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), float64, no scipy.

    tr sqrt(S1 S2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): that matrix is symmetric PSD, so
    eigh is stable where sqrtm of the non-symmetric product is not; round-off eigenvalues
    (tiny, possibly negative) are set to zero."""
    mu1, mu2 = (torch.as_tensor(m).to(torch.float64) for m in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c).to(torch.float64) for c in (cov1, cov2))
    d = mu1.shape[0]
    for name, t, shape in (("mu1", mu1, (d,)), ("cov1", cov1, (d, d)), ("mu2", mu2, (d,)), ("cov2", cov2, (d, d))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    tr_sqrt = _psd_eigvalsh(middle).sqrt().sum()
    dist = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt
    return float(dist)


# ---------------------------------------------------------------------------- FID / JFID
class FID:
    """FID with a pluggable feature network: feature_fn maps [n, C, H, W] images in [0, 1]
    to [n, D] features. Use inception.load_inception(...) (pytorch-fid's weights, loaded as data)
    for numbers comparable with published FID; SmallFeatureNet only for tests and demos."""

    def __init__(self, feature_fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 64):
        self.feature_fn, self.batch_size = feature_fn, int(batch_size)

    @torch.no_grad()
    def features(self, images, name: str = "images") -> torch.Tensor:
        _check_image(name, images)
        chunks = [self.feature_fn(images[i : i + self.batch_size]).flatten(1) for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks).to("cpu", torch.float64)

    def __call__(self, real, fake) -> float:
        return frechet_distance(
            *feature_statistics(self.features(real, "real")), *feature_statistics(self.features(fake, "fake"))
        )


def fid(real, fake, feature_fn, batch_size: int = 64) -> float:
    """FID between two image sets (UFID of the paper: samples vs ground truth)."""
    return FID(feature_fn, batch_size)(real, fake)


def jfid(x_real, y, x_fake, feature_fn, batch_size: int = 64) -> float:
    """Joint FID: FID of [features(y), features(x)] per image, real x vs restored x_fake, so
    a sample that ignores its measurement y is penalised even if it looks realistic."""
    _check_pair("x_real", x_real, "x_fake", x_fake)
    _check_image("y", y)
    if y.shape[0] != x_real.shape[0]:
        raise ValueError(f"y: expected batch size {x_real.shape[0]} like x_real, got {y.shape[0]}")
    net = FID(feature_fn, batch_size)
    f_y = net.features(y, "y")
    real = torch.cat([f_y, net.features(x_real, "x_real")], dim=1)
    fake = torch.cat([f_y, net.features(x_fake, "x_fake")], dim=1)
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


class InceptionFeatures(nn.Module):
    """Wraps NVIDIA's TorchScript Inception-v3 (inception-2015-12-05.pt, StyleGAN2-ADA /
    clean-fid). That file's forward(img, return_features=False, ...) takes [N, 3, H, W] with
    0-255 pixel values (uint8, as StyleGAN feeds it), any H x W: it resizes to 299 x 299
    (bilinear) and normalises (x - 128) / 128 itself; return_features=True gives the 2048-d
    pool3 features used for FID. This wrapper takes [0, 1] floats, rounds them to uint8
    levels and repeats grayscale to 3 channels."""

    def __init__(self, model, device=None):
        super().__init__()
        self.model, self.device = model, device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        img = (images * 255).round().clamp(0, 255).to(torch.uint8)
        if img.shape[1] == 1:
            img = img.repeat(1, 3, 1, 1)
        if self.device is not None:
            img = img.to(self.device)
        return self.model(img, return_features=True)


def load_inception_torchscript(path: PathLike, device=None, *, trust_code: bool = False) -> InceptionFeatures:
    """Load the user's copy of inception-2015-12-05.pt (a file, or a directory holding it).

    A TorchScript file is a program: loading it runs code from the file, so this needs
    ``trust_code=True``, for files from a source you trust. ``msdiff_fast.inception.load_inception``
    reads the same network's weights as data and is what the package itself uses."""
    if trust_code is not True:
        raise ValueError(
            "trust_code: loading a TorchScript file runs code from it; pass trust_code=True only for a file you "
            "trust, or load a state dict with msdiff_fast.inception.load_inception (data only)"
        )
    path = file_in(path, INCEPTION_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception TorchScript file not found: {path!r}. Expected NVIDIA's "
            f"'{INCEPTION_FILE}' (the StyleGAN2-ADA / clean-fid FID network); it is never "
            f"downloaded, obtain it separately."
        )
    with warnings.catch_warnings():  # the file is TorchScript: jit.load is the only way in
        warnings.simplefilter("ignore", DeprecationWarning)
        model = torch.jit.load(path, map_location=device).eval()
    return InceptionFeatures(model, device)


class SmallFeatureNet(nn.Module):
    """Tiny fixed-seed random conv net (deterministic) for tests and the CPU demo.
    Its FID is NOT comparable with published FID numbers."""

    def __init__(self, in_channels: int = 3, width: int = 16, seed: int = 0):
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1) for i in range(3))
        gen = torch.Generator().manual_seed(seed)  # local generator: global RNG untouched
        for conv in self.convs:
            fan_in = conv.weight[0].numel()
            conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2 / fan_in)
            conv.bias.data.zero_()
        self.requires_grad_(False)
        self.in_channels = in_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = images * 2 - 1
        if h.shape[1] == 1 and self.in_channels != 1:
            h = h.repeat(1, self.in_channels, 1, 1)
        h = h.to(self.convs[0].weight.dtype)
        for conv in self.convs:
            h = F.relu(conv(h))
        # population std so tiny inputs (1x1 after three stride-2 convs) give 0, not NaN
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3), correction=0)], dim=1)


# ---------------------------------------------------------------------------- LPIPS
# torchvision alexnet.features: (index in features, in, out, kernel, stride, padding);
# a 3x3/2 max-pool follows convs 0 and 3. LPIPS taps the ReLU after each conv.
_ALEX_CONVS = [
    (0, 3, 64, 11, 4, 2),
    (3, 64, 192, 5, 1, 2),
    (6, 192, 384, 3, 1, 1),
    (8, 384, 256, 3, 1, 1),
    (10, 256, 256, 3, 1, 1),
]


def _load_state(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LPIPS weights not found: {path!r} (expected {what}). Nothing is downloaded; obtain the file separately."
        )
    try:
        state = load_data(path)
    except Exception as err:  # pickle and zip errors: a file that is not plain tensors (or holds code)
        raise ValueError(
            f"LPIPS weights {path}: not a state dict of tensors (read with weights_only=True: {' '.join(str(err).split())[:200]})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"LPIPS weights {path}: expected a dict of parameter names to tensors, got {type(state).__name__}")
    return state


class LPIPS(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk, per image [B], inputs in [0, 1].

    weights: a directory holding torchvision's 'alexnet-owt-7be5be79.pth' and LPIPS' 'alex.pth';
    or a (trunk_file, linear_file) pair; or one file with both (e.g. a saved lpips.LPIPS
    state_dict, trunk keys 'net.sliceK.N.*'). pretrained=False builds fixed-seed random
    weights for tests only: such values mean nothing and must not be reported."""

    def __init__(self, net: str = "alex", weights=None, *, pretrained: bool = True, seed: int = 0):
        super().__init__()
        if net != "alex":
            raise ValueError(f"net: only 'alex' is implemented, got {net!r}")
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, stride=s, padding=p) for _, i, o, k, s, p in _ALEX_CONVS)
        self.lins = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, _, o, *_ in _ALEX_CONVS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        if pretrained:
            if weights is None:
                raise ValueError(
                    f"weights: expected a directory with '{ALEXNET_FILE}' and "
                    f"'{LPIPS_ALEX_FILE}' (or pretrained=False for tests), got None"
                )
            self.load_weights(weights)
        else:
            gen = torch.Generator().manual_seed(seed)
            for conv in self.convs:
                conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2 / conv.weight[0].numel())
                conv.bias.data.zero_()
            for lin in self.lins:  # LPIPS heads are non-negative
                lin.weight.data = torch.rand(lin.weight.shape, generator=gen) / lin.in_channels
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, weights) -> None:
        if isinstance(weights, (tuple, list)):
            state = {
                **_load_state(os.fspath(weights[0]), f"torchvision '{ALEXNET_FILE}'"),
                **_load_state(os.fspath(weights[1]), f"LPIPS v0.1 '{LPIPS_ALEX_FILE}'"),
            }
        elif os.path.isdir(weights):
            state = {
                **_load_state(os.path.join(weights, ALEXNET_FILE), f"torchvision AlexNet weights '{ALEXNET_FILE}'"),
                **_load_state(os.path.join(weights, LPIPS_ALEX_FILE), f"LPIPS v0.1 linear weights '{LPIPS_ALEX_FILE}'"),
            }
        else:
            state = _load_state(os.fspath(weights), "a state dict with AlexNet trunk and LPIPS 'lin0.model.1.weight'... keys")
        # lpips.LPIPS stores the trunk as net.slice{k}.{features index}.*
        state = {re.sub(r"^net\.slice\d\.", "features.", k): v for k, v in state.items()}
        key_map = {}  # our parameter name -> published key name
        for n, (idx, *_) in enumerate(_ALEX_CONVS):
            key_map[f"convs.{n}.weight"] = f"features.{idx}.weight"
            key_map[f"convs.{n}.bias"] = f"features.{idx}.bias"
            key_map[f"lins.{n}.weight"] = f"lin{n}.model.1.weight"
        missing = [k for k in key_map.values() if k not in state]
        if missing:
            raise KeyError(f"weights: missing keys {missing}")
        own = self.state_dict()
        for my_key, their_key in key_map.items():
            if state[their_key].shape != own[my_key].shape:
                raise ValueError(
                    f"weights: {their_key} expected shape {tuple(own[my_key].shape)}, got {tuple(state[their_key].shape)}"
                )
            own[my_key] = state[their_key]
        self.load_state_dict(own)

    def _taps(self, x: torch.Tensor):
        taps = []
        for n, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            taps.append(x)
            if n in (0, 1):
                x = F.max_pool2d(x, kernel_size=3, stride=2)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair("x", x, "y", y)
        if x.shape[1] != 3:
            raise ValueError(f"x: LPIPS expects 3 RGB channels, got {x.shape[1]}")
        dtype = self.shift.dtype
        x = ((x.to(dtype) * 2 - 1) - self.shift) / self.scale
        y = ((y.to(dtype) * 2 - 1) - self.shift) / self.scale
        total = 0
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            # unit-normalise over channels (LPIPS eps 1e-10), squared difference, 1x1 head
            fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((fx - fy) ** 2).mean(dim=(2, 3))
        return total.flatten()
