"""RUN/report.html: one self-contained page a person can open to see how a run went.

Everything is inside the file: images are inlined as base64 ``data:`` URIs and the only style is
an inline ``<style>`` block, so it opens offline, attached to an e-mail, or from an archive. It
is built only from the files a run leaves (see :mod:`visiontune.run.folder`), so it can be rebuilt at
any time (``visiontune report --run RUN``). Every optional file that is missing turns its
section into "not available" instead of an error; every piece of text is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

from visiontune.atomic_io import same_file, write_text_atomically
from visiontune.safe_yaml import load_yaml_text
from visiontune.data import load_image
from visiontune.errors import ConfigError, VisiontuneError
from visiontune.run.files import run_file
from visiontune.run.folder import AP_FILE, PR_CURVES_FILE, REPORT_HTML, RUN_FILES, check_run_folder
from visiontune.run.plots import plot_confusion, plot_curves

log = logging.getLogger(__name__)

THUMBNAIL_PX = 128  # longest side of the "most wrong" thumbnails
MAX_WRONG = 24  # how many of the most wrong validation images to show
MAX_ITEMS = 40  # a load report can list hundreds of tensors: show this many of each list, and the count
COUNT_ONLY_KEYS = ("loaded",)
LOAD_REPORT_KEYS = ("weights_load_report", "load_report")  # report.json keys, newest first

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.9em}img.plot{max-width:100%}
.missing{color:#888;font-style:italic}.grid{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;width:150px;font-size:.8em}figure img{display:block;margin:auto;image-rendering:pixelated}
figcaption{text-align:center;word-break:break-all}.wrong{color:#b00}
"""


def write_report(run_dir: str | Path, out: str | Path | None = None, max_wrong: int = MAX_WRONG) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and return its path."""
    run_dir = Path(run_dir)
    page = build_report(run_dir, max_wrong=max_wrong)
    path = Path(out) if out is not None else run_dir / REPORT_HTML
    _refuse_overwriting_the_run(run_dir, path)
    write_text_atomically(path, page)  # a reader never sees half a page; a symlink there is replaced
    log.info("wrote %s", path)
    return path


def _refuse_overwriting_the_run(run_dir: Path, path: Path) -> None:
    """``--out`` may name any file but one of the run's own, which the report is built from."""
    for name in RUN_FILES:
        if name != REPORT_HTML and same_file(path, run_dir / name):
            raise VisiontuneError(f"--out {path} is the run's own {name}; writing the report there would destroy it. "
                                  f"Choose another file (default: {run_dir / REPORT_HTML})")


