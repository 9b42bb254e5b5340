"""The Inception-v3 network of FID, defined here so that its weights load as data.

FID is computed with the TensorFlow Inception-v3 of 2015-12-05. pytorch-fid ported its weights to
a PyTorch state dict (``pt_inception-2015-12-05-6726825d.pth``) for torchvision's Inception-v3
layout with four blocks changed to match TensorFlow's graph:

- Mixed_5b/5c/5d (A blocks), Mixed_6b-6e (C blocks) and Mixed_7b (E block): the average pool of
  the pooling branch leaves the zero padding out of the mean (``count_include_pad=False``);
- Mixed_7c (E block): the pooling branch takes a 3x3 max pool, not an average;
- the classifier has 1008 outputs.

Inputs in [0, 1] are resized to 299 x 299 (bilinear, as pytorch-fid) and mapped to [-1, 1]; the
features are the 2048 channels of the global average pool. ``load_inception`` reads the state dict
with ``torch.load(weights_only=True)`` (or a .safetensors file), so a file can hold only tensors,
never code, and checks every key and shape before using it.
"""

import os
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .training.checkpoint import file_in, load_data

PathLike = Union[str, "os.PathLike[str]"]
FEATURES = 2048
INPUT_SIZE = 299
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as TensorFlow), ReLU: torchvision's BasicConv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _chain(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _average_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of pixels inside the image, not 9
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 (64 + 64 + 96 + pool_features channels)."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, (self.branch5x5_1, self.branch5x5_2)),
                _chain(x, (self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)),
                self.branch_pool(_average_pool(x)),
            ],
            dim=1,
        )


class BlockB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                _chain(x, (self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3)),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1), 4 x 192 channels out."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        row, column = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, width, 1)
        self.branch7x7_2 = ConvBN(width, width, row[0], padding=row[1])
        self.branch7x7_3 = ConvBN(width, 192, column[0], padding=column[1])
        self.branch7x7dbl_1 = ConvBN(in_channels, width, 1)
        self.branch7x7dbl_2 = ConvBN(width, width, column[0], padding=column[1])
        self.branch7x7dbl_3 = ConvBN(width, width, row[0], padding=row[1])
        self.branch7x7dbl_4 = ConvBN(width, width, column[0], padding=column[1])
        self.branch7x7dbl_5 = ConvBN(width, 192, row[0], padding=row[1])
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                _chain(x, (self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)),
                _chain(
                    x, (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5)
                ),
                self.branch_pool(_average_pool(x)),
            ],
            dim=1,
        )


class BlockD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                _chain(x, (self.branch3x3_1, self.branch3x3_2)),
                _chain(x, (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (320 + 768 + 768 + 192 = 2048 channels). The last
    block of TensorFlow's graph pools its fourth branch with a max pool (``max_pool=True``)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        narrow = self.branch3x3_1(x)
        wide = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _average_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(narrow),
                self.branch3x3_2b(narrow),
                self.branch3x3dbl_3a(wide),
                self.branch3x3dbl_3b(wide),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class FIDInceptionV3(nn.Module):
    """Inception-v3 as used for FID: images [N, 3, H, W] in [0, 1] -> features [N, 2048].

    Parameter names follow torchvision / pytorch-fid, so pytorch-fid's weight file loads as it is.
    A grey batch [N, 1, H, W] is repeated to RGB."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.eval()
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if (
            not isinstance(images, torch.Tensor)
            or images.ndim != 4
            or images.shape[1] not in (1, 3)
            or not images.is_floating_point()
        ):
            got = (
                f"shape {tuple(images.shape)} dtype {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
            )
            raise ValueError(f"images: expected a float tensor [N, 1 or 3, H, W] in [0, 1], got {got}")
        x = images.to(self.Conv2d_1a_3x3.conv.weight.dtype)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = _chain(x, (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(x, (self.Conv2d_3b_1x1, self.Conv2d_4a_3x3))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = _chain(
            x,
            (
                self.Mixed_5b,
                self.Mixed_5c,
                self.Mixed_5d,
                self.Mixed_6a,
                self.Mixed_6b,
                self.Mixed_6c,
                self.Mixed_6d,
                self.Mixed_6e,
                self.Mixed_7a,
                self.Mixed_7b,
                self.Mixed_7c,
            ),
        )
        return x.mean(dim=(2, 3))


# Keys of the published file that the feature network does not use: the 1008-way classifier, and
# batch-norm step counters (present or not depending on the torch version that saved the file).
_UNUSED = ("fc.weight", "fc.bias")


def _read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        import safetensors.torch

        return safetensors.torch.load_file(path)
    state = load_data(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def load_inception(path: PathLike, device: Optional[Union[str, torch.device]] = None) -> FIDInceptionV3:
    """``FIDInceptionV3`` with the weights of ``path``: a state dict saved with torch.save (read with
    weights_only=True, e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth) or a .safetensors
    file; a directory is searched for the pytorch-fid file name. Raises FileNotFoundError, or
    ValueError naming the missing, unexpected or misshapen keys; the file never runs code."""
    path = file_in(path, PYTORCH_FID_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights not found: {path!r}; expected a state dict of the FID Inception-v3 "
            f"(pytorch-fid's {PYTORCH_FID_FILE}); it is never downloaded"
        )
    try:
        state = _read_state_dict(path)
    except Exception as err:  # pickle, zip, safetensors errors: a file that is not plain tensors
        raise ValueError(
            f"Inception weights {path}: not a state dict of tensors ({' '.join(str(err).split())[:200]}); a "
            f"TorchScript file needs --inception-torchscript / load_inception_torchscript(trust_code=True), "
            f"which runs code"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"Inception weights {path}: expected a dict of parameter names to tensors, got {type(state).__name__}")
    network = FIDInceptionV3()
    state = {k: v for k, v in state.items() if k not in _UNUSED and not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    reshaped = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        parts = [
            f"{label} {', '.join(items[:3])}{f' and {len(items) - 3} more' if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", reshaped))
            if items
        ]
        raise ValueError(f"Inception weights {path}: not the FID Inception-v3: {'; '.join(parts)}")
    network.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return network.to(device) if device is not None else network
