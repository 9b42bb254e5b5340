"""Metrics: PSNR/SSIM against scikit-image, closed forms for the rest, LPIPS key mapping."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from msdiff_fast import metrics as M


def _structured(b=2, c=3, h=37, w=41):
    """Gradients, a checkerboard and a sinusoid: edges and flat areas, unlike pure noise."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h, dtype=torch.float64),
                            torch.linspace(0, 1, w, dtype=torch.float64), indexing="ij")
    board = ((torch.arange(h)[:, None] // 4 + torch.arange(w)[None, :] // 4) % 2).double()
    chans = [xx, board * 0.8 + 0.1, 0.5 + 0.4 * torch.sin(12 * xx + 7 * yy)]
    img = torch.stack([chans[i % 3] for i in range(c)])
    return torch.stack([img.roll(k * 5, dims=-1) for k in range(b)])


def _pairs():
    rand_x = torch.rand(3, 3, 32, 29, dtype=torch.float64)
    rand_y = (rand_x + 0.1 * torch.randn_like(rand_x)).clamp(0, 1)
    s_x = _structured()
    s_y = (s_x + 0.05 * torch.randn_like(s_x)).clamp(0, 1)
    gray_x = torch.rand(2, 1, 24, 24, dtype=torch.float64)
    return [(rand_x, rand_y), (s_x, s_y), (gray_x, gray_x.flip(-1))]


def _hwc_255(t):  # one image [C, H, W] in [0, 1] -> numpy [H, W, C] on 0-255
    return (t * 255).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------- PSNR
@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("crop_border", [0, 3])
def test_psnr_matches_skimage(case, crop_border):
    x, y = _pairs()[case]
    ours = M.psnr(x, y, crop_border=crop_border)
    c = crop_border
    for i in range(x.shape[0]):
        xi, yi = (t[i, :, c:t.shape[-2] - c, c:t.shape[-1] - c] for t in (x, y))
        ref = peak_signal_noise_ratio(_hwc_255(xi), _hwc_255(yi), data_range=255)
        assert ours[i].item() == pytest.approx(ref, rel=1e-9)


def test_psnr_known_values():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 0.9
    assert torch.isinf(M.psnr(x, x)).all()
    # offset of one grey level: MSE = 1 on 0-255, PSNR = 20 log10(255) = 48.13 dB
    expected = 20 * math.log10(255)
    assert M.psnr(x, x + 1 / 255).tolist() == pytest.approx([expected] * 2, rel=1e-9)
    assert expected == pytest.approx(48.1308, abs=1e-4)
    assert M.psnr(x, x + 1 / 255, reduction="mean").item() == pytest.approx(expected, rel=1e-9)
    # data_range=255 input gives the same numbers as [0, 1] input
    assert M.psnr(x * 255, (x + 1 / 255) * 255, data_range=255)[0].item() == pytest.approx(expected)


def test_psnr_quantize_rounds_to_uint8_levels():
    x = torch.full((1, 3, 8, 8), 100 / 255, dtype=torch.float64)
    assert torch.isinf(M.psnr(x, x + 0.4 / 255, quantize=True)).all()  # rounds to 100
    assert M.psnr(x, x + 0.6 / 255, quantize=True).item() == pytest.approx(20 * math.log10(255))


def test_psnr_y_channel_hand_computed():
    rgb = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    delta = torch.tensor([0.05, -0.02, 0.1], dtype=torch.float64).view(1, 3, 1, 1)
    # Y = 16 + 65.481 R + 128.553 G + 24.966 B, so dY = 65.481 dR + 128.553 dG + 24.966 dB
    d_y = 65.481 * 0.05 + 128.553 * -0.02 + 24.966 * 0.1
    expected = 20 * math.log10(255 / abs(d_y))
    assert M.psnr(rgb, rgb + delta, y_channel=True).item() == pytest.approx(expected, rel=1e-9)


def test_psnr_crop_border_ignores_border_errors():
    x = torch.rand(1, 3, 20, 20, dtype=torch.float64)
    y = x.clone()
    y[..., :2, :] = 0
    assert torch.isinf(M.psnr(x, y, crop_border=2)).all()
    assert torch.isfinite(M.psnr(x, y)).all()


# ---------------------------------------------------------------------------- SSIM
def _skimage_ssim(xi, yi):
    # Gaussian 11x11 sigma 1.5, population covariance, L = 255; skimage filters with reflect
    # padding and then drops (11 - 1) / 2 = 5 pixels per side before averaging, which is
    # exactly MATLAB's 'valid' SSIM map.
    return structural_similarity(_hwc_255(xi), _hwc_255(yi), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255, channel_axis=-1)


@pytest.mark.parametrize("case", range(3))
def test_ssim_matches_skimage(case):
    x, y = _pairs()[case]
    ours = M.ssim(x, y)
    for i in range(x.shape[0]):
        assert ours[i].item() == pytest.approx(_skimage_ssim(x[i], y[i]), rel=1e-10, abs=1e-12)


def test_ssim_crop_and_y_channel_match_skimage():
    x, y = _pairs()[1]
    ours = M.ssim(x, y, crop_border=4, y_channel=True)
    coeffs = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(3, 1, 1)
    for i in range(x.shape[0]):
        # hand-made Y channel (0-255), divided by 255 so _hwc_255 puts it back on 0-255
        yx, yy = ((16 + (t[i] * coeffs).sum(0, keepdim=True)) / 255 for t in (x, y))
        ref = _skimage_ssim(yx[:, 4:-4, 4:-4], yy[:, 4:-4, 4:-4])
        assert ours[i].item() == pytest.approx(ref, rel=1e-10)


def test_ssim_identity_float32_and_small_input():
    x = torch.rand(2, 3, 16, 16)
    assert M.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    assert M.ssim(x, x).dtype == torch.float64
    with pytest.raises(ValueError, match="H, W >= 11"):
        M.ssim(x, x, crop_border=3)


# ------------------------------------------------------------------ consistency / diversity
def test_consistency_is_psnr_of_the_measurements():
    def down(t):
        return F.avg_pool2d(t, 2)

    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 0.8 + 0.1
    noisy = x + 0.05 * torch.randn_like(x)
    assert torch.equal(M.consistency(noisy, x, down), M.psnr(down(noisy), down(x)))
    # a zero-mean 2x2 checkerboard is invisible to 2x average pooling: consistent up to
    # float64 round-off (about 300 dB)
    board = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).double() * 2 - 1
    assert (M.consistency(x + 0.05 * board, x, down) > 250).all()


def test_diversity_known_values():
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    same = torch.stack([x] * 5)
    assert M.diversity(same).tolist() == pytest.approx([0.0] * 4, abs=1e-10)
    c = 6.0
    pair = torch.stack([x, x + c / 255])
    # population std of {a, a + c} is c / 2; with Bessel's correction c / sqrt(2)
    assert M.diversity(pair).tolist() == pytest.approx([c / 2] * 4, rel=1e-9)
    assert M.diversity(pair, unbiased=True).tolist() == pytest.approx([c / math.sqrt(2)] * 4)


# ---------------------------------------------------------------------------- Fréchet / FID
def _random_spd(d, gen):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_identical_diagonal_symmetric_and_scipy():
    gen = torch.Generator().manual_seed(1)
    d = 12
    mu1, mu2 = (torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(2))
    s1, s2 = _random_spd(d, gen), _random_spd(d, gen)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)

    v1, v2 = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) + 0.1
    closed = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum()
    diagonal = M.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert diagonal == pytest.approx(closed.item(), rel=1e-12)

    forward, backward = M.frechet_distance(mu1, s1, mu2, s2), M.frechet_distance(mu2, s2, mu1, s1)
    assert forward == pytest.approx(backward, rel=1e-10)

    m1, m2, c1, c2 = (t.numpy() for t in (mu1, mu2, s1, s2))
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    assert forward == pytest.approx(ref, rel=1e-8)
    # numpy inputs work too
    assert M.frechet_distance(m1, c1, m2, c2) == pytest.approx(forward, rel=1e-12)


