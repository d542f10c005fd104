"""visiontune explain: the target layer from the anatomy, CAMs of CNNs and ViTs, overlays written,
a planted pattern found where it was planted, and one clear line when grad-cam is missing."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from torch import nn

import visiontune
from visiontune.cli import main
from visiontune.errors import VisiontuneError
from visiontune.model.create import create_model
from visiontune.model.preprocessing import Preprocessing
from visiontune.run.explain import compute_cams, explain, explain_images, find_target_layer, overlay
from visiontune.run.loaded import LoadedRun, load_run

pytest.importorskip("pytorch_grad_cam")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 1-epoch resnet18 run at 32 px; the same folder as tests/test_export.py's and test_report_html.py's."""
    root = tmp_path_factory.getbasetemp() / "tiny_trained_run"
    data, run_dir = root / "data", root / "run"
    if not (run_dir / "report.json").is_file():
        make_image_folder(data, per_class=4, val_per_class=2)
        assert main(["train", "--data", str(data), "--model", "resnet18", "--weights", "none", "--image-size", "32",
                     "--batch-size", "8", "--workers", "0", "--seed", "0", "--device", "cpu", "--quiet",
                     "--epochs", "1", "--lr", "0.001", "--out", str(run_dir)]) == 0
    return data, run_dir


class _RedVersusGreen(nn.Module):
    """Class 0 is "more red than green" and class 1 the reverse, decided by a 1x1-conv feature map
    averaged over the image: Grad-CAM of class 0 is then ReLU(red - green), exactly, pixel by pixel."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 1)
        self.features = nn.Conv2d(2, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.stem.weight.zero_()
            self.stem.weight[0, 0] = 1.0  # channel 0: red
            self.stem.weight[1, 1] = 1.0  # channel 1: green
            self.stem.bias.zero_()
            self.features.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.features.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, images):
        return self.fc(self.pool(self.features(self.stem(images))).flatten(1))


def _planted(size: int = 16) -> torch.Tensor:
    """A green image with a red square in its top-left quadrant (rows and columns 2..5)."""
    image = torch.zeros(1, 3, size, size)
    image[0, 1] = 1.0
    image[0, :, 2:6, 2:6] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    return image


def test_gradcam_of_a_planted_pattern_peaks_where_it_was_planted():
    model = _RedVersusGreen().eval()
    target = find_target_layer(model, 16)
    assert target.layout == "NCHW" and target.grid == (16, 16)
    red, green = compute_cams(model, target, _planted().repeat(2, 1, 1, 1), [0, 1], "gradcam")
    inside = np.zeros((16, 16), dtype=bool)
    inside[2:6, 2:6] = True
    # The maps are min-max scaled to [0, 1]; the model is linear, so inside/outside differ by the
    # whole range. 0.5 leaves room for grad-cam's bilinear rescale (a no-op at equal size) and rounding.
    assert red.shape == (16, 16) and red[inside].min() > 0.5 and red[~inside].max() < 0.5
    assert green[~inside].min() > 0.5 and green[inside].max() < 0.5
    # the gradient-free map sees the square too: the features' main direction separates it; its sign
    # is the SVD's choice (it may differ between BLAS builds), so either region may be the bright one
    eigen = compute_cams(model, target, _planted(), [0], "eigencam")[0]
    assert abs(eigen[inside].mean() - eigen[~inside].mean()) > 0.5


def test_a_vit_is_read_at_its_last_blocks_norm_on_the_patch_grid():
    model = create_model("timm:test_vit", num_classes=3, weights=None).eval()
    size = 32
    target = find_target_layer(model, size)
    blocks = len(model.blocks)
    assert target.name == f"blocks.{blocks - 1}.norm1" and target.layout == "tokens"
    assert target.prefix_tokens == model.num_prefix_tokens
    patch = model.patch_embed.patch_size[0]
    assert target.grid == (size // patch, size // patch)  # the patches of a 32 px image, not of its default size
    torch.manual_seed(0)
    images = torch.randn(2, 3, size, size)
    for method in ("gradcam", "eigencam", "scorecam"):
        cams = compute_cams(model, target, images, [0, 2], method)
        assert cams.shape == (2, size, size) and cams.dtype == np.float32
        assert 0.0 <= cams.min() and cams.max() <= 1.0 and cams.max() > 0.0, method  # a map, not zeros
    picture = np.full((size, size, 3), 0.5, dtype=np.float32)
    drawn = overlay(picture, cams[0])
    assert drawn.shape == (size, size, 3) and drawn.dtype == np.uint8


class _ToChannelsLast(nn.Module):
    def forward(self, maps):
        return maps.permute(0, 2, 3, 1)


class _ChannelsLastNet(nn.Module):
    """Ends in a (batch, height, width, channels) map, as torchvision's Swin does (no output_fmt)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.permute = _ToChannelsLast()
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, images):
        return self.fc(self.norm(self.permute(self.stage(self.stem(images)))).mean(dim=(1, 2)))