def build_report(run_dir: str | Path, max_wrong: int = MAX_WRONG) -> str:
    """The report page as a string (see :func:`write_report`)."""
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    report = _read_json(run_file(run_dir, "report.json"), dict) or {}
    config_text = _read_text(run_file(run_dir, "config.yaml"))
    classes = _read_json(run_file(run_dir, "classes.json"), list) or []
    sections = [
        ("summary", "Summary", _summary_section(report)),
        ("configuration", "Configuration", _pre(config_text) if config_text else _missing("config.yaml")),
        ("load-report", "Pretrained weights: load report", _load_report_section(report)),
        ("curves", "Learning curves", _curves_section(run_dir)),
        ("confusion", "Confusion matrix", _confusion_section(run_dir, report, classes)),
        ("per-class", "Per-class precision and recall", _per_class_section(report)),
        ("most-wrong", "Validation images it got most wrong", _most_wrong_section(run_dir, config_text, max_wrong)),
    ]
    if report.get("task") == "multilabel":
        sections = [_multilabel_section(run_dir) if key == "confusion" else (key, heading, content)
                    for key, heading, content in sections]
    title = f"visiontune run {run_dir.resolve().name}"
    body = "\n".join(f'<section id="{key}">\n<h2>{_e(heading)}</h2>\n{content}\n</section>'
                     for key, heading, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n</body>\n</html>\n")


def _require_run_dir(run_dir: Path) -> None:
    markers = ("config.yaml", "metrics.csv", "report.json")
    check_run_folder(run_dir)  # no file of the run may be a link: it could embed any file in the page
    if not run_dir.is_dir() or not any(run_file(run_dir, name).is_file() for name in markers):
        raise VisiontuneError(f"{run_dir} is not a visiontune run folder (it has none of {', '.join(markers)}); "
                              "pass the folder 'visiontune train' wrote (its --out)")


# -- sections --------------------------------------------------------------------------------------


def _summary_section(report: dict) -> str:
    # None marks what the run did not use (no --budget, no --ema): nothing to show
    scalars = {key: value for key, value in report.items() if _is_scalar(value) and value is not None}
    if not scalars:
        return _missing("report.json")
    return _key_value_table(scalars)


def _load_report_section(report: dict) -> str:
    """What loading a weights file did (``weights_load_report`` in report.json; None when the
    architecture's built-in weights, or none, were used)."""
    load_report = next((value for key in LOAD_REPORT_KEYS if (value := find_key(report, key)) is not None), None)
    if load_report is None:
        weights = report.get("weights")
        detail = f"weights {weights!r}: " if _is_scalar(weights) and weights is not None else ""
        return _missing(f"{detail}no weights file was loaded, so there is no load report "
                        "(built-in pretrained weights load whole; 'none' means random initialisation)")
    if isinstance(load_report, str):
        return _pre(load_report)
    if not isinstance(load_report, dict):
        return _render_value(load_report)
    counts = [f"{_e(key)}: {len(value)}" for key, value in load_report.items() if isinstance(value, (list, dict))]
    # what loaded is the long, unsurprising part: its count says enough; the rest is the news
    details = {key: value for key, value in load_report.items() if key not in COUNT_ONLY_KEYS}
    return (f"<p>{' &middot; '.join(counts)}</p>" if counts else "") + _render_value(details)


def _curves_section(run_dir: Path) -> str:
    image = _png_file_or_plot(run_file(run_dir, "curves.png"), lambda path: _plot_curves_from_csv(run_dir, path))
    table = _metrics_table(run_dir)
    if image is None and table is None:
        return _missing("curves.png / metrics.csv")
    return (_img(image, "learning curves", plot=True) if image else _missing("curves.png")) + (table or "")


def _confusion_section(run_dir: Path, report: dict, classes: list) -> str:
    confusion = find_key(report, "confusion")

    def plot(path: Path) -> bool:
        if not (confusion and classes):
            return False

        plot_confusion(confusion, classes, path)
        return True

    image = _png_file_or_plot(run_file(run_dir, "confusion.png"), plot)
    return _img(image, "confusion matrix", plot=True) if image else _missing("confusion.png")


def _multilabel_section(run_dir: Path) -> tuple[str, str, str]:
    """Multi-label runs have no confusion matrix: per-class AP bars and precision-recall curves."""
    parts = []
    for name, alt in ((AP_FILE, "average precision per class"), (PR_CURVES_FILE, "precision-recall curves")):
        image = _png_file_or_plot(run_file(run_dir, name), lambda path: False)
        parts.append(_img(image, alt, plot=True) if image else _missing(name))
    return "average-precision", "Average precision and precision-recall per class", "\n".join(parts)


def _per_class_section(report: dict) -> str:
    per_class = find_key(report, "per_class")
    if not isinstance(per_class, dict) or not per_class:
        return _missing("per-class metrics in report.json")
    columns = ("precision", "recall", "f1", "support")
    rows = []
    for name, values in per_class.items():
        cells = "".join(f'<td class="num">{_e(_format(values.get(column)))}</td>' for column in columns)
        rows.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
    header = "".join(f"<th>{column}</th>" for column in ("class", *columns))
    return f"<table><tr>{header}</tr>\n" + "\n".join(rows) + "\n</table>"


def _most_wrong_section(run_dir: Path, config_text: str | None, max_wrong: int) -> str:
    rows = _read_csv(run_file(run_dir, "val_predictions.csv"))
    if rows is None:
        return _missing("val_predictions.csv")
    wrong = [row for row in rows if row.get("label") != row.get("predicted")]
    if not wrong:
        return f"<p>All {len(rows)} validation images were classified correctly.</p>"
    wrong.sort(key=lambda row: _float(row.get("loss")) or 0.0, reverse=True)
    roots = _image_roots(run_dir, config_text)
    figures = [_wrong_figure(row, roots) for row in wrong[:max_wrong]]
    return (f"<p>{len(wrong)} of {len(rows)} validation images were misclassified; the {len(figures)} with the "
            f"highest loss:</p>\n<div class=\"grid\">\n" + "\n".join(figures) + "\n</div>")


def _wrong_figure(row: dict, roots: list[Path]) -> str:
    path = row.get("path", "")
    caption = (f"true: {_e(row.get('label', '?'))}<br><span class=\"wrong\">predicted: {_e(row.get('predicted', '?'))}"
               f"</span> {_e(_percent(row.get('confidence')))}<br><small>{_e(Path(path).name)}</small>")
    thumbnail = _thumbnail(path, roots)
    picture = _img(thumbnail, Path(path).name) if thumbnail else _missing("image not found")
    return f'<figure title="{_e(path)}">{picture}<figcaption>{caption}</figcaption></figure>'


# -- images ----------------------------------------------------------------------------------------


def _png_file_or_plot(path: Path, plot: Callable[[Path], bool]) -> bytes | None:
    """The PNG the run wrote, else one re-plotted from its data (``plot`` returns False if it cannot)."""
    if path.is_file():
        return path.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / path.name
        try:
            if plot(target) and target.is_file():
                return target.read_bytes()
        except Exception as error:  # noqa: BLE001 - a broken file must not stop the rest of the report
            log.warning("could not re-plot %s: %s", path.name, error)
    return None


def _plot_curves_from_csv(run_dir: Path, path: Path) -> bool:
    rows = _read_csv(run_file(run_dir, "metrics.csv"))
    if not rows:
        return False

    plot_curves(rows, path)
    return True


def _image_roots(run_dir: Path, config_text: str | None) -> list[Path]:
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


def _thumbnail(path: str, roots: list[Path]) -> bytes | None:
    candidates = [Path(path)] if Path(path).is_absolute() else [root / path for root in roots]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        return None
    try:
        image = load_image(found)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    except Exception as error:  # noqa: BLE001 - an unreadable image gets a caption, not a crash
        log.warning("cannot make a thumbnail of %s: %s", found, error)
        return None


def _img(png: bytes, alt: str, plot: bool = False) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    css = ' class="plot"' if plot else ""  # plots shrink to the page width; thumbnails keep their size
    return f'<img{css} alt="{_e(alt)}" src="data:image/png;base64,{encoded}">'


# -- small renderers ------------------------------------------------------------------------------


def _metrics_table(run_dir: Path) -> str | None:
    rows = _read_csv(run_file(run_dir, "metrics.csv"))
    if not rows:
        return None
    columns = [column for column in rows[0] if any(row.get(column) for row in rows)]
    header = "".join(f"<th>{_e(column)}</th>" for column in columns)
    body = "\n".join("<tr>" + "".join(f'<td class="num">{_e(_format_cell(row.get(column)))}</td>' for column in columns)
                     + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>\n{body}\n</table>"


def _render_value(value) -> str:
    """Nested dicts as tables, lists as bulleted lists (long ones truncated), scalars escaped."""
    if isinstance(value, dict):
        if not value:
            return "<em>none</em>"
        shown = list(value.items())[:MAX_ITEMS]
        rows = "".join(f"<tr><th>{_e(key)}</th><td>{_render_value(item)}</td></tr>" for key, item in shown)
        hidden = len(value) - len(shown)
        more = f'<tr><td colspan="2">... and {hidden} more</td></tr>' if hidden else ""
        return f"<table>{rows}{more}</table>"
    if isinstance(value, (list, tuple)):
        if not value:
            return "<em>none</em>"
        shown = value[:MAX_ITEMS]
        items = "".join(f"<li>{_render_value(item)}</li>" for item in shown)
        more = f"<li>... and {len(value) - len(shown)} more</li>" if len(value) > len(shown) else ""
        return f"<ul>{items}{more}</ul>"
    return _e(_format(value))


def _key_value_table(values: dict) -> str:
    rows = "".join(f"<tr><th>{_e(key)}</th><td>{_e(_format(value))}</td></tr>" for key, value in values.items())
    return f"<table>{rows}</table>"


def find_key(tree, key: str):
    """The first value stored under ``key`` anywhere in nested dicts (breadth first), else None."""
    level = [tree]
    while level:
        next_level = []
        for node in level:
            if isinstance(node, dict):
                if key in node:
                    return node[key]
                next_level.extend(value for value in node.values() if isinstance(value, dict))
        level = next_level
    return None


def _pre(text: str) -> str:
    return f"<pre>{_e(text)}</pre>"


def _missing(what: str) -> str:
    return f'<p class="missing">not available: {_e(what)}</p>'


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _format(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _percent(value) -> str:
    number = _float(value)
    return "" if number is None else f"({number:.0%} sure)"


def _format_cell(value) -> str:
    """A CSV cell: numbers formatted, anything else as written."""
    number = _float(value)
    return _format(number) if number is not None else _format(value)


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def _read_json(path: Path, kind: type | None = None):
    """The JSON value in ``path``; None (its sections are left out, with a log line) when the file is
    missing, not JSON or not of ``kind`` (a damaged or swapped file)."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        log.warning("%s is not valid JSON (%s); its sections are left out", path, str(error)[:80])
        return None
    if kind is not None and not isinstance(value, kind):
        log.warning("%s holds a %s, not a %s; its sections are left out", path, type(value).__name__, kind.__name__)
        return None
    return value


def _read_csv(path: Path) -> list[dict] | None:
    text = _read_text(path)
    return None if text is None else list(csv.DictReader(io.StringIO(text)))
