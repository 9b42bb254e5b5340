"""Issue 11: no user file lost, no code run from a file, no silent garbage. One test (or a few) per item."""
import json
import math
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import msdiff_fast
from msdiff_fast.cli import main
from msdiff_fast.ops import mr_step, noise_inject, weighted_score_loss
from msdiff_fast.training import read_image, write_image

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(out: Path, task: str = "denoise", steps: int = 1, extra=()) -> Path:
    code = main(["train", "--out", str(out), "--task", task, "--estimator", "mr", "--image-size", "16", "--batch-size", "2",
                 "--synthetic-count", "4", "--steps", str(steps), "--checkpoint-every", "0", "--no-progress", *extra])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny mean-reverting runs with the same network shapes: denoise and x2 super-resolution."""
    root = tmp_path_factory.mktemp("runs")
    return {"denoise": _train(root / "denoise"), "sr": _train(root / "sr", "sr")}


def _one_error_line(code, captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code != 0, captured
    assert len(lines) == 1 and lines[0].startswith("msdiff: error: "), captured.err
    return lines[0]


def _images(folder: Path, names, size=(16, 16)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        write_image(folder / name, torch.rand(3, *size, generator=torch.Generator().manual_seed(index)))
    return folder


def _sample(run: Path, source: Path, out: Path, *extra) -> int:
    return main(["sample", "--checkpoint", str(run), "--input", str(source), "--out", str(out), "--nfe", "1", "--no-progress", "--device", "cpu", *extra])


def _contents(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Evil:
    """A pickle that creates a directory when unpickled by anything that runs code from files."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _malicious_file(path: Path, marker: Path) -> Path:
    torch.save({"weights": Evil(marker)}, path)
    return path


# ---------------------------------------------------------------------------- 1. inputs overwritten
def test_item01_sample_refuses_output_folders_that_touch_the_input_and_never_overwrites(runs, tmp_path, capsys):
    source = _images(tmp_path / "imgs", ["a.png", "b.png"])
    before = _contents(source)
    (tmp_path / "link").symlink_to(source, target_is_directory=True)
    for out, relation in ((source, "is it"), (source / "sub", "lies inside"), (tmp_path, "contains"), (tmp_path / "link", "is it")):
        line = _one_error_line(_sample(runs["denoise"], source, out), capsys.readouterr())
        assert "--out" in line and "--input" in line and relation in line
    assert _contents(source) == before and not (source / "sub").exists()

    out = tmp_path / "restored"
    assert _sample(runs["denoise"], source, out) == 0
    capsys.readouterr()
    written = _contents(out)
    assert set(written) == {"a.png", "b.png"}
    inodes = {name: os.stat(out / name).st_ino for name in written}
    line = _one_error_line(_sample(runs["denoise"], source, out, "--seed", "1"), capsys.readouterr())
    assert "already exist" in line and "--overwrite" in line
    assert _contents(out) == written and inodes == {name: os.stat(out / name).st_ino for name in written}  # nothing replaced
    assert _sample(runs["denoise"], source, out, "--seed", "1", "--overwrite") == 0
    assert all(os.stat(out / name).st_ino != inode for name, inode in inodes.items())  # replaced (atomically: new files)


# ---------------------------------------------------------------------------- 2. name collisions
def test_item02_two_files_of_one_name_are_refused_before_any_work(runs, tmp_path, capsys):
    source = _images(tmp_path / "imgs", ["a.png", "a.jpg", "b.png"])
    out = tmp_path / "restored"
    line = _one_error_line(_sample(runs["denoise"], source, out), capsys.readouterr())
    assert "a.png" in line and "a.jpg" in line
    assert not out.exists()

    reference = _images(tmp_path / "truth", ["img0.png", "img0.jpg", "img1.png"])
    restored = _images(tmp_path / "restored_ok", ["img0.png", "img1.png"])
    code = main(["evaluate", "--restored", str(restored), "--reference", str(reference)])
    line = _one_error_line(code, capsys.readouterr())
    assert "img0.png" in line and "img0.jpg" in line and not (restored / "metrics.json").exists()


