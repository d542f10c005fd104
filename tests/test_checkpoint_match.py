"""Matching strategies, unwrapping, prefix cleaning, dry runs and the report."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from torch import nn

from visiontune.checkpoint import LoadReport, load_weights, save_weights
from visiontune.checkpoint.collapse import collapse_numbers, collapse_subtrees
from visiontune.errors import CheckpointError, ConfigError


class Net(nn.Module):
    """conv -> bn -> head, the shape of every classifier."""

    def __init__(self, num_classes: int = 3, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)


class Renamed(nn.Module):
    """The same network as Net under other names, in the same order."""

    def __init__(self, num_classes: int = 3, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3)
        self.norm = nn.BatchNorm2d(width)
        self.classifier = nn.Linear(width, num_classes)


def random_state(model: nn.Module, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.randn(value.shape, generator=generator) if value.is_floating_point() else value + 7) for key, value in model.state_dict().items()}


def snapshot(model) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_loaded(model, state: dict, pairs: dict) -> None:
    current = model.state_dict()
    for target, source in pairs.items():
        assert torch.equal(current[target], state[source].reshape(current[target].shape)), target


# --- "name": the tutorial's first recipe --------------------------------------------------------------


def test_name_loads_matching_names_and_shapes_and_reports_a_new_head():
    source = random_state(Net(num_classes=1000))
    model = Net(num_classes=5)
    head_before = model.fc.weight.clone()
    report = load_weights(model, source, match="name")
    assert report.mismatched == {"fc.weight": ((5, 4), (1000, 4)), "fc.bias": ((5,), (1000,))}
    assert set(report.loaded) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert report.missing == [] and report.unexpected == [] and report.renamed == {}
    assert torch.equal(model.fc.weight, head_before)
    assert_loaded(model, source, report.loaded)


def test_a_ddp_resnet18_checkpoint_with_epoch_loads_all_but_the_head():
    tvm = pytest.importorskip("torchvision.models")
    trained = tvm.resnet18()
    trained.layer1[0].bn1.running_mean.normal_()
    checkpoint = {"state_dict": {f"module.{key}": value for key, value in trained.state_dict().items()}, "epoch": 7}
    model = tvm.resnet18(num_classes=5)
    report = load_weights(model, checkpoint)
    assert report.unwrapped_from == "state_dict"
    assert report.removed_prefixes == ["module."]
    assert len(report.loaded) == len(trained.state_dict()) - 2
    assert set(report.mismatched) == {"fc.weight", "fc.bias"} and report.missing == [] and report.unexpected == []
    assert report.renamed == {}  # prefix cleaning is not renaming
    assert report.loaded["conv1.weight"] == "module.conv1.weight"
    assert torch.equal(model.layer1[0].bn1.running_mean, trained.layer1[0].bn1.running_mean)
    text = str(report)
    assert "layer{1..4}.*" in text and "fc.weight (5, 512) <- module.fc.weight (1000, 512)" in text


# --- unwrapping and prefixes ---------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "module", "net", "ema", "model_ema", "state_dict_ema"])
def test_weights_are_found_under_every_conventional_wrapper(wrapper):
    source = random_state(Net())
    report = load_weights(Net(), {wrapper: source, "epoch": 3, "optimizer": {"state": {}}})
    assert report.unwrapped_from == wrapper and report.complete


def test_trained_weights_win_over_ema_unless_asked():
    trained, ema = random_state(Net(), seed=1), random_state(Net(), seed=2)
    model = Net()
    assert load_weights(model, {"model": trained, "model_ema": ema}).unwrapped_from == "model"
    assert torch.equal(model.conv.weight, trained["conv.weight"])
    assert load_weights(model, {"model": trained, "model_ema": ema}, prefer_ema=True).unwrapped_from == "model_ema"
    assert torch.equal(model.conv.weight, ema["conv.weight"])


def test_nested_wrappers_are_searched():
    report = load_weights(Net(), {"model": {"state_dict": random_state(Net())}})
    assert report.unwrapped_from == "model.state_dict"


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "model.", "backbone.", "model.backbone."])
def test_prefixes_are_cleaned_when_they_make_names_line_up(prefix):
    source = {prefix + key: value for key, value in random_state(Net()).items()}
    model = Net()
    report = load_weights(model, source, match="name")
    assert report.complete and report.renamed == {}
    assert report.loaded["conv.weight"] == prefix + "conv.weight"


def test_a_prefix_the_model_has_is_added():
    wrapped = nn.Module()
    wrapped.backbone = Net()
    report = load_weights(wrapped, random_state(Net()), match="name")
    assert report.complete and report.loaded["backbone.conv.weight"] == "conv.weight"


def test_a_checkpoint_that_is_not_a_dict_of_tensors_is_explained():
    with pytest.raises(CheckpointError, match="'epoch'"):
        load_weights(Net(), {"epoch": 3, "best_acc": 0.9})


# --- "order": the second recipe -----------------------------------------------------------------------


def test_order_pairs_differently_named_tensors_in_sequence():
    source = random_state(Renamed())
    model = Net()
    report = load_weights(model, source, match="order")
    assert report.complete and report.loaded["bn.running_var"] == "norm.running_var"
    assert report.renamed == report.loaded
    assert_loaded(model, source, report.loaded)


def test_order_never_forces_a_wrong_shape_in():
    source = random_state(Renamed(num_classes=1000))
    model = Net(num_classes=5)
    before = model.fc.weight.clone()
    report = load_weights(model, source, match="order")
    assert set(report.mismatched) == {"fc.weight", "fc.bias"}
    assert torch.equal(model.fc.weight, before)
    assert any("mismatch" in note for note in report.notes)


def test_order_ignores_batch_counters_missing_on_one_side():
    source = {key: value for key, value in random_state(Renamed()).items() if not key.endswith("num_batches_tracked")}
    report = load_weights(Net(), source, match="order")
    assert report.missing == ["bn.num_batches_tracked"] and not report.mismatched
    assert report.loaded["fc.weight"] == "classifier.weight"


# --- explicit mappings and rules: the third recipe --------------------------------------------------


def test_mapping_pairs_what_it_names_and_names_the_rest():
    source = random_state(Net())
    source["other_head.weight"] = source.pop("fc.weight")
    model = Net()
    report = load_weights(model, source, match={"fc.weight": "other_head.weight", "bn.running_var": None})
    assert report.loaded["fc.weight"] == "other_head.weight" and report.renamed == {"fc.weight": "other_head.weight"}
    assert report.missing == ["bn.running_var"]  # None: keep the model's own
    assert report.unexpected == ["bn.running_var"]
    assert_loaded(model, source, report.loaded)


def test_mapping_may_use_the_names_as_written_in_the_file():
    source = {f"module.{key}": value for key, value in random_state(Renamed()).items()}
    mapping = {"conv.weight": "module.stem.weight", "conv.bias": "stem.bias"}
    report = load_weights(Net(), source, match=mapping)
    assert report.loaded == {"conv.weight": "module.stem.weight", "conv.bias": "module.stem.bias"}


def test_mapping_naming_keys_that_do_not_exist_is_an_error_that_changes_nothing():
    model = Net()
    before = snapshot(model)
    with pytest.raises(CheckpointError) as caught:
        load_weights(model, random_state(Net()), match={"fc.weigth": "fc.weight", "conv.weight": "conv.wieght"})
    message = str(caught.value)
    assert "'fc.weigth'" in message and "did you mean 'fc.weight'" in message and "'conv.wieght'" in message
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_regex_rules_rename_and_drop():
    source = random_state(Renamed())
    rules = [(r"^stem\.", "conv."), (r"^norm\.", "bn."), (r"^classifier\.", None)]
    report = load_weights(Net(), source, match=rules)
    assert report.loaded["bn.weight"] == "norm.weight"
    assert report.missing == ["fc.weight", "fc.bias"]
    assert report.unexpected == ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_mapping_and_rules_from_a_file(tmp_path, suffix):
    source = random_state(Renamed())
    mapping = {"conv.weight": "stem.weight", "conv.bias": "stem.bias"}
    rules = {"rules": [["^norm", "bn"], {"pattern": "^classifier", "replacement": "fc"}]}
    for content in (mapping, rules):
        path = tmp_path / f"spec{suffix}"
        path.write_text(json.dumps(content))  # JSON is valid YAML too
        report = load_weights(Net(), source, match=str(path))
        assert str(path) in report.match
        assert set(report.loaded) >= set(mapping) if content is mapping else report.loaded["fc.bias"] == "classifier.bias"


def test_a_malformed_match_argument_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="auto, name, order"):
        load_weights(Net(), random_state(Net()), match="fuzzy")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- [only_a_pattern]\n")
    with pytest.raises(ConfigError, match=r"\[pattern, replacement\]"):
        load_weights(Net(), random_state(Net()), match=bad)


# --- "auto" -------------------------------------------------------------------------------------------


def test_auto_aligns_renamed_modules_and_reports_the_head():
    source = random_state(Renamed(num_classes=1000))
    model = Net(num_classes=10)
    report = load_weights(model, source)
    assert report.loaded["bn.running_mean"] == "norm.running_mean" and report.loaded["conv.bias"] == "stem.bias"
    assert report.mismatched == {"fc.weight": ((10, 4), (1000, 4)), "fc.bias": ((10,), (1000,))}
    assert report.missing == [] and report.unexpected == []
    assert_loaded(model, source, report.loaded)


def test_auto_allows_reshapes_that_only_add_or_drop_size_one_dimensions():
    class Scaled(nn.Module):
        def __init__(self, stored_as):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(stored_as))
            self.proj = nn.Conv2d(8, 4, 1) if stored_as == (8, 1, 1) else nn.Linear(8, 4)

    source = random_state(Scaled((8, 1, 1)))
    model = Scaled((8,))
    report = load_weights(model, source)
    assert report.complete and report.loaded == {"gamma": "gamma", "proj.weight": "proj.weight", "proj.bias": "proj.bias"}
    assert torch.equal(model.gamma, source["gamma"].flatten()) and torch.equal(model.proj.weight, source["proj.weight"][:, :, 0, 0])


def test_auto_never_pairs_integer_buffers_with_weights():
    class WithIndex(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(6))
            self.register_buffer("index", torch.arange(6))

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("position_ids", torch.arange(6))
            self.bias_table = nn.Parameter(torch.ones(6))

    report = load_weights(WithIndex(), Other().state_dict())
    assert report.loaded == {"table": "bias_table", "index": "position_ids"}


def test_nothing_fitting_is_an_error_that_changes_nothing():
    model = Net()
    before = snapshot(model)
    source = {"encoder.weight": torch.zeros(7, 7, 7), "decoder.bias": torch.zeros(9)}
    with pytest.raises(CheckpointError, match="No tensor of checkpoint .* fits the model") as caught:
        load_weights(model, source)
    assert "encoder.weight" in str(caught.value) and "conv.weight" in str(caught.value)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_dry_run_plans_without_touching_the_model(tmp_path):
    path = save_weights(random_state(Net()), tmp_path / "w.safetensors")
    model = Net()
    before = snapshot(model)
    report = load_weights(model, path, dry_run=True)
    assert report.dry_run and report.complete and report.source_format == "safetensors"
    assert str(report).startswith("would load 9 of 9 model tensors")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


# --- the report ---------------------------------------------------------------------------------------


def test_report_to_dict_is_json_safe_and_complete():
    report = load_weights(Net(num_classes=5), random_state(Renamed(num_classes=1000)))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["mismatched"]["fc.weight"] == {"model_shape": [5, 4], "checkpoint_shape": [1000, 4], "checkpoint_key": "classifier.weight"}
    assert data["loaded"]["conv.weight"] == "stem.weight" and data["renamed"] == data["loaded"]
    assert data["match"] == "auto" and data["source_format"] == "in-memory"


def test_report_collapses_runs():
    keys = [f"layer{stage}.{block}.{leaf}" for stage in range(1, 5) for block in range(2) for leaf in ("weight", "bias")]
    assert collapse_subtrees(keys, keys + ["fc.weight"]) == ["layer{1..4}.*"]
    assert collapse_subtrees(keys[:4], keys) == ["layer1.*"]
    assert collapse_numbers(["blocks.1.conv", "blocks.2.conv", "blocks.3.conv", "blocks.5.conv", "head"]) == ["blocks.{1,2,3,5}.conv", "head"]
    assert collapse_numbers(["a.1.w", "a.2.w"], tags=[(3,), (4,)]) == ["a.1.w", "a.2.w"]


def test_report_string_is_compact():
    tvm = pytest.importorskip("torchvision.models")
    report = load_weights(tvm.resnet18(num_classes=5), tvm.resnet18().state_dict())
    lines = str(report).splitlines()
    assert len(lines) <= 8
    assert isinstance(report, LoadReport) and "loaded" in lines[1] and "conv1.*, bn1.*, layer{1..4}.*" in lines[1]


def test_a_head_whose_weight_does_not_fit_loads_nothing_of_it():
    """Same class count, other feature width: the bias would fit by shape, but it belongs to a head
    that does not, so it is held back rather than loaded half."""
    source = random_state(Net(num_classes=10, width=4))
    source["fc.weight"] = torch.randn(10, 6)
    model = Net(num_classes=10, width=4)
    bias_before = model.fc.bias.clone()
    report = load_weights(model, source)
    assert set(report.mismatched) == {"fc.weight"} and "fc.bias" in report.missing and "fc.bias" in report.unexpected
    assert torch.equal(model.fc.bias, bias_before)
    assert any("fc.bias" in note for note in report.notes)


def test_another_architecture_is_refused_rather_than_loaded_piecemeal():
    tvm = pytest.importorskip("torchvision.models")
    model = tvm.mobilenet_v2(num_classes=10)
    with pytest.raises(CheckpointError, match="No tensor of checkpoint"):
        load_weights(model, tvm.resnet18().state_dict())