def test_frechet_singular_covariances_do_not_nan():
    f = torch.randn(5, 20, dtype=torch.float64)  # rank-4 covariance in 20 dims
    mu, cov = M.feature_statistics(f)
    assert M.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_feature_statistics_matches_numpy():
    f = torch.randn(50, 7)
    mu, cov = M.feature_statistics(f)
    assert np.allclose(mu.numpy(), f.double().numpy().mean(0))
    assert np.allclose(cov.numpy(), np.cov(f.double().numpy(), rowvar=False))


def test_fid_and_jfid_with_small_feature_net():
    net = M.SmallFeatureNet()
    real = torch.rand(24, 3, 16, 16)
    fake = (real + 0.3 * torch.randn_like(real)).clamp(0, 1)
    y = F.avg_pool2d(real, 4)
    assert torch.equal(net(real), M.SmallFeatureNet()(real))  # deterministic, seed-fixed
    assert M.fid(real, real, net) == pytest.approx(0.0, abs=1e-8)
    value = M.fid(real, fake, net, batch_size=5)
    assert value > 0
    assert value == pytest.approx(M.FID(net, batch_size=100)(real, fake), rel=1e-6)
    assert M.jfid(real, y, real, net) == pytest.approx(0.0, abs=1e-8)
    assert M.jfid(real, y, fake, net) > 0
    with pytest.raises(ValueError, match="y: expected batch size"):
        M.jfid(real, y[:3], fake, net)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_inception_loader_missing_file_and_input_convention(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        M.load_inception_torchscript(tmp_path / "nope.pt", trust_code=True)
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        M.load_inception_torchscript(tmp_path, trust_code=True)  # directory without the file

    class FakeInception(torch.nn.Module):  # same call signature as NVIDIA's file
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert img.dtype == torch.uint8 and img.shape[1] == 3
            assert return_features
            return img.float().mean(dim=(2, 3))

    torch.jit.script(FakeInception()).save(str(tmp_path / "inception-2015-12-05.pt"))
    features = M.load_inception_torchscript(tmp_path, trust_code=True)
    x = torch.full((2, 1, 8, 8), 0.5)
    assert features(x).tolist() == [[128.0] * 3] * 2  # [0, 1] -> rounded 0-255, gray -> RGB


# ---------------------------------------------------------------------------- LPIPS
def test_lpips_random_weights_basic_properties():
    lp = M.LPIPS(pretrained=False)
    x = torch.rand(3, 3, 64, 64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert lp(x, x).tolist() == pytest.approx([0.0] * 3, abs=1e-7)
    d = lp(x, y)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.allclose(d, lp(y, x), rtol=1e-5, atol=0)
    assert all((lin.weight >= 0).all() for lin in lp.lins)


def test_lpips_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        M.LPIPS(weights=tmp_path)
    with pytest.raises(ValueError, match="weights"):
        M.LPIPS()


def _reference_state_dicts():
    """Random weights under the published key names and shapes."""
    gen = torch.Generator().manual_seed(3)
    trunk = {}
    for idx, (cin, cout, k) in {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3),
                                8: (384, 256, 3), 10: (256, 256, 3)}.items():
        trunk[f"features.{idx}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * 0.05
        trunk[f"features.{idx}.bias"] = torch.randn(cout, generator=gen) * 0.01
    trunk["classifier.1.weight"] = torch.zeros(4, 9216)  # torchvision extras are ignored
    lin = {f"lin{n}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
           for n, c in enumerate([64, 192, 384, 256, 256])}
    return trunk, lin


def test_lpips_state_dict_round_trip(tmp_path):
    trunk, lin = _reference_state_dicts()
    torch.save(trunk, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(lin, tmp_path / "alex.pth")
    lp = M.LPIPS(weights=tmp_path)
    for n, idx in enumerate([0, 3, 6, 8, 10]):
        assert torch.equal(lp.convs[n].weight, trunk[f"features.{idx}.weight"])
        assert torch.equal(lp.convs[n].bias, trunk[f"features.{idx}.bias"])
        assert torch.equal(lp.lins[n].weight, lin[f"lin{n}.model.1.weight"])
    pair = M.LPIPS(weights=(tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "alex.pth"))
    # the lpips package's own state_dict layout: net.slice{k}.{features index}.*
    slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    combined = {f"net.slice{slice_of[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
                for k, v in trunk.items() if k.startswith("features.")}
    torch.save({**combined, **lin}, tmp_path / "lpips_full.pth")
    single = M.LPIPS(weights=tmp_path / "lpips_full.pth")
    x, y = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    assert torch.equal(lp(x, y), pair(x, y)) and torch.equal(lp(x, y), single(x, y))

    del lin["lin4.model.1.weight"]
    torch.save(lin, tmp_path / "alex.pth")
    with pytest.raises(KeyError, match="lin4.model.1.weight"):
        M.LPIPS(weights=tmp_path)


# ---------------------------------------------------------------------------- bad inputs
GOOD = torch.rand(2, 3, 16, 16)


@pytest.mark.parametrize("call, exc, words", [
    (lambda: M.psnr(GOOD.numpy(), GOOD), TypeError, ["x", "torch.Tensor"]),
    (lambda: M.psnr(GOOD, GOOD[:, :2]), ValueError, ["y", "shape"]),
    (lambda: M.psnr(GOOD[0], GOOD[0]), ValueError, ["x", "4-D"]),
    (lambda: M.ssim(GOOD, (GOOD * 255).to(torch.uint8)), TypeError, ["y", "floating"]),
    (lambda: M.ssim(GOOD, torch.full_like(GOOD, float("nan"))), ValueError, ["y", "finite"]),
    (lambda: M.psnr(GOOD, GOOD, reduction="sum"), ValueError, ["reduction"]),
    (lambda: M.psnr(GOOD[:, :1], GOOD[:, :1], y_channel=True), ValueError, ["y_channel"]),
    (lambda: M.consistency(GOOD[:1], GOOD, lambda t: t), ValueError, ["x_hat"]),
    (lambda: M.consistency(GOOD, GOOD, lambda t: t > 0.5), TypeError, ["operator(x)"]),
    (lambda: M.diversity(GOOD), ValueError, ["samples", "5-D"]),
    (lambda: M.diversity(GOOD[None]), ValueError, ["samples", "at least 2"]),
    (lambda: M.frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4)),
     ValueError, ["cov2"]),
    (lambda: M.feature_statistics(torch.zeros(1, 4)), ValueError, ["features"]),
    (lambda: M.LPIPS(pretrained=False)(GOOD[:, :1], GOOD[:, :1]), ValueError, ["x", "RGB"]),
    (lambda: M.LPIPS(net="vgg", pretrained=False), ValueError, ["net"]),
    (lambda: M.fid(GOOD.numpy(), GOOD, M.SmallFeatureNet()), TypeError, ["real"]),
])
def test_bad_inputs_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value)