def test_a_channels_last_map_is_transposed():
    model = _ChannelsLastNet().eval()
    target = find_target_layer(model, 16)
    assert target.name == "norm" and target.layout == "NHWC" and target.grid == (8, 8)
    cams = compute_cams(model, target, torch.randn(2, 3, 16, 16), [0, 1], "gradcam")
    assert cams.shape == (2, 16, 16)


def test_explain_images_of_a_vit_run_in_memory():
    model = create_model("timm:test_vit", num_classes=2, weights=None).eval()
    preprocessing = Preprocessing(resize_size=36, crop_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    run = LoadedRun(model, ["cat", "dog"], preprocessing, None, None)
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (30, 200, 30))]
    results = explain_images(run, images, ["cat", None], methods=("gradcam", "eigencam"))
    for result in results:
        assert result.picture.shape == (32, 32, 3)  # the centre crop the model saw
        assert {"gradcam predicted", "eigencam"} <= set(result.overlays)
        assert all(picture.shape == (32, 32, 3) for picture in result.overlays.values())
    first = results[0]
    assert ("gradcam true" in first.overlays) == (first.predicted != "cat")
    assert "gradcam true" not in results[1].overlays  # no true class given


@pytest.mark.slow  # the shared 1-epoch run: about 7 s the first time
def test_cli_explain_writes_overlays_of_a_trained_run(tiny_run, tmp_path, capsys):
    data, run_dir = tiny_run
    out = tmp_path / "why"
    assert main(["explain", "--run", str(run_dir), str(data / "val" / "red"), str(data / "val" / "blue" / "blue_0.png"),
                 "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "(true: red)" in printed and "explanations.json" in printed
    index = json.loads((out / "explanations.json").read_text())
    assert index["target_layer"].startswith("layer") and index["methods"] == ["gradcam", "eigencam"]
    assert len(index["images"]) == 3 and [entry["label"] for entry in index["images"]] == ["red", "red", "blue"]
    loaded = load_run(run_dir)
    for entry in index["images"]:
        wanted = {"input", "gradcam predicted", "eigencam"} | ({"gradcam true"} if entry["predicted"] != entry["label"]
                                                              else set())
        assert set(entry["files"]) == wanted and entry["predicted"] in loaded.classes
        for name in entry["files"].values():
            with Image.open(out / name) as picture:
                assert picture.size == (32, 32) and picture.mode == "RGB"
    # what predict says, explain says (same preprocessing, same weights)
    predictions, _ = loaded.predict([entry["path"] for entry in index["images"]])
    assert [p.label for p in predictions] == [entry["predicted"] for entry in index["images"]]


@pytest.mark.slow  # the shared 1-epoch run: about 7 s the first time
def test_label_and_method_mistakes_are_one_line(tiny_run, tmp_path, capsys):
    data, run_dir = tiny_run
    image = str(data / "val" / "red" / "red_0.png")
    assert main(["explain", "--run", str(run_dir), image, "--out", str(tmp_path / "o"), "--label", "purple"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'purple' is not one of the run's classes" in err[0] and "red" in err[0]
    with pytest.raises(SystemExit) as usage_error:  # argparse's own one-line usage error
        main(["explain", "--run", str(run_dir), image, "--out", str(tmp_path / "o"), "--method", "magic"])
    assert usage_error.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert main(["explain", "--run", str(run_dir), image, "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a picture")  # skipped and named, the others explained
    assert main(["explain", "--run", str(run_dir), str(tmp_path / "bad.png"), image, "--out", str(tmp_path / "o"),
                 "--method", "eigencam"]) == 0
    assert "skipped unreadable image" in capsys.readouterr().err
    assert [entry["path"] for entry in json.loads((tmp_path / "o" / "explanations.json").read_text())["images"]] == [image]
    with pytest.raises(VisiontuneError, match="unknown CAM method 'magic'"):
        explain(run_dir, [image], tmp_path / "o", methods=["magic"])
    entries, skipped = visiontune.explain(run_dir, image, tmp_path / "api", methods=["gradcam"], label="green")
    assert not skipped and entries[0]["label"] == "green" and "gradcam predicted" in entries[0]["files"]


@pytest.mark.slow  # the shared 1-epoch run: about 7 s the first time
def test_without_grad_cam_the_error_names_the_extra(tiny_run, tmp_path, monkeypatch, capsys):
    data, run_dir = tiny_run
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import now fails, as when not installed
    status = main(["explain", "--run", str(run_dir), str(data / "val" / "red"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "pip install 'visiontune[explain]'" in err[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written
