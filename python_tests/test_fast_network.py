"""The fast network path (models.FastNetwork): each switch against the plain float32 eager network."""

import pytest
import torch

from msdiff_fast.estimators import MeanReverting
from msdiff_fast.models import FastNetwork, bf16_unsupported, unet_preset
from msdiff_fast.samplers import MRSampler
from msdiff_fast.sde import MRSDE


def tiny_unet(size=16):
    net = unet_preset("tiny", estimator="mr", image_size=size).eval()
    # the output layer starts at zero (score_sde's init): random weights make the output non-trivial
    torch.nn.init.normal_(net.conv_out.weight, std=0.05, generator=torch.Generator().manual_seed(1))
    return net


def network_inputs(batch=3, size=16):
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 6, size, size, generator=g), torch.rand(batch, generator=g)


def plain_output(net, x, t):
    with torch.no_grad():
        return net(x, t)


def test_inference_mode_alone_gives_the_same_output_bit_for_bit():
    net = tiny_unet()
    x, t = network_inputs()
    expected = plain_output(net, x, t)
    fast = FastNetwork(net, channels_last=False, inference_mode=True)
    output = fast(x, t)
    assert torch.equal(output, expected)
    assert output.is_inference()
    assert FastNetwork(net, channels_last=False, inference_mode=False)(x, t).requires_grad


def test_channels_last_gives_the_same_output_to_float_rounding():
    net = tiny_unet()
    x, t = network_inputs()
    expected = plain_output(net, x, t)
    fast = FastNetwork(net)  # the defaults: channels-last and inference mode
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # converted in place, as documented
    output = fast(x, t)
    assert output.dtype == torch.float32 and output.is_contiguous()
    # measured: 1e-6 at outputs of magnitude 2 (oneDNN's channels-last kernels sum in another order)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_bf16_autocast_stays_within_its_documented_tolerance_or_refuses():
    net = tiny_unet()
    x, t = network_inputs()
    expected = plain_output(net, x, t)
    reason = bf16_unsupported("cpu")
    if reason is not None:
        with pytest.raises(ValueError, match="bf16: expected a device with bfloat16 arithmetic"):
            FastNetwork(net, bf16=True)
        return
    output = FastNetwork(net, bf16=True)(x, t)
    assert output.dtype == torch.float32 and output.is_contiguous()
    error = float((output - expected).abs().max() / expected.abs().max())
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per operation); measured 6e-3
    # through the tiny U-Net's 30 layers. The documented bound is 3e-2 of the output's magnitude.
    assert 0 < error < 3e-2, error


def test_bf16_refuses_devices_without_bfloat16_arithmetic():
    assert "only supported here on CPU and CUDA" in bf16_unsupported("meta")
    with pytest.raises(ValueError, match="bf16"):
        FastNetwork(tiny_unet().to("meta"), bf16=True)


class SmallNet(torch.nn.Module):
    """Conv - GroupNorm - SiLU - conv, time as a scale: compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 8)
        self.conv2 = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv2(torch.nn.functional.silu(self.norm(self.conv1(x))) * t[:, None, None, None])


def test_compile_gives_the_same_output_to_float_rounding():
    net = SmallNet()
    x, t = network_inputs(2, 8)
    expected = plain_output(net, x, t)
    fast = FastNetwork(net, compile=True)
    for _ in range(2):  # the second call runs the compiled code without compiling again
        output = fast(x, t)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert [name for name, _ in fast.named_parameters()] == [f"network.{name}" for name, _ in net.named_parameters()]


def test_fast_network_samples_like_the_plain_network():
    net = tiny_unet()
    sde = MRSDE(0.2, "cosine")
    estimator = MeanReverting(sde, x_shape=(3, 16, 16))
    mu = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    sampler = MRSampler(sde, 5, model_output=estimator.model_output, loop="static")
    with torch.no_grad():
        expected = sampler.sample(estimator.sampling_model(net), mu, generator=torch.Generator().manual_seed(4))
    output = sampler.sample(estimator.sampling_model(FastNetwork(net)), mu, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    net = SmallNet()
    with pytest.raises(TypeError, match="network"):
        FastNetwork(lambda x, t: x)
    for name in ("channels_last", "bf16", "inference_mode", "compile"):
        with pytest.raises(TypeError, match=name):
            FastNetwork(net, **{name: "yes"})
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        FastNetwork(net)([1.0], torch.zeros(1))
