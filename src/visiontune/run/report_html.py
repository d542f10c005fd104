"""RUN/report.html: one self-contained page a person reads top-down to see how a run went.

The order is the reader's: the run's name, model and data; the headline (accuracy, macro-F1,
what was trained, how long); the learning curves; the confusion matrix; per-class precision and
recall; the validation images it got most wrong, with Grad-CAM overlays
(:mod:`visiontune.run.report_gallery`); the audit's counts when an ``audit.json`` sits in the run
folder; and last, folded (``<details>``), every value of report.json, the configuration and the
weights' load report, which are reference, not news.

Everything is inside the file: images are inlined as base64 ``data:`` URIs and the only style is
an inline ``<style>`` block, so it opens offline, attached to an e-mail, or from an archive; the
page is readable at phone width (viewport meta, images that shrink, tables that scroll sideways,
captions that wrap between words). It is built only from the files a run leaves (see
:mod:`visiontune.run.folder`), so it can be rebuilt at any time (``visiontune report --run RUN``).
Every optional file that is missing turns its section into "not available" instead of an error;
every piece of text is HTML-escaped.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from visiontune.atomic_io import same_file, write_text_atomically
from visiontune.errors import VisiontuneError
from visiontune.model.anatomy import Anatomy
from visiontune.run.files import run_file
from visiontune.run.folder import AP_FILE, PR_CURVES_FILE, REPORT_HTML, RUN_FILES, check_run_folder
from visiontune.run.loaded import LoadedRun
from visiontune.run.html_parts import (escape, find_key, format_cell, format_value, img, is_scalar, key_value_table,
                                       missing, pre, read_csv, read_json, read_text, render_value, scrolling,
                                       to_float)
from visiontune.run.plots import plot_confusion, plot_curves
from visiontune.run.report_gallery import most_wrong_section

log = logging.getLogger(__name__)

MAX_WRONG = 24  # how many of the most wrong validation images to show
COUNT_ONLY_KEYS = ("loaded",)
LOAD_REPORT_KEYS = ("weights_load_report", "load_report")  # report.json keys, newest first
AUDIT_FILE = "audit.json"  # written by `visiontune audit --out RUN` (optional)
# section ids in page order; the folded ones come last
SECTIONS = ("headline", "curves", "confusion", "per-class", "most-wrong", "audit", "summary", "configuration",
            "load-report")
FOLDED = ("summary", "configuration", "load-report")

_STYLE = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1100px;
color:#222;padding:0 1em;line-height:1.4}
h1{font-size:1.7em;margin-bottom:.1em;overflow-wrap:anywhere}.sub{color:#555;margin-top:0}
h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:.8em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em .9em;min-width:8em}
.card b{display:block;font-size:1.6em;font-variant-numeric:tabular-nums}.card span{color:#555;font-size:.9em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.9em}
img{max-width:100%;height:auto}img.plot{display:block}
details{margin-top:1.2em;border-top:1px solid #ddd;padding-top:.4em}
summary{cursor:pointer;font-size:1.15em;font-weight:600;padding:.3em 0}
.missing{color:#888;font-style:italic}.grid{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;max-width:100%;font-size:.85em;border:1px solid #eee;border-radius:6px;padding:.4em}
.pics{display:flex;gap:.3em}.pic{width:100px;text-align:center;font-size:.8em;color:#555}
.pic img{display:block;width:100px;height:100px;object-fit:contain}img.thumb{image-rendering:pixelated}
figcaption{text-align:center;overflow-wrap:break-word;margin-top:.3em}.nowrap{white-space:nowrap}
.file{overflow-wrap:anywhere;color:#666}.wrong{color:#b00}
@media (max-width:480px){.pic,.pic img{width:96px}.pic img{height:96px}body{padding:0 .6em}td,th{padding:.2em .35em}}
"""


