"""Files stay where they belong: train, evaluate and predict write only into the run folder and the
feature-cache folder, with HOME, the working directory and the temp directory all watched.

That an existing run folder is not overwritten without --overwrite is tested in test_train_cli.py;
that --overwrite keeps a user's own files, and symlinks in run folders, in test_robustness_run_files.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from conftest import make_image_folder
from visiontune.cli import main


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in root.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_nothing_is_written_outside_the_run_folder_and_the_cache(tmp_path, tmp_path_factory, monkeypatch, capsys):
    home, work, temp = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for folder in (home, work, temp):
        folder.mkdir()
    data = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=4, val_per_class=2)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("VISIONTUNE_CACHE", raising=False)  # the default cache: ~/.cache/visiontune
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    # matplotlib's own font cache, should this be the first import of it, is not ours to police
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(work)
    import visiontune.data

    # images read from their files (not decoded once into memory), so the disk feature cache has a key
    monkeypatch.setattr(visiontune.data, "fits_in_memory", lambda *args, **kwargs: False)
    before = _snapshot(tmp_path)

    # no --out: the default run folder runs/<model>-<time> under the working directory
    status = main(["train", "--data", str(data), "--model", "timm:test_resnet", "--weights", "none", "--image-size", "32",
                   "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet", "--epochs", "1",
                   "--strategy", "linear-probe", "--augment", "none", "--feature-cache", "disk"])
    assert status == 0
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1
    run_dir = runs[0]
    assert main(["evaluate", "--run", str(run_dir), "--data", str(data), "--device", "cpu"]) == 0
    assert main(["predict", "--run", str(run_dir), str(data / "val"), "--device", "cpu", "--json"]) == 0
    capsys.readouterr()

    after = _snapshot(tmp_path)
    changed = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
    removed = sorted(set(before) - set(after))
    allowed = (str(run_dir.relative_to(tmp_path)), str(Path("home/.cache/visiontune")))
    assert not removed
    assert [name for name in changed if not name.startswith(allowed)] == []
    assert any(name.startswith(allowed[1]) for name in changed), "the disk feature cache was not used"
    assert (run_dir / "best.safetensors").is_file()


@pytest.mark.slow
def test_a_fresh_process_writes_nothing_outside_the_run_and_cache_folders(tmp_path):
    """In a new process, as a user's first run: matplotlib's font cache (and torch.compile's caches)
    would otherwise land under ~/.cache, ~/.config or $TMPDIR."""
    import os
    import subprocess
    import sys

    home, work, temp = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for folder in (home, work, temp):
        folder.mkdir()
    data = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=4, val_per_class=2)
    drop = ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VISIONTUNE_CACHE", "TORCHINDUCTOR_CACHE_DIR",
            "TRITON_CACHE_DIR")
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env.update(HOME=str(home), TMPDIR=str(temp), OMP_NUM_THREADS="1")
    before = _snapshot(tmp_path)
    for command in (["train", "--data", str(data), "--model", "timm:test_resnet", "--weights", "none",
                     "--image-size", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet",
                     "--epochs", "1", "--strategy", "linear-probe", "--out", "run"],
                    ["report", "--run", "run"]):
        done = subprocess.run([sys.executable, "-m", "visiontune", *command], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr

    after = _snapshot(tmp_path)
    changed = sorted(name for name, stamp in after.items() if before.get(name) != stamp)
    allowed = ("work/run/", "home/.cache/visiontune/")
    assert [name for name in changed if not name.startswith(allowed)] == []
    assert (home / ".cache/visiontune/matplotlib").is_dir(), "matplotlib's config folder was not pointed into the cache"
