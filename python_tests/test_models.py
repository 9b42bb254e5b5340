"""DDPM U-Net: paper parameter counts, shapes per estimator head, zero init, time conditioning, input checks."""
import pytest
import torch

from msdiff_fast.models import PRESETS, UNet, unet_preset


def _count(name, estimator, **kwargs):
    with torch.device("meta"):
        model = unet_preset(name, estimator, **kwargs)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, estimator, published", [
    ("celeba_sr_x8_160", "cmde", 43.48e6),
    ("celeba_inpaint_128", "cmde", 43.48e6),
    ("edges2shoes_64", "cmde", 28.75e6),
])
def test_parameter_count_matches_paper(name, estimator, published):
    count = _count(name, estimator)
    assert abs(count - published) / published < 5e-3, count


def test_parameter_count_exact():
    # Pinned so that any architectural drift (a missing skip projection, an extra attention) shows.
    assert _count("celeba_sr_x8_160", "cmde") == 43_481_862
    assert _count("edges2shoes_64", "cmde") == 28_752_902
    assert _count("edges2shoes_64", "cde") == 28_749_443


@pytest.mark.parametrize("estimator, cin, cout", [
    ("cde", 6, 3), ("cdiffe", 6, 6), ("cmde", 6, 6), ("vscmde", 6, 6), ("mr", 6, 3),
])
def test_preset_channels(estimator, cin, cout):
    model = unet_preset("tiny", estimator)
    assert (model.in_channels, model.out_channels) == (cin, cout)
    x = torch.randn(2, cin, 32, 32)
    assert model(x, torch.rand(2)).shape == (2, cout, 32, 32)


def test_cond_channels_and_overrides():
    model = unet_preset("tiny", "cmde", image_channels=3, cond_channels=1, nf=16, num_res_blocks=1)
    assert (model.in_channels, model.out_channels, model.nf, model.num_res_blocks) == (4, 4, 16, 1)
    assert model(torch.randn(1, 4, 16, 16), 0.5).shape == (1, 4, 16, 16)


@pytest.mark.parametrize("batch, height, width", [(1, 32, 32), (3, 32, 48), (2, 16, 16), (1, 64, 32)])
def test_output_shape_any_divisible_size(batch, height, width):
    model = unet_preset("tiny", "cde")
    out = model(torch.randn(batch, 6, height, width), torch.rand(batch))
    assert out.shape == (batch, 3, height, width)


def test_structure_independent_of_input_size():
    model = unet_preset("tiny")
    n_attn = sum(type(m).__name__ == "AttnBlock" for m in model.modules())
    # tiny: attention at 8 px = level 2 (2 down blocks + 1 up) + the middle one.
    assert n_attn == 4
    assert model.image_size == 32


def test_scalar_and_0d_t_broadcast():
    model = unet_preset("tiny")
    _perturb(model)
    x = torch.randn(3, 6, 16, 16)
    ref = model(x, torch.full((3,), 0.25))
    torch.testing.assert_close(model(x, 0.25), ref)
    torch.testing.assert_close(model(x, torch.tensor(0.25)), ref)


def test_zero_output_at_init_then_trainable():
    model = unet_preset("tiny")
    x, t = torch.randn(4, 6, 32, 32), torch.rand(4)
    assert torch.count_nonzero(model(x, t)) == 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    target = torch.randn(4, 6, 32, 32)
    for step in range(2):
        opt.zero_grad()
        loss = (model(x, t) - target).square().mean()
        loss.backward()
        if step == 0:
            assert model.conv_out.weight.grad.abs().sum() > 0
            opt.step()
            assert model(x, t).abs().max() > 0
    # Once the output conv is non-zero, the gradient reaches the first conv and the time MLP.
    assert model.conv_in.weight.grad.abs().sum() > 0
    assert model.temb[0].weight.grad is not None


def _perturb(model, scale=0.05):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def test_time_conditioning_changes_output():
    model = unet_preset("tiny").eval()
    _perturb(model)
    x = torch.randn(2, 6, 32, 32)
    a, b = model(x, torch.full((2,), 0.1)), model(x, torch.full((2,), 0.9))
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    # time_scale is the only thing between t and the embedding.
    scaled = unet_preset("tiny", time_scale=1.0).eval()
    scaled.load_state_dict(model.state_dict())
    torch.testing.assert_close(scaled(x, torch.full((2,), 99.9)), a)


def test_batch_elements_independent():
    model = unet_preset("tiny").eval()
    _perturb(model)
    x, t = torch.randn(3, 6, 32, 32), torch.rand(3)
    full = model(x, t)
    torch.testing.assert_close(model(x[1:2], t[1:2]), full[1:2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("x_shape, t, match", [
    ((2, 5, 32, 32), torch.rand(2), "in_channels"),
    ((6, 32, 32), torch.rand(1), "x must be a 4-d"),
    ((2, 6, 30, 32), torch.rand(2), "divisible by 4"),
    ((2, 6, 32, 32), torch.rand(3), "t must be"),
    ((2, 6, 32, 32), torch.rand(2, 1), "t must be"),
])
def test_bad_inputs_raise(x_shape, t, match):
    model = unet_preset("tiny")
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*x_shape), t)


def test_bad_preset_arguments():
    with pytest.raises(ValueError, match="tiny"):
        unet_preset("no_such_preset")
    with pytest.raises(ValueError, match="estimator"):
        unet_preset("tiny", estimator="nope")
    assert set(PRESETS) >= {"celeba_sr_x8_160", "celeba_inpaint_128", "edges2shoes_64", "tiny"}
    assert isinstance(unet_preset("tiny"), UNet)
