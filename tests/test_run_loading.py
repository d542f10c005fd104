"""load_run (and so evaluate/predict) says what is wrong with a folder that is not a run."""

from __future__ import annotations

import pytest

import visiontune
from visiontune.errors import ConfigError
from visiontune.run.folder import CONFIG_FILE


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope does not exist; give the folder that 'visiontune train --out' wrote"):
        visiontune.load_run(tmp_path / "nope")


@pytest.mark.parametrize("make", ["empty folder", "file"])
def test_a_folder_or_file_without_a_config_is_not_a_run(tmp_path, make):
    path = tmp_path / "thing"
    path.mkdir() if make == "empty folder" else path.write_text("hello")
    with pytest.raises(ConfigError, match=f"not a visiontune run folder \\(it has no {CONFIG_FILE}\\)"):
        visiontune.load_run(path)


def test_an_unknown_checkpoint_is_refused_before_the_model_is_built(tmp_path):
    (tmp_path / CONFIG_FILE).write_text("model: resnet18\n")
    with pytest.raises(ConfigError, match="'best' or 'last', got 'newest'"):
        visiontune.load_run(tmp_path, checkpoint="newest")
