"""The pictures a run leaves: learning curves and the confusion matrix, as PNG files.

Figures are drawn with matplotlib's object API on an Agg canvas, never through ``pyplot``: no
display is needed, and the global backend of a user's notebook is left alone. A figure is rendered
into memory and written with :func:`visiontune.atomic_io.write_bytes_atomically`, so a symlink
planted at ``curves.png`` is replaced, never written through.

matplotlib keeps a font cache in its config folder (``~/.config/matplotlib`` or ``~/.cache/matplotlib``,
else a new folder under ``$TMPDIR``). Unless ``MPLCONFIGDIR`` is already set, it is pointed into
visiontune's cache folder (``$VISIONTUNE_CACHE/matplotlib``) before matplotlib is first imported,
so that a run writes nothing outside the run and cache folders.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from visiontune.atomic_io import write_bytes_atomically
from visiontune.features.store import cache_root


def point_matplotlib_config_into_cache() -> None:
    """Set ``MPLCONFIGDIR`` (unless set) before matplotlib is first imported, here or by a library
    that imports it (grad-cam does): its font cache then lands in visiontune's cache folder."""
    os.environ.setdefault("MPLCONFIGDIR", str(cache_root() / "matplotlib"))


point_matplotlib_config_into_cache()

# Below the environment variable on purpose: matplotlib reads MPLCONFIGDIR when it is first imported.
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

log = logging.getLogger(__name__)

_DPI = 110


def plot_curves(rows: Sequence[dict], path: str | Path) -> Path:
    """Loss and accuracy per epoch, train vs validation, from metrics.csv-style rows.

    Each row needs ``epoch`` and any of ``train_loss``, ``val_loss``, ``train_acc``, ``val_acc``
    (numbers or the strings read back from the CSV; missing or empty values are skipped). When a
    ``phase`` column changes (gradual unfreezing) a dashed line marks the epoch it changed at.
    """
    epochs = [_number(row.get("epoch")) for row in rows]
    figure = Figure(figsize=(10, 4), dpi=_DPI)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for axes, metric, title in ((loss_axes, "loss", "Loss"), (accuracy_axes, "acc", "Accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            points = [(e, _number(row.get(f"{split}_{metric}"))) for e, row in zip(epochs, rows)]
            points = [(e, v) for e, v in points if e is not None and v is not None]
            if points:
                axes.plot(*zip(*points), style, markersize=4, label=split)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axes.grid(alpha=0.3)
        for epoch, phase in _phase_changes(rows, epochs):
            axes.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=1)
            axes.annotate(
                phase, (epoch - 0.5, 1.0), xycoords=("data", "axes fraction"),
                xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey",
            )
        if axes.lines:
            axes.legend(loc="best")
    accuracy_axes.set_ylim(-0.02, 1.02)
    return _save(figure, path)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path) -> Path:
    """The confusion matrix (rows = true class): colours are row-normalised (recall per class),
    numbers are counts. Labels stay readable up to about 50 classes."""
    n = len(classes)
    counts = [[int(value) for value in row] for row in confusion]
    if len(counts) != n or any(len(row) != n for row in counts):
        raise ValueError(f"confusion must be {n}x{n} for {n} classes")
    normalised = [[value / max(sum(row), 1) for value in row] for row in counts]

    side = min(max(4.0, 0.32 * n + 2.5), 20.0)  # inches: grows with the class count
    label_size = 9 if n <= 15 else max(4, int(9 - (n - 15) / 7))
    figure = Figure(figsize=(side + 1.2, side), dpi=_DPI)
    axes = figure.subplots()
    image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    axes.set_xticks(range(n), [_shorten(name) for name in classes], rotation=90 if n > 6 and max(map(len, classes)) > 2 else 0, fontsize=label_size)
    axes.set_yticks(range(n), [_shorten(name) for name in classes], fontsize=label_size)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    total = sum(map(sum, counts))
    correct = sum(counts[i][i] for i in range(n))
    axes.set_title(f"Confusion matrix: {correct}/{total} correct")
    if n <= 30:  # beyond that the numbers would overlap; the colours still tell the story
        number_size = max(5, min(10, int(140 / max(n, 1))))
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                if value:
                    colour = "white" if normalised[i][j] > 0.55 else "black"
                    axes.text(j, i, str(value), ha="center", va="center", fontsize=number_size, color=colour)
    return _save(figure, path)


def plot_average_precision(per_class_ap: dict[str, float | None], path: str | Path) -> Path:
    """Multi-label runs: one bar per class, its average precision on validation (classes without a
    positive image have none and are marked n/a); the dashed line is their mean, the mAP."""
    names = list(per_class_ap)
    values = [per_class_ap[name] for name in names]
    figure = Figure(figsize=(min(max(5.0, 0.35 * len(names) + 2), 20.0), 4), dpi=_DPI)
    axes = figure.subplots()
    axes.bar(range(len(names)), [value or 0.0 for value in values], color="tab:blue")
    for index, value in enumerate(values):
        if value is None:
            axes.text(index, 0.02, "n/a", ha="center", fontsize=7, color="grey")
    known = [value for value in values if value is not None]
    if known:
        axes.axhline(sum(known) / len(known), color="tab:red", linestyle="--", linewidth=1,
                     label=f"mAP {sum(known) / len(known):.3f}")
        axes.legend(loc="lower right")
    axes.set_xticks(range(len(names)), [_shorten(name) for name in names], rotation=90 if len(names) > 8 else 0,
                    fontsize=8)
    axes.set_ylim(0, 1.02)
    axes.set_ylabel("average precision")
    axes.set_title("Average precision per class (validation)")
    return _save(figure, path)


def plot_pr_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path) -> Path:
    """Multi-label runs: each class's precision-recall curve, ``{class: (recall, precision)}``;
    the legend names at most 12 classes, the curves of more are drawn thin and unnamed."""
    figure = Figure(figsize=(6, 5), dpi=_DPI)
    axes = figure.subplots()
    for index, (name, (recall, precision)) in enumerate(curves.items()):
        named = index < 12
        axes.plot(recall, precision, linewidth=1.2 if named else 0.6, label=_shorten(name) if named else None)
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title("Precision-recall per class (validation)")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower left", fontsize=7)
    return _save(figure, path)


def _phase_changes(rows: Sequence[dict], epochs: list[float | None]) -> list[tuple[float, str]]:
    """(epoch, new phase) wherever the ``phase`` column differs from the row before."""
    changes = []
    previous = None
    for epoch, row in zip(epochs, rows):
        phase = row.get("phase")
        if phase in (None, ""):
            continue
        if previous is not None and phase != previous and epoch is not None:
            changes.append((epoch, str(phase)))
        previous = phase
    return changes


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _shorten(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def save_png(figure: Figure, path: str | Path, **savefig_options) -> Path:
    """Render ``figure`` as PNG in memory and write it atomically to ``path`` (every plot goes here)."""
    path = Path(path)
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig_options)
    write_bytes_atomically(path, buffer.getvalue())
    log.debug("wrote %s", path)
    return path


def _save(figure: Figure, path: str | Path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    return save_png(figure, path)
