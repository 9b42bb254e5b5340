"""The `msdiff` command (msdiff_fast/cli.py, demo.py) and tiled restoration (msdiff_fast/tiling.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msdiff_fast.cli import CLIError, main, parse_arguments
from msdiff_fast.restoration import ModelSpec
from msdiff_fast.tiling import TiledNetwork, TileLayout, blend_weights, merge_tiles, restore_tiled, split_tiles, tile_starts
from msdiff_fast.training import SyntheticImages, write_image

REPO = Path(__file__).resolve().parent.parent
DEMO_FILES = ("report.md", "metrics.json", "samples.png", "nfe_curve.png")


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: a second thread only adds start-up and contention time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("length, tile, overlap", [(16, 16, 4), (17, 16, 4), (45, 16, 4), (100, 32, 8), (33, 16, 0), (40, 16, 15)])
def test_tile_starts_cover_the_line_with_the_requested_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] == length - tile
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start:start + tile] = True
    assert covered.all()
    shared = [previous + tile - start for previous, start in zip(starts, starts[1:])]
    assert all(overlap <= s < tile for s in shared)


@pytest.mark.parametrize("height, width", [(16, 16), (13, 9), (45, 70), (16, 50), (64, 17)])
def test_tiling_an_identity_restorer_gives_back_the_image_exactly(height, width):
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(height * 100 + width))
    batches = []

    def identity(batch):
        batches.append(batch.shape[0])
        return batch.clone()

    (restored,) = restore_tiled(identity, [image], tile=16, overlap=4, batch_size=3)
    assert restored.shape == image.shape and restored.dtype == image.dtype
    assert torch.equal(restored, image)
    assert max(batches) <= 3 and sum(batches) == len(TileLayout.for_image(height, width, 16, 4))


@pytest.mark.parametrize("height, width, overlap", [(45, 70, 4), (16, 16, 4), (40, 40, 15), (33, 20, 0)])
def test_blending_weights_sum_to_one_and_stay_inside_their_tiles(height, width, overlap):
    layout = TileLayout.for_image(height, width, 16, overlap)
    weights = blend_weights(layout)
    assert weights.shape == (len(layout), max(height, 16), max(width, 16))
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(weights.shape[1:], dtype=torch.float64), rtol=0, atol=1e-12)
    assert (weights >= 0).all()
    for index, (top, left) in enumerate(layout.corners):
        outside = weights[index].clone()
        outside[top:top + 16, left:left + 16] = 0
        assert (outside == 0).all()
        assert (weights[index, top:top + 16, left:left + 16] > 0).all() or len(layout) == 1


def test_blending_is_smooth_across_a_seam():
    """Tiles restored to two different constants meet in a monotone ramp, not a step."""
    image = torch.zeros(1, 16, 28)  # two tiles side by side sharing 4 columns
    tiles, layout = split_tiles(image, 16, 4)
    assert len(layout) == 2
    merged = merge_tiles(torch.stack([torch.zeros(1, 16, 16), torch.ones(1, 16, 16)]), layout)
    row = merged[0, 0]
    assert torch.all(row[:12] == 0) and torch.all(row[16:] == 1)
    ramp = row[12:16]
    assert torch.all(ramp[1:] > ramp[:-1]) and 0 < ramp[0] and ramp[-1] < 1


def test_restore_tiled_is_linear_in_the_restorer():
    """weights sum to one: a restorer that adds c to every tile adds exactly c to the image."""
    image = torch.rand(3, 37, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (restored,) = restore_tiled(lambda batch: batch + 0.25, [image], tile=16, overlap=6, batch_size=8)
    torch.testing.assert_close(restored, image + 0.25, rtol=0, atol=1e-12)


def test_tiling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(40, 16, 16)
    with pytest.raises(ValueError, match="image"):
        split_tiles(torch.zeros(16, 16), 16, 4)
    with pytest.raises(ValueError, match="restore"):
        restore_tiled(lambda batch: batch[:, :, :8], [torch.zeros(3, 16, 16)], 16, 4, 2)


@pytest.mark.parametrize("height, width", [(16, 16), (13, 9), (45, 70), (40, 23)])
def test_tiled_network_of_a_pixelwise_network_is_the_network_on_the_whole_image(height, width):
    """Every tile sees the same pixels at the same place: a per-pixel network gives the same
    output through the tiles as on the whole image (the weights sum to one)."""
    weight = torch.randn(2, 5, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def pixelwise(x, t):
        return torch.nn.functional.conv2d(x, weight) * t.reshape(-1, 1, 1, 1)

    x = torch.randn(3, 5, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    tiled = TiledNetwork(pixelwise, tile=16, overlap=4, max_batch=5)
    torch.testing.assert_close(tiled(x, t), pixelwise(x, t), rtol=0, atol=1e-12)


def test_tiled_network_calls_the_network_on_tiles_in_batches():
    calls = []

    def network(x, t):
        calls.append((tuple(x.shape), t.clone()))
        return x[:, :1].clone()

    x = torch.rand(2, 3, 40, 23)
    tiled = TiledNetwork(network, tile=16, overlap=4, max_batch=4)
    tiled(x, torch.tensor([0.25, 0.75]))
    tiles = len(TileLayout.for_image(40, 23, 16, 4))
    assert sum(shape[0] for shape, _ in calls) == 2 * tiles and max(shape[0] for shape, _ in calls) <= 4
    assert all(shape[1:] == (3, 16, 16) for shape, _ in calls)
    times = torch.cat([t for _, t in calls])
    assert torch.equal(times, torch.tensor([0.25] * tiles + [0.75] * tiles))
    calls.clear()
    assert torch.equal(tiled(x[:, :, :16, :16], torch.tensor([0.5, 0.5])), x[:, :1, :16, :16])  # one tile: the network itself
    with pytest.raises(ValueError, match="overlap"):
        TiledNetwork(network, tile=16, overlap=16)
    with pytest.raises(ValueError, match="x: expected a tensor"):
        tiled(torch.zeros(3, 16, 16), torch.tensor([0.5]))


def test_whole_image_sampling_through_tiles_has_no_seams():
    """With one noise draw for the whole image, a sampler run through a tiled per-pixel model
    equals the same sampler on the whole image; sampling each tile on its own (restore_tiled)
    does not: independent noise in neighbouring tiles."""
    from msdiff_fast.restoration import SamplerSpec, restore_batch, restore_images
    from msdiff_fast.training.batches import stream_seed

    spec = ModelSpec("denoise", {"noise_sigma": 25.0}, "mr", {"lam_inf": 50 / 255, "target": "residual"}, "tiny", 16, 3)
    estimator = spec.build_estimator()
    weight = 0.3 * torch.eye(3, 6).reshape(3, 6, 1, 1)

    def pixelwise(network_input, t):
        return torch.nn.functional.conv2d(network_input, weight)

    condition = torch.rand(3, 40, 52, generator=torch.Generator().manual_seed(2))
    sampler = SamplerSpec("mr-sde", 5)
    (tiled,) = restore_images(pixelwise, estimator, [condition], sampler, 3, tile=16, overlap=4, batch=8)
    whole = restore_batch(pixelwise, estimator, condition[None], sampler, torch.Generator().manual_seed(stream_seed(3, 0)))[0]
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    (separate,) = restore_tiled(lambda batch: restore_batch(pixelwise, estimator, batch, sampler, torch.Generator().manual_seed(3)),
                                [condition], 16, 4, 64)
    assert (separate - whole).abs().max() > 1e-3


def test_restore_images_keeps_order_and_sizes():
    from msdiff_fast.restoration import SamplerSpec, restore_images

    spec = ModelSpec("denoise", {"noise_sigma": 25.0}, "mr", {"lam_inf": 50 / 255, "target": "residual"}, "tiny", 16, 3)
    estimator = spec.build_estimator()
    sizes = [(16, 16), (20, 33), (16, 16), (9, 12), (20, 33)]
    conditions = [torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)) for i, (h, w) in enumerate(sizes)]
    zero_residual = lambda network_input, t: torch.zeros_like(network_input[:, :3])  # noqa: E731 - restores to mu exactly
    restored = restore_images(zero_residual, estimator, conditions, SamplerSpec("mr-ode", 3), 0, 16, 4, 5)
    for condition, image in zip(conditions, restored):
        assert image.shape == condition.shape
        torch.testing.assert_close(image, condition, rtol=0, atol=2e-3)  # the noise left at t_end


# ---------------------------------------------------------------------------- restore_batch with an exact network
def _exact_network(estimator, points):
    """A network with the estimator's input/output layout whose noise prediction is exact for
    data uniform over ``points`` (independent of the condition): samplers must land on a point."""
    from msdiff_fast.testing import FiniteData

    channels = points.shape[1]
    sde = estimator.sde if estimator.name == "mr" else estimator.sde.x
    exact = FiniteData(points).denoiser(sde, "noise")

    def network(network_input, t):
        if estimator.name == "mr":
            mu = network_input[:, channels:]
            return exact(network_input[:, :channels] + mu, t, mu).float()
        score_output = -exact(network_input[:, :channels], t, None).float()
        if estimator.name == "cde":
            return score_output
        return torch.cat([score_output, torch.zeros_like(network_input[:, channels:])], dim=1)

    return network


@pytest.mark.parametrize("estimator_name", ["mr", "cmde", "cde"])
def test_restore_batch_wires_every_sampler_to_the_estimator(estimator_name):
    from msdiff_fast.restoration import ModelSpec, SamplerSpec, restore_batch

    points = torch.stack([SyntheticImages(2, 8, seed=3)[i] for i in range(2)])
    if estimator_name == "mr":
        spec = ModelSpec("denoise", {"noise_sigma": 25.0}, "mr", {"lam_inf": 50 / 255, "target": "noise"}, "tiny", 8, 3)
    else:
        spec = ModelSpec("sr", {"scale": 2}, estimator_name, {"sigma_y_max": 0.5} if estimator_name == "cmde" else {}, "tiny", 8, 3)
    estimator = spec.build_estimator()
    network = _exact_network(estimator, points)
    condition = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    samplers = [SamplerSpec("mr-sde", 10), SamplerSpec("mr-ode", 10, order=3), SamplerSpec("posterior", 50), SamplerSpec("euler", 200)]
    samplers += [SamplerSpec("pc", 200)] if estimator_name != "mr" else []
    tolerance = 0.01 if estimator_name == "mr" else 0.05  # VE stops at sigma_min = 5e-3: a little noise is left
    for sampler in samplers:
        sampler.check(estimator)
        restored = restore_batch(network, estimator, condition, sampler, torch.Generator().manual_seed(1))
        assert restored.shape == condition.shape and restored.min() >= 0 and restored.max() <= 1
        nearest = torch.cdist(restored.flatten(1).double(), points.flatten(1).double()).argmin(dim=1)
        assert (restored.double() - points[nearest].double()).abs().max() < tolerance, sampler


# ---------------------------------------------------------------------------- the demo, end to end
def run_msdiff(*arguments, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "msdiff_fast", *map(str, arguments)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_msdiff("demo", "--quick", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _check_demo_output(out: Path, data: str):
    for name in DEMO_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"sr_cmde", "denoise", "sr_mr"}
    assert metrics["settings"]["data"] == data
    assert all(math.isfinite(v) for v in _numbers(metrics))
    for key, model in metrics["models"].items():
        samplers = {(row["sampler"], row["nfe"]) for row in model["rows"]}
        assert {("mr-sde", 5), ("mr-sde", 10), ("mr-sde", 20), ("mr-ode", 10)} <= samplers
        assert (("mr-ode", 1) in samplers) == (key != "sr_cmde")  # the posterior mean in one step: mean-reverting models
        assert ("pc" if key == "sr_cmde" else "posterior", model["reference"]["nfe"]) in samplers
        assert (out / "runs" / key / "checkpoints").is_dir()
        for row in model["rows"]:
            assert math.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1
            assert (row["consistency"] is not None) == key.startswith("sr")
            assert (row["diversity"] is not None) == (row["samples_per_input"] > 1)
            assert set(row["per_image_psnr"]) == set(model["images"])
    report = (out / "report.md").read_text()
    assert "| sampler | NFE | PSNR (dB)" in report and "Quick mode" in report and "posterior mean" in report
    assert ("chelsea" in report) == (data == "photos")
    from PIL import Image

    for name in ("samples.png", "nfe_curve.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100


def test_quick_demo_on_photographs_writes_every_file_with_finite_numbers(quick_demo):
    _check_demo_output(quick_demo, "photos")


def test_quick_demo_on_synthetic_images(tmp_path):
    result = run_msdiff("demo", "--quick", "--data", "synthetic", "--out", tmp_path, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_demo_output(tmp_path, "synthetic")


def test_demo_progress_is_one_line_per_model_event(quick_demo):
    """Worker processes never write to the terminal: the parent prints whole lines, each naming its model."""
    result = run_msdiff("demo", "--quick", "--train-steps", "2", "--nfe", "1", "5", "--pc-nfe", "2", "--posterior-nfe", "1",
                        "--out", quick_demo.parent / "progress")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(line.startswith("[msdiff demo] ") for line in lines), lines
    progress = [line for line in lines if ": train " in line or ": sample" in line]
    for key in ("sr_cmde", "denoise", "sr_mr"):
        assert any(line.startswith(f"[msdiff demo] {key}: train 2/2") for line in progress), progress
        assert any(line.startswith(f"[msdiff demo] {key}: sample mr-sde NFE 5") for line in progress), progress


# ---------------------------------------------------------------------------- sample and evaluate with a real checkpoint
def _single_error_line(code, captured):
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("msdiff: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _low_resolution_folder(folder: Path, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for index, (height, width) in enumerate(sizes):
        write_image(folder / f"img{index}.png", torch.rand(3, height, width, generator=torch.Generator().manual_seed(index)))
    return folder


def test_demo_training_does_not_depend_on_the_global_random_state(tmp_path):
    """The report promises that the same command reproduces its numbers: the initial weights come
    from --seed, not from torch's global generator (seeded at random in every process)."""
    from msdiff_fast.demo import DemoSettings, demo_models
    from msdiff_fast.demo.experiment import train_model as _train

    settings = DemoSettings.quick().replace(train_steps=2)
    model = next(m for m in demo_models(settings) if m.key == "denoise")
    runs = []
    for run, global_seed in enumerate((123, 456)):
        torch.manual_seed(global_seed)
        trained = _train(model, settings, tmp_path / str(run), torch.device("cpu"), lambda stage, done, total: None)
        runs.append(torch.cat([p.detach().flatten() for p in trained["network"].parameters()]))
    assert torch.equal(runs[0], runs[1])
    # msdiff train builds its network the same way; the caller's generator is left alone
    state = torch.get_rng_state()
    first, second = (torch.cat([p.flatten() for p in model.spec.network(seed=5).parameters()]) for _ in range(2))
    assert torch.equal(first, second) and torch.equal(torch.get_rng_state(), state)


