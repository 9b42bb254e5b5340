"""DDPM U-Net (Ho et al. 2020, as ported to PyTorch in Song et al.'s score_sde "ddpm" model).

Conditioning is by concatenation: the caller stacks x_t and the condition along channels.
Layer layout and initialisation follow score_sde so that parameter counts match the paper
(43.48M for the CelebA-HQ 160 CMDE network, 28.75M for edges2shoes).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [sin | cos] of a float tensor of shape [B] (DDPM/score_sde layout)."""
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) / (half - 1) * steps)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def _variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """DDPM's default_init: uniform variance scaling with fan_avg; scale 0 gives exact zeros."""
    if scale == 0:
        return nn.init.zeros_(weight)
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    return nn.init.uniform_(weight, -bound, bound)


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0)
    _variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(cin: int, cout: int) -> nn.Linear:
    lin = nn.Linear(cin, cout)
    _variance_scaling_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in DDPM; narrower layers (tiny configs) use the largest divisor <= 32.
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-swish-conv, add projected time embedding, GroupNorm-swish-dropout-conv, residual."""

    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = _conv(cin, cout)
        self.temb_proj = _linear(temb_dim, cout)
        self.norm2 = _group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(cout, cout, init_scale=0.0)
        # score_sde's NIN is a per-pixel dense layer: a 1x1 conv with the same parameters.
        self.skip = _conv(cin, cout, kernel=1, init_scale=0.1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, residual; output projection starts at zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v = (_conv(channels, channels, 1, init_scale=0.1) for _ in range(3))
        self.out = _conv(channels, channels, 1, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(h.transpose(1, 2).reshape(b, c, hgt, wid))


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = _conv(channels, channels, stride=2) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        # TensorFlow "SAME" padding for a stride-2 3x3 conv on even sizes: one row/column after.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = _conv(channels, channels) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class UNet(nn.Module):
    """Noise-conditional DDPM U-Net: ``forward(x, t) -> [B, out_channels, H, W]``.

    ``t`` (float tensor [B], 0-dim tensor or python float) is embedded as ``t * time_scale``.
    Attention placement is fixed per level from ``image_size``; inputs of any H, W divisible
    by ``2 ** (len(ch_mult) - 1)`` are accepted (tiling).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        nf: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        resamp_with_conv: bool = True,
        time_scale: float = 999.0,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.nf, self.ch_mult, self.num_res_blocks = nf, tuple(ch_mult), num_res_blocks
        self.attn_resolutions, self.time_scale = tuple(attn_resolutions), float(time_scale)
        levels = len(self.ch_mult)
        use_attn = [image_size // 2**i in self.attn_resolutions for i in range(levels)]
        temb_dim = 4 * nf

        def res(cin, cout):
            return ResBlock(cin, cout, temb_dim, dropout)

        self.temb = nn.Sequential(_linear(nf, temb_dim), nn.SiLU(), _linear(temb_dim, temb_dim))
        self.conv_in = _conv(in_channels, nf)

        # Each down level: num_res_blocks x (ResBlock [+ Attn]), then Downsample except at the bottom.
        self.down = nn.ModuleList()
        skip_channels, ch = [nf], nf
        for i, mult in enumerate(self.ch_mult):
            level = nn.Module()
            level.blocks, level.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.blocks.append(res(ch, nf * mult))
                ch = nf * mult
                level.attns.append(AttnBlock(ch) if use_attn[i] else nn.Identity())
                skip_channels.append(ch)
            level.downsample = Downsample(ch, resamp_with_conv) if i < levels - 1 else nn.Identity()
            if i < levels - 1:
                skip_channels.append(ch)
            self.down.append(level)

        self.mid = nn.ModuleList([res(ch, ch), AttnBlock(ch), res(ch, ch)])

        # Each up level: num_res_blocks + 1 ResBlocks eating one skip each, one Attn after them
        # (score_sde places it once per level, not per block), then Upsample except at the top.
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.blocks.append(res(ch + skip_channels.pop(), nf * self.ch_mult[i]))
                ch = nf * self.ch_mult[i]
            level.attn = AttnBlock(ch) if use_attn[i] else nn.Identity()
            level.upsample = Upsample(ch, resamp_with_conv) if i > 0 else nn.Identity()
            self.up.append(level)
        assert not skip_channels

        self.norm_out = _group_norm(ch)
        self.conv_out = _conv(ch, out_channels, init_scale=0.0)

    def _check_inputs(self, x: torch.Tensor, t) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = f"ndim {x.dim()} (shape {tuple(x.shape)})" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: x must be a 4-d tensor [B, C, H, W], got {got}")
        b, c, hgt, wid = x.shape
        if c != self.in_channels:
            raise ValueError(f"UNet: x must have {self.in_channels} channels (in_channels), got {c} (shape {tuple(x.shape)})")
        factor = 2 ** (len(self.ch_mult) - 1)
        if hgt % factor or wid % factor:
            raise ValueError(f"UNet: x height and width must be divisible by {factor} (2 ** (len(ch_mult) - 1)), got {hgt}x{wid}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(
                f"UNet: t must be a float, a 0-d tensor or a tensor of shape [{b}] (batch size of x), got shape {tuple(t.shape)}"
            )
        return t

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        t = self._check_inputs(x, t)
        temb = self.temb(timestep_embedding(t * self.time_scale, self.nf)).to(x.dtype)

        hs = [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], temb)))
            if not isinstance(level.downsample, nn.Identity):
                hs.append(level.downsample(hs[-1]))

        h = self.mid[0](hs[-1], temb)
        h = self.mid[2](self.mid[1](h), temb)

        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            h = level.upsample(level.attn(h))
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclasses.dataclass(frozen=True)
class Preset:
    image_size: int
    nf: int
    ch_mult: tuple[int, ...]
    attn_resolutions: tuple[int, ...]
    num_res_blocks: int = 2
    dropout: float = 0.1


