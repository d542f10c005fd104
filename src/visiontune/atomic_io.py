"""Writing files so that a reader never sees half of one and a planted link is never followed.

Every file visiontune writes goes through :func:`atomic_write`: the bytes go to a temporary file
in the same folder, which ``os.replace`` then moves onto the name in one step. A crash leaves the
previous file whole, and ``os.replace`` replaces a symbolic link at the name instead of writing
through it, so a run folder received from someone else cannot make visiontune overwrite the file
a link points to.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from visiontune.errors import VisiontuneError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` in one step.

    A crash or an exception while writing leaves any previous file at ``path`` untouched and removes
    the temporary file, so readers never see a half-written checkpoint.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():  # os.replace cannot put a file there
        raise VisiontuneError(f"cannot write {path}: a folder of that name is in the way; move or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temp_path = Path(temp_name)
    os.chmod(temp_path, 0o666 & ~_current_umask())  # mkstemp makes it private; give the usual permissions
    try:
        yield temp_path
        _fsync_file(temp_path)
        os.replace(temp_path, path)
        _fsync_folder(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder inside ``folder``; on success move every file written there
    into ``folder`` under the same name (each with ``os.replace``, as :func:`atomic_write` does).

    For writers that pick file names themselves (an ONNX file and its external ``.data`` file).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".visiontune-", suffix=".tmp", dir=folder))
    try:
        yield staging
        for written in sorted(staging.iterdir()):
            _fsync_file(written)
            os.replace(written, folder / written.name)
        _fsync_folder(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_write` (never through a symlink at ``path``)."""
    with atomic_write(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` through :func:`atomic_write`."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) the same inode,
    which catches a symlink or a hard link to the other."""
    first, second = Path(first).expanduser(), Path(second).expanduser()
    try:
        if first.resolve() == second.resolve():
            return True
        return os.path.samefile(first, second)
    except (OSError, RuntimeError):  # one does not exist (yet), or is a symlink loop: not one file
        return False


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a folder be opened (Windows).
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
