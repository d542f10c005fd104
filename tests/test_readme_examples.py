"""The README's Python examples run as written, so the documented API cannot drift from the code.

Every ```python block of README.md runs in order in one namespace, with the README's placeholder
paths pointed at small files made here. Two things differ from a user's run, both to stay offline
and fast: ``TrainConfig`` gets ``weights="none"``, tiny images and one epoch per phase (a
download would fail here), and the checkpoint the README loads is one saved here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

import visiontune
from visiontune.config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def make_image_folder(root: Path, classes: int = 5, per_class: int = 4) -> None:
    generator = torch.Generator().manual_seed(0)
    for label in range(classes):
        for index in range(per_class):
            pixels = torch.randint(0, 256, (24, 24, 3), generator=generator, dtype=torch.uint8)
            folder = root / ("train" if index < per_class - 1 else "val") / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")


@pytest.mark.slow
def test_the_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "README.md should hold the Python examples this test runs"

    data = tmp_path / "images"
    make_image_folder(data)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "old_checkpoint.pth")
    monkeypatch.chdir(tmp_path)

    def offline_config(**fields):  # the README's fields, plus what keeps this test offline and small
        fields.update(weights="none", image_size=32, batch_size=4, epochs=min(fields.get("epochs", 2), 2),
                      out=str(tmp_path / "runs" / "pets"), workers=0)
        return TrainConfig(**fields)

    monkeypatch.setattr(visiontune, "TrainConfig", offline_config, raising=False)
    placeholders = {
        "path/to/images": str(data),
        "runs/pets": str(tmp_path / "runs" / "pets"),
        "photo.jpg": str(next(data.rglob("*.png"))),
    }
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        for placeholder, real in placeholders.items():
            block = block.replace(f'"{placeholder}"', repr(real))
        exec(compile(block, f"<README.md python block {number}>", "exec"), namespace)  # noqa: S102 - our own README

    # The blocks did what they say: a run was trained, loaded and used.
    assert namespace["run"].classes == [f"class{label}" for label in range(5)]
    assert namespace["predictions"][0].label in namespace["run"].classes
    assert namespace["report"].loaded  # the saved resnet18 backbone loaded into the model
