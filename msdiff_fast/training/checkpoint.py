"""Training checkpoints: written atomically, found again after a crash, checked before loading.

Layout of ``<out_dir>/checkpoints``::

    step_00001000/model.safetensors   raw weights (metadata: step, description, estimator)
    step_00001000/ema.safetensors     EMA weights (the ones to sample with)
    step_00001000/optimizer.pt        optimizer and GradScaler state (torch.save)
    step_00001000/state.pt            step, estimator state, config, description, seconds
    step_00001000/manifest.json       sha256 of each of the four files above
    latest                            one line: the directory name of the newest checkpoint

A checkpoint is assembled in a hidden ``.step_*.partial-<pid>`` directory, every file flushed and
fsynced, then the directory is renamed to its final name and ``latest`` is replaced last (temp
file, fsync, ``os.replace``). Pruning first renames a directory to a hidden ``.step_*.deleting-<pid>``
name and only then deletes its files. A crash at any moment therefore leaves ``latest`` naming a
complete checkpoint, and a directory named ``step_*`` is always complete; hidden leftovers of a
crash are removed by the next save.

Loading checks before anything is used: every file against its sha256 in the manifest (a flipped
bit or a file copied in from another run is refused), the weights' own metadata (kind, step,
description) against state.pt, and ``latest`` must name a ``step_*`` directory of the run itself
(an absolute path, ``..`` or a symlink out of the run is ignored, as is an unreadable pointer:
the newest complete ``step_*`` directory is used instead). Nothing is ever loaded as code:
safetensors, and ``torch.load(weights_only=True)`` for the optimizer and state; every failure is a
ValueError that names the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import safetensors.torch
import torch

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "msdiff_fast.checkpoint/1"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)(?:-(\d+))?$")
_FILES = ("model.safetensors", "ema.safetensors", "optimizer.pt", "state.pt")
MANIFEST = "manifest.json"
# leftovers of a killed save or prune, and of a killed atomic_write (e.g. of ``latest``)
_LEFTOVER = re.compile(r"^\.(step_\d+(?:-\d+)?\.(partial|deleting)|.+\.(msdiff-)?tmp)-\d+$")


# ---------------------------------------------------------------------------- atomic files
def _fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_synced(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: PathLike, write: Callable[[Any], None]) -> None:
    """Write a file so that readers see either the old content or the complete new one:
    ``write(binary_file)`` fills a temp file in the same directory, which is fsynced and then
    ``os.replace``d over ``path``. On any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.msdiff-tmp-{os.getpid()}")
    try:
        _write_synced(temp, write)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


# ---------------------------------------------------------------------------- helpers
def _cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    # A copy: safetensors refuses tensors that share storage, and the caller keeps training.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _metadata(step: int, description: Mapping, estimator_name: str, kind: str) -> Dict[str, str]:
    return {
        "format": FORMAT,
        "kind": kind,
        "step": str(step),
        "estimator": estimator_name,
        "description": json.dumps(description, sort_keys=True),
    }


def check_description(description) -> Dict[str, Any]:
    """Return ``description`` as a dict after checking it is JSON-serialisable with string keys."""
    if description is None:
        return {}
    if not isinstance(description, Mapping) or not all(isinstance(k, str) for k in description):
        raise TypeError(
            f"description: expected a dict with string keys (e.g. {{'preset': 'tiny', "
            f"'estimator': 'cmde'}}), got {type(description).__name__}"
        )
    try:
        return json.loads(json.dumps(dict(description), sort_keys=True))
    except (TypeError, ValueError) as err:
        raise TypeError(f"description: expected JSON-serialisable values, got {description!r} ({err})") from err


