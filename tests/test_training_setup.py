"""The training set-up (training/setup.py): a config becomes model, loaders, optimizer, loss and phases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_image_folder
from visiontune.checkpoint import save_weights
from visiontune.config import config_from_dict
from visiontune.errors import DataError
from visiontune.model.heads import find_head
from visiontune.training.setup import build_training, is_weights_file

CLASSES = ("blue", "green", "red")  # discover() sorts the class folders


def _config(data, **overrides):
    values = {"data": str(data), "model": "timm:test_resnet", "weights": "none", "image_size": 32, "batch_size": 4,
              "workers": 0, "device": "cpu", "precision": "fp32", "seed": 3}
    return config_from_dict({**values, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("setup") / "data", classes=CLASSES, per_class=4, val_per_class=2)


def test_build_training_gives_model_loaders_and_phases_for_the_data(data):
    setup = build_training(_config(data, strategy="gradual", epochs=3, freeze_epochs=1))
    assert setup.classes == sorted(CLASSES) and setup.num_train_images == 12
    assert setup.split_info["train_images"] == 12 and setup.split_info["val_images"] == 6
    assert find_head(setup.model)[1].out_features == 3  # a new head for the folder's classes
    assert [(phase.name, phase.start_epoch, phase.end_epoch) for phase in setup.phases] == [("head", 0, 1),
                                                                                           ("full", 1, 3)]
    images, labels = next(iter(setup.train_loader))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.long and len(setup.train_loader) == 3
    assert sum(len(labels) for _, labels in setup.val_loader) == 6 == len(setup.val_samples)
    assert isinstance(setup.loss_fn, nn.CrossEntropyLoss) and setup.device == torch.device("cpu")


def test_the_first_phase_trains_only_the_head_and_the_optimizer_holds_exactly_that(data):
    setup = build_training(_config(data, strategy="linear-probe", epochs=1))
    head_name, head = find_head(setup.model)
    trainable = {name for name, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head_name}.{name}" for name, _ in head.named_parameters()}
    in_optimizer = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in setup.model.parameters() if p.requires_grad}


def test_the_same_config_gives_the_same_head_and_the_same_first_batch(data):
    first, second = build_training(_config(data)), build_training(_config(data))
    assert all(torch.equal(value, second.model.state_dict()[key]) for key, value in first.model.state_dict().items())
    (images_a, labels_a), (images_b, labels_b) = next(iter(first.train_loader)), next(iter(second.train_loader))
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_a_weights_file_is_loaded_and_reported(data, tmp_path):
    source = build_training(_config(data)).model
    path = save_weights(source, tmp_path / "start.safetensors")
    assert is_weights_file(str(path)) and not is_weights_file("DEFAULT")
    setup = build_training(_config(data, weights=str(path), seed=99))  # another seed: another random head
    assert setup.load_report is not None and not setup.load_report["missing"]
    assert all(torch.equal(value, setup.model.state_dict()[key]) for key, value in source.state_dict().items())


def test_balance_weights_the_loss_by_class_frequency(tmp_path):
    folder = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=2, val_per_class=1)
    for index in range(2, 6):  # red gets 6 images, green 2
        (folder / "train" / "red" / f"red_{index}.png").write_bytes((folder / "train" / "red" / "red_0.png").read_bytes())
    setup = build_training(_config(folder, balance=True))
    # n / (k * count) per class, in class order (green, red): 8 / (2 * 2) and 8 / (2 * 6).
    assert setup.loss_fn.weight.tolist() == pytest.approx([2.0, 2 / 3])


def test_no_readable_training_image_is_a_data_error(tmp_path):
    folder = make_image_folder(tmp_path / "data", classes=("red", "green"), per_class=1, val_per_class=1)
    for path in (folder / "train").rglob("*.png"):
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="no readable training image left for 2 class"):
        build_training(_config(folder))
