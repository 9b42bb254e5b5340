"""The README's own spelling works: every Python example runs and every `msdiff` command line in
it parses (its flags exist and take the values written there)."""

import re
import shlex
from pathlib import Path

import pytest
import torch

import msdiff_fast as mf

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language: str):
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def example_names():
    """What the README's examples take as given: a trained network, the model callable around it,
    a degraded image and an SDE (a tiny untrained U-Net of the "mr" layout here)."""
    from msdiff_fast.models import unet_preset
    from msdiff_fast.sde import MRSDE

    torch.manual_seed(0)
    net = unet_preset("tiny", estimator="mr", image_channels=3, cond_channels=3, image_size=16).eval()
    return {
        "torch": torch,
        "mf": mf,
        "net": net,
        "model": lambda x_t, t, mu: net(torch.cat([x_t - mu, mu], dim=1), t),
        "degraded": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
        "sde": MRSDE.from_irsde(50, T=100, schedule="cosine", eps=0.005, convention="irsde"),
    }


PYTHON_EXAMPLES = code_blocks("python")


def test_the_readme_has_examples():
    assert len(PYTHON_EXAMPLES) >= 2
    assert any(line.startswith("msdiff ") for block in code_blocks("bash") for line in block.splitlines())


@pytest.mark.parametrize("index", range(len(PYTHON_EXAMPLES)))
def test_python_example_runs(index):
    names = example_names()
    with torch.no_grad():
        exec(compile(PYTHON_EXAMPLES[index], f"README.md python example {index}", "exec"), names)
    restored = names.get("restored")
    assert restored is not None, "each sampling example ends with `restored`"
    assert restored.shape == names["degraded"].shape and torch.isfinite(restored).all()


def msdiff_command_lines():
    lines = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            if line.startswith("msdiff "):
                words = shlex.split(line, comments=True)
                lines.append([word for word in words[1:] if not (word.startswith("[") and word.endswith("]"))])
    return lines


@pytest.mark.parametrize("argv", msdiff_command_lines(), ids=lambda argv: " ".join(argv[:1]))
def test_msdiff_command_line_parses(argv):
    from msdiff_fast.cli import parse_arguments

    args = parse_arguments(argv)
    assert args.command == argv[0]