def _step_of(name: str) -> Optional[int]:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------- finding
def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint directory of a run (``out_dir`` or its ``checkpoints``
    folder), or None when there is none. Follows ``latest``; if that pointer is missing or names a
    removed directory, falls back to the ``step_*`` directory with the highest step."""
    root = Path(out_dir)
    folder = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not folder.is_dir():
        return None
    target = _pointed_to(folder)
    if target is not None:
        return target
    candidates = [
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.is_symlink() and _step_of(p.name) is not None and all((p / f).is_file() for f in _FILES)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (_step_of(p.name), p.stat().st_mtime_ns))


def _pointed_to(folder: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, when it names a ``step_*`` directory directly inside
    ``folder`` (after resolving symlinks); None for a missing, unreadable or escaping pointer."""
    try:
        name = (folder / LATEST).read_bytes()[:256].decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if _step_of(name) is None:  # also rules out "/", "..", and anything but one step_* name
        return None
    target = folder / name
    if not target.is_dir() or target.resolve().parent != folder.resolve():
        return None
    return target


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint directory from any of: the directory itself, a file inside it, a run's
    out_dir, or its ``checkpoints`` folder. Raises FileNotFoundError naming what was searched."""
    path = Path(path)
    if path.is_file() and path.name in _FILES:
        path = path.parent
    if path.is_dir() and (path / "state.pt").is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"checkpoint: no checkpoint at {path} (expected a checkpoint directory with "
        f"{', '.join(_FILES)}, or a run directory whose checkpoints/latest names one)"
    )


# ---------------------------------------------------------------------------- saving
def save_checkpoint(
    folder: PathLike,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer_state: Mapping,
    state: Mapping,
    description: Mapping,
    estimator_name: str,
) -> Path:
    """Write one checkpoint under ``folder`` (a run's ``checkpoints`` directory) and point
    ``latest`` at it; return its directory. ``state`` is torch.save'd as state.pt together with
    step, description and estimator name. Never replaces an existing checkpoint directory."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name, suffix = f"step_{step:08d}", 1
    while (folder / name).exists():  # e.g. a resumed run that forked from an older checkpoint
        name, suffix = f"step_{step:08d}-{suffix}", suffix + 1
    partial = folder / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    full_state = dict(state, format=FORMAT, step=step, description=dict(description), estimator_name=estimator_name)
    try:
        for file, module, kind in (("model.safetensors", model, "model"), ("ema.safetensors", ema, "ema")):
            blob = safetensors.torch.save(_cpu_state(module), _metadata(step, description, estimator_name, kind))
            _write_synced(partial / file, lambda handle: handle.write(blob))
        _write_synced(partial / "optimizer.pt", lambda handle: torch.save(dict(optimizer_state), handle))
        _write_synced(partial / "state.pt", lambda handle: torch.save(full_state, handle))
        manifest = {"format": FORMAT, "sha256": {file: _sha256((partial / file).read_bytes()) for file in _FILES}}
        _write_synced(partial / MANIFEST, lambda handle: handle.write(json.dumps(manifest, indent=1).encode()))
        _fsync_directory(partial)
        os.rename(partial, folder / name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _fsync_directory(folder)
    atomic_write(folder / LATEST, lambda handle: handle.write(f"{name}\n".encode()))
    return folder / name


def prune_checkpoints(folder: PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoint directories (never the one ``latest`` names)
    and leftovers of saves, prunes and pointer writes that were killed mid-way (hidden
    ``.step_*.partial-<pid>``, ``.step_*.deleting-<pid>``, ``.latest.msdiff-tmp-<pid>``, and
    ``.latest.tmp-<pid>`` of earlier versions). ``keep`` 0 keeps every checkpoint."""
    folder = Path(folder)
    current = latest_checkpoint(folder)
    for leftover in folder.iterdir():
        if _LEFTOVER.match(leftover.name):  # saves and prunes are sequential: none is in progress
            _remove(leftover)
    if keep <= 0:
        return
    checkpoints = sorted(
        (p for p in folder.iterdir() if p.is_dir() and _step_of(p.name) is not None),
        key=lambda p: (_step_of(p.name), p.stat().st_mtime_ns),
    )
    for old in checkpoints[:-keep]:
        if current is None or old.resolve() != current.resolve():
            # Out of the step_* namespace first (one atomic rename), so that a kill while its files
            # are deleted never leaves an incomplete step_* directory behind.
            doomed = folder / f".{old.name}.deleting-{os.getpid()}"
            os.rename(old, doomed)
            _fsync_directory(folder)
            shutil.rmtree(doomed, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- loading
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified_bytes(directory: Path, file: str) -> bytes:
    """The content of ``directory/file`` after checking it against the checkpoint's manifest."""
    path = directory / file
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"checkpoint: cannot read {path} ({err.strerror or err})") from None
    try:
        manifest = json.loads((directory / MANIFEST).read_bytes())
    except FileNotFoundError:
        warnings.warn(
            f"checkpoint {directory} has no {MANIFEST} (written before content hashes): its files cannot be verified",
            stacklevel=3,
        )
        return data
    except (OSError, ValueError) as err:
        raise ValueError(f"checkpoint: {directory / MANIFEST} is damaged ({err})") from None
    expected = (
        manifest.get("sha256", {}).get(file) if isinstance(manifest, dict) and isinstance(manifest.get("sha256"), dict) else None
    )
    if expected is None:
        raise ValueError(f"checkpoint: {directory / MANIFEST} lists no hash for {file}; the checkpoint is damaged")
    if _sha256(data) != expected:
        raise ValueError(
            f"checkpoint: {path} does not match its sha256 in {MANIFEST} (damaged, or replaced after it was "
            f"written); use another checkpoint of the run"
        )
    return data


def file_in(path: PathLike, name_in_directory: str) -> str:
    """``path`` as a str, or the file ``name_in_directory`` inside it when ``path`` is a directory."""
    path = os.fspath(path)
    return os.path.join(path, name_in_directory) if os.path.isdir(path) else path


def load_data(source: Union[PathLike, io.BytesIO]) -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU: tensors and plain containers only,
    never code (pickled globals and TorchScript archives raise). Quiet about TorchScript: torch
    warns before it refuses one, and the caller's error says what to do instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
        return torch.load(source, map_location="cpu", weights_only=True)


def _torch_data(directory: Path, file: str) -> Any:
    """A torch.save'd file of a checkpoint, verified, read as data only (weights_only=True)."""
    data = _verified_bytes(directory, file)
    try:
        return load_data(io.BytesIO(data))
    except Exception as err:  # pickle, zip and torch errors: a file that is not plain tensors and containers
        raise ValueError(
            f"checkpoint: cannot read {directory / file} as data (weights_only=True): "
            f"{' '.join(str(err).split())[:300] or type(err).__name__}"
        ) from None


def read_state(checkpoint: PathLike) -> Dict[str, Any]:
    """state.pt of a checkpoint (step, estimator state, config, description, ...), on the CPU."""
    directory = resolve_checkpoint(checkpoint)
    state = _torch_data(directory, "state.pt")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {directory / 'state.pt'} is not a {FORMAT} checkpoint state")
    missing = [key for key in ("step", "description", "estimator_name") if key not in state]
    if missing or not isinstance(state["description"], dict) or not isinstance(state["step"], int):
        raise ValueError(f"checkpoint: {directory / 'state.pt'} lacks {missing or 'a valid step and description'}; it is damaged")
    return state


def read_optimizer_state(checkpoint: PathLike) -> Dict[str, Any]:
    """optimizer.pt of a checkpoint: {"optimizer": ..., "scaler": ...} state dicts, on the CPU."""
    directory = resolve_checkpoint(checkpoint)
    state = _torch_data(directory, "optimizer.pt")
    if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict) or not isinstance(state.get("scaler"), dict):
        raise ValueError(f"checkpoint: {directory / 'optimizer.pt'} is not an optimizer and scaler state")
    return state


def _safetensors_metadata(data: bytes) -> Dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__") or {}


def read_weights(checkpoint: PathLike, ema: bool = True, description: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
    """The EMA (default) or raw weights of a checkpoint as a CPU state dict, verified against the
    manifest; with ``description``, the file's own metadata must describe that model."""
    directory = resolve_checkpoint(checkpoint)
    kind = "ema" if ema else "model"
    file = f"{kind}.safetensors"
    data = _verified_bytes(directory, file)
    try:
        weights = safetensors.torch.load(data)
        metadata = _safetensors_metadata(data)
        found = json.loads(metadata["description"]) if "description" in metadata else None
    except Exception as err:  # safetensors, struct and json errors of a damaged file
        raise ValueError(f"checkpoint: cannot read {directory / file}: {' '.join(str(err).split())[:300]}") from None
    if metadata.get("kind", kind) != kind:
        raise ValueError(f"checkpoint: {directory / file} holds {metadata['kind']!r} weights, expected {kind!r}")
    if description is not None and found is not None:
        check_same_description(found, check_description(description), str(directory / file))
    return weights


def check_compatible(weights: Mapping[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """Raise ValueError listing missing, unexpected and differently shaped tensors."""
    own = model.state_dict()
    missing = sorted(own.keys() - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    reshaped = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & weights.keys())
        if weights[k].shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        details = "; ".join(
            part
            for part in (
                f"missing {_short(missing)}" if missing else "",
                f"unexpected {_short(unexpected)}" if unexpected else "",
                f"shape mismatch {_short(reshaped)}" if reshaped else "",
            )
            if part
        )
        raise ValueError(f"checkpoint {where} does not fit this model (another preset or shape?): {details}")


def check_same_description(found: Mapping, expected: Mapping, where: str) -> None:
    """Raise ValueError naming every key whose value differs between two model descriptions."""
    keys = sorted(set(found) | set(expected))
    differences = [
        f"{k}: checkpoint {found.get(k, '<absent>')!r} vs expected {expected.get(k, '<absent>')!r}"
        for k in keys
        if found.get(k, "<absent>") != expected.get(k, "<absent>")
    ]
    if differences:
        raise ValueError(
            f"checkpoint {where} was made for another model ({'; '.join(differences)}); "
            f"use a new out_dir or the settings it was trained with"
        )


def _short(items, limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def load_checkpoint(
    path: PathLike, model: torch.nn.Module, ema: bool = True, description: Optional[Mapping] = None
) -> Dict[str, Any]:
    """Load the EMA (default) or raw weights of a checkpoint into ``model`` for sampling.

    ``path``: a checkpoint directory, a file in it, or a run's out_dir (its latest checkpoint).
    ``description``: when given, must equal the one stored (e.g. {"preset": "tiny", ...}).
    Everything is checked before ``model`` is touched. Returns the stored state: ``step``,
    ``description``, ``estimator_name``, ``estimator`` (its state_dict, e.g. sigma_y_max), ``config``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(ema, bool):
        raise TypeError(f"ema: expected a bool, got {type(ema).__name__}")
    directory = resolve_checkpoint(path)
    state = read_state(directory)
    if description is not None:
        check_same_description(state["description"], check_description(description), str(directory))
    weights = read_weights(directory, ema, description=state["description"])
    check_compatible(weights, model, str(directory))
    model.load_state_dict(weights)
    state["path"] = str(directory)
    return state
