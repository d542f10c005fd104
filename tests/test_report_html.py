"""RUN/report.html: read top-down (headline first, reference folded last), every image inlined and
decodable, text escaped, offline, readable at phone width; Grad-CAM overlays in the gallery."""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import sys

import pytest
from conftest import make_image, make_image_folder
from PIL import Image

from visiontune.cli import main
from visiontune.errors import VisiontuneError
from visiontune.run.report_html import write_report

# page order; "audit" only when the run folder holds an audit.json
SECTIONS = ("headline", "curves", "confusion", "per-class", "most-wrong", "summary", "configuration", "load-report")
FOLDED = ("summary", "configuration", "load-report")
CLASSES = ["cat", "dog", "<b>bird</b>"]  # a name that must be escaped


class _Page(HTMLParser):
    """The sections, images and external references of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: dict[str, str] = {}
        self.images: list[dict] = []
        self.external: list[str] = []
        self.tags: list[str] = []
        self.order: list[str] = []  # section ids in page order
        self.folded: set[str] = set()  # sections whose content sits inside <details>
        self.meta: list[dict] = []
        self.title = ""
        self.h1 = ""
        self._section: str | None = None
        self._text: list[str] = []
        self._in: str | None = None  # "title" or "h1" while inside one
        self._first_child = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if self._first_child and tag != "section":  # a folded section is one <details> holding it all
            if tag == "details":
                self.folded.add(self._section)
            self._first_child = False
        if tag == "section":
            self._section, self._text = attrs["id"], []
            self.order.append(attrs["id"])
            self._first_child = True
        if tag == "meta":
            self.meta.append(attrs)
        if tag in ("title", "h1"):
            self._in = tag
        if tag == "img":
            self.images.append({**attrs, "section": self._section})
        for name in ("src", "href"):
            if name in attrs and not attrs[name].startswith("data:"):
                self.external.append(attrs[name])

    def handle_endtag(self, tag):
        if tag in ("title", "h1"):
            self._in = None
        if tag == "section":
            self.sections[self._section] = "".join(self._text)
            self._section = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        if self._in == "h1":
            self.h1 += data
        if self._section:
            self._text.append(data)


def _png(path: Path, color=(200, 30, 30), size=(40, 30)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _fake_run(root: Path, *, wrong: int = 3) -> Path:
    """A run folder with the files visiontune train writes (format of visiontune.run.folder/artifacts)."""
    run = root / "run"
    run.mkdir(parents=True)
    data = root / "data"
    (run / "config.yaml").write_text(f"data: {data}\nmodel: resnet18\nweights: init.safetensors\nlr: 0.001\n")
    (run / "classes.json").write_text(json.dumps(CLASSES))
    per_class = {name: {"precision": 0.5, "recall": 0.75, "f1": 0.6, "support": 4} for name in CLASSES}
    report = {"model": "resnet18", "weights": "init.safetensors", "strategy": "gradual", "best_val_accuracy": 0.75,
              "best_epoch": 2, "epochs_completed": 2, "epochs_planned": 2, "timings": {"train_and_val_seconds": 83.0},
              "data": {"train_images": 12, "val_images": 6},
              "final": {"accuracy": 0.75, "macro_f1": 0.6, "per_class": per_class,
                        "confusion": [[3, 1, 0], [0, 4, 0], [1, 1, 2]]},
              "weights_load_report": {  # visiontune.checkpoint.LoadReport.to_dict()
                  "source": "init.safetensors", "match": "auto",
                  "loaded": {f"layer{i}.weight": f"layer{i}.weight" for i in range(100)},
                  "missing": [], "unexpected": ["aux.weight"],
                  "mismatched": {"fc.weight": {"model_shape": [3, 512], "checkpoint_shape": [1000, 512],
                                               "checkpoint_key": "fc.weight <old>"}}}}
    (run / "report.json").write_text(json.dumps(report))
    (run / "metrics.csv").write_text("epoch,phase,lr,train_loss,train_acc,val_loss,val_acc\n"
                                     "1,full,0.001,1.2,0.4,1.1,0.5\n2,full,0.0005,0.8,0.7,0.9,0.75\n")
    _png(run / "curves.png")
    _png(run / "confusion.png", (30, 30, 200))
    rows = []
    for index in range(6):  # the first `wrong` are misclassified, with increasing loss
        path = make_image(data / "val" / "cat" / f"img_{index}.png", (220, 30, 30), size=24, noise_seed=index)
        predicted = CLASSES[2] if index < wrong else "cat"
        rows.append({"path": str(path.relative_to(data)) if index % 2 else str(path), "label": "cat",
                     "predicted": predicted, "confidence": 0.9, "loss": float(index)})
    with open(run / "val_predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "predicted", "confidence", "loss"])
        writer.writeheader()
        writer.writerows(rows)
    return run


def _decoded_images(page: _Page) -> list[Image.Image]:
    images = []
    for image in page.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        decoded = Image.open(io.BytesIO(base64.b64decode(image["src"][len(prefix):], validate=True)))
        decoded.load()
        images.append(decoded)
    return images


def test_report_has_every_section_and_every_image_inlined(tmp_path):
    run = _fake_run(tmp_path, wrong=3)
    path = write_report(run)
    assert path == run / "report.html"
    text = path.read_text()
    page = _Page(text)

    assert set(SECTIONS) <= set(page.sections)
    assert not page.external and "script" not in page.tags and "link" not in page.tags  # opens offline
    images = _decoded_images(page)
    by_section = [image["section"] for image in page.images]
    assert by_section.count("curves") == 1 and by_section.count("confusion") == 1
    assert by_section.count("most-wrong") == 3  # one thumbnail per misclassified image, nothing else
    assert images[0].size == (40, 30) and images[1].getpixel((0, 0)) == (30, 30, 200)
    assert all(image.size == (24, 24) for image in images[2:])

    wrong = page.sections["most-wrong"]
    assert "3 of 6" in wrong and "img_2.png" in wrong and "img_4.png" not in wrong
    assert wrong.index("img_2.png") < wrong.index("img_0.png")  # highest loss first
    # the parsed text is the raw label ...
    assert "true: cat" in wrong and "predicted: <b>bird</b>" in wrong and "(90% sure)" in wrong
    assert "<b>bird</b>" not in text and "&lt;b&gt;bird&lt;/b&gt;" in text  # ... because it was escaped
    assert "model: resnet18" in page.sections["configuration"]
    load_report = page.sections["load-report"]
    assert "loaded: 100" in load_report and "unexpected: 1" in load_report and "mismatched: 1" in load_report
    assert "fc.weight <old>" in load_report and "1000" in load_report and "aux.weight" in load_report
    assert "layer7.weight" not in load_report  # what loaded is only counted
    per_class = page.sections["per-class"]
    assert all(name in per_class for name in CLASSES) and "0.75" in per_class and "precision" in per_class
    assert "best_val_accuracy" in page.sections["summary"]
    assert "not available" not in text


def test_missing_files_say_not_available_and_plots_are_redrawn_from_data(tmp_path):
    run = _fake_run(tmp_path)
    for name in ("curves.png", "confusion.png"):
        (run / name).unlink()
    page = _Page(write_report(run).read_text())
    # re-plotted from metrics.csv and report.json's confusion matrix
    assert [image["section"] for image in page.images][:2] == ["curves", "confusion"]
    assert len(_decoded_images(page)) == 5

    for name in ("report.json", "metrics.csv", "val_predictions.csv"):
        (run / name).unlink()
    page = _Page(write_report(run).read_text())
    assert set(SECTIONS) <= set(page.sections) and not page.images
    for section in ("headline", "summary", "load-report", "curves", "confusion", "per-class", "most-wrong"):
        assert "not available" in page.sections[section], section
    assert "not available" not in page.sections["configuration"]


def test_a_run_with_builtin_weights_and_no_mistakes(tmp_path):
    run = _fake_run(tmp_path, wrong=0)
    report = json.loads((run / "report.json").read_text())
    report["weights_load_report"], report["weights"] = None, "DEFAULT"
    (run / "report.json").write_text(json.dumps(report))
    page = _Page(write_report(run).read_text())
    assert "no weights file was loaded" in page.sections["load-report"]
    assert "All 6 validation images were classified correctly" in page.sections["most-wrong"]


def test_the_summary_leaves_out_what_the_run_did_not_use(tmp_path):
    run = _fake_run(tmp_path)
    report = json.loads((run / "report.json").read_text())
    report.update(budget=None, ema_decay=None, best_weights="model")  # trained without --budget and --ema
    (run / "report.json").write_text(json.dumps(report))
    summary = _Page(write_report(run).read_text()).sections["summary"]
    assert "best_weights" in summary and "budget" not in summary and "ema_decay" not in summary


def test_missing_thumbnail_files_are_named_not_fatal(tmp_path):
    run = _fake_run(tmp_path, wrong=2)
    for image in (tmp_path / "data").rglob("*.png"):
        image.unlink()
    page = _Page(write_report(run).read_text())
    assert "image not found" in page.sections["most-wrong"] and "img_1.png" in page.sections["most-wrong"]
    assert len(page.images) == 2  # only the two plots


def test_not_a_run_folder_is_a_user_error(tmp_path):
    with pytest.raises(VisiontuneError, match="not a visiontune run folder"):
        write_report(tmp_path)
    with pytest.raises(VisiontuneError, match="not a visiontune run folder"):
        write_report(tmp_path / "nowhere")


def test_cli_report(tmp_path, capsys):
    run = _fake_run(tmp_path)
    out = tmp_path / "elsewhere.html"
    assert main(["report", "--run", str(run), "--out", str(out), "--max-wrong", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    assert len(_Page(out.read_text()).images) == 3
    assert main(["report", "--run", str(tmp_path / "missing")]) == 2
    assert "not a visiontune run folder" in capsys.readouterr().err


# -- the real run format -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A 1-epoch resnet18 run through the CLI; shared with tests/test_export.py (same folder)."""
    root = tmp_path_factory.getbasetemp() / "tiny_trained_run"
    data, run_dir = root / "data", root / "run"
    if not (run_dir / "report.json").is_file():
        make_image_folder(data, per_class=4, val_per_class=2)
        assert main(["train", "--data", str(data), "--model", "resnet18", "--weights", "none", "--image-size", "32",
                     "--batch-size", "8", "--workers", "0", "--seed", "0", "--device", "cpu", "--quiet",
                     "--epochs", "1", "--lr", "0.001", "--out", str(run_dir)]) == 0
    return data, run_dir


