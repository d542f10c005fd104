"""Which backbone to fine-tune: each candidate scored by a linear probe and its training speed.

For every candidate the backbone runs once over the training and validation images (the feature
cache of :mod:`visiontune.features.extract`, with the weights' evaluation preprocessing), a linear
probe is fitted on the training features (:mod:`visiontune.features.probe`) and scored on the
validation ones, and a few real training steps measure the images per second the model will
train at (:mod:`visiontune.training.throughput`). How well frozen features separate the classes
is the usual cheap predictor of how well a backbone fine-tunes; the probe costs one forward pass
per image instead of a training run.

The ranking puts the most accurate model first, except that models within
:data:`NEAR_TIE` of it count as tied and the fastest of them wins: half a point of probe accuracy
is within the noise of a small validation set, a 2x faster training step is not. With a time
budget, models that cannot train one epoch within it come after those that can.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from visiontune import data
from visiontune.atomic_io import write_text_atomically
from visiontune.config import TrainConfig, config_from_dict
from visiontune.data.datasets import require_trainable
from visiontune.device import prefers_channels_last, resolve_device, resolve_precision
from visiontune.errors import ConfigError, shown
from visiontune.features.extract import HeadNotReproducible, build_feature_cache, feature_cache_key
from visiontune.features.probe import PROBE_STEPS, run_linear_probe
from visiontune.memory import MemoryBudget
from visiontune.model.anatomy import anatomy_of
from visiontune.model.preprocessing import Preprocessing
from visiontune.model.registry import parse_name
from visiontune.run.folder import default_run_dir
from visiontune.training.budget import parse_budget
from visiontune.training.setup import build_model, is_weights_file, resolve_run_preprocessing
from visiontune.training.throughput import measure_training_throughput

log = logging.getLogger(__name__)

NEAR_TIE = 0.005  # probe accuracies closer than half a point are tied; the faster model wins
SELECT_FILE = "select.json"


@dataclass
class Candidate:
    """One backbone's scores; ``error`` says why it could not be scored (then the rest are None)."""

    model: str
    parameters: int | None = None  # with the new head for this data's classes
    image_size: int | None = None  # crop size in pixels the probe and the timing used
    val_accuracy: float | None = None  # linear probe on the validation features, 0..1
    train_accuracy: float | None = None
    feature_dim: int | None = None
    images_per_second: float | None = None  # one training step of the main phase, images per second
    epochs_in_budget: float | None = None  # epochs fitting in the budget at that step speed (no loading, validation)
    seconds: float = 0.0  # wall time this candidate's scoring took
    error: str | None = None

    @property
    def fits_budget(self) -> bool:
        return self.epochs_in_budget is None or self.epochs_in_budget >= 1.0


@dataclass
class SelectResult:
    """Candidates ranked best first (``recommended`` is the first one scored) and where it was written."""

    candidates: list[Candidate]
    recommended: str | None
    classes: list[str]
    train_images: int
    val_images: int
    weights: str
    batch_size: int
    budget_seconds: float | None
    path: Path | None = None
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"recommended": self.recommended, "candidates": [asdict(c) for c in self.candidates],
                "classes": self.classes, "train_images": self.train_images, "val_images": self.val_images,
                "weights": self.weights, "batch_size": self.batch_size, "budget_seconds": self.budget_seconds,
                "near_tie": NEAR_TIE, **self.settings}