# ---------------------------------------------------------------------------- 3. concurrent runs, atomic outputs
def test_item03_a_second_run_into_a_busy_folder_fails_at_once(runs, tmp_path, capsys):
    from msdiff_fast.outputs import LOCK_FILE, OutputFolder

    source = _images(tmp_path / "imgs", ["a.png"])
    out = tmp_path / "restored"
    with OutputFolder(out):  # another run holds the folder
        started = time.perf_counter()
        line = _one_error_line(_sample(runs["denoise"], source, out), capsys.readouterr())
        assert time.perf_counter() - started < 30
        assert "another msdiff run" in line and f"pid {os.getpid()}" in line and str(out) in line
        for command in (["evaluate", "--restored", str(source), "--reference", str(source), "--out", str(out)],
                        ["bench", "--image-size", "16", "--batch", "1", "--nfe", "1", "--repeats", "1", "--reference-nfe", "2", "--out", str(out)],
                        ["train", "--out", str(out), "--steps", "1", "--image-size", "16", "--synthetic-count", "4", "--batch-size", "2"]):
            assert "another msdiff run" in _one_error_line(main(command), capsys.readouterr())
        assert not list(out.glob("*.png"))
    assert _sample(runs["denoise"], source, out) == 0  # the lock is released with the folder
    assert not (out / LOCK_FILE).exists()


