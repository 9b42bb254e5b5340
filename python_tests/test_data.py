"""Data sets, image I/O and degradations (msdiff_fast.training.data / .degradations)."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from msdiff_fast.training import (
    DEGRADATIONS,
    JPEG,
    ConditionalPairs,
    Edges,
    GaussianBlur,
    GaussianNoise,
    ImageFolder,
    Inpainting,
    LowLight,
    MotionBlur,
    PairedFolders,
    SuperResolution,
    SyntheticImages,
    check_images,
    item_seed,
    make_degradation,
    read_image,
    save_grid,
    write_image,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def synthetic_batch(n=4, size=32, seed=0):
    data = SyntheticImages(n, size=size, seed=seed)
    return torch.stack([data[i] for i in range(n)])


def neighbour_correlation(x):
    """Per-image correlation between horizontally adjacent pixels."""
    a, b = x[..., :-1].flatten(1), x[..., 1:].flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# ---------------------------------------------------------------------------- super-resolution
def test_sr_nearest_up_area_down_recovers_the_low_resolution_image():
    x = synthetic_batch(3, 32)
    sr = SuperResolution(4, up="nearest", down="area")
    low = sr.operator(x)
    y = sr(x)
    assert low.shape == (3, 3, 8, 8) and y.shape == x.shape
    torch.testing.assert_close(sr.operator(y), low, rtol=0, atol=1e-6)
    # nearest up: every 4x4 block of y is one low-resolution pixel
    torch.testing.assert_close(y[..., ::4, ::4], low, rtol=0, atol=0)
    assert torch.equal(y, y[..., ::4, ::4].repeat_interleave(4, -2).repeat_interleave(4, -1))


def test_sr_bicubic_shapes_range_and_constant_images():
    x = synthetic_batch(2, 32)
    for up in ("nearest", "bicubic"):
        sr = SuperResolution(2, up=up, down="bicubic")
        y = sr(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        assert sr.operator(x).shape == (2, 3, 16, 16)
    constant = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(SuperResolution(4, up="bicubic")(constant), constant)


def test_sr_rejects_sizes_not_divisible_by_the_factor():
    with pytest.raises(ValueError, match="divisible"):
        SuperResolution(8)(torch.rand(1, 3, 20, 24))
    with pytest.raises(ValueError, match="factor"):
        SuperResolution(0)


# ---------------------------------------------------------------------------- inpainting
def test_square_hole_has_exact_area_untouched_outside_and_varies():
    x = synthetic_batch(8, 32)
    inpaint = Inpainting(0.25, kind="square", fill=0.0)
    y, mask = inpaint.masked(x, gen(1))
    assert mask.shape == (8, 1, 32, 32)
    assert torch.all(mask.sum(dim=(1, 2, 3)) == 32 * 32 * 0.75)  # one 16x16 hole
    hole = mask == 0
    for b in range(8):  # the hole is one square
        rows, cols = hole[b, 0].any(1).nonzero(), hole[b, 0].any(0).nonzero()
        assert rows.numel() == 16 and cols.numel() == 16
        assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15
    observed = mask.expand_as(x).bool()
    assert torch.equal(y[observed], x[observed])
    assert torch.all(y[~observed] == 0)
    corners = {tuple(hole[b, 0].nonzero()[0].tolist()) for b in range(8)}
    assert len(corners) > 1, "hole position should vary across the batch"
    # reproducible for the same seed, different for another
    _, mask_again = inpaint.masked(x, gen(1))
    _, mask_other = inpaint.masked(x, gen(2))
    assert torch.equal(mask, mask_again) and not torch.equal(mask, mask_other)
    # operator: the same masking, by default with the latest mask
    torch.testing.assert_close(inpaint.operator(x, mask), y)
    assert torch.equal(inpaint.operator(x), x * mask_other)


def test_pixel_masks_drop_the_requested_fraction_and_fill():
    x = torch.rand(4, 3, 20, 20)
    y, mask = Inpainting(0.3, kind="pixels", fill=0.5).masked(x, gen(0))
    assert torch.all((mask == 0).sum(dim=(1, 2, 3)) == 120)
    assert torch.all(y.masked_select(mask.expand_as(y) == 0) == 0.5)
    with pytest.raises(ValueError, match="hole_fraction"):
        Inpainting(1.5)


# ---------------------------------------------------------------------------- edges
def test_canny_finds_the_border_of_a_bright_square_thin_and_nowhere_else():
    x = torch.full((1, 3, 40, 40), 0.1)
    x[..., 10:30, 12:32] = 0.9  # rows 10..29, cols 12..31
    edges = Edges(0.1, 0.2, sigma=1.0).edge_mask(x)[0, 0]
    rr, cc = torch.meshgrid(torch.arange(40), torch.arange(40), indexing="ij")
    # distance (in the max norm) to the square's outline, which lies between pixels
    inside = (rr >= 10) & (rr <= 29) & (cc >= 12) & (cc <= 31)
    dist_out = torch.maximum(torch.maximum(10 - rr, rr - 29), torch.maximum(12 - cc, cc - 31))
    dist_in = torch.minimum(torch.minimum(rr - 10, 29 - rr), torch.minimum(cc - 12, 31 - cc))
    dist = torch.where(inside, dist_in, dist_out - 1)  # 0 on the pixels either side of the step
    assert edges.any()
    assert dist[edges].max() <= 1, "edge pixels far from the square's border"
    border_pixels = inside & (dist_in == 0)
    near_edge = torch.nn.functional.max_pool2d(edges[None, None].float(), 3, 1, 1)[0, 0] > 0
    assert near_edge[border_pixels].all(), "part of the square's border has no edge within 1 px"
    # thin: every row through a vertical side (away from corners) crosses it exactly once
    for r in range(14, 26):
        assert edges[r, 5:22].sum() == 1 and edges[r, 22:38].sum() == 1
    for c in range(16, 28):
        assert edges[3:20, c].sum() == 1 and edges[20:38, c].sum() == 1


def test_canny_hysteresis_keeps_weak_edges_only_when_connected_to_strong_ones():
    x = torch.zeros(1, 1, 40, 40)
    x[0, 0, :, 20:] = torch.linspace(0.5, 0.04, 40)[:, None]  # one step fading from strong to weak
    x[0, 0, 28:36, 4:12] = 0.05  # an isolated weak square (gradient between low and high)
    edges = Edges(0.1, 0.2).edge_mask(x)[0, 0]
    strong_only = Edges(0.2, 0.2).edge_mask(x)[0, 0]
    weak_too = Edges(0.1, 0.1).edge_mask(x)[0, 0]
    assert edges[:, 18:23].any(1).all(), "the fading step should be one unbroken edge"
    assert not strong_only[-3:, 18:23].any(), "test setup: the bottom of the step is weak"
    assert weak_too[:, :14].any() and not edges[:, :14].any(), "isolated weak edges must be dropped"


def test_edge_map_is_black_on_white_binary_and_has_the_input_shape():
    x = torch.full((2, 3, 24, 24), 0.2)
    x[:, :, 6:18, 6:18] = 0.8
    y = make_degradation("edges")(x)
    assert y.shape == x.shape and set(y.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])
    assert y.mean() > 0.8, "background should be white (1), edges black (0)"
    assert torch.equal(Edges().operator(x), y)
    assert torch.all(Edges()(torch.full((1, 1, 16, 16), 0.5)) == 1)  # flat image: no edges
    ramp = torch.linspace(0.2, 0.6, 32).expand(1, 1, 32, 32)
    assert Edges().edge_mask(ramp)[..., 3:-3, 3:-3].sum() == 0  # gentle ramps are no edges


# ---------------------------------------------------------------------------- restoration degradations
def test_gaussian_noise_std_matches_sigma_on_the_255_scale():
    x = torch.full((8, 3, 64, 64), 0.5)
    for sigma in (15.0, 25.0, 50.0):
        y = GaussianNoise(sigma)(x, gen(3))
        std = (y - x).std().item()
        assert abs(std / (sigma / 255) - 1) < 0.02, (sigma, std * 255)
        assert abs((y - x).mean().item()) < 0.01 * sigma / 255 * 10
    assert torch.equal(GaussianNoise(25)(x, gen(5)), GaussianNoise(25)(x, gen(5)))


def test_jpeg_low_quality_changes_more_than_high_quality():
    x = synthetic_batch(4, 32)
    err_10 = (JPEG(10)(x) - x).abs().mean()
    err_95 = (JPEG(95)(x) - x).abs().mean()
    assert err_10 > 2 * err_95 > 0
    y = JPEG((5, 30))(x, gen(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    grey = JPEG(50)(x[:, :1])
    assert grey.shape == (4, 1, 32, 32)
    with pytest.raises(ValueError, match="quality"):
        JPEG(0)


def test_blurs_preserve_constants_and_smooth_noise():
    constant = torch.full((2, 3, 20, 20), 0.37)
    noise = torch.rand(2, 3, 32, 32, generator=gen(0))
    for blur in (GaussianBlur(9, 2.0), MotionBlur(9), MotionBlur(7, angle=30.0)):
        torch.testing.assert_close(blur(constant, gen(1)), constant)
        assert blur(noise, gen(1)).std() < 0.6 * noise.std()
    kernels = MotionBlur(9).kernels(torch.tensor([0.0, 90.0]))
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(2, dtype=kernels.dtype))
    assert torch.all(kernels[0, 4] > 0) and kernels[0].sum(1)[4] == pytest.approx(1.0)  # horizontal line
    assert kernels[1].sum(0)[4] == pytest.approx(1.0)  # vertical line
    with pytest.raises(ValueError, match="odd"):
        GaussianBlur(4, 1.0)


def test_lowlight_darkens_and_stays_in_range():
    x = synthetic_batch(4, 32)
    y = LowLight()(x, gen(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert y.mean() < 0.6 * x.mean()


def test_factory_builds_every_name_reproducibly_and_rejects_unknown():
    x = synthetic_batch(2, 32)
    kwargs = {"sr": {"factor": 4}}
    for name in ("sr", "inpaint", "edges", "noise", "blur", "motion_blur", "lowlight", "jpeg"):
        deg = make_degradation(name, **kwargs.get(name, {}))
        assert deg.name == name and name in DEGRADATIONS
        y = deg(x, gen(7))
        check_images(y, name)
        assert y.shape == x.shape
        assert torch.equal(y, deg(x, gen(7))), name
    with pytest.raises(ValueError, match="valid names: .*sr.*jpeg"):
        make_degradation("denoise")


def test_check_images_names_the_input_and_what_it_found():
    check_images(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"cond: .*4-D.*\(3, 4, 4\)"):
        check_images(torch.rand(3, 4, 4), "cond")
    with pytest.raises(ValueError, match=r"x: .*\[0, 1\].*\[-1"):
        check_images(torch.linspace(-1, 1, 16).view(1, 1, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        check_images(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="dtype"):
        check_images(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))


# ---------------------------------------------------------------------------- folders
def _write_uint8(path, pixels):
    Image.fromarray(pixels).save(path)


def test_image_folder_reads_png_exactly_and_jpeg_approximately(tmp_path):
    rng = np.random.default_rng(0)
    pngs = [rng.integers(0, 256, (12, 10, 3), dtype=np.uint8) for _ in range(3)]
    for i, pixels in enumerate(pngs):
        _write_uint8(tmp_path / f"img{i}.png", pixels)
    (tmp_path / "sub").mkdir()
    smooth = np.repeat(np.linspace(0, 255, 10, dtype=np.uint8)[None, :, None], 12, 0).repeat(3, 2)
    _write_uint8(tmp_path / "sub" / "photo.jpg", np.ascontiguousarray(smooth))
    (tmp_path / "notes.txt").write_text("not an image")
    data = ImageFolder(tmp_path)
    assert len(data) == 4 and data.verify() == []
    for i, pixels in enumerate(pngs):
        item = data[i]
        assert item.dtype == torch.float32 and item.shape == (3, 12, 10)
        assert torch.equal(item, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    assert (data[3] - torch.from_numpy(smooth).permute(2, 0, 1) / 255).abs().max() < 0.05
    assert len(ImageFolder(tmp_path, recursive=False)) == 3
    assert ImageFolder(tmp_path, size=8)[0].shape == (3, 8, 8)
    assert ImageFolder(tmp_path, size=(6, 4), crop="random")[1].shape == (3, 6, 4)
    assert ImageFolder(tmp_path, channels=1)[0].shape == (1, 12, 10)


def test_image_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*\.png"):
        ImageFolder(empty)
    good = tmp_path / "mixed"
    good.mkdir()
    _write_uint8(good / "a_good.png", np.zeros((4, 4, 3), np.uint8))
    (good / "b_bad.png").write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    data = ImageFolder(good)
    assert data[0].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="b_bad.png"):
        data[1]
    bad = data.verify()
    assert len(bad) == 1 and "b_bad.png" in bad[0]


def test_paired_folders_match_by_name_and_report_unmatched(tmp_path):
    clean, degraded = tmp_path / "clean", tmp_path / "degraded"
    clean.mkdir(), degraded.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _write_uint8(clean / f"{name}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        _write_uint8(degraded / f"{name}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    pairs = PairedFolders(clean, degraded)
    x, y = pairs[1]
    assert torch.equal(x, read_image(clean / "b.png")) and torch.equal(y, read_image(degraded / "b.png"))
    assert PairedFolders(clean, degraded, size=4)[0][0].shape == (3, 4, 4)
    _write_uint8(clean / "only_clean.png", np.zeros((8, 8, 3), np.uint8))
    _write_uint8(degraded / "only_degraded.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="only_clean.*only_degraded"):
        PairedFolders(clean, degraded)
    (clean / "only_clean.png").unlink(), (degraded / "only_degraded.jpg").unlink()
    _write_uint8(degraded / "b.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="size mismatch.*b.png"):
        PairedFolders(clean, degraded)[1]


# ---------------------------------------------------------------------------- pairs and synthetic data
def test_conditional_pairs_are_reproducible_per_item_and_epoch():
    base = SyntheticImages(6, size=16)
    pairs = ConditionalPairs(base, Inpainting(0.25), seed=3)
    x, y = pairs[2]
    assert torch.equal(x, base[2]) and y.shape == x.shape
    assert torch.equal(y, pairs[2][1])
    expected = Inpainting(0.25)(x[None], torch.Generator().manual_seed(item_seed(3, 2)))[0]
    assert torch.equal(y, expected)
    holes = {tuple((pairs[i][1] == 0).all(0).nonzero()[0].tolist()) for i in range(6)}
    assert len(holes) > 1
    pairs.set_epoch(1)
    assert not torch.equal(pairs[2][1], y)
    assert not torch.equal(ConditionalPairs(base, Inpainting(0.25), seed=4)[2][1], y)
    assert item_seed(0, 1) != item_seed(1, 0)


def test_synthetic_images_are_deterministic_structured_and_fast():
    a, b = synthetic_batch(16, 32, seed=0), synthetic_batch(16, 32, seed=0)
    assert torch.equal(a, b)
    assert not torch.equal(a, synthetic_batch(16, 32, seed=1))
    assert not torch.equal(a[0], a[1])
    assert a.dtype == torch.float32 and a.shape == (16, 3, 32, 32)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.all(a.flatten(1).std(1) > 0.02), "images should not be constant"
    for size in (16, 32, 64):
        corr = neighbour_correlation(synthetic_batch(16, size))
        assert corr.min() > 0.5, (size, corr.min())
    assert SyntheticImages(2, size=(16, 24), channels=1)[1].shape == (1, 16, 24)
    data = SyntheticImages(1000, size=32)
    start = time.perf_counter()
    for i in range(1000):
        data[i]
    assert time.perf_counter() - start < 4.0
    with pytest.raises(IndexError):
        data[1000]


# ---------------------------------------------------------------------------- image files and grids
def test_write_read_image_round_trip_and_checks(tmp_path):
    x = torch.randint(0, 256, (3, 9, 7)).float() / 255
    write_image(tmp_path / "x.png", x)
    assert torch.equal(read_image(tmp_path / "x.png"), x)
    write_image(tmp_path / "g.png", x[:1])
    assert torch.equal(read_image(tmp_path / "g.png", channels=1), x[:1])
    too_bright = x.clone()
    too_bright[0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\].*1\.5"):
        write_image(tmp_path / "bad.png", too_bright)
    with pytest.raises(ValueError, match=r"\(2, 3, 9, 7\)"):
        write_image(tmp_path / "bad.png", x.expand(2, 3, 9, 7))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_save_grid_writes_the_expected_pixel_size(tmp_path):
    x = synthetic_batch(4, 16)
    cond = SuperResolution(2)(x)
    low = SuperResolution(2).operator(x)  # smaller images are scaled up to the cell size
    save_grid(tmp_path / "rows.png", [cond, low, x[:, :1], x], pad=2)
    with Image.open(tmp_path / "rows.png") as img:
        assert img.size == (4 * 18 + 2, 4 * 18 + 2) and img.mode == "RGB"
    grid = read_image(tmp_path / "rows.png")
    assert torch.equal(grid[:, 2 + 3 * 18:2 + 3 * 18 + 16, 2:18], (x[0] * 255).round() / 255)
    save_grid(tmp_path / "square.png", synthetic_batch(5, 8), pad=1)
    with Image.open(tmp_path / "square.png") as img:
        assert img.size == (3 * 9 + 1, 2 * 9 + 1)
    save_grid(tmp_path / "wrapped.png", [x, x[:2]], nrow=3, pad=0)
    with Image.open(tmp_path / "wrapped.png") as img:
        assert img.size == (3 * 16, 3 * 16)
