"""report.html's gallery: the validation images a run got most wrong, each with its Grad-CAM
overlays (where the model saw the predicted class, and the true one) when grad-cam is installed.

The overlays come from :func:`visiontune.run.explain.explain_images` on the run's best weights,
on the CPU. Without grad-cam, without the weights, or when the maps fail, the gallery still shows
every image and one line says why the overlays are left out.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from visiontune.data import load_image
from visiontune.data.images import BadImageError
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.model.anatomy import Anatomy
from visiontune.run.explain import ImageMaps, explain_images, find_target_layer, import_grad_cam, png_bytes
from visiontune.run.files import run_file
from visiontune.run.html_parts import escape, img, missing, read_csv, to_float
from visiontune.run.loaded import LoadedRun, load_run
from visiontune.safe_yaml import load_yaml_text

log = logging.getLogger(__name__)

THUMBNAIL_PX = 128  # longest side of the thumbnails
OVERLAY_BATCH = 8  # images per forward and backward pass: bounds the memory of a large model's maps
OVERLAY_METHOD = "gradcam"
OVERLAY_TITLES = {f"{OVERLAY_METHOD} predicted": "why it said", f"{OVERLAY_METHOD} true": "evidence for"}


def most_wrong_section(run_dir: Path, config_text: str | None, max_wrong: int, overlays: bool = True,
                       trained: LoadedRun | None = None, anatomy: Anatomy | None = None) -> str:
    """``trained``/``anatomy``: the model that just trained (best weights loaded, eval mode) and its
    anatomy, so the end of a run neither rebuilds the model nor searches its layers again."""
    rows = read_csv(run_file(run_dir, "val_predictions.csv"))
    if rows is None:
        return missing("val_predictions.csv")
    wrong = [row for row in rows if row.get("label") != row.get("predicted")]
    if not wrong:
        return f"<p>All {len(rows)} validation images were classified correctly.</p>"
    wrong.sort(key=lambda row: to_float(row.get("loss")) or 0.0, reverse=True)
    shown = wrong[:max_wrong]
    roots = image_roots(run_dir, config_text)
    found = [find_image(row.get("path", ""), roots) for row in shown]
    maps, why_not = _overlays(run_dir, shown, found, trained, anatomy) if overlays and shown else ({}, None)
    figures = [_figure(row, path, maps.get(index)) for index, (row, path) in enumerate(zip(shown, found))]
    with_maps = (" Next to each, Grad-CAM heat maps: where the model found evidence for the class it predicted, and "
                 "for the true class (an all-blue map: it found none)." if maps else "")
    note = f'<p class="missing">Grad-CAM overlays left out: {escape(why_not)}</p>' if why_not else ""
    return (f"<p>{len(wrong)} of {len(rows)} validation images were misclassified; the {len(figures)} with the "
            f"highest loss.{with_maps}</p>\n{note}<div class=\"grid\">\n" + "\n".join(figures) + "\n</div>")


def _figure(row: dict, path: Path | None, maps: ImageMaps | None) -> str:
    name = Path(row.get("path", "")).name
    label, predicted = row.get("label", "?"), row.get("predicted", "?")
    sure = to_float(row.get("confidence"))
    caption = (f"true: <b>{escape(label)}</b><br><span class=\"wrong\">predicted: <b>{escape(predicted)}</b></span>"
               + (f' <span class="nowrap">({sure:.0%} sure)</span>' if sure is not None else "")
               + f'<br><small class="file">{escape(name)}</small>')
    thumbnail = _thumbnail(path) if path is not None else None
    pictures = [_picture(img(thumbnail, name, "thumb"), "image") if thumbnail
                else missing("image not found")]
    for key, title in OVERLAY_TITLES.items():
        if maps is not None and key in maps.overlays:
            shown_class = predicted if key.endswith("predicted") else label
            pictures.append(_picture(img(png_bytes(maps.overlays[key]), f"{title} {shown_class}", "cam"),
                                     f"{title} {escape(shown_class)}"))
    return (f'<figure title="{escape(row.get("path", ""))}"><div class="pics">{"".join(pictures)}</div>'
            f"<figcaption>{caption}</figcaption></figure>")


def _picture(image: str, title: str) -> str:
    return f'<div class="pic">{image}<span>{title}</span></div>'


def _overlays(run_dir: Path, rows: list[dict], found: list[Path | None], trained: LoadedRun | None,
              anatomy: Anatomy | None) -> tuple[dict[int, ImageMaps], str | None]:
    """Grad-CAM maps of the found images by their index in ``rows``, or ({}, why not)."""
    try:
        import_grad_cam()
    except VisiontuneError as error:
        return {}, str(error)
    pictures = []
    for index, path in enumerate(found):
        if path is not None:
            try:
                pictures.append((index, load_image(path)))
            except BadImageError as error:
                log.warning("no overlay for %s: %s", path, error.reason)
    if not pictures:
        return {}, "none of the images was found"
    try:
        loaded = trained or load_run(run_dir, device="cpu")
        target = find_target_layer(loaded.model, loaded.preprocessing.crop_size, anatomy)
        maps: dict[int, ImageMaps] = {}
        for start in range(0, len(pictures), OVERLAY_BATCH):
            chunk = pictures[start:start + OVERLAY_BATCH]
            labels = [rows[index].get("label") for index, _ in chunk]
            results = explain_images(loaded, [picture for _, picture in chunk], labels, (OVERLAY_METHOD,),
                                     target=target)
            maps.update((index, result) for (index, _), result in zip(chunk, results))
    except VisiontuneError as error:
        return {}, f"the run's model could not be loaded ({error})"
    except Exception as error:  # noqa: BLE001 - a model grad-cam cannot read must not stop the report
        log.warning("Grad-CAM overlays failed: %s: %s", type(error).__name__, error)
        return {}, f"computing them failed ({type(error).__name__}: {str(error)[:160]})"
    return maps, None


def image_roots(run_dir: Path, config_text: str | None) -> list[Path]:
    """Folders a relative path in val_predictions.csv may be relative to: the data folder, the run."""
    roots = []
    try:
        values = load_yaml_text(config_text or "", "config.yaml")
    except ConfigError:
        values = None
    data = values.get("data") if isinstance(values, dict) else None
    if data:
        data_path = Path(str(data)).expanduser()
        roots.append(data_path if data_path.is_dir() else data_path.parent)  # a CSV manifest's folder
    return roots + [run_dir, Path.cwd()]


def find_image(path: str, roots: list[Path]) -> Path | None:
    candidates = [Path(path)] if Path(path).is_absolute() else [root / path for root in roots]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def _thumbnail(found: Path) -> bytes | None:
    try:
        image = load_image(found)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    except Exception as error:  # noqa: BLE001 - an unreadable image gets a caption, not a crash
        log.warning("cannot make a thumbnail of %s: %s", found, error)
        return None
