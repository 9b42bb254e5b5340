"""Output folders that keep a user's files safe: one writer at a time, nothing overwritten unless
asked, every file complete or absent.

``OutputFolder(path)`` is a context manager used by every command that writes user-visible files:

- it takes an exclusive, non-blocking ``fcntl.flock`` on ``path/.msdiff.lock``: a second run into
  the same folder fails at once (``FolderBusyError``, naming the folder and the holder's pid)
  instead of interleaving its files with the first run's;
- ``check_new(relatives)`` refuses, before any work starts, files that exist unless the folder
  was opened with ``overwrite=True``; ``write(relative, write)`` writes one file atomically (temp
  file in the same folder, fsync, ``os.replace``; the temp file is removed on any error) and
  refuses an existing file the same way;
- on exit, error or not, it removes the lock file; on entry it removes temp files left by a run
  that was killed (none can be in use: the lock is held).

Where flock does not exist (Windows) the lock is an ``O_EXCL`` lock file instead, which a killed
run leaves behind; its message says to delete it.
"""

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from .training.checkpoint import atomic_write

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

PathLike = Union[str, "os.PathLike[str]"]
LOCK_FILE = ".msdiff.lock"
# atomic_write's temp files: .<name>.msdiff-tmp-<pid> (a name no other program uses)
_TEMP_FILE = re.compile(r"^\..+\.msdiff-tmp-\d+$")


class FolderBusyError(OSError):
    """Another run holds the folder's lock."""


def check_separate_folders(output: PathLike, output_flag: str, source: PathLike, source_flag: str) -> None:
    """Raise ValueError when ``output`` is, contains or lies inside ``source`` (symlinks resolved):
    writing there could replace the source files or mix the outputs into them."""
    out, src = Path(output).resolve(), Path(source).resolve()
    if out == src:
        relation = "is"
    elif src in out.parents:
        relation = "lies inside"
    elif out in src.parents:
        relation = "contains"
    else:
        return
    raise ValueError(
        f"{output_flag} {output}: expected a folder apart from {source_flag} {source}, but it {relation} it "
        f"(resolved: {out} vs {src}); choose another {output_flag}"
    )


def check_no_collisions(names: Iterable[str], sources: Iterable[PathLike], flag: str) -> None:
    """Raise ValueError naming two sources that map to the same output name (a.png and a.jpg -> a.png)."""
    first = {}
    for name, source in zip(names, sources):
        if name in first:
            raise ValueError(
                f"{flag}: {first[name]} and {source} would both be written as {name!r}; rename one of them (nothing was written)"
            )
        first[name] = source


class OutputFolder:
    """A folder this process alone writes to while the ``with`` block runs (see the module docstring)."""

    def __init__(
        self, path: PathLike, flag: str = "--out", overwrite: bool = False, overwrite_flag: Optional[str] = "--overwrite"
    ):
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite: expected a bool, got {type(overwrite).__name__}")
        self.path, self.flag, self.overwrite, self.overwrite_flag = Path(path), flag, overwrite, overwrite_flag
        self._lock: Optional[int] = None

    # ------------------------------------------------------------------ lock
    def __enter__(self) -> "OutputFolder":
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire()
        try:
            self._remove_stale_temps()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _acquire(self) -> int:
        lock = self.path / LOCK_FILE
        if fcntl is None:
            try:
                handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise FolderBusyError(
                    f"{self.flag} {self.path}: another msdiff run is writing there ({lock} exists; "
                    f"delete it if no run is going on)"
                ) from None
            os.write(handle, f"{os.getpid()}\n".encode())
            return handle
        while True:
            handle = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(handle, 32).decode(errors="replace").strip()
                os.close(handle)
                pid = f" (pid {holder})" if holder.isdigit() else ""
                raise FolderBusyError(
                    f"{self.flag} {self.path}: another msdiff run{pid} is writing there; "
                    f"wait for it to finish or choose another {self.flag}"
                ) from None
            # The holder before us may have unlinked the file between our open and our flock: then
            # we locked a file nobody else will ever see, so start again on the current one.
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(handle).st_ino:
                os.ftruncate(handle, 0)
                os.write(handle, f"{os.getpid()}\n".encode())
                return handle
            os.close(handle)

    def _release(self) -> None:
        if self._lock is None:
            return
        # Unlink while still holding the lock, so no other run can lock this file after us.
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._lock)
        self._lock = None

    def _remove_stale_temps(self) -> None:
        for leftover in self.path.rglob(".*.msdiff-tmp-*"):
            if leftover.is_file() and _TEMP_FILE.match(leftover.name):
                leftover.unlink(missing_ok=True)

    # ------------------------------------------------------------------ files
    def target(self, relative: PathLike) -> Path:
        return self.path / relative

    def check_new(self, relatives: Iterable[PathLike]) -> None:
        """Raise FileExistsError naming the first of ``relatives`` that exists (unless overwrite):
        called before any work starts, so a refused run has changed nothing."""
        if self.overwrite:
            return
        existing = [self.path / r for r in relatives if (self.path / r).exists()]
        if existing:
            more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
            remedy = f"pass {self.overwrite_flag} to replace them or " if self.overwrite_flag else ""
            raise FileExistsError(
                f"{self.flag} {self.path}: {existing[0]}{more} already exist(s); {remedy}choose another {self.flag}"
            )

    def write(self, relative: PathLike, write: Callable[[Any], None]) -> Path:
        """Write ``path/relative`` atomically: ``write(binary_file)`` fills a temp file beside it."""
        if self._lock is None:
            raise RuntimeError("OutputFolder.write: use the folder in a `with` block (it holds the lock)")
        path = self.path / relative
        self.check_new([relative])
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, write)
        return path

    def write_text(self, relative: PathLike, text: str) -> Path:
        data = text.encode()
        return self.write(relative, lambda handle: handle.write(data))