def test_item03_outputs_are_written_atomically_and_leftovers_removed(tmp_path, monkeypatch):
    from msdiff_fast.outputs import OutputFolder

    original_save = Image.Image.save

    def killed_while_saving(image, target, *args, **kwargs):
        handle = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target
        handle.write(b"\x89PNG half an image")
        handle.flush()
        raise KeyboardInterrupt  # the process dies with the file half written

    monkeypatch.setattr(Image.Image, "save", killed_while_saving)
    destination = tmp_path / "out" / "a.png"
    with pytest.raises(KeyboardInterrupt):
        write_image(destination, torch.rand(3, 4, 4))
    assert not destination.exists() and list(destination.parent.iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", original_save)

    stale = tmp_path / "out" / "sub" / ".b.png.msdiff-tmp-12345"  # left by a run killed with SIGKILL
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    with OutputFolder(tmp_path / "out") as folder:
        assert not stale.exists()
        folder.write_text("report.md", "done\n")
        with pytest.raises(FileExistsError, match="--overwrite"):
            folder.write_text("report.md", "again\n")
    assert (tmp_path / "out" / "report.md").read_text() == "done\n"
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["report.md", "sub"]


# ---------------------------------------------------------------------------- 4. code execution
def _torchscript_file(path: Path) -> Path:
    class Features(torch.nn.Module):  # NVIDIA's call signature
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return img.float().mean(dim=(2, 3)).repeat(1, 4)

    torch.jit.script(Features()).save(str(path))
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_item04_inception_files_are_loaded_as_data_and_torchscript_only_behind_a_flag(tmp_path, capsys):
    from msdiff_fast.metrics import load_inception_torchscript

    images = _images(tmp_path / "imgs", ["a.png", "b.png", "c.png"])
    script = _torchscript_file(tmp_path / "inception.pt")
    out = tmp_path / "metrics"
    code = main(["evaluate", "--restored", str(images), "--reference", str(images), "--inception", str(script), "--out", str(out)])
    line = _one_error_line(code, capsys.readouterr())
    assert "--inception" in line and "--inception-torchscript" in line and not out.exists()  # the file's code never ran

    marker = tmp_path / "pwned"
    code = main(["evaluate", "--restored", str(images), "--reference", str(images), "--inception", str(_malicious_file(tmp_path / "evil.pth", marker)),
                 "--out", str(out)])
    assert "--inception" in _one_error_line(code, capsys.readouterr()) and not marker.exists()

    with pytest.raises(ValueError, match="trust_code"):
        load_inception_torchscript(script)
    code = main(["evaluate", "--restored", str(images), "--reference", str(images), "--inception-torchscript", str(script), "--out", str(out)])
    assert code == 0, capsys.readouterr().err  # the explicit flag still works, for files the user trusts
    assert json.loads((out / "metrics.json").read_text())["metrics"]["fid_inception"] is not None


def test_item04_checkpoint_and_lpips_files_never_run_code(runs, tmp_path, capsys):
    from msdiff_fast.training.checkpoint import latest_checkpoint

    marker = tmp_path / "pwned"
    weights = tmp_path / "lpips"
    weights.mkdir()
    for name in ("alexnet-owt-7be5be79.pth", "alex.pth"):
        _malicious_file(weights / name, marker)
    images = _images(tmp_path / "imgs", ["a.png"])
    code = main(["evaluate", "--restored", str(images), "--reference", str(images), "--lpips-weights", str(weights), "--out", str(tmp_path / "m")])
    assert "--lpips-weights" in _one_error_line(code, capsys.readouterr())
    for file in ("state.pt", "optimizer.pt"):
        run = tmp_path / f"run_{file}"
        _copy_tree(runs["denoise"], run)
        step = latest_checkpoint(run)
        _malicious_file(step / file, marker)
        _rehash(step)  # a crafted checkpoint carries a matching manifest
        code = main(["train", "--out", str(run), "--resume", "--steps", "2", "--no-progress"])
        assert file in _one_error_line(code, capsys.readouterr())
    assert not marker.exists()


def _copy_tree(source: Path, target: Path) -> None:
    import shutil

    shutil.copytree(source, target, symlinks=True)


def _rehash(step: Path) -> None:
    import hashlib

    manifest = json.loads((step / "manifest.json").read_text())
    manifest["sha256"] = {name: hashlib.sha256((step / name).read_bytes()).hexdigest() for name in manifest["sha256"]}
    (step / "manifest.json").write_text(json.dumps(manifest))


def test_item04_fid_inception_network_loads_a_state_dict_with_checked_keys(tmp_path):
    from msdiff_fast.inception import FIDInceptionV3, load_inception

    network = FIDInceptionV3()
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    # torchvision / pytorch-fid parameter names and shapes
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert network.Conv2d_1a_3x3.bn.eps == 0.001
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for name, buffer in network.named_buffers():  # random statistics, so batch norm is not the identity
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    state = dict(network.state_dict(), **{"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    loaded = load_inception(tmp_path)  # a directory: pytorch-fid's file name
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    features = loaded(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    torch.testing.assert_close(features, network(images))
    # any size is resized to 299 x 299 (bilinear), [0, 1] mapped to [-1, 1]; grey is repeated to RGB
    resized = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(loaded(resized), features, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loaded(images[:, :1]), loaded(images[:, :1].expand(-1, 3, -1, -1)))
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "inception.safetensors"))
    torch.testing.assert_close(load_inception(tmp_path / "inception.safetensors")(images), features)

    del state["Mixed_6a.branch3x3.conv.weight"]
    state["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    state["AuxLogits.fc.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as error:
        load_inception(tmp_path / "bad.pth")
    message = str(error.value)
    assert "\n" not in message and "missing Mixed_6a.branch3x3.conv.weight" in message
    assert "unexpected AuxLogits.fc.weight" in message and "misshapen Mixed_5b.branch1x1.conv.weight (1, 1, 1, 1)" in message


# ---------------------------------------------------------------------------- 5. image decoding
def _png16_rgb(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit RGB PNG (Pillow cannot write one): signature, IHDR, one IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_item05_every_kind_of_image_is_read_correctly_or_refused(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    expected_rgb = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    grey16 = (np.linspace(0, 1, 12 * 10).reshape(12, 10) ** 0.9 * 65535).round().astype(np.uint16)
    expected_grey16 = torch.from_numpy(grey16.astype(np.float32) / 65535)[None]

    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    grey = read_image(tmp_path / "grey16.png", channels=1)
    torch.testing.assert_close(grey, expected_grey16)
    assert abs(float(grey.mean()) - float(expected_grey16.mean())) < 1e-6 and float(grey.mean()) < 0.6  # not saturated (0.995)
    torch.testing.assert_close(read_image(tmp_path / "grey16.png", channels=3), expected_grey16.expand(3, -1, -1))

    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey8.png")
    torch.testing.assert_close(read_image(tmp_path / "grey8.png", 1), expected_rgb[:1])
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    torch.testing.assert_close(read_image(tmp_path / "rgb.png"), expected_rgb)
    opaque = np.concatenate([rgb, np.full((12, 10, 1), 255, np.uint8)], axis=2)
    Image.fromarray(opaque, "RGBA").save(tmp_path / "rgba_opaque.png")
    torch.testing.assert_close(read_image(tmp_path / "rgba_opaque.png"), expected_rgb)  # opaque alpha is dropped
    Image.fromarray(np.stack([rgb[..., 0], np.full((12, 10), 255, np.uint8)], axis=2), "LA").save(tmp_path / "la.png")
    torch.testing.assert_close(read_image(tmp_path / "la.png", 1), expected_rgb[:1])
    palette = Image.fromarray(rgb).quantize(64)
    palette.save(tmp_path / "palette.png")
    torch.testing.assert_close(read_image(tmp_path / "palette.png"), torch.from_numpy(np.array(palette.convert("RGB"))).permute(2, 0, 1).float() / 255)
    rgb16 = rgb.astype(np.uint16) * 256 + 77  # 16-bit colour: Pillow hands over the top 8 bits
    torch.testing.assert_close(read_image(_png16_rgb(tmp_path / "rgb16.png", rgb16)), expected_rgb)

    transparent = opaque.copy()
    transparent[0, 0, 3] = 0
    Image.fromarray(transparent, "RGBA").save(tmp_path / "rgba.png")
    palette.save(tmp_path / "palette_transparent.png", transparency=0)
    for name in ("rgba.png", "palette_transparent.png"):
        with pytest.raises(ValueError, match=f"{name}.*transparent"):
            read_image(tmp_path / name)


# ---------------------------------------------------------------------------- 6. limits
def test_item06_limits_are_checked_before_anything_is_allocated(runs, tmp_path, capsys, monkeypatch):
    from msdiff_fast import restoration as cli
    from msdiff_fast.samplers.timesteps import MAX_STEPS

    Image.new("L", (10000, 10000)).save(tmp_path / "bomb.png")  # ~100 KB claiming 10^8 pixels
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"10000x10000 is 100000000 pixels, more than the limit of 67108864"):
        read_image(tmp_path / "bomb.png")
    assert time.perf_counter() - started < 5  # the header was read, not the pixels

    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"steps: expected an int in 1..{MAX_STEPS}, got 100000000"):
        msdiff_fast.MRSampler(msdiff_fast.sde.VPSDE(), steps=10**8)
    with pytest.raises(ValueError, match="steps"):
        msdiff_fast.pc_sample(lambda x, t, c: x, msdiff_fast.sde.VESDE(), None, 10**9, shape=(1, 1, 2, 2))
    assert time.perf_counter() - started < 5
    source = _images(tmp_path / "imgs", ["a.png"])
    line = _one_error_line(_sample(runs["denoise"], source, tmp_path / "o1", "--nfe", "1000000000"), capsys.readouterr())
    assert "--nfe" in line and str(MAX_STEPS) in line
    line = _one_error_line(main(["demo", "--quick", "--pc-nfe", "1000000000", "--out", str(tmp_path / "demo")]), capsys.readouterr())
    assert "--pc-nfe" in line and str(2 * MAX_STEPS) in line and not (tmp_path / "demo").exists()

    monkeypatch.setattr(cli, "available_memory", lambda device: 2**10)
    line = _one_error_line(_sample(runs["denoise"], source, tmp_path / "o2"), capsys.readouterr())
    assert "needs at least" in line and "GiB" in line and "0.00 GiB are available" in line
    assert not (tmp_path / "o2").exists()
    # the estimate grows with the image and is at least the images and the sampler state
    small, large = cli.sampling_memory([(16, 16)], 3, 16, 4, 16), cli.sampling_memory([(4000, 3000)], 3, 16, 4, 16)
    assert large > 8 * 4 * 3 * 4000 * 3000 and small < large


# ---------------------------------------------------------------------------- 7. NaN guard
def _nan_at(call_index):
    calls = []

    def model(x, t, c):
        calls.append(1)
        return torch.full_like(x, math.nan) if len(calls) == call_index else torch.zeros_like(x)

    return model


def test_item07_every_sampler_path_checks_every_model_output():
    from msdiff_fast.sde import MRSDE, VESDE

    mr = MRSDE.from_irsde(50 / 255)
    mu = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (1, 4):  # the NaN comes at the last call, whose output denoise_last returns
        with pytest.raises(FloatingPointError, match=f"model's output at step {steps}/{steps}"):
            msdiff_fast.MRSampler(mr, steps, denoise_last=True).sample(_nan_at(steps), mu)
    with pytest.raises(FloatingPointError, match="pc_sample \\(corrector\\).*step 1/3"):
        msdiff_fast.pc_sample(_nan_at(1), VESDE(), None, 3, shape=(1, 3, 8, 8))
    for sampler in (msdiff_fast.posterior_sample, msdiff_fast.euler_maruyama, msdiff_fast.probability_flow_euler):
        with pytest.raises(FloatingPointError, match="model's output at step 3/3"):
            sampler(_nan_at(3), mr, mu, 3)


# ---------------------------------------------------------------------------- 8 and 9. backends agree
def _backends():
    names = ["torch", "cpu", "triton"] + (["cuda"] if HAS_CUDA else [])
    return [name for name in names if msdiff_fast.backends("cuda" if name == "cuda" else "cpu")["mr_step"][name] == "ok"]


@pytest.mark.parametrize("backend", _backends())
def test_item08_partial_overlap_is_refused_and_full_aliasing_allowed(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(5 * 8, generator=generator).to(device)
    x, out = buffer[:32].view(4, 8), buffer[8:].view(4, 8)
    term = torch.randn(4, 8, generator=generator).to(device)
    coefs = torch.rand(4, 2, generator=generator).to(device)
    with pytest.raises(ValueError, match="out: expected memory apart from x.*partly overlaps x"):
        mr_step(x, [term], coefs, out=out, backend=backend)
    with pytest.raises(ValueError, match="partly overlaps terms\\[0\\]"):
        mr_step(term, [x], coefs, out=out, backend=backend)
    expected = mr_step(x, [term], coefs, backend="torch")
    aliased = x.clone()
    assert mr_step(aliased, [term], coefs, out=aliased, backend=backend) is aliased  # out is x: allowed
    torch.testing.assert_close(aliased, expected)

    x0 = torch.randn(2, 3, 4, generator=generator).to(device)
    y0 = torch.randn(2, 1, 4, generator=generator).to(device)
    x_coefs, y_coefs = torch.rand(2, 2, generator=generator).to(device), torch.rand(2, 2, generator=generator).to(device)
    cat = torch.cat([x0, y0], dim=1)
    with pytest.raises(ValueError, match="out \\(its x part\\).*partly overlaps x0"):
        noise_inject(cat[:, 1:], x_coefs, y0, y_coefs, out=cat, backend=backend)
    reference = noise_inject(x0, x_coefs, y0, y_coefs, seed=3, backend="torch")
    in_place = cat.clone()  # x0 and y0 as the two halves of the output buffer: elementwise, allowed
    noise_inject(in_place[:, :3], x_coefs, in_place[:, 3:], y_coefs, seed=3, out=in_place, backend=backend)
    torch.testing.assert_close(in_place, torch.cat(reference, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_item08_inputs_the_ops_cannot_differentiate_in_are_refused_on_every_backend(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    x, term = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    coefs = torch.rand(3, 2, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="coefs: expected a tensor that does not require grad"):
        mr_step(x, [term], coefs, backend=backend)
    with pytest.raises(ValueError, match="noise_coef"):
        mr_step(x, [term], coefs.detach(), torch.rand(3, device=device, requires_grad=True), backend=backend)
    with torch.no_grad():  # nothing is tracked: fine
        mr_step(x, [term], coefs, backend=backend)
    with pytest.raises(ValueError, match="x_coefs: expected a tensor that does not require grad \\(noise_inject is not differentiable"):
        noise_inject(x[:, None], coefs, backend=backend)
    with pytest.raises(ValueError, match="coefs: expected a tensor that does not require grad"):
        weighted_score_loss(x, torch.rand(3, 1, 3, device=device, requires_grad=True), backend=backend)
    # what the ops are differentiable in gives the same gradient everywhere
    x.requires_grad_(True)
    mr_step(x, [term], coefs.detach(), backend=backend).sum().backward()
    torch.testing.assert_close(x.grad, coefs.detach()[:, :1].expand(3, 5))


@pytest.mark.parametrize("backend", _backends())
def test_item09_an_empty_batch_gives_an_empty_result_on_every_backend(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    empty = torch.zeros(0, 3, 4, device=device)
    coefs = torch.zeros(0, 3, device=device)
    assert mr_step(empty, [empty, empty], coefs, torch.zeros(0, device=device), backend=backend).shape == (0, 3, 4)
    assert mr_step(empty, [empty], coefs[:, :2], out=torch.zeros(0, 3, 4, device=device), backend=backend).shape == (0, 3, 4)
    x_t, y_t = noise_inject(empty, coefs[:, :2], torch.zeros(0, 1, 4, device=device), coefs[:, :2], mu=empty, backend=backend)
    assert x_t.shape == (0, 3, 4) and y_t.shape == (0, 1, 4)
    x_t, y_t = noise_inject(empty, coefs[:, :2], torch.zeros(0, 1, 4, device=device), backend=backend)
    assert x_t.shape == (0, 3, 4) and y_t.shape == (0, 1, 4)
    loss_coefs = torch.zeros(0, 1, 3, device=device)
    assert weighted_score_loss(empty, loss_coefs, backend=backend).shape == (0,)
    assert float(weighted_score_loss(empty, loss_coefs, reduction="sum", backend=backend)) == 0.0
    with pytest.raises(ValueError, match="mean"):
        weighted_score_loss(empty, loss_coefs, reduction="mean", backend=backend)


def test_item09_samplers_return_an_empty_batch_for_an_empty_batch():
    from msdiff_fast.sde import MRSDE, VESDE

    mr, mu = MRSDE.from_irsde(50 / 255), torch.zeros(0, 3, 8, 8)
    for solver, order in (("sde", 2), ("ode", 3)):
        assert msdiff_fast.MRSampler(mr, 5, solver=solver, order=order).sample(lambda x, t, c: x, mu).shape == (0, 3, 8, 8)
    for sampler in (msdiff_fast.posterior_sample, msdiff_fast.euler_maruyama):
        assert sampler(lambda x, t, c: x, mr, mu, 3).shape == (0, 3, 8, 8)
    assert msdiff_fast.pc_sample(lambda x, t, c: x, VESDE(), None, 3, shape=(0, 3, 8, 8)).shape == (0, 3, 8, 8)


# ---------------------------------------------------------------------------- 10. one line, not a traceback
def test_item10_user_errors_are_one_line(runs, tmp_path, capsys):
    from msdiff_fast.sde import MRSDE
    from msdiff_fast.training.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    _copy_tree(runs["denoise"], run)
    line = _one_error_line(main(["train", "--out", str(run), "--resume", "--task", "sr", "--steps", "2", "--no-progress"]), capsys.readouterr())
    assert "--resume" in line and "task 'denoise' (asked: 'sr')" in line
    source = _images(tmp_path / "imgs", ["a.png"])
    line = _one_error_line(_sample(runs["denoise"], source, tmp_path / "out", "--seed", str(2**70)), capsys.readouterr())
    assert "--seed" in line and not (tmp_path / "out").exists()

    (run / "checkpoints" / "latest").write_bytes(bytes(range(256)))  # a damaged pointer
    assert latest_checkpoint(run).name.startswith("step_")  # the newest complete checkpoint instead
    assert _sample(run, source, tmp_path / "out") == 0

    mr = MRSDE.from_irsde(50 / 255)
    with pytest.raises(TypeError, match="generator: expected a torch.Generator or None, got int"):
        msdiff_fast.MRSampler(mr, 2).sample(lambda x, t, c: x, torch.zeros(1, 3, 4, 4), generator=0)
    with pytest.raises(ValueError, match="mu: expected a tensor with a batch dimension"):
        msdiff_fast.MRSampler(mr, 2).sample(lambda x, t, c: x, torch.tensor(0.5))
    with pytest.raises(TypeError, match="generator"):
        msdiff_fast.posterior_sample(lambda x, t, c: x, mr, torch.zeros(1, 3, 4, 4), 2, generator=0)


# ---------------------------------------------------------------------------- 11. checkpoint integrity
def test_item11_weights_of_another_run_or_with_flipped_bits_are_refused(runs, tmp_path):
    from msdiff_fast.cli import CLIError
    from msdiff_fast.restoration import load_trained
    from msdiff_fast.training.checkpoint import latest_checkpoint

    run = tmp_path / "sr"
    _copy_tree(runs["sr"], run)
    step = latest_checkpoint(run)
    foreign = latest_checkpoint(runs["denoise"]) / "ema.safetensors"
    (step / "ema.safetensors").write_bytes(foreign.read_bytes())
    with pytest.raises(CLIError, match="ema.safetensors does not match its sha256"):
        load_trained(run, torch.device("cpu"))
    _rehash(step)  # even with a matching manifest, the file's own metadata names its model
    with pytest.raises(CLIError, match="task: checkpoint 'denoise' vs expected 'sr'"):
        load_trained(run, torch.device("cpu"))

    _copy_tree(runs["sr"], tmp_path / "flipped")
    step = latest_checkpoint(tmp_path / "flipped")
    data = bytearray((step / "ema.safetensors").read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    rng = np.random.default_rng(0)
    for position in rng.choice(np.arange(header + 3, len(data), 4), 200, replace=False):
        data[position] ^= 0x40  # an exponent bit of a float32 (little-endian: the top byte)
    (step / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(CLIError, match="does not match its sha256"):
        load_trained(tmp_path / "flipped", torch.device("cpu"))


def test_item11_latest_never_leads_out_of_the_run(runs, tmp_path):
    from msdiff_fast.training.checkpoint import latest_checkpoint, resolve_checkpoint

    run = tmp_path / "run"
    _copy_tree(runs["denoise"], run)
    own = latest_checkpoint(run)
    outside = tmp_path / "outside" / "step_99999999"
    _copy_tree(own, outside)
    folder = run / "checkpoints"
    (folder / "step_99999998").symlink_to(outside, target_is_directory=True)
    for pointer in ("../../outside/step_99999999", str(outside), "../../..", "step_99999998"):
        (folder / "latest").write_text(pointer + "\n")
        assert latest_checkpoint(run) == own
        assert resolve_checkpoint(run) == own


# ---------------------------------------------------------------------------- 12. leftovers
def test_item12_pruning_and_pointer_writes_leave_no_incomplete_or_stale_files(tmp_path, monkeypatch):
    import shutil

    from msdiff_fast.training import checkpoint

    model = torch.nn.Linear(2, 2)
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save_checkpoint(folder, step, model, model, {"optimizer": {}, "scaler": {}}, {"estimator": {}}, {"task": "t"}, "mr")
    (folder / ".latest.tmp-999999").write_text("step_00000001\n")  # a pointer write killed half way
    real_rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        (Path(path) / "optimizer.pt").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune_checkpoints(folder, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    steps = [p for p in folder.iterdir() if p.name.startswith("step_")]
    assert all((p / name).is_file() for p in steps for name in ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt"))
    checkpoint.save_checkpoint(folder, 3, model, model, {"optimizer": {}, "scaler": {}}, {"estimator": {}}, {"task": "t"}, "mr")
    checkpoint.prune_checkpoints(folder, keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000003"]


def test_item12_train_checks_every_flag_before_creating_out(tmp_path, capsys):
    out = tmp_path / "unused"
    for flags in (["--estimator", "mr", "--sigma-data", "0.5"], ["--batch-size", "0"], ["--image-size", "18"], ["--device", "tpu"]):
        _one_error_line(main(["train", "--out", str(out), *flags]), capsys.readouterr())
        assert not out.exists(), flags


# ---------------------------------------------------------------------------- 13. smaller
def test_item13_smaller_checks():
    from msdiff_fast.compat import to_k_diffusion
    from msdiff_fast.samplers import get_timesteps
    from msdiff_fast.sde import MRSDE, VPSDE, SubVPSDE

    output = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="split: expected an int"):
        weighted_score_loss(output, torch.zeros(2, 2, 3), split=True)

    mr, mu = MRSDE.from_irsde(50 / 255), torch.rand(1, 3, 4, 4)
    for dtype in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=f"model: expected a floating-point output .* got {dtype}"):
            msdiff_fast.MRSampler(mr, 2).sample(lambda x, t, c: torch.zeros(x.shape, dtype=dtype), mu)
    with pytest.raises(ValueError, match="mu: expected finite values"):
        msdiff_fast.MRSampler(mr, 2).sample(lambda x, t, c: x, torch.full((1, 3, 4, 4), math.nan))
    nan_weights = torch.nn.Conv2d(3, 3, 1)
    torch.nn.init.constant_(nan_weights.weight, math.nan)
    with pytest.raises(FloatingPointError) as error:
        msdiff_fast.MRSampler(mr, 2).sample(lambda x, t, c: nan_weights(x), mu)
    assert "weights" in str(error.value) and "more steps" not in str(error.value).replace("more steps will not help", "")

    if not HAS_CUDA:
        assert all(row["triton"] != "ok" for row in msdiff_fast.backends("cuda").values())

    for sde in (VPSDE(), SubVPSDE()):
        denoiser = to_k_diffusion(lambda x, t, c: torch.zeros_like(x), sde, model_output="noise")
        assert denoiser.sigma_min > 0
        sigmas = torch.exp(torch.linspace(math.log(denoiser.sigma_max), math.log(denoiser.sigma_min), 5))  # get_sigmas_karras' range
        assert all(torch.isfinite(denoiser(torch.ones(1, 2), sigma)).all() for sigma in sigmas)

    vp = VPSDE()
    t0 = float(torch.tensor(vp.T, dtype=torch.float32).double()) + 3.4e-8
    times = get_timesteps(vp, 2, [t0, 0.5, 1e-3])
    assert float(times[0]) == vp.T
    with pytest.raises(ValueError, match="timesteps"):
        get_timesteps(vp, 2, [vp.T + 1e-3, 0.5, 1e-3])