def select_backbone(
    data_dir: str | Path,
    models: str | Sequence[str],
    *,
    weights: str | None = "DEFAULT",
    image_size: int | None = None,
    batch_size: int | None = None,
    budget: str | float | None = None,
    val_split: float | None = None,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    probe_steps: int = PROBE_STEPS,
    cache_dir: str | Path | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> SelectResult:
    """Score every model of ``models`` (a list, or names separated by commas) on ``data_dir``
    and write the ranking to ``out/select.json`` (default ``runs/select-<timestamp>``).

    ``weights`` applies to every candidate: ``"DEFAULT"`` (each model's pretrained weights),
    ``"none"``/None (random init) or a weights file (one model only). ``image_size``: crop size in
    pixels (default: each model's own); ``batch_size``: the training batch whose step is timed
    (default: train's); ``budget``: the training time you plan (seconds, or ``"90s"``, ``"3m"``,
    ``"1h"``): each candidate says how many epochs fit in it. ``clock``: seconds (tests fake it)."""
    names = _model_names(models)
    weights = "none" if weights is None else str(weights)
    if is_weights_file(weights) and len(names) > 1:
        raise ConfigError(f"--weights {shown(weights)} is a file, which fits one architecture, but {len(names)} models "
                          "were given; pass one --models NAME with a file, or --weights DEFAULT / none for several")
    budget_seconds = None if budget is None else parse_budget(budget)
    given = {"data": str(data_dir), "weights": weights, "image_size": image_size, "seed": seed, "device": device,
             "val_split": val_split}
    # The training config's own checks: a bad size, batch or device is refused as train refuses it.
    base = config_from_dict({**given, **({"batch_size": batch_size} if batch_size is not None else {})},
                            require_data=False)
    torch_device = resolve_device(device)
    precision = resolve_precision(torch_device, "auto")
    split = data.discover(data_dir, val_split=val_split, seed=seed)
    images = _ImageSets(split)
    candidates = []
    for name in names:
        started = clock()
        config = config_from_dict({**base.to_dict(), "model": name})
        candidate = _score(config, split, images, torch_device, precision, probe_steps, cache_dir, clock)
        if budget_seconds is not None and candidate.images_per_second:
            candidate.epochs_in_budget = budget_seconds * candidate.images_per_second / images.train_count
        candidate.seconds = clock() - started
        candidates.append(candidate)
    ranked = rank(candidates)
    recommended = next((c.model for c in ranked if c.error is None), None)
    result = SelectResult(ranked, recommended, list(split.classes), images.train_count, images.val_count, weights,
                          base.batch_size, budget_seconds,
                          settings={"data": str(data_dir), "image_size": image_size, "probe_steps": probe_steps,
                                    "device": str(torch_device), "precision": precision.name, "seed": seed})
    folder = Path(out) if out is not None else default_run_dir("select")
    folder.mkdir(parents=True, exist_ok=True)
    result.path = write_text_atomically(folder / SELECT_FILE, _json(result.to_dict()))
    return result


def rank(candidates: Sequence[Candidate], near_tie: float = NEAR_TIE) -> list[Candidate]:
    """Best first: among the remaining scored candidates, the fastest of those within ``near_tie``
    of the best accuracy; those fitting the budget before those that do not; failures last."""
    scored = [c for c in candidates if c.error is None]
    ranked: list[Candidate] = []
    for pool in ([c for c in scored if c.fits_budget], [c for c in scored if not c.fits_budget]):
        pool = list(pool)
        while pool:
            best = max(c.val_accuracy for c in pool)
            tied = [c for c in pool if best - c.val_accuracy < near_tie]
            pick = max(tied, key=lambda c: (c.images_per_second or 0.0, c.val_accuracy, -pool.index(c)))
            ranked.append(pick)
            pool.remove(pick)
    return ranked + [c for c in candidates if c.error is not None]


def _model_names(models: str | Sequence[str]) -> list[str]:
    """The candidates in the order given, each checked (an unknown name lists close matches) before any work."""
    items = models.split(",") if isinstance(models, str) else list(models)
    names = list(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
    if not names:
        raise ConfigError(f"no model to compare in {shown(models)}; pass names separated by commas, "
                          "such as --models resnet18,timm:efficientnet_lite0")
    for name in names:
        parse_name(name)
    return names


class _ImageSets:
    """The train and validation images prepared for one preprocessing, decoded once and shared by
    every candidate that uses the same sizes and interpolation."""

    def __init__(self, split: data.DatasetSplit):
        self.split = split
        self.budget = MemoryBudget.from_available()
        self._prepared: dict[tuple, tuple] = {}
        self._claimed = 0  # bytes of the budget the decoded images hold
        self.train_count, self.val_count = len(split.train), len(split.val)

    def get(self, preprocessing: Preprocessing):
        key = (preprocessing.resize_size, preprocessing.crop_size, preprocessing.interpolation)
        if key not in self._prepared:
            self._prepared.clear()  # the candidate before used other sizes: free its images
            self.budget.release(self._claimed)
            self._claimed = 0
            self._prepared[key] = self._decode(preprocessing)
        train_samples, train_images, val_samples, val_images = self._prepared[key]
        transform = data.build_eval_transform(preprocessing)
        return train_samples, _dataset(train_images, train_samples, transform), val_samples, \
            _dataset(val_images, val_samples, transform)

    def _decode(self, preprocessing: Preprocessing):
        size = preprocessing.resize_size
        needed = data.decoded_bytes(len(self.split.train) + len(self.split.val), size)
        if self.budget.claim(needed, "decoded images"):
            self._claimed = needed
            def decoded(samples):
                return data.decode_to_uint8(samples, size, crop_size=preprocessing.crop_size,
                                            interpolation=preprocessing.interpolation)

            train, val = decoded(self.split.train), decoded(self.split.val)
            bad, prepared = train.bad + val.bad, (train.samples, train, val.samples, val)
        else:
            (train, train_bad), (val, val_bad) = data.check_images(self.split.train), data.check_images(self.split.val)
            bad, prepared = train_bad + val_bad, (train, None, val, None)
        require_trainable(self.split, [s.label for s in prepared[0]], [s.label for s in prepared[2]], len(bad))
        self.train_count, self.val_count = len(prepared[0]), len(prepared[2])
        return prepared


def _dataset(decoded, samples, transform):
    if decoded is not None:
        return data.InMemoryDataset.from_decoded(decoded, transform)
    return data.ImageDataset(samples, transform)


def _score(config: TrainConfig, split, images: _ImageSets, device, precision, probe_steps, cache_dir,
           clock) -> Candidate:
    preprocessing = resolve_run_preprocessing(config)
    train_samples, train_set, val_samples, val_set = images.get(preprocessing)
    torch.manual_seed(config.seed)  # the new head's initialisation (and a random-init backbone's)
    model, _ = build_model(config, len(split.classes))
    model.to(device)
    if prefers_channels_last(model):
        model.to(memory_format=torch.channels_last)  # as training will run it; oneDNN's faster kernels
    anatomy = anatomy_of(model, name=config.model)
    candidate = Candidate(config.model, parameters=sum(p.numel() for p in model.parameters()),
                          image_size=preprocessing.crop_size)
    transform = repr(data.build_eval_transform(preprocessing))
    try:
        features = [build_feature_cache(model, dataset, batch_size=config.batch_size, device=device,
                                        anatomy=anatomy, cache_dir=cache_dir, memory_budget=images.budget,
                                        key=feature_cache_key(model, samples, transform_description=transform,
                                                              views=1, model_name=config.model, anatomy=anatomy))
                    for samples, dataset in ((train_samples, train_set), (val_samples, val_set))]
    except HeadNotReproducible as error:
        candidate.error = f"no linear probe: {error}"
        log.warning("%s: %s", config.model, candidate.error)
        return candidate
    probe = run_linear_probe(*features, len(split.classes), steps=probe_steps, device=device)
    for cached in features:
        images.budget.release(cached.memory_bytes)  # dropped now: the next candidate's may use the room
    candidate.val_accuracy, candidate.train_accuracy = probe.val_accuracy, probe.train_accuracy
    candidate.feature_dim = probe.feature_dim
    speed = measure_training_throughput(model, config, len(split.classes), preprocessing.crop_size, device,
                                        precision, anatomy=anatomy, clock=clock)
    candidate.images_per_second = speed.images_per_second
    return candidate


def _json(values: dict) -> str:
    return json.dumps(values, indent=2) + "\n"
