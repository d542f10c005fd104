"""Reading from a run folder that may have come from someone else.

A run folder can be received as an archive or a shared directory, so visiontune trusts no entry in
it to be what its name says. Writing is safe by construction (:func:`visiontune.atomic_io.atomic_write`
replaces a symbolic link instead of following it); reading goes through :func:`run_file`, which
accepts only a regular file inside the folder, so a planted link can neither make a command load
another file nor make ``report.html`` embed one.
"""

from __future__ import annotations

import os
from pathlib import Path

from visiontune.errors import ConfigError


def run_file(run_dir: str | Path, name: str) -> Path:
    """``RUN/name`` for reading, refused (ConfigError) unless it is absent or a regular file inside
    the run folder: a symlink could make visiontune read, embed in report.html or load a file that
    is not the run's."""
    run_dir = Path(run_dir)
    path = run_dir / name
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link (to {os.readlink(path)}), not a file the run wrote; "
                          "visiontune reads only regular files inside a run folder: replace the link with the real file")
    if path.exists() and (not path.is_file() or path.resolve().parent != run_dir.resolve()):
        raise ConfigError(f"{path} is not a regular file inside the run folder {run_dir}; "
                          f"put the run's own {name} there")
    return path


def run_subfolder(run_dir: str | Path, name: str) -> Path:
    """``RUN/name`` as a folder to write into, refused when it is a symlink (files would land
    wherever it points) or not a folder."""
    path = Path(run_dir) / name
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ConfigError(f"{path} is a symbolic link or a file, not the run's own {name}/ folder; "
                          "remove it (visiontune recreates it)")
    return path
