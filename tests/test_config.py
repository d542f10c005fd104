"""TrainConfig: one validation path for Python, YAML and flags; clear errors; CLI exits 2."""

from __future__ import annotations

import argparse

import pytest

from visiontune.cli import main
from visiontune.config import (TrainConfig, add_config_arguments, config_from_args, config_from_dict, read_config,
                               save_config, valid_keys)
from visiontune.errors import ConfigError

REQUIRED = {"data": "some/folder", "model": "resnet18"}


def test_values_are_coerced_to_the_field_types():
    config = config_from_dict({**REQUIRED, "epochs": "3", "lr": "0.01", "image-size": "none", "balance": "yes"})
    assert (config.epochs, config.lr, config.image_size, config.balance) == (3, 0.01, None, True)
    assert config_from_dict({**REQUIRED, "lr": "auto"}).lr == "auto"
    assert config_from_dict({**REQUIRED, "weights": "none"}).weights == "none"  # a string field keeps 'none'


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"lr": "fast"}, "lr must be a number or 'auto', got 'fast'"),
        ({"lr": 0}, "lr must be > 0"),
        ({"lr": -1e-3}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a number"),
        ({"epochs": 2.5}, "epochs must be an integer"),
        ({"strategy": "everything"}, "strategy must be one of linear-probe, partial, full, gradual"),
        ({"val_split": 1.5}, "val_split must be > 0 and < 1"),
        ({"balance": "maybe"}, "balance must be true or false"),
        ({"strategy": "gradual", "epochs": 1}, "--epochs must be larger"),
    ],
)
def test_bad_values_raise_config_errors_naming_the_range(values, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("+", r"\+")):
        config_from_dict({**REQUIRED, **values})


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        config_from_dict({**REQUIRED, "learning_rate": 0.1})
    message = str(error.value)
    assert "learning_rate" in message and all(key in message for key in ("lr", "batch_size", "strategy"))


def test_data_and_model_are_required():
    with pytest.raises(ConfigError, match="--data is required"):
        config_from_dict({"model": "resnet18"})


def test_yaml_gives_defaults_and_flags_override(tmp_path):
    config_file = tmp_path / "train.yaml"
    config_file.write_text("data: imgs\nmodel: resnet18\nepochs: 7\nbatch-size: 4\nlr: 0.002\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(["--epochs", "2", "--balance"]), config_file)
    assert (config.epochs, config.batch_size, config.lr, config.balance) == (2, 4, 0.002, True)
    assert config.weight_decay == TrainConfig().weight_decay


def test_every_field_has_a_flag_with_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {action.dest: action for action in parser._actions}
    for key in valid_keys():
        assert key in flags and flags[key].help


def test_saved_config_reads_back_equal(tmp_path):
    config = config_from_dict({**REQUIRED, "epochs": 4, "head_lr": 0.05, "layer_decay": 0.7})
    assert read_config(save_config(config, tmp_path / "config.yaml")) == config


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--lr", "abc"], "lr must be a number"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(tmp_path, capsys, extra, expected):
    status = main(["train", "--data", str(tmp_path), "--model", "resnet18", *extra])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and expected in err


def test_cli_unknown_yaml_key_exits_2(tmp_path, capsys):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("data: x\nmodel: resnet18\nepocs: 3\n")
    assert main(["train", "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "epocs" in err and "valid keys" in err


def test_the_recipe_defaults_of_benchmarks_recipes_md():
    # Chosen from the experiments in benchmarks/recipes.md (issue 13): a change here must come with new figures there.
    config = TrainConfig()
    assert (config.strategy, config.batch_size, config.lr, config.label_smoothing) == ("full", 64, 1e-3, 0.0)
    assert config.head_lr is None and config.ema == 0.0 and config.augment == "basic"
