"""The files an audit writes: audit.csv, audit.json, clean.csv and a self-contained audit.html.

Every file goes through :mod:`visiontune.atomic_io` (a reader never sees half of one; a planted
link at the name is replaced, never written through). The user's images and manifest are only
read: ``clean.csv`` is a new manifest (absolute paths) that ``visiontune train --data clean.csv``
accepts, listing the images the audit did not flag (one copy of each duplicate group kept).
The HTML page opens with the leaks (duplicates across train and val), then the likely label
errors, duplicates and outliers as image grids (thumbnails inlined as base64 PNG), the class
counts, and a table of every flagged image that sorts by any column on a click.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from visiontune.atomic_io import same_file, write_text_atomically
from visiontune.data.images import load_image
from visiontune.errors import ConfigError

log = logging.getLogger(__name__)

AUDIT_HTML, AUDIT_CSV, AUDIT_JSON, CLEAN_CSV = "audit.html", "audit.csv", "audit.json", "clean.csv"
ISSUE_KINDS = ("leak", "label", "duplicate", "outlier")  # the audit.csv ``issues`` vocabulary, loudest first
THUMBNAIL_PX = 72  # longest side of a thumbnail in audit.html, pixels
MAX_SHOWN = 120  # images per grid in audit.html; audit.csv lists them all


@dataclass
class AuditRow:
    """One audited image."""

    path: Path
    split: str  # "train" or "val"
    given: str  # the class its folder or manifest gives
    suggested: str  # the class the out-of-fold probe finds most probable
    quality: float  # cleanlab's label-quality score, 0 (surely mislabelled) .. 1
    outlier_distance: float  # mean cosine distance to its nearest neighbours
    issues: list[str] = field(default_factory=list)  # kinds from ISSUE_KINDS
    duplicate_group: int | None = None  # index into AuditResult.duplicates
    keep: bool = True  # listed in clean.csv


@dataclass
class AuditResult:
    """What an audit found, and where it was written."""

    rows: list[AuditRow]
    classes: list[str]
    duplicates: list[dict]  # {"members": [row indices], "exact": bool, "leak": bool}
    imbalanced: list[str]  # classes with under a tenth of an even share of the images
    counts: dict  # images flagged per issue kind, and totals
    settings: dict
    out: Path | None = None
    feature_cache_hit: bool = False
    seconds: float = 0.0  # wall time of the whole audit

    @property
    def leaks(self) -> list[dict]:
        return [group for group in self.duplicates if group["leak"]]

    def flagged(self, kind: str) -> list[AuditRow]:
        return [row for row in self.rows if kind in row.issues]


def refuse_overwriting_inputs(out: Path, data: Path) -> None:
    """The audit never writes over the user's data: ``--out`` must not be (or hold at an output's
    name) the manifest it reads."""
    for name in (AUDIT_HTML, AUDIT_CSV, AUDIT_JSON, CLEAN_CSV):
        if data.is_file() and (out / name).exists() and same_file(out / name, data):
            raise ConfigError(f"--out {out} would overwrite the manifest {data} (as {name}); choose another --out")


def write_audit(result: AuditResult, out: str | Path) -> Path:
    """Write the four files into ``out`` (created if needed); returns ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give the audit a folder")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / AUDIT_CSV, _audit_csv(result))
    write_text_atomically(out / CLEAN_CSV, _clean_csv(result))
    write_text_atomically(out / AUDIT_JSON, json.dumps(audit_summary(result), indent=2) + "\n")
    write_text_atomically(out / AUDIT_HTML, audit_html(result))
    result.out = out
    return out


def audit_summary(result: AuditResult) -> dict:
    return {"counts": result.counts, "classes": result.classes, "imbalanced_classes": result.imbalanced,
            "leaks": [[str(result.rows[i].path) for i in group["members"]] for group in result.leaks],
            "duplicate_groups": len(result.duplicates), "feature_cache_hit": result.feature_cache_hit,
            "seconds": round(result.seconds, 3), "settings": result.settings}


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _audit_csv(result: AuditResult) -> str:
    header = ["path", "split", "given_label", "suggested_label", "label_quality", "issues", "outlier_distance",
              "duplicate_group", "in_clean_csv"]
    return _csv_text(header, [[str(row.path), row.split, row.given, row.suggested, f"{row.quality:.6f}",
                               " ".join(row.issues), f"{row.outlier_distance:.6f}",
                               "" if row.duplicate_group is None else row.duplicate_group, int(row.keep)]
                              for row in result.rows])