PRESETS: dict[str, Preset] = {
    # Batzolis et al., CelebA-HQ 20->160 super-resolution (43.48M parameters with the CMDE head).
    "celeba_sr_x8_160": Preset(160, 96, (1, 1, 2, 2, 3, 3), (20, 10, 5)),
    # Batzolis et al., CelebA-HQ 128 inpainting.
    "celeba_inpaint_128": Preset(128, 96, (1, 1, 2, 2, 3, 3), (16, 8, 4)),
    # Batzolis et al., edges2shoes 64 (28.75M parameters with the CMDE head, 3-channel edges).
    "edges2shoes_64": Preset(64, 128, (1, 1, 2, 2), (16, 8)),
    # Small network for tests and CPU demos (works at 16..64 pixels).
    "tiny": Preset(32, 32, (1, 2, 2), (8,), dropout=0.0),
}

_ESTIMATORS = ("cde", "cdiffe", "cmde", "vscmde", "mr")


def unet_preset(
    name: str, estimator: str = "cmde", image_channels: int = 3, cond_channels: int | None = None, **overrides
) -> UNet:
    """Build a preset U-Net with the input/output channels that ``estimator`` needs.

    cde: in x+y, out x; cdiffe/cmde/vscmde: in x+y, out x+y (x and y scores);
    mr (input cat(x_t - mu, mu)): in 2x, out x. ``overrides`` replace any UNet argument.
    """
    if name not in PRESETS:
        raise ValueError(f"unet_preset: name must be one of {sorted(PRESETS)}, got {name!r}")
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unet_preset: estimator must be one of {list(_ESTIMATORS)}, got {estimator!r}")
    cond_channels = image_channels if cond_channels is None else cond_channels
    if estimator == "mr":
        in_ch, out_ch = 2 * image_channels, image_channels
    elif estimator == "cde":
        in_ch, out_ch = image_channels + cond_channels, image_channels
    else:
        in_ch = out_ch = image_channels + cond_channels
    kwargs = dict(dataclasses.asdict(PRESETS[name]), in_channels=in_ch, out_channels=out_ch)
    kwargs.update(overrides)
    return UNet(**kwargs)
