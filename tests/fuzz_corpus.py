"""The hostile inputs that tests/test_fuzz_cli.py draws from: flag values, config files, damaged run
folders, bad checkpoints and bad data paths.

Each builder writes its thing into a case folder and returns the path (or a command-line string).
Builders are plain named functions, so a failing hypothesis example reads as a list of names that
reproduce it by hand. Anything a builder points outside the run folder points into the case's
``victims/`` folder, which the harness watches: a planted symlink that gets written through or a
pickle whose code runs both show up there as a changed or new file.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# -- flag values --------------------------------------------------------------------------------

# Real argv can hold any text except NUL (exec refuses it); undecodable bytes arrive as lone
# surrogates (surrogateescape), so "\udcff" is what a Latin-1 file name looks like to Python.
GARBAGE_TEXT = ["", " ", "abc", "1,5", "½", "٣", "日本語", "\u202eevil", "😀", "\udcff", "-", "--", "none",
                "null", "~", "$HOME", "../..", "a" * 5000]
# Boundary and malformed numbers that argparse's int()/float() or our own validation must refuse
# (or accept, where they are in range).
GARBAGE_NUMBERS = ["-1", "0", "-0", "nan", "NaN", "inf", "-inf", "1e309", "-1e309", "99999999999999999999999",
                   "-99999999999999999999999", "0x10", "1_0", "1e-320", "2.5", " 3", "3 ", "+1", "1/2"]
HOSTILE_VALUES = GARBAGE_TEXT + GARBAGE_NUMBERS

# Names (relative to the case folder) that --out/--data/PATH values may point at: see make_paths().
PATH_CHOICES = ["good_data", "good_data_val", "missing", "a_file", "empty_dir", "unicode_dir", "dev_null",
                "proc", "victim_link", "dangling_link", "loop_link", "bad_images", "csv_garbage", "csv_dupes",
                "one_class", "good_run"]


def make_paths(case: Path, data: Path, run: Path) -> dict[str, str]:
    """Every hostile path kind, created inside ``case`` (``data`` is copied in; ``run`` is the case's
    good run folder, which may not exist)."""
    from conftest import make_image

    victims = case / "victims"
    shutil.copytree(data, case / "data")  # a case's own copy: --out may name it, and must not spoil the next case
    paths = {
        "good_data": str(case / "data"),
        "good_data_val": str(case / "data" / "val"),
        "missing": str(case / "no" / "such" / "place"),
        "a_file": str(victims / "a_file.txt"),
        "empty_dir": str(case / "empty"),
        "unicode_dir": str(case / "dåta 日本 \u202e"),
        "dev_null": "/dev/null",
        "proc": "/proc/visiontune-fuzz/out",
        "victim_link": str(case / "victim_link"),
        "dangling_link": str(case / "dangling_link"),
        "loop_link": str(case / "loop_link"),
        "bad_images": str(case / "bad_images"),
        "csv_garbage": str(case / "garbage.csv"),
        "csv_dupes": str(case / "dupes.csv"),
        "one_class": str(case / "one_class"),
        "good_run": str(run),
    }
    (case / "empty").mkdir()
    Path(paths["unicode_dir"]).mkdir()
    os.symlink(victims / "a_file.txt", paths["victim_link"])
    os.symlink(case / "nowhere", paths["dangling_link"])
    os.symlink(paths["loop_link"], paths["loop_link"])
    for name in ("red", "green"):  # every file of every class unreadable
        folder = case / "bad_images" / name
        folder.mkdir(parents=True)
        (folder / "truncated.png").write_bytes((data / "val" / name / f"{name}_0.png").read_bytes()[:40])
        (folder / "empty.png").write_bytes(b"")
        (folder / "text.jpg").write_text("not an image")
    Path(paths["csv_garbage"]).write_bytes(b"path,label\n\xff\xfe,\x00\n,,,\n\"unterminated\n")
    image = next((case / "data" / "val" / "red").iterdir())
    Path(paths["csv_dupes"]).write_text(f"path,label\n{image},red\n{image},green\n{image},red\n")
    make_image(case / "one_class" / "red" / "r.png", (220, 30, 30))
    return paths


# -- config files (train/lr-find --config, run/config.yaml, convert --match rules) ----------------

def _alias_bomb(levels: int) -> bytes:
    """Under ``data:``, each level a list of ten references to the previous one: 10**levels strings
    from a few hundred bytes (issue 11 item 2 used seven levels; five keep a failing case cheap)."""
    lines = ["data:", '- &a0 "xxxxxxxxxx"']
    for level in range(1, levels + 1):
        lines.append(f"- &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]")
    return ("\n".join(lines) + "\n").encode()


CONFIG_FILES: dict[str, bytes] = {
    "empty": b"",
    "only_document_marker": b"---\n",
    "a_list": b"- epochs\n- 2\n",
    "a_number": b"42\n",
    "wrong_type_int": b"epochs: ten\n",
    "wrong_type_list": b"epochs: [1, 2]\n",
    "wrong_type_dict": b"batch_size: {a: 1}\n",
    "float_for_int": b"batch_size: 1.5\n",
    "bool_for_int": b"epochs: true\n",
    "nan_lr": b"lr: .nan\n",
    "inf_lr": b"lr: .inf\n",
    "huge_seed": b"seed: 99999999999999999999999\n",
    "null_bytes_in_path": b'data: "a\\0b"\n',
    "unknown_key": b"learning_rate: 0.1\n",
    "key_not_a_string": b"1: 2\n? [a, b]\n: c\n",
    "duplicate_keys": b"epochs: 1\nepochs: 2\n",
    "merge_alias": b"base: &b {epochs: 1}\n<<: *b\n",
    "alias_bomb": _alias_bomb(5),
    "python_tag": b"epochs: !!python/object/apply:os.system ['echo pwned']\n",
    "latin1": "model: café\n".encode("latin-1"),
    "utf16": "epochs: 1\n".encode("utf-16"),
    "binary": bytes(range(256)),
    "tabs": b"epochs:\t1\n\tbatch_size: 2\n",
    "unterminated": b'model: "timm:test\n',
    "deep_nesting": b"[" * 5000 + b"]" * 5000,
}

# --match FILE: a {model_key: checkpoint_key} mapping or [pattern, replacement] rules.
RULES_FILES: dict[str, bytes] = {
    **{name: CONFIG_FILES[name] for name in ("empty", "a_number", "alias_bomb", "python_tag", "latin1", "binary",
                                               "deep_nesting")},
    "bad_group_reference": b'- ["^(.*)$", "\\\\9"]\n',
    "bad_regex": b'- ["([", "x"]\n',
    "rule_wrong_arity": b'- ["a"]\n- ["a", "b", "c"]\n',
    "rule_not_strings": b"- [1, 2]\n",
    "mapping_to_missing": b"fc.weight: no.such.key\n",
    "mapping_values_lists": b"fc.weight: [1, 2]\n",
}


# -- checkpoints ----------------------------------------------------------------------------------

class _RunsCode:
    """A pickle that runs code on load: os.mkdir of a marker in victims/ (watched by the harness)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _best(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "best.safetensors"))