def _clean_csv(result: AuditResult) -> str:
    """``path,label`` of the kept images, plus ``split`` when the data fixed its own validation set
    (train/val folders, a manifest with a split column), so training keeps that set."""
    with_split = bool(result.settings.get("fixed_split"))
    header = ["path", "label"] + (["split"] if with_split else [])
    return _csv_text(header, [[str(row.path), row.given] + ([row.split] if with_split else [])
                              for row in result.rows if row.keep])


# -- audit.html -----------------------------------------------------------------------------------

_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:80rem;color:#222}
h1{margin-bottom:.2rem}.leak{border:3px solid #c00;padding:.5rem 1rem;background:#fff0f0}
.leak h2{color:#c00}.grid{display:flex;flex-wrap:wrap;gap:.6rem}
figure{margin:0;width:8.5rem;font-size:.75rem;overflow-wrap:anywhere}figure img{display:block}
.group{border:1px solid #ccc;padding:.3rem;display:flex;flex-wrap:wrap;gap:.4rem}
section{overflow-x:auto}table{border-collapse:collapse;font-size:.85rem}
th,td{border:1px solid #ddd;padding:.2rem .5rem;overflow-wrap:anywhere}
th{cursor:pointer;background:#f4f4f4}td.num{text-align:right}"""

_SORT_SCRIPT = """document.querySelectorAll('table.sortable th').forEach(function(th,col){
th.addEventListener('click',function(){var t=th.closest('table'),b=t.tBodies[0],
rows=Array.from(b.rows),up=th.dataset.dir!=='up';th.dataset.dir=up?'up':'down';
rows.sort(function(x,y){var a=x.cells[col].dataset.v||x.cells[col].textContent,
c=y.cells[col].dataset.v||y.cells[col].textContent,p=parseFloat(a),q=parseFloat(c);
var r=(!isNaN(p)&&!isNaN(q))?p-q:a.localeCompare(c);return up?r:-r;});
rows.forEach(function(r){b.appendChild(r);});});});"""


def audit_html(result: AuditResult) -> str:
    counts = result.counts
    head = (f"<h1>visiontune audit</h1><p>{counts['images']} images ({counts['train']} train, {counts['val']} val), "
            f"{len(result.classes)} classes; flagged: {len(result.leaks)} train/val leaks ({counts['leak']} images), {counts['label']} likely mislabelled, "
            f"{counts['duplicate']} duplicated, {counts['outlier']} outliers; clean.csv keeps {counts['kept']}.</p>")
    sections = [_leak_section(result), _label_section(result), _duplicate_section(result), _outlier_section(result),
                _class_section(result), _table_section(result), _settings_section(result)]
    body = head + "".join(section for section in sections if section)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            f"content=\"width=device-width,initial-scale=1\"><title>visiontune audit</title><style>{_STYLE}</style>"
            f"</head><body>{body}<script>{_SORT_SCRIPT}</script></body></html>\n")


def _leak_section(result: AuditResult) -> str:
    if not result.leaks:
        return "<section><h2>Leakage</h2><p>No image of the validation set has a copy in the training set.</p></section>"
    groups = "".join(_group(result, group) for group in result.leaks[:MAX_SHOWN])
    groups = f"<div class=\"grid\">{groups}</div>"
    return (f"<section class=\"leak\"><h2>Leakage: {len(result.leaks)} validation image(s) with a copy in training"
            f"</h2><p>Validation scores these images after training on their copies, so its accuracy is too high. "
            f"clean.csv drops the training copies.</p>{groups}</section>")


def _label_section(result: AuditResult) -> str:
    rows = sorted(result.flagged("label"), key=lambda row: row.quality)
    figures = "".join(_figure(row, f"given <b>{_e(row.given)}</b> &rarr; suggested <b>{_e(row.suggested)}</b>, "
                                   f"score {row.quality:.2f}") for row in rows[:MAX_SHOWN])
    more = f"<p>{len(rows) - MAX_SHOWN} more in audit.csv.</p>" if len(rows) > MAX_SHOWN else ""
    return (f"<section><h2>Likely label errors ({len(rows)})</h2><p>Lowest label-quality score first (cleanlab, on "
            f"out-of-fold probabilities).</p><div class=\"grid\">{figures}</div>{more}</section>")


def _duplicate_section(result: AuditResult) -> str:
    groups = [group for group in result.duplicates if not group["leak"]]
    shown = "".join(_group(result, group) for group in groups[:MAX_SHOWN])
    return (f"<section><h2>Duplicates within a split ({len(groups)} groups)</h2><div class=\"grid\">{shown}</div>"
            "</section>")


def _outlier_section(result: AuditResult) -> str:
    rows = sorted(result.flagged("outlier"), key=lambda row: -row.outlier_distance)
    figures = "".join(_figure(row, f"{_e(row.given)}, distance {row.outlier_distance:.3f}") for row in rows[:MAX_SHOWN])
    return (f"<section><h2>Outliers ({len(rows)})</h2><p>Far from every other image in feature space.</p>"
            f"<div class=\"grid\">{figures}</div></section>")


def _class_section(result: AuditResult) -> str:
    counts = {name: [0, 0] for name in result.classes}
    for row in result.rows:
        counts[row.given][row.split == "val"] += 1
    body = "".join(f"<tr><td>{_e(name)}</td><td class=\"num\">{train}</td><td class=\"num\">{val}</td>"
                   f"<td>{'imbalanced' if name in result.imbalanced else ''}</td></tr>"
                   for name, (train, val) in counts.items())
    return (f"<section><h2>Classes</h2><table class=\"sortable\"><thead><tr><th>class</th><th>train</th><th>val</th>"
            f"<th>note</th></tr></thead><tbody>{body}</tbody></table></section>")


def _table_section(result: AuditResult) -> str:
    rows = [row for row in result.rows if row.issues]
    body = "".join(f"<tr><td>{_e(row.path)}</td><td>{row.split}</td><td>{_e(row.given)}</td><td>{_e(row.suggested)}"
                   f"</td><td class=\"num\">{row.quality:.3f}</td><td>{' '.join(row.issues)}</td>"
                   f"<td class=\"num\">{row.outlier_distance:.3f}</td></tr>" for row in rows)
    return (f"<section><h2>Every flagged image ({len(rows)})</h2><p>Click a column to sort.</p>"
            f"<table class=\"sortable\"><thead><tr><th>path</th><th>split</th><th>given</th><th>suggested</th>"
            f"<th>label quality</th><th>issues</th><th>outlier distance</th></tr></thead><tbody>{body}</tbody>"
            f"</table></section>")


def _settings_section(result: AuditResult) -> str:
    return (f"<details><summary>Settings</summary><pre>{_e(json.dumps(result.settings, indent=2))}</pre></details>")


def _group(result: AuditResult, group: dict) -> str:
    kind = "exact copies" if group["exact"] else "near copies"
    figures = "".join(_figure(result.rows[i], f"{result.rows[i].split}, {_e(result.rows[i].given)}")
                      for i in group["members"])
    return f"<div class=\"group\" title=\"{kind}\">{figures}</div>"


def _figure(row: AuditRow, caption: str) -> str:
    png = _thumbnail(row.path)
    image = (f"<img alt=\"{_e(row.path.name)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\">"
             if png else "<p>(unreadable)</p>")
    return f"<figure>{image}<figcaption>{_e(row.path.name)}<br>{caption}</figcaption></figure>"


def _thumbnail(path: Path) -> bytes | None:
    try:
        image = load_image(path)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    except Exception as error:  # noqa: BLE001 - an image that vanished or broke since gets a caption, not a crash
        log.warning("cannot make a thumbnail of %s: %s", path, error)
        return None


def _e(value) -> str:
    return html.escape(str(value))