def write_report(run_dir: str | Path, out: str | Path | None = None, max_wrong: int = MAX_WRONG,
                 overlays: bool = True, trained: LoadedRun | None = None, anatomy: Anatomy | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and return its path. ``overlays``: Grad-CAM maps
    next to the most wrong images (needs grad-cam; runs the model on the CPU). ``trained``, ``anatomy``:
    the model that just trained and its anatomy (see :func:`most_wrong_section`), else the run is loaded."""
    run_dir = Path(run_dir)
    page = build_report(run_dir, max_wrong=max_wrong, overlays=overlays, trained=trained, anatomy=anatomy)
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


def build_report(run_dir: str | Path, max_wrong: int = MAX_WRONG, overlays: bool = True,
                 trained: LoadedRun | None = None, anatomy: Anatomy | None = None) -> str:
    """The report page as a string (see :func:`write_report`)."""
    run_dir = Path(run_dir)
    _require_run_dir(run_dir)
    report = read_json(run_file(run_dir, "report.json"), dict) or {}
    config_text = read_text(run_file(run_dir, "config.yaml"))
    classes = read_json(run_file(run_dir, "classes.json"), list) or []
    audit = read_json(run_file(run_dir, AUDIT_FILE), dict)
    sections = [
        ("headline", "Result", _headline_section(report, read_csv(run_file(run_dir, "metrics.csv")) or [])),
        ("curves", "Learning curves", _curves_section(run_dir)),
        ("confusion", "Confusion matrix", _confusion_section(run_dir, report, classes)),
        ("per-class", "Per-class precision and recall", _per_class_section(report)),
        ("most-wrong", "Validation images it got most wrong",
         most_wrong_section(run_dir, config_text, max_wrong, overlays=overlays, trained=trained, anatomy=anatomy)),
        *([("audit", "Data audit", _audit_section(audit))] if audit is not None else []),
        ("summary", "Every value in report.json", _summary_section(report)),
        ("configuration", "Configuration (config.yaml)", pre(config_text) if config_text else missing("config.yaml")),
        ("load-report", "Pretrained weights: load report", _load_report_section(report)),
    ]
    if report.get("task") == "multilabel":  # AP bars and PR curves stand where the confusion matrix would
        sections = [_multilabel_section(run_dir) if key == "confusion" else (key, heading, content)
                    for key, heading, content in sections]
    body = "\n".join(_section(key, heading, content) for key, heading, content in sections)
    name = run_dir.resolve().name
    model = report.get("model") if is_scalar(report.get("model")) else None
    title = f"{name}: {model}" if model else name
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)} (visiontune report)</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f'<header><h1>{escape(name)}</h1>\n<p class="sub">{_subtitle(report, classes)}</p></header>\n'
            f"{body}\n</body>\n</html>\n")


def _section(key: str, heading: str, content: str) -> str:
    if key in FOLDED:  # reference material: one click away, never in the reader's way
        return (f'<section id="{key}">\n<details>\n<summary>{escape(heading)}</summary>\n{content}\n'
                "</details>\n</section>")
    return f'<section id="{key}">\n<h2>{escape(heading)}</h2>\n{content}\n</section>'


def _require_run_dir(run_dir: Path) -> None:
    markers = ("config.yaml", "metrics.csv", "report.json")
    check_run_folder(run_dir)  # no file of the run may be a link: it could embed any file in the page
    if not run_dir.is_dir() or not any(run_file(run_dir, name).is_file() for name in markers):
        raise VisiontuneError(f"{run_dir} is not a visiontune run folder (it has none of {', '.join(markers)}); "
                              "pass the folder 'visiontune train' wrote (its --out)")


# -- the top: who, what, how well -----------------------------------------------------------------


def _subtitle(report: dict, classes: list) -> str:
    data = report.get("data") if isinstance(report.get("data"), dict) else {}
    parts = []
    if is_scalar(report.get("model")) and report.get("model"):
        parts.append(f"model <b>{escape(report['model'])}</b>")
    counts = [f"{data[key]} {what}" for key, what in (("train_images", "training"), ("val_images", "validation"))
              if isinstance(data.get(key), int)]
    if counts or classes:
        images = f"{' and '.join(counts)} images" if counts else "images"
        parts.append(f"{escape(images)} in {len(classes)} classes" if classes else escape(images))
    return " &middot; ".join(parts) or "visiontune run"


def _headline_section(report: dict, epochs: list[dict]) -> str:
    final = report.get("final") if isinstance(report.get("final"), dict) else {}
    accuracy = to_float(final.get("accuracy", report.get("best_val_accuracy")))
    macro_f1 = to_float(final.get("macro_f1"))
    timings = report.get("timings") if isinstance(report.get("timings"), dict) else {}
    seconds = to_float(timings.get("train_and_val_seconds"))
    cards = [(f"{accuracy:.1%}" if accuracy is not None else "n/a", "validation accuracy"),
             (f"{macro_f1:.3f}" if macro_f1 is not None else "n/a", "macro-F1"),
             (_duration(seconds) if seconds is not None else "n/a", "training time")]
    if accuracy is None and macro_f1 is None and seconds is None:
        return missing("report.json")
    html_cards = "".join(f'<div class="card"><b>{escape(value)}</b><span>{escape(what)}</span></div>'
                         for value, what in cards)
    return f'<div class="cards">{html_cards}</div>\n<p>{_what_was_trained(report)}{_phases(epochs)}</p>'


def _what_was_trained(report: dict) -> str:
    """One sentence: the model, its starting weights, the strategy, the epochs, where it ran."""
    def text(key: str):
        value = report.get(key)
        return value if is_scalar(value) and value is not None else None

    words = [f"Fine-tuned <b>{escape(text('model') or 'the model')}</b>"]
    if text("weights") is not None:
        words.append(f"from weights <code>{escape(Path(str(text('weights'))).name or text('weights'))}</code>")
    if text("strategy"):
        words.append(f"with the <b>{escape(text('strategy'))}</b> strategy")
    if isinstance(report.get("epochs_completed"), int):
        planned = report.get("epochs_planned")
        of = f" of {planned}" if isinstance(planned, int) and planned != report["epochs_completed"] else ""
        words.append(f"for {report['epochs_completed']}{of} epochs")
        if report.get("stopped_early") is True:
            words.append("(stopped early)")
    best = report.get("best_epoch")
    environment = report.get("environment") if isinstance(report.get("environment"), dict) else {}
    where = ", ".join(escape(environment[key]) for key in ("device", "precision")
                      if environment.get(key) is not None and is_scalar(environment[key]))
    sentence = " ".join(words) + (f" on {where}" if where else "") + "."
    return sentence + (f" The best validation accuracy came at epoch {escape(best)}." if isinstance(best, int) else "")


def _phases(epochs: list[dict]) -> str:
    """The phases in order, from metrics.csv's phase column: "Phases: head for 1 epoch, then full for 2"."""
    runs: list[list] = []  # [phase, epochs] in order
    for row in epochs:
        phase = row.get("phase") or "?"
        if runs and runs[-1][0] == phase:
            runs[-1][1] += 1
        else:
            runs.append([phase, 1])
    if not runs:
        return ""
    parts = [f"<b>{escape(phase)}</b> for {count} epoch{'s' if count != 1 else ''}" for phase, count in runs]
    return " Phases: " + ", then ".join(parts) + "."


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


# -- results ---------------------------------------------------------------------------------------


def _curves_section(run_dir: Path) -> str:
    image = _png_file_or_plot(run_file(run_dir, "curves.png"), lambda path: _plot_curves_from_csv(run_dir, path))
    table = _metrics_table(run_dir)
    if image is None and table is None:
        return missing("curves.png / metrics.csv")
    folded_table = f"<details><summary>Every epoch's numbers</summary>{table}</details>" if table else ""
    return (img(image, "learning curves", "plot") if image else missing("curves.png")) + folded_table


def _confusion_section(run_dir: Path, report: dict, classes: list) -> str:
    confusion = find_key(report, "confusion")

    def plot(path: Path) -> bool:
        if not (confusion and classes):
            return False
        plot_confusion(confusion, classes, path)
        return True

    image = _png_file_or_plot(run_file(run_dir, "confusion.png"), plot)
    return img(image, "confusion matrix", "plot") if image else missing("confusion.png")


def _multilabel_section(run_dir: Path) -> tuple[str, str, str]:
    """Multi-label runs have no confusion matrix: per-class AP bars and precision-recall curves."""
    parts = []
    for name, alt in ((AP_FILE, "average precision per class"), (PR_CURVES_FILE, "precision-recall curves")):
        image = _png_file_or_plot(run_file(run_dir, name), lambda path: False)
        parts.append(img(image, alt, "plot") if image else missing(name))
    return "average-precision", "Average precision and precision-recall per class", "\n".join(parts)


def _per_class_section(report: dict) -> str:
    per_class = find_key(report, "per_class")
    if not isinstance(per_class, dict) or not per_class:
        return missing("per-class metrics in report.json")
    columns = ("precision", "recall", "f1", "support")
    rows = []
    for name, values in per_class.items():
        values = values if isinstance(values, dict) else {}
        cells = "".join(f'<td class="num">{escape(format_value(values.get(column)))}</td>' for column in columns)
        rows.append(f"<tr><td>{escape(name)}</td>{cells}</tr>")
    header = "".join(f"<th>{column}</th>" for column in ("class", *columns))
    return scrolling(f"<table><tr>{header}</tr>\n" + "\n".join(rows) + "\n</table>")


def _audit_section(audit: dict) -> str:
    """The counts of ``visiontune audit``'s findings (its audit.json), as a small table."""
    counts = audit.get("counts") if isinstance(audit.get("counts"), dict) else audit
    numbers = {key: value for key, value in counts.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if not numbers:
        return missing("counts in audit.json")
    return key_value_table(numbers) + "<p>Details: <code>audit.html</code> and <code>audit.csv</code> beside it.</p>"


# -- reference, folded -----------------------------------------------------------------------------


def _summary_section(report: dict) -> str:
    # None marks what the run did not use (no --budget, no --ema): nothing to show
    scalars = {key: value for key, value in report.items() if is_scalar(value) and value is not None}
    if not scalars:
        return missing("report.json")
    return key_value_table(scalars)


def _load_report_section(report: dict) -> str:
    """What loading a weights file did (``weights_load_report`` in report.json; None when the
    architecture's built-in weights, or none, were used)."""
    load_report = next((value for key in LOAD_REPORT_KEYS if (value := find_key(report, key)) is not None), None)
    if load_report is None:
        weights = report.get("weights")
        detail = f"weights {weights!r}: " if is_scalar(weights) and weights is not None else ""
        return missing(f"{detail}no weights file was loaded, so there is no load report "
                       "(built-in pretrained weights load whole; 'none' means random initialisation)")
    if isinstance(load_report, str):
        return pre(load_report)
    if not isinstance(load_report, dict):
        return render_value(load_report)
    counts = [f"{escape(key)}: {len(value)}" for key, value in load_report.items() if isinstance(value, (list, dict))]
    # what loaded is the long, unsurprising part: its count says enough; the rest is the news
    details = {key: value for key, value in load_report.items() if key not in COUNT_ONLY_KEYS}
    return (f"<p>{' &middot; '.join(counts)}</p>" if counts else "") + render_value(details)


# -- images and tables -----------------------------------------------------------------------------


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
    rows = read_csv(run_file(run_dir, "metrics.csv"))
    if not rows:
        return False
    plot_curves(rows, path)
    return True


def _metrics_table(run_dir: Path) -> str | None:
    rows = read_csv(run_file(run_dir, "metrics.csv"))
    if not rows:
        return None
    columns = [column for column in rows[0] if any(row.get(column) for row in rows)]
    header = "".join(f"<th>{escape(column)}</th>" for column in columns)
    body = "\n".join("<tr>" + "".join(f'<td class="num">{escape(format_cell(row.get(column)))}</td>'
                                      for column in columns) + "</tr>" for row in rows)
    return scrolling(f"<table><tr>{header}</tr>\n{body}\n</table>")