def _safetensors_with_header(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _write_checkpoint(kind: str, path: Path, run: Path, victims: Path) -> None:
    """Write the checkpoint ``kind`` (one of CHECKPOINT_KINDS) at ``path``; ``run`` is a good run folder."""
    best, last = run / "best.safetensors", run / "last.ckpt"
    if kind == "good_safetensors":
        shutil.copyfile(best, path)
    elif kind == "good_ckpt":
        shutil.copyfile(last, path)
    elif kind == "truncated_safetensors":
        path.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    elif kind == "truncated_ckpt":
        path.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "html":
        path.write_text("<!DOCTYPE html><html><body>404</body></html>")
    elif kind == "lfs_pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    elif kind in ("nan_safetensors", "inf_safetensors"):
        tensors = _best(run)
        name = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[name] = torch.full_like(tensors[name], float("nan") if kind == "nan_safetensors" else float("inf"))
        save_file(tensors, str(path))
    elif kind == "int_dtype":
        save_file({k: v.to(torch.int64) for k, v in _best(run).items()}, str(path))
    elif kind == "float16":
        save_file({k: v.half() if v.is_floating_point() else v for k, v in _best(run).items()}, str(path))
    elif kind == "bool_dtype":
        save_file({k: v.bool() for k, v in _best(run).items()}, str(path))
    elif kind == "wrong_shapes":
        save_file({k: torch.zeros(3, 1, 2) for k in _best(run)}, str(path))
    elif kind == "scalars":
        save_file({k: torch.tensor(1.0) for k in _best(run)}, str(path))
    elif kind == "other_model":
        torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).state_dict(), path)
    elif kind == "empty_state_dict":
        save_file({}, str(path))
    elif kind == "non_tensor_values":
        torch.save({"state_dict": {"fc.weight": "a string", "fc.bias": [1, 2]}, "epoch": "x"}, path)
    elif kind == "nested_wrappers":
        torch.save({"model": {"module": {"state_dict": {"module." + k: v for k, v in _best(run).items()}}}}, path)
    elif kind == "pickle_runs_code":
        torch.save({"state_dict": _RunsCode(victims / "pwned")}, path)
    elif kind == "plain_pickle_runs_code":
        path.write_bytes(pickle.dumps({"state_dict": _RunsCode(victims / "pwned_plain")}))
    elif kind == "ckpt_without_rng":
        state = torch.load(last, weights_only=True)
        state.pop("rng", None)
        torch.save(state, path)
    elif kind == "ckpt_nan":
        state = torch.load(last, weights_only=True)
        for tensor in state["model"].values():
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
        torch.save(state, path)
    elif kind == "ckpt_model_not_a_dict":
        state = torch.load(last, weights_only=True)
        state["model"] = [1, 2, 3]
        torch.save(state, path)
    elif kind == "header_length_huge":
        path.write_bytes(_safetensors_with_header(b"{}", length=2**63))
    elif kind == "header_not_json":
        path.write_bytes(_safetensors_with_header(b"{not json" + b" " * 7))
    elif kind == "header_offsets_past_end":
        path.write_bytes(_safetensors_with_header(
            {"fc.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 10**12]}}, b"\0" * 16))
    elif kind == "header_shape_huge":
        path.write_bytes(_safetensors_with_header(
            {"fc.weight": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 16]}}, b"\0" * 16))
    elif kind == "a_directory":
        path.mkdir()
    elif kind == "missing":
        pass
    elif kind == "symlink_to_victim":
        os.symlink(victims / "a_file.txt", path)
    elif kind == "symlink_loop":
        os.symlink(path, path)
    else:
        raise AssertionError(kind)


CHECKPOINT_KINDS = ["good_safetensors", "good_ckpt", "truncated_safetensors", "truncated_ckpt", "empty", "text",
                    "html", "lfs_pointer", "nan_safetensors", "inf_safetensors", "int_dtype", "float16", "bool_dtype",
                    "wrong_shapes", "scalars", "other_model", "empty_state_dict", "non_tensor_values",
                    "nested_wrappers", "pickle_runs_code", "plain_pickle_runs_code", "ckpt_without_rng", "ckpt_nan",
                    "ckpt_model_not_a_dict", "header_length_huge", "header_not_json", "header_offsets_past_end",
                    "header_shape_huge", "a_directory", "missing", "symlink_to_victim", "symlink_loop"]
# Kinds that hold code: --allow-unsafe with them runs it by design, so the harness never pairs them.
CODE_KINDS = ("pickle_runs_code", "plain_pickle_runs_code")


def write_checkpoint(kind: str, path: Path, run: Path, victims: Path) -> Path:
    """Write a checkpoint of ``kind``; the suffix of ``path`` is kept (a lie for some kinds, on purpose)."""
    _write_checkpoint(kind, path, run, victims)
    return path


# -- run-folder damage ----------------------------------------------------------------------------

RUN_FILE_NAMES = ["config.yaml", "classes.json", "preprocessing.json", "metrics.csv", "best.safetensors",
                  "last.ckpt", "report.json", "val_predictions.csv", "curves.png", "confusion.png", "report.html",
                  "tensorboard"]
# Damage that fits any file.
GENERIC_DAMAGE = ["missing", "empty", "truncated", "garbage_bytes", "non_utf8", "symlink_to_victim",
                  "symlink_to_victim_dir", "dangling_symlink", "symlink_loop", "a_directory", "swapped"]
def _preprocessing(**changes) -> bytes:
    """The preprocessing.json of a 32-px run with ``changes`` (json writes NaN as the bare word NaN)."""
    values = {"crop_size": 32, "resize_size": 34, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    return json.dumps({**values, **changes}).encode()


# Damage that only makes sense for one file: (file, damage) -> content.
SPECIFIC_DAMAGE: dict[tuple[str, str], bytes] = {
    ("classes.json", "a_dict"): b'{"red": 0, "green": 1}',
    ("classes.json", "ints"): b"[1, 2]",
    ("classes.json", "duplicates"): b'["red", "red"]',
    ("classes.json", "too_many"): b'["red", "green", "blue", "cyan"]',
    ("classes.json", "one_class"): b'["red"]',
    ("classes.json", "empty_list"): b"[]",
    ("classes.json", "newline_names"): b'["re\\nd", "gr/../een"]',
    ("classes.json", "nan"): b"NaN",
    ("preprocessing.json", "size_zero"): _preprocessing(crop_size=0, resize_size=0),
    ("preprocessing.json", "size_negative"): _preprocessing(crop_size=-32),
    ("preprocessing.json", "size_huge"): _preprocessing(crop_size=100000000, resize_size=100000000),
    ("preprocessing.json", "std_zero"): _preprocessing(std=[0, 0, 0]),
    ("preprocessing.json", "nan_mean"): _preprocessing(mean=[float("nan"), 0, 0]),
    ("preprocessing.json", "two_channels"): _preprocessing(mean=[0.5, 0.5], std=[0.5, 0.5]),
    ("preprocessing.json", "unknown_interpolation"): _preprocessing(interpolation="lanczos9"),
    ("preprocessing.json", "strings"): _preprocessing(crop_size="big", mean="red", std=None),
    ("preprocessing.json", "a_list"): b"[1, 2, 3]",
    ("metrics.csv", "wrong_columns"): b"a,b\n1,2\n",
    ("metrics.csv", "non_numbers"): b"epoch,phase,lr,train_loss,train_acc,val_loss,val_acc\nx,y,z,nan,inf,-,\n",
    ("report.json", "a_list"): b"[]",
    ("report.json", "wrong_types"): b'{"best_epoch": "x", "history": 5, "classes": {"a": 1}, "bad_files": 3}',
    ("val_predictions.csv", "wrong_columns"): b"x\n1\n",
    ("val_predictions.csv", "paths_outside"): b"path,label,predicted,confidence\n/etc/passwd,red,red,0.9\n",
    ("config.yaml", "alias_bomb"): CONFIG_FILES["alias_bomb"],
    ("config.yaml", "wrong_type"): CONFIG_FILES["wrong_type_int"],
    ("config.yaml", "unknown_model"): b"model: timm:no_such_model\nweights: none\n",
    ("config.yaml", "python_tag"): CONFIG_FILES["python_tag"],
    ("config.yaml", "latin1"): CONFIG_FILES["latin1"],
}
RUN_DAMAGE = [(name, damage) for name in RUN_FILE_NAMES for damage in GENERIC_DAMAGE] + list(SPECIFIC_DAMAGE) + [
    ("best.safetensors", kind) for kind in ("nan_safetensors", "int_dtype", "wrong_shapes", "other_model", "float16",
                                            "header_offsets_past_end", "pickle_runs_code")] + [
    ("last.ckpt", kind) for kind in ("ckpt_without_rng", "ckpt_nan", "ckpt_model_not_a_dict", "pickle_runs_code",
                                     "good_safetensors")]


def damage_run(run: Path, name: str, damage: str, victims: Path) -> None:
    """Damage file ``name`` of the run folder ``run`` in the way ``damage`` says."""
    target = run / name
    if (name, damage) in SPECIFIC_DAMAGE:
        _remove(target)
        target.write_bytes(SPECIFIC_DAMAGE[(name, damage)])
        return
    if damage in CHECKPOINT_KINDS:
        good = run.parent / f".good_{name}"  # the checkpoint builders read the good files of the run
        shutil.copytree(run, good)
        _remove(target)
        write_checkpoint(damage, target, good, victims)
        shutil.rmtree(good)
        return
    if damage == "missing":
        _remove(target)
    elif damage in ("empty", "truncated", "garbage_bytes", "non_utf8"):
        content = target.read_bytes() if target.is_file() else b""
        _remove(target)
        target.write_bytes({"empty": b"", "truncated": content[: len(content) // 2],
                            "garbage_bytes": bytes(range(256)) * 4, "non_utf8": b"\xff\xfe\xfa" + content[3:]}[damage])
    elif damage == "symlink_to_victim":
        _remove(target)
        os.symlink(victims / "a_file.txt", target)
    elif damage == "symlink_to_victim_dir":
        _remove(target)
        os.symlink(victims, target)
    elif damage == "dangling_symlink":
        _remove(target)
        os.symlink(run / "nowhere", target)
    elif damage == "symlink_loop":
        _remove(target)
        os.symlink(target, target)
    elif damage == "a_directory":
        _remove(target)
        target.mkdir()
        (target / "inside").write_text("x")
    elif damage == "swapped":
        other = run / ("classes.json" if name != "classes.json" else "config.yaml")
        if not target.exists():
            target.mkdir()
        swap = run / ".swap"
        os.replace(target, swap)
        os.replace(other, target)
        os.replace(swap, other)
    else:
        raise AssertionError(damage)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# -- a few sub-command specific value lists -------------------------------------------------------

MODEL_NAMES = ["timm:test_resnet", "timm:", "timm:no_such_model", "no_such_model", "", "timm:test_resnet ",
               "TIMM:TEST_RESNET", "timm:../../etc/passwd", "hf-hub:someone/model", "日本", "a" * 5000,
               "timm:test_resnet.bad_tag", "resnet18.tv_in1k", "timm:*"]
MODELS_PATTERNS = ["", "*", "?", "[", "[!", "res*", "timm:*", "timm:test_*", "\\", "a" * 5000, "日本", "\udcff",
                   "**/*", "-x", "zzz"]
