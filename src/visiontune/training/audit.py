"""``visiontune.audit``: find wrong labels, duplicates, leaks and outliers in a labelled image set.

The path: discover the data as ``train`` does (:func:`visiontune.data.discover`) → the backbone
(a finished run's with ``run=``, else ``model``'s pretrained one) runs once over every image into
the on-disk feature cache (:mod:`visiontune.features.extract`; keyed on the model and every file,
so a second audit of the same folder reads it back) → out-of-fold probabilities and cleanlab's
verdicts (:mod:`visiontune.features.audit`) → duplicates and leaks
(:mod:`visiontune.features.audit_duplicates`) → the files (:mod:`visiontune.run.audit_report`).
It lives in ``training/`` because it builds the model exactly as training does
(:func:`visiontune.training.setup.build_model`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from visiontune import data
from visiontune.config import config_from_dict
from visiontune.device import resolve_device
from visiontune.errors import ConfigError, shown
from visiontune.features.audit import (OUTLIER_NEIGHBOURS, class_imbalance, nearest_neighbours, out_of_fold_probabilities,
                                       outliers, require_cleanlab, score_labels, unit_rows)
from visiontune.features.audit_duplicates import duplicate_groups, file_digest
from visiontune.features.extract import HeadNotReproducible, build_feature_cache, feature_cache_key
from visiontune.features.probe import as_matrix
from visiontune.features.store import cache_root
from visiontune.model.anatomy import anatomy_of
from visiontune.run.audit_report import AuditResult, AuditRow, refuse_overwriting_inputs, write_audit
from visiontune.run.folder import default_run_dir
from visiontune.run.loaded import load_run
from visiontune.training.setup import build_model, resolve_run_preprocessing

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5


def audit(
    data_path: str | Path,
    model: str | None = None,
    *,
    weights: str | None = "DEFAULT",
    run: str | Path | None = None,
    folds: int = DEFAULT_FOLDS,
    out: str | Path | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    val_split: float | None = None,
    seed: int = 0,
    device: str = "auto",
    cache_dir: str | Path | None = None,
) -> AuditResult:
    """Audit ``data_path`` (a folder or CSV manifest, as ``train`` takes) and write audit.html,
    audit.csv, audit.json and clean.csv into ``out`` (default ``runs/audit-<timestamp>``).

    The features come from ``run``'s trained backbone when given, else from ``model`` with
    ``weights`` (``"DEFAULT"``: pretrained; ``"none"``: random init; or a weights file).
    ``folds``: out-of-fold probes (each image scored by a probe fitted on the other folds);
    ``image_size``: crop size in pixels (default: the weights' or the run's)."""
    started = time.perf_counter()
    require_cleanlab()  # before any long work: a missing extra is one line, at once
    if (model is None) == (run is None):
        raise ConfigError("give --model NAME (a pretrained backbone) or --run RUN (a finished run's backbone), "
                          "exactly one")
    out_dir = Path(out) if out is not None else default_run_dir("audit")
    split = data.discover(data_path, val_split=val_split, seed=seed)
    refuse_overwriting_inputs(out_dir, Path(data_path).expanduser().absolute())
    torch_device = resolve_device(device)
    backbone, preprocessing, model_name, batch = _backbone(split, model, weights, run, image_size, batch_size, seed,
                                                           device, torch_device)
    samples = split.train + split.val
    cached, hit, samples = _features(backbone, samples, preprocessing, model_name, batch, torch_device, cache_dir)
    split_of = {id(sample): "val" for sample in split.val}
    is_val = np.array([split_of.get(id(sample)) == "val" for sample in samples])
    labels = np.array([sample.label for sample in samples], dtype=np.int64)
    matrix = as_matrix(cached)
    pred_probs = out_of_fold_probabilities(matrix, labels, len(split.classes), folds=folds, seed=seed)
    scores = score_labels(pred_probs, labels)
    distances, neighbours = nearest_neighbours(unit_rows(matrix), OUTLIER_NEIGHBOURS)
    outlier_flags, outlier_limit = outliers(distances)
    groups = duplicate_groups([file_digest(sample.path) for sample in samples], distances, neighbours, is_val)
    rows = [AuditRow(sample.path, "val" if is_val[i] else "train", split.classes[sample.label],
                     split.classes[int(scores.suggested[i])], float(scores.quality[i]), float(distances[i].mean()))
            for i, sample in enumerate(samples)]
    _mark(rows, scores.label_issue, outlier_flags, groups)
    settings = {"data": str(data_path), "model": model_name, "weights": None if run else str(weights),
                "run": None if run is None else str(run), "folds": folds, "seed": seed,
                "image_size": preprocessing.crop_size, "device": str(torch_device), "source": split.source,
                "fixed_split": split.source == "folders" or bool(split.split_info.get("split_column")),
                "outlier_limit": outlier_limit, "feature_dim": int(matrix.shape[1])}
    result = AuditResult(rows, list(split.classes), [{"members": list(g.members), "exact": g.exact, "leak": g.leak}
                                                     for g in groups],
                         [split.classes[c] for c in class_imbalance(labels, len(split.classes))],
                         _counts(rows, is_val), settings, feature_cache_hit=hit)
    result.seconds = time.perf_counter() - started
    write_audit(result, out_dir)
    return result


def _backbone(split, model, weights, run, image_size, batch_size, seed, device, torch_device):
    """``(model on the device in eval mode, preprocessing, name for the cache key, batch size)``."""
    given = {"image_size": image_size, "seed": seed, "device": device,
             **({"batch_size": batch_size} if batch_size is not None else {})}
    if run is not None:
        config = config_from_dict(given, require_data=False)  # the same checks of size, batch and device
        loaded = load_run(run, device=torch_device)
        preprocessing = loaded.preprocessing
        if image_size:
            preprocessing = preprocessing.with_image_size(image_size)
        return loaded.model, preprocessing, f"run:{Path(run).resolve()}:{loaded.config.model}", config.batch_size
    weights = "none" if weights is None else str(weights)
    config = config_from_dict({**given, "model": model, "weights": weights}, require_data=False)
    torch.manual_seed(seed)  # the head's initialisation (and a random-init backbone's): not in the features
    built, _ = build_model(config, len(split.classes))
    return built.to(torch_device).eval(), resolve_run_preprocessing(config), config.model, config.batch_size


def _features(model, samples, preprocessing, model_name, batch, device, cache_dir):
    """``(cached features, whether the disk cache had them, the samples they are for)``. The key
    covers every discovered file, so a repeated audit skips even the check for unreadable images."""
    anatomy = anatomy_of(model, name=model_name.rsplit(":", 1)[-1])
    transform = data.build_eval_transform(preprocessing)

    def key_for(chosen):
        return feature_cache_key(model, chosen, transform_description=repr(transform), views=1,
                                 model_name=model_name, anatomy=anatomy)

    key = key_for(samples)
    hit = (cache_root(cache_dir) / "features" / key / "meta.json").is_file()
    if not hit:
        samples, bad = data.check_images(samples)
        if bad:
            key = key_for(samples)
    if len(samples) < 2:
        raise ConfigError(f"only {len(samples)} readable image(s); an audit needs at least two")
    try:
        cached = build_feature_cache(model, data.ImageDataset(samples, transform), batch_size=batch, device=device,
                                     key=key, store="disk", cache_dir=cache_dir, anatomy=anatomy)
    except HeadNotReproducible as error:
        raise ConfigError(f"cannot audit with {shown(model_name)}: {error}; choose another --model") from None
    return cached, hit, samples


def _mark(rows: list[AuditRow], label_issue, outlier_flags, groups) -> None:
    """Tag each row's issues and decide what clean.csv keeps: no flagged label or outlier, one copy
    per duplicate group (for a leak, a validation copy: the training copies go)."""
    for index, row in enumerate(rows):
        if label_issue[index]:
            row.issues.append("label")
        if outlier_flags[index]:
            row.issues.append("outlier")
    for number, group in enumerate(groups):
        members = list(group.members)
        keeper = next((i for i in members if rows[i].split == "val"), members[0]) if group.leak else members[0]
        for i in members:
            rows[i].duplicate_group = number
            rows[i].issues.append("duplicate")
            if group.leak:
                rows[i].issues.append("leak")
            if i != keeper:
                rows[i].keep = False
    for row in rows:
        row.issues.sort(key=["leak", "label", "duplicate", "outlier"].index)
        if "label" in row.issues or "outlier" in row.issues:
            row.keep = False


def _counts(rows: list[AuditRow], is_val: np.ndarray) -> dict:
    counts = {kind: sum(kind in row.issues for row in rows) for kind in ("leak", "label", "duplicate", "outlier")}
    return {"images": len(rows), "train": int((~is_val).sum()), "val": int(is_val.sum()),
            "flagged": sum(bool(row.issues) for row in rows), "kept": sum(row.keep for row in rows), **counts}