def test_sample_restores_images_of_any_size_and_evaluate_scores_them(quick_demo, tmp_path, capsys):
    checkpoint = quick_demo / "runs" / "sr_cmde"  # x2 super-resolution, trained at 16x16
    truth_set = SyntheticImages(2, (24, 20), seed=5)
    truth = tmp_path / "truth"
    for index in range(2):
        write_image(truth / f"img{index}.png", truth_set[index])
    from msdiff_fast.training import SuperResolution

    low = tmp_path / "low"
    for index in range(2):
        write_image(low / f"img{index}.png", SuperResolution(2).operator(truth_set[index][None])[0])
    restored = tmp_path / "restored"
    code = main(["sample", "--checkpoint", str(checkpoint), "--input", str(low), "--out", str(restored), "--nfe", "3",
                 "--batch", "4", "--task", "sr", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    from PIL import Image

    for index in range(2):
        with Image.open(restored / f"img{index}.png") as picture:
            assert picture.size == (20, 24)  # 12x10 inputs, x2, restored in overlapping 16px tiles
    code = main(["evaluate", "--restored", str(restored), "--reference", str(truth), "--task", "sr", "--small-fid"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((restored / "metrics.json").read_text())
    values = report["metrics"]
    assert report["images"] == 2 and math.isfinite(values["psnr"]) and math.isfinite(values["consistency"])
    assert values["lpips"] is None and values["fid_inception"] is None and values["fid_small"] >= 0
    assert "PSNR (dB)" in (restored / "metrics.md").read_text()


def test_sample_under_torchrun_restores_each_image_once_as_one_process_does(quick_demo, tmp_path):
    """Two gloo processes share the batches out: every file is written once, by one of them, and
    the files are those of a single-process run with the same seed, byte for byte."""
    images = _low_resolution_folder(tmp_path / "in", [(8, 8), (12, 10), (8, 8), (8, 8), (12, 10)])
    arguments = ["sample", "--checkpoint", quick_demo / "runs" / "sr_mr", "--input", images, "--nfe", "3", "--batch", "2",
                 "--num-samples", "2", "--no-progress", "--seed", "4"]
    single = run_msdiff(*arguments, "--out", tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "msdiff_fast.cli",
                              *map(str, arguments), "--out", str(tmp_path / "sharded")], env=env, capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stdout[-3000:] + sharded.stderr[-3000:]
    assert "wrote 10 images" in sharded.stdout
    written = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*.png"))
    assert len(written) == 10 and written == sorted(p.relative_to(tmp_path / "sharded") for p in (tmp_path / "sharded").rglob("*.png"))
    for name in written:
        assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes(), name
    assert not [p for p in (tmp_path / "sharded").rglob("*") if p.name.startswith(".")]  # no lock or temp file left


def test_sample_with_the_compiled_loop_writes_the_static_loops_images(quick_demo, tmp_path, capsys):
    images = _low_resolution_folder(tmp_path / "in", [(8, 8), (8, 8)])
    outputs = {}
    for loop in ("static", "compile"):
        outputs[loop] = tmp_path / loop
        code = main(["sample", "--checkpoint", str(quick_demo / "runs" / "sr_mr"), "--input", str(images), "--nfe", "3",
                     "--out", str(outputs[loop]), "--loop", loop, "--no-progress", "--seed", "2"])
        assert code == 0, capsys.readouterr().err
    import numpy as np
    from PIL import Image

    written = sorted(p.name for p in outputs["static"].glob("*.png"))
    assert len(written) == 2 and written == sorted(p.name for p in outputs["compile"].glob("*.png"))
    for name in written:
        with Image.open(outputs["static"] / name) as static, Image.open(outputs["compile"] / name) as compiled:
            # float rounding in the compiled network can move a pixel across a rounding boundary, no further
            assert np.abs(np.asarray(static, dtype=int) - np.asarray(compiled, dtype=int)).max() <= 1, name


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    images = _low_resolution_folder(tmp_path / "in", [(8, 8)])
    code = main(["sample", "--checkpoint", str(tmp_path / "no_such_run"), "--input", str(images), "--out", str(tmp_path / "out")])
    line = _single_error_line(code, capsys.readouterr())
    assert "no checkpoint at" in line and "msdiff train" in line


def test_wrong_task_for_a_checkpoint_is_one_line(quick_demo, tmp_path, capsys):
    images = _low_resolution_folder(tmp_path / "in", [(8, 8)])
    code = main(["sample", "--checkpoint", str(quick_demo / "runs" / "sr_cmde"), "--input", str(images), "--out", str(tmp_path / "out"), "--task", "denoise"])
    line = _single_error_line(code, capsys.readouterr())
    assert "trained for task 'sr'" in line


def test_sampler_that_does_not_fit_the_model_is_one_line(quick_demo, tmp_path, capsys):
    images = _low_resolution_folder(tmp_path / "in", [(16, 16)])
    code = main(["sample", "--checkpoint", str(quick_demo / "runs" / "denoise"), "--input", str(images), "--out", str(tmp_path / "out"), "--sampler", "pc", "--nfe", "4"])
    line = _single_error_line(code, capsys.readouterr())
    assert "posterior" in line


def test_unreadable_image_is_one_line(quick_demo, tmp_path, capsys):
    images = _low_resolution_folder(tmp_path / "in", [(8, 8)])
    (images / "broken.png").write_bytes(b"this is not a PNG")
    code = main(["sample", "--checkpoint", str(quick_demo / "runs" / "sr_cmde"), "--input", str(images), "--out", str(tmp_path / "out")])
    line = _single_error_line(code, capsys.readouterr())
    assert "broken.png" in line and "cannot read image" in line


def test_out_directory_not_writable_is_one_line(quick_demo, tmp_path, capsys):
    images = _low_resolution_folder(tmp_path / "in", [(8, 8)])
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the output folder should go")
    code = main(["sample", "--checkpoint", str(quick_demo / "runs" / "sr_cmde"), "--input", str(images), "--out", str(blocker / "restored")])
    line = _single_error_line(code, capsys.readouterr())
    assert "cannot write there" in line and "--out" in line
    code = main(["demo", "--quick", "--out", str(blocker / "demo")])
    assert "cannot write there" in _single_error_line(code, capsys.readouterr())


def test_bad_flag_values_are_one_line(tmp_path, capsys):
    unused = str(tmp_path / "unused")
    code = main(["sample", "--checkpoint", "x", "--input", "y", "--out", "z", "--nfe", "ten"])
    assert "--nfe" in _single_error_line(code, capsys.readouterr())
    code = main(["demo", "--out", unused, "--pc-nfe", "7"])
    assert "--pc-nfe" in _single_error_line(code, capsys.readouterr())
    code = main(["train", "--out", unused, "--sampler", "pc"])
    assert "unrecognized arguments" in _single_error_line(code, capsys.readouterr())
    code = main(["train", "--out", unused, "--estimator", "mr", "--sigma-data", "0.5"])
    assert "--sigma-data: preconditions the VE estimators" in _single_error_line(code, capsys.readouterr())
    assert not (tmp_path / "unused").exists()  # refused before --out was created


def test_errors_from_a_subprocess_have_no_traceback(tmp_path):
    result = run_msdiff("sample", "--checkpoint", tmp_path / "missing", "--input", tmp_path, "--out", tmp_path / "out")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("msdiff: error: no checkpoint at")


# ---------------------------------------------------------------------------- train, resume, config files, bench
def test_train_refuses_an_existing_run_without_resume_and_resumes_with_it(tmp_path, capsys):
    out = tmp_path / "run"
    settings = ["--task", "denoise", "--estimator", "mr", "--image-size", "16", "--batch-size", "2", "--synthetic-count", "8",
                "--checkpoint-every", "0", "--no-progress"]
    assert main(["train", "--out", str(out), "--steps", "2", *settings]) == 0
    capsys.readouterr()
    code = main(["train", "--out", str(out), "--steps", "3", *settings])
    assert "--resume" in _single_error_line(code, capsys.readouterr())
    # resuming keeps the run's settings when the flags are left out
    assert main(["train", "--out", str(out), "--steps", "3", "--resume", "--no-progress"]) == 0
    from msdiff_fast.training.checkpoint import read_state

    state = read_state(out)
    assert state["step"] == 3 and state["description"]["task"] == "denoise" and state["description"]["image_size"] == 16


def test_config_file_sets_flags_and_command_line_flags_win(tmp_path):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"sample": {"nfe": 20, "sampler": "mr-ode", "order": 3, "no-progress": True}}))
    args = parse_arguments(["sample", "--config", str(config), "--checkpoint", "c", "--input", "i", "--out", "o", "--nfe", "5"])
    assert (args.nfe, args.sampler, args.order, args.no_progress) == (5, "mr-ode", 3, True)
    toml = tmp_path / "settings.toml"
    toml.write_text('steps = 123\ntask = "inpaint"\nhole-fraction = 0.1\n')
    if sys.version_info < (3, 11):  # no tomllib: the CLI says so instead of reading the file
        with pytest.raises(CLIError, match="TOML needs Python 3.11"):
            parse_arguments(["train", "--config", str(toml), "--out", "o"])
        return
    args = parse_arguments(["train", "--config", str(toml), "--out", "o"])
    assert (args.steps, args.task, args.hole_fraction) == (123, "inpaint", 0.1)


def test_config_file_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "settings.json"
    config.write_text(json.dumps({"steps": 10, "stepz": 5}))
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "o")])
    line = _single_error_line(code, capsys.readouterr())
    assert "'stepz'" in line and "valid:" in line
    config.write_text(json.dumps({"task": "nonsense"}))
    code = main(["train", "--config", str(config), "--out", str(tmp_path / "o")])
    assert "nonsense" in _single_error_line(code, capsys.readouterr())


def test_bench_times_every_sampler_and_reports_the_speedup(tmp_path, capsys):
    code = main(["bench", "--image-size", "16", "--batch", "1", "--nfe", "1", "2", "--repeats", "1", "--reference-nfe", "4",
                 "--out", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert code == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(row["sampler"].split()[0], row["nfe"]) for row in rows] == [("mr-sde", 1), ("mr-sde", 2), ("mr-ode", 1), ("mr-ode", 2), ("pc", 4)]
    assert all(row["seconds"] > 0 for row in rows) and rows[-1]["speedup"] == 1.0


def test_every_command_has_help(capsys):
    for command in ("demo", "train", "sample", "evaluate", "bench"):
        with pytest.raises(SystemExit) as exit_info:
            parse_arguments([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text and "--config" in text
