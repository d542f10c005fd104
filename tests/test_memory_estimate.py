"""Issue 11 item 3: a training configuration that cannot fit in memory is refused before anything
is allocated, with one line naming the flags; one that fits is never refused."""

from __future__ import annotations

import pytest
import torch

from conftest import make_image_folder
from visiontune.cli import main
from visiontune.config import TrainConfig
from visiontune.device import Precision
from visiontune.errors import ConfigError
from visiontune.model.create import create_model
from visiontune.model.preprocessing import Preprocessing
from visiontune.training import memory_estimate, setup
from visiontune.training.memory_estimate import check_training_memory, estimate_training_memory

TINY = ["--model", "resnet18", "--weights", "none", "--batch-size", "4", "--workers", "0", "--device", "cpu",
        "--epochs", "1", "--quiet"]
FP32 = Precision(None)
GiB = 2**30


def _config(**values) -> TrainConfig:
    return TrainConfig(**{"data": "unused", "model": "resnet18", "weights": "none", "workers": 0, **values})


def _preprocessing(size: int) -> Preprocessing:
    return Preprocessing(crop_size=size, resize_size=size, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")


def test_a_huge_image_size_exits_2_with_one_line_before_reading_data_or_writing(tmp_path, capsys, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=2, val_per_class=1)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the memory check must refuse before the data or the model is built")

    monkeypatch.setattr(setup, "_build_datasets", must_not_run)
    monkeypatch.setattr(setup, "build_model", must_not_run)
    status = main(["train", "--data", str(data), *TINY, "--image-size", "100000", "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "--image-size 100000" in error and "--batch-size 4" in error and "needs at least" in error
    assert not (tmp_path / "run").exists()


def test_the_estimate_grows_with_pixels_and_batch():
    small = estimate_training_memory(_config(), _preprocessing(64), batch=2, precision=FP32, workers=0)
    large = estimate_training_memory(_config(), _preprocessing(128), batch=2, precision=FP32, workers=0)
    double = estimate_training_memory(_config(), _preprocessing(64), batch=4, precision=FP32, workers=0)
    # Layer outputs are batch x channels x H x W: twice the batch, twice the bytes (to the one
    # element that halving an odd sum rounds away); twice the side, four times the pixels of every
    # feature map except the pooled ones after the last stage.
    assert abs(double.activations - 2 * small.activations) <= 4
    assert 3.9 * small.activations < large.activations <= 4 * small.activations
    assert large.weights == small.weights == double.weights
    assert large.input_batch == 4 * small.input_batch


def test_a_frozen_backbone_and_16_bit_autocast_need_less():
    full = estimate_training_memory(_config(), _preprocessing(64), batch=2, precision=FP32, workers=0)
    probe = estimate_training_memory(_config(strategy="linear-probe"), _preprocessing(64), 2, FP32, workers=0)
    bf16 = estimate_training_memory(_config(), _preprocessing(64), 2, Precision(torch.bfloat16), workers=0)
    assert probe.activations < full.activations and probe.weights < full.weights
    assert bf16.activations * 2 == full.activations


@pytest.mark.parametrize("model_name", ["resnet18", "timm:resnet18", "mobilenet_v3_small"])
def test_the_estimate_is_a_lower_bound_of_what_autograd_keeps(model_name):
    """A false refusal would be worse than none: the counted activations must not exceed the
    tensors a real training forward pass saves for backward (parameters left out; every saved
    tensor is alive at once when the forward pass ends)."""
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=memory_estimate.NOMINAL_CLASSES, weights=None).train()
    parameters = {param.untyped_storage().data_ptr() for param in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(torch.randn(2, 3, 64, 64))
    estimate = estimate_training_memory(_config(model=model_name), _preprocessing(64), 2, FP32, workers=0)
    assert 0 < estimate.activations <= sum(saved.values())


def test_what_fits_passes_and_what_does_not_names_the_flags(monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_memory_bytes", lambda: 64 * GiB)
    fits = check_training_memory(_config(batch_size=8), _preprocessing(224), torch.device("cpu"), FP32)
    assert fits is not None and fits.total < 64 * GiB
    # 4500 px is over the unestimated limit, but the estimate says it fits in 1 PiB: accepted.
    monkeypatch.setattr(memory_estimate, "available_memory_bytes", lambda: 2**50)
    check_training_memory(_config(batch_size=1, image_size=4500), _preprocessing(4500), torch.device("cpu"), FP32)
    monkeypatch.setattr(memory_estimate, "available_memory_bytes", lambda: 1 * GiB)
    with pytest.raises(ConfigError, match=r"the weights' image size 1024 with --batch-size 64: .*lower --image-size "
                                          r"or --batch-size"):
        check_training_memory(_config(batch_size=64), _preprocessing(1024), torch.device("cpu"), FP32)


def test_torchrun_processes_on_one_machine_share_its_ram(monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_memory_bytes", lambda: 64 * GiB)
    alone = check_training_memory(_config(batch_size=8), _preprocessing(224), torch.device("cpu"), FP32)
    monkeypatch.setattr(memory_estimate.distributed, "local_world_size", lambda: 10**6)
    with pytest.raises(ConfigError, match=r"of RAM is available \(shared by 1000000 processes\)"):
        check_training_memory(_config(batch_size=8), _preprocessing(224), torch.device("cpu"), FP32)
    assert alone.total > 64 * GiB // 10**6


def test_on_a_gpu_the_free_gpu_memory_decides(monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_memory_bytes", lambda: 2**50)  # plenty of RAM
    monkeypatch.setattr(memory_estimate.torch.cuda, "mem_get_info", lambda device: (1 * GiB, 80 * GiB))
    with pytest.raises(ConfigError, match=r"--image-size 2048 with --batch-size 64: .* but 1\.0 GiB is free on cuda:0"):
        check_training_memory(_config(batch_size=64, image_size=2048), _preprocessing(2048),
                              torch.device("cuda", 0), FP32)


def test_without_an_estimate_only_sane_image_sizes_pass(monkeypatch):
    """An architecture that cannot run on the meta device (here: any, by a failing build)."""
    def cannot_build(*args, **kwargs):
        raise RuntimeError("data-dependent initialisation")

    monkeypatch.setattr(memory_estimate, "create_model", cannot_build)
    limit = memory_estimate.MAX_UNESTIMATED_IMAGE_SIZE
    assert check_training_memory(_config(image_size=limit), _preprocessing(limit), torch.device("cpu"), FP32) is None
    with pytest.raises(ConfigError, match=rf"--image-size {limit + 1}: images over {limit} px .*cannot be estimated"):
        check_training_memory(_config(image_size=limit + 1), _preprocessing(limit + 1), torch.device("cpu"), FP32)


def test_estimating_leaves_the_random_streams_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    estimate_training_memory(_config(), _preprocessing(32), batch=2, precision=FP32, workers=0)
    assert torch.equal(torch.rand(3), expected)
