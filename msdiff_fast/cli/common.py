"""What the subcommands share: the parser's error and help style, the common flags, and the
checks that turn a flag's value (a device, a seed, a folder of images, an output folder) into
the object the library takes, with one-line errors that name the flag."""

import argparse
import contextlib
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..errors import UsageError, one_line
from ..outputs import FolderBusyError, OutputFolder, check_no_collisions, check_separate_folders
from ..training.data import IMAGE_EXTENSIONS, read_image
from ..training.tasks import TASK_OPTION_DEFAULTS, UPSAMPLING

PROG = "msdiff"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as UsageError, printed by main)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')", 2)


def add_command(commands, name: str, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The subcommand ``name``'s parser: ``summary`` in ``msdiff --help``, the rest in its own help."""
    return commands.add_parser(name, formatter_class=HelpFormatter, help=summary, description=description, epilog=epilog)


def add_common(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="JSON or TOML file of settings (keys: these flags' long names); flags given here win"
    )
    if device:
        parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def add_task_options(parser: argparse.ArgumentParser) -> None:
    defaults = TASK_OPTION_DEFAULTS
    parser.add_argument("--scale", type=int, help=f"sr: upscaling factor (default {defaults['scale']})")
    parser.add_argument(
        "--upsample",
        choices=UPSAMPLING,
        help="sr: how the low-resolution condition is brought to the output size "
        "(default: bicubic for --estimator mr, whose diffusion starts from it; nearest for the others, as the CMDE paper)",
    )
    parser.add_argument("--hole-fraction", type=float, help=f"inpaint: hole area fraction (default {defaults['hole_fraction']})")
    parser.add_argument(
        "--noise-sigma", type=float, help=f"denoise: noise std on the 0-255 scale (default {defaults['noise_sigma']:g})"
    )
    parser.add_argument("--quality", type=int, help=f"jpeg: JPEG quality 1-100 (default {defaults['quality']})")


def command_line() -> str:
    """The command as the user typed it, for reports."""
    return " ".join([PROG, *sys.argv[1:]]) if sys.argv and sys.argv[0] else PROG


def device_from(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}", 2) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def check_seed(seed: Optional[int], flag: str = "--seed") -> None:
    if seed is not None and not 0 <= seed < 2**63:
        raise UsageError(f"{flag}: expected an integer in [0, 2**63), got {seed}", 2)


@contextlib.contextmanager
def output_folder(path, overwrite: bool = False, flag: str = "--out", overwrite_flag: Optional[str] = "--overwrite"):
    """``outputs.OutputFolder`` (created if needed, locked against other runs, atomic writes that
    never replace a file unless ``overwrite``) with its errors as one-line UsageErrors."""
    folder = OutputFolder(path, flag, overwrite, overwrite_flag)
    try:
        folder.__enter__()
    except FolderBusyError as err:
        raise UsageError(str(err)) from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(f"{flag} {path}: cannot write there ({reason}); choose a directory you can write to") from None
    try:
        yield folder
    except FileExistsError as err:  # OutputFolder.check_new / write refusing to replace a file
        raise UsageError(one_line(err)) from None
    finally:
        folder.__exit__(None, None, None)


def check_apart(output, output_flag: str, source, source_flag: str) -> None:
    try:
        check_separate_folders(output, output_flag, source, source_flag)
    except ValueError as err:
        raise UsageError(one_line(err), 2) from None


def relative_names(files: Sequence[Path], root, flag: str, suffix: Optional[str] = None) -> List[str]:
    """Each file's path relative to ``root`` (with ``suffix`` instead of its extension; without
    one, with no extension); raises UsageError naming two files that share a name (a.png, a.jpg)."""
    names = [(p.relative_to(root).with_suffix(suffix or "")).as_posix() for p in files]
    try:
        check_no_collisions(names, files, flag)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    return names


def list_images(folder, flag: str) -> List[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{flag} {root}: no such directory")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise UsageError(f"{flag} {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    return files


def load_image(path: Path, channels: int) -> torch.Tensor:
    try:
        return read_image(path, channels)
    except (ValueError, OSError) as err:
        raise UsageError(f"{one_line(err)}; convert or remove that file") from None