@pytest.mark.slow
def test_report_of_a_real_run(tiny_run):
    _, run_dir = tiny_run
    with open(run_dir / "val_predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    wrong = sum(row["label"] != row["predicted"] for row in predictions)

    page = _Page(write_report(run_dir, out=run_dir / "report_test.html").read_text())

    assert set(SECTIONS) <= set(page.sections)
    sections = [image["section"] for image in page.images]
    assert sections.count("curves") == 1 and sections.count("confusion") == 1
    # each misclassified image: its thumbnail, and Grad-CAM for the predicted and for the true class
    assert sections.count("most-wrong") == 3 * min(wrong, 24)
    decoded = _decoded_images(page)
    assert len(decoded) == len(page.images) and not page.external
    overlays = [image for image, info in zip(decoded, page.images) if info.get("class") == "cam"]
    assert len(overlays) == 2 * min(wrong, 24) and all(image.size == (32, 32) for image in overlays)  # the crop
    assert "overlays left out" not in page.sections["most-wrong"]
    assert all(name in page.sections["per-class"] for name in ("blue", "green", "red"))
    assert "resnet18" in page.sections["configuration"] and "best_val_accuracy" in page.sections["summary"]
    assert "no weights file was loaded" in page.sections["load-report"]  # --weights none


def test_a_swapped_report_json_leaves_its_sections_out(tmp_path):
    run = _fake_run(tmp_path)
    (run / "report.json").write_text(json.dumps(["not", "a", "report"]))  # a list where a dict belongs
    page = _Page(write_report(run).read_text())
    assert "report.json" in page.sections["summary"]  # named as not available, not a crash


def test_the_page_reads_top_down(tmp_path):
    """Title once, the headline and curves first, reference material last and folded."""
    run = _fake_run(tmp_path)
    text = write_report(run).read_text()
    page = _Page(text)
    assert page.order == list(SECTIONS) and page.folded == set(FOLDED)
    assert page.title.count("run") == 1 and "resnet18" in page.title  # the folder's name once, not "run run"
    assert page.h1 == "run"
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in page.meta
    headline = page.sections["headline"]
    assert "75.0%" in headline and "0.600" in headline and "1 min 23 s" in headline
    assert "Fine-tuned resnet18 from weights init.safetensors with the gradual strategy for 2 epochs" in headline
    assert "Phases: full for 2 epochs." in headline  # from metrics.csv
    assert "word-break:break-all" not in text  # captions wrap between words ...
    assert '<span class="nowrap">(90% sure)</span>' in text  # ... and never inside "90% sure"
    assert ".scroll{overflow-x:auto" in text and "img{max-width:100%" in text  # phone width


def test_an_audit_json_adds_its_counts_after_the_gallery(tmp_path):
    run = _fake_run(tmp_path)
    (run / "audit.json").write_text(json.dumps({"counts": {"label": 3, "duplicate": 2, "leak": 1, "outlier": 0},
                                                "images": 40}))
    page = _Page(write_report(run).read_text())
    assert page.order.index("audit") == page.order.index("most-wrong") + 1
    audit = page.sections["audit"]
    assert "label3" in audit and "leak1" in audit and "outlier0" in audit and "audit.html" in audit
    (run / "audit.json").write_text("[1, 2]")  # damaged: its section is left out, no crash
    assert "audit" not in _Page(write_report(run).read_text()).order


def test_without_grad_cam_the_gallery_says_why_it_has_no_overlays(tmp_path, monkeypatch):
    run = _fake_run(tmp_path, wrong=2)
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # import now fails, as when not installed
    page = _Page(write_report(run).read_text())
    wrong = page.sections["most-wrong"]
    assert "Grad-CAM overlays left out" in wrong and "pip install 'visiontune[explain]'" in wrong
    assert [image["section"] for image in page.images].count("most-wrong") == 2  # the thumbnails stay
