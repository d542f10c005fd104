"""A fuzzing harness over every sub-command: hostile flags, config files, damaged run folders, bad
checkpoints and bad data, and only three outcomes allowed.

Every case runs ``visiontune.cli.main([...])`` in this process (cheap: torch is imported once) and
must end in one of:
  * exit status 0, with no traceback on stderr;
  * exit status 2 with exactly ONE line on stderr (library warnings included, as a user sees them),
    no traceback, and that line bounded in length (a message must cut a huge value, not print it);
  * exit status 130 (interrupted), with at most one line on stderr;
  * exit status 1 only where it is documented: ``models`` matching nothing, ``convert --strict``.
and, whatever the outcome:
  * nothing changed outside the places the command may write (its --out, the working directory, the
    feature cache, and the run folder for the commands that write into it): HOME, TMPDIR,
    MPLCONFIGDIR, the data, the template run and a ``victims/`` folder that planted symlinks and
    pickles point at are all hashed before and after;
  * a good ``last.ckpt`` / ``best.safetensors`` that was in the run folder is still there: the same
    bytes for commands that only read it, still loadable and finite for ``train --resume``.

Inputs are drawn by hypothesis from tests/fuzz_corpus.py with ``derandomize=True`` (the same cases
on every machine and every run) and no example database. Failing cases do not stop the others:
each test collects every failure and reports them all at the end, each with the command line and the
damage that reproduces it. Sweeps besides run every run-folder damage, checkpoint kind, config file
and rules file of the corpus at least once. ``pytest --fuzz-long`` runs ten times as many examples
and every run damage through every command that reads a run.

Each case runs under an address-space limit (RLIMIT_AS) a few GiB above what the interpreter holds,
so an absurd request that is attempted instead of refused (issue 11 item 3) fails here as a
MemoryError, not by the OOM killer on a shared machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import fuzz_corpus as corpus
from conftest import make_image_folder
from visiontune.cli import main

# A message may name a path and a value; anything longer printed an unbounded value (issue 11, item 2).
MAX_ERROR_LINE = 2000
# Extra address space a case may take beyond what the interpreter holds when it starts (bytes). A
# request that needs more (an absurd --image-size) must be refused up front, not attempted: the
# limit turns an attempt into a MemoryError here instead of the kernel's OOM killer on a shared box.
MEMORY_HEADROOM = 3 * 2**30
pytestmark = pytest.mark.slow  # about a minute of CPU time in all

TINY_TRAIN = ["--model", "timm:test_resnet", "--weights", "none", "--image-size", "32", "--batch-size", "4",
              "--workers", "0", "--device", "cpu", "--quiet", "--epochs", "1"]


# -- the world: one tiny trained run per module, HOME/TMPDIR/caches pointed inside it ---------------

@dataclass
class World:
    root: Path
    env: Path  # HOME, TMPDIR, MPLCONFIGDIR live here (watched); the feature cache too (not watched)
    cache: Path
    data: Path
    template: Path  # a good trained run folder, copied for each case that needs one
    long: bool
    counter: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("fuzz")
    env = root / "env"
    folders = {name: env / name for name in ("home", "tmp", "mpl")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    cache = root / "cache"
    saved_env = {name: os.environ.get(name) for name in ("HOME", "TMPDIR", "MPLCONFIGDIR", "VISIONTUNE_CACHE")}
    os.environ.update(HOME=str(folders["home"]), TMPDIR=str(folders["tmp"]), MPLCONFIGDIR=str(folders["mpl"]),
                      VISIONTUNE_CACHE=str(cache))
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(folders["tmp"])  # gettempdir() caches TMPDIR
    saved_cwd = os.getcwd()
    os.chdir(root)
    try:
        data = make_image_folder(root / "data", classes=("red", "green"), per_class=4, val_per_class=2)
        template = root / "template"
        status = main(["train", "--data", str(data), *TINY_TRAIN, "--out", str(template)])
        assert status == 0 and (template / "best.safetensors").is_file()
        # Warm-up: matplotlib's font cache is written on its first use; that is not a case's doing.
        main(["report", "--run", str(template), "--out", str(root / "warmup.html")])
        shutil.rmtree(folders["tmp"])
        folders["tmp"].mkdir()
        world = World(root, env, cache, data, template, long=request.config.getoption("--fuzz-long"))
        yield world
    finally:
        os.chdir(saved_cwd)
        tempfile.tempdir = saved_tempdir
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        total = sum(world.outcomes.values())
        reporter.write_line(f"\nfuzz: {total} hostile cases, outcomes: {dict(sorted(world.outcomes.items()))}")


def examples(world: World, default: int) -> settings:
    """Reproducible settings: the same examples everywhere, no database, no shrinking (every failure
    is collected and reported with its reproduction instead)."""
    return settings(max_examples=default * (10 if world.long else 1), deadline=None, derandomize=True,
                    database=None, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck))


# -- one case ---------------------------------------------------------------------------------------

class Case:
    """A fresh folder for one example: ``victims/`` (watched), ``work/`` (the working directory),
    ``out/`` (where outputs go), ``inputs/`` (config and checkpoint files, watched), and on request a
    copy of the template run, maybe damaged."""

    def __init__(self, world: World):
        world.counter += 1
        self.world = world
        self.dir = world.root / "cases" / f"{world.counter:04d}"
        self.victims, self.work, self.out, self.inputs = (self.dir / n for n in ("victims", "work", "out", "inputs"))
        for folder in (self.victims, self.work, self.out, self.inputs):
            folder.mkdir(parents=True)
        (self.victims / "a_file.txt").write_text("a user's own file\n")
        self.run = self.dir / "run"
        self.paths = corpus.make_paths(self.dir, world.data, self.run)
        self.writable: list[Path] = [self.work, self.out, world.cache]
        self.notes: list[str] = []
        self.good_checkpoints: dict[str, str] = {}
        self.writes_checkpoints = False

    def copy_run(self, damage: tuple[str, str] | None = None) -> Path:
        shutil.copytree(self.world.template, self.run, symlinks=True)
        if damage is not None:
            corpus.damage_run(self.run, *damage, self.victims)
            self.notes.append(f"run damage: {damage[0]} <- {damage[1]}")
        for name in ("best.safetensors", "last.ckpt"):
            if damage is None or damage[0] != name:  # "swapped" trades the damaged file with a JSON/YAML one
                self.good_checkpoints[name] = _hash(self.run / name)
        return self.run

    def output(self, kind: str) -> str:
        """A path for --out: ``fresh`` (a new name under out/) or one of corpus.PATH_CHOICES. The
        path itself may change (the user named it); a symlink's target too (the user named that)."""
        path = str(self.out / "fresh" / "thing") if kind == "fresh" else self.paths[kind]
        # export writes its preprocessing beside FILE; convert adds .safetensors to a name without a suffix
        self.writable += [Path(path), Path(path + ".json"), Path(path + ".safetensors")]
        missing = Path(path)
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        self.writable.append(missing)  # the folders an output needs may be created
        if Path(path).is_symlink():
            self.writable.append(Path(os.path.realpath(path)))
        return path

    def checkpoint(self, kind: str, suffix: str = ".safetensors") -> str:
        path = self.inputs / f"{kind}{suffix}"
        corpus.write_checkpoint(kind, path, self.world.template, self.victims)
        self.notes.append(f"checkpoint: {kind}{suffix}")
        return str(path)

    def config(self, kind: str, table: dict[str, bytes] = corpus.CONFIG_FILES) -> str:
        path = self.inputs / f"{kind}.yaml"
        path.write_bytes(table[kind])
        self.notes.append(f"file {path.name}: {table[kind][:80]!r}")
        return str(path)


def _hash(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _snapshot(roots: list[Path], skip: list[Path]) -> dict[str, tuple]:
    """Every entry under ``roots`` (not under ``skip``): symlinks by target, files by content."""
    skipped = {os.path.abspath(p) for p in skip}
    entries: dict[str, tuple] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if os.path.join(folder, d) not in skipped]
            for name in dirs + files:
                path = os.path.join(folder, name)
                if path in skipped:
                    continue
                if os.path.islink(path):
                    entries[path] = ("link", os.readlink(path))
                elif os.path.isfile(path):
                    entries[path] = ("file", _hash(Path(path)))
                else:
                    entries[path] = ("dir",)
    return entries


@contextlib.contextmanager
def _memory_limit():
    if torch.cuda.is_available():
        torch.cuda.init()  # CUDA reserves a large address range when it starts: count it as held already
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        in_use = int(next(line for line in status if line.startswith("VmSize:")).split()[1]) * 1024
    limit = in_use + MEMORY_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Outcome:
    status: int | None
    stdout: str
    stderr: str
    error: BaseException | None = None
    warnings: list[str] = field(default_factory=list)


def invoke(argv: list[str]) -> Outcome:
    """``visiontune ARGV`` in this process, stdout/stderr/logging captured as a user's terminal shows them."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)  # what the CLI's logging.basicConfig(level=WARNING) prints
    root = logging.getLogger()
    root.addHandler(handler)
    status, error = None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught, _memory_limit():
            warnings.simplefilter("default")
            try:
                status = main(argv)
            except SystemExit as exit:  # argparse: usage errors and --help
                status = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            except Exception as exception:  # noqa: BLE001 - any escape is a traceback a user would see
                error = exception
    finally:
        root.removeHandler(handler)
    return Outcome(status, out.getvalue(), err.getvalue(), error, [str(w.message)[:200] for w in caught])


def invoke_in(case: Case, argv: list[str]) -> Outcome:
    """:func:`invoke` with the case's ``work/`` as the working directory (default outputs land there)."""
    cwd = os.getcwd()
    os.chdir(case.work)
    try:
        return invoke(argv)
    finally:
        os.chdir(cwd)


def run_case(case: Case, argv: list[str], *, writes_run: bool = False, exit_1_ok: bool = False) -> Outcome:
    """Run one case and record its outcome; failures go to ``world.failures`` with a reproduction."""
    world = case.world
    watched = [world.env, world.data, world.template, case.dir]
    skip = list(case.writable) + ([case.run] if writes_run else [])
    before = _snapshot(watched, skip)
    outcome = invoke_in(case, argv)
    problems = _judge(outcome, exit_1_ok)
    after = _snapshot(watched, skip)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    if changed:
        problems.append("changed outside its outputs: " + ", ".join(os.path.relpath(p, world.root) for p in changed[:6]))
    problems += _lost_checkpoints(case, trained=case.writes_checkpoints)
    kind = f"exit {outcome.status}" if outcome.error is None else "traceback"
    world.outcomes[kind] += 1
    command = f"visiontune {' '.join(_show(a, case) for a in argv)}" if argv else "visiontune (no arguments)"
    if problems:
        world.failures.append(f"{command}\n    " + "\n    ".join(case.notes + problems))
    if os.environ.get("VISIONTUNE_FUZZ_VERBOSE"):  # one line per case, for reading what was tried
        print(f"[{kind}{' FAIL' if problems else ''}] {command} {case.notes}", file=sys.__stderr__)
    shutil.rmtree(case.dir, ignore_errors=True)
    return outcome


def _show(arg: str, case: Case) -> str:
    text = arg.replace(str(case.dir), "CASE").replace(str(case.world.root), "WORLD")
    return (text[:60] + f"...({len(text)} chars)") if len(text) > 80 else repr(text) if not text or " " in text else text


def _judge(outcome: Outcome, exit_1_ok: bool) -> list[str]:
    if outcome.error is not None:
        last = traceback.format_exception_only(type(outcome.error), outcome.error)[-1].strip()
        return [f"traceback: {last[:300]}"]
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    problems = []
    if "Traceback" in outcome.stderr:
        problems.append("a traceback on stderr")
    if outcome.status == 0 and re.search(r"(loss|accuracy)\s+nan|nan%", outcome.stdout, re.IGNORECASE):
        problems.append("exit 0 printing a NaN metric")  # issue 11 item 7: NaN weights loaded silently
    if outcome.status == 2:
        if len(lines) != 1:
            problems.append(f"exit 2 with {len(lines)} lines on stderr: {[line[:120] for line in lines[:4]]}")
        elif len(lines[0]) > MAX_ERROR_LINE:
            problems.append(f"exit 2 with a {len(lines[0])}-character line: {lines[0][:120]}...")
    elif outcome.status == 130:
        if len(lines) > 1:  # one line saying what was kept and how to go on, not two that disagree
            problems.append(f"exit 130 with {len(lines)} lines on stderr: {[line[:120] for line in lines[:4]]}")
    elif outcome.status != 0 and not (outcome.status == 1 and exit_1_ok):
        problems.append(f"exit status {outcome.status}: {lines[-3:]}")
    return problems


def _lost_checkpoints(case: Case, trained: bool) -> list[str]:
    problems = []
    for name, digest in case.good_checkpoints.items():
        path = case.run / name
        if path.is_symlink() or not path.is_file():
            problems.append(f"good {name} lost")
        elif not trained and _hash(path) != digest:
            problems.append(f"good {name} changed by a command that only reads it")
        elif trained:
            try:
                tensors = load_file(str(path)) if name.endswith(".safetensors") else \
                    torch.load(path, weights_only=True)["model"]
                if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
                    problems.append(f"{name} now holds non-finite weights")
            except Exception as error:  # noqa: BLE001
                problems.append(f"good {name} no longer loads: {str(error)[:120]}")
    return problems


def _report(world: World, before: int) -> None:
    failures = world.failures[before:]
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures)


# -- value strategies -------------------------------------------------------------------------------

def _number(text: str) -> float | None:
    try:
        return float(int(text))
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


# Valid values that only cost time (a user may ask for 1000 epochs): the harness skips them, keeping
# the invalid ones and the absurd ones a memory estimate must refuse (--image-size 100000).
def _affordable(flag: str, text: str) -> bool:
    value = _number(text)
    if value is None or value != value:
        return True
    caps = {"--epochs": 2, "--freeze-epochs": 2, "--workers": 0, "--cache-views": 1, "--nproc": 1, "--steps": 4,
            "--top-k": 10**9, "--max-wrong": 10**9}
    if flag in caps:
        return value <= caps[flag]
    if flag == "--image-size":
        return value <= 64 or value >= 10**5
    return True


def flag_values(flag: str, extra: list[str] = ()) -> st.SearchStrategy[str]:
    """Half the time a generic hostile value, half the time one that passes parsing and probes the
    boundaries behind it (``extra``: the flag's own edge cases)."""
    generic = st.sampled_from(corpus.HOSTILE_VALUES)
    values = st.one_of(st.sampled_from(list(extra)), generic) if extra else generic
    return values.filter(lambda text: _affordable(flag, text))


TRAIN_VALUE_FLAGS = {
    "--epochs": ["1", "2"], "--batch-size": ["1", "2", "100000"], "--image-size": ["8", "7", "100000", "1000000000"],
    "--lr": ["auto", "1e-3", "1e30"], "--head-lr": ["1e-3"], "--momentum": ["1", "0.99"], "--weight-decay": ["1e9"],
    "--warmup-epochs": ["1e9"], "--grad-clip": ["1e-30"], "--label-smoothing": ["1", "0.999"],
    "--mixup": ["1e-9", "1e9"], "--cutmix": ["1e9"], "--train-groups": ["1000000"], "--layer-decay": ["1", "1e-9"],
    "--freeze-epochs": ["1", "2"], "--patience": ["1"], "--val-split": ["0.999", "1e-9"], "--seed": ["1"],
    "--workers": [], "--cache-views": ["1"], "--strategy": ["linear-probe", "gradual", "partial", "everything"],
    "--optimizer": ["sgd", "lion"], "--augment": ["trivial", "randaugment", "none"], "--on-bad-image": ["error"],
    "--device": ["cuda", "mps", "cpu:0"], "--precision": ["bf16", "fp16", "fp8"], "--feature-cache": [
        "disk", "memory", "off"], "--model": corpus.MODEL_NAMES, "--nproc": ["1"],
    "--source-model": ["timm:test_resnet", "resnet18", "no_such_net"],
    "--epoch-samples": ["1", "0"], "--track": ["none", "neptune"], "--image-column": ["image"], "--val-data": ["hf:missing", "x-{000000..000001}.tar", "pipe:false"],
    "--task": ["multilabel", "single", "auto", "both"],
}
PATH_FLAGS = ("--data", "--out", "--weights", "--config", "--resume")
ALL_TRAIN_FLAGS = sorted(TRAIN_VALUE_FLAGS) + list(PATH_FLAGS) + ["--balance", "--no-balance", "--sync-bn",
                                                                    "--overwrite", "--lerning-rate", "--batch"]


def _train_like_argv(case: Case, data: st.DataObject, command: str, base: list[str]) -> tuple[list[str], bool]:
    """``base`` with one to three hostile changes: a flag's value, a config/weights/resume file, a
    data or output path, a flag removed, or a bad spelling."""
    argv = [command, "--data", str(case.world.data), *base, "--out", case.output("fresh")]
    writes_run = False
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        flag = data.draw(st.sampled_from(ALL_TRAIN_FLAGS + ["remove"]), label="flag")
        if flag == "remove":
            removable = [i for i, a in enumerate(argv) if a.startswith("--")]
            index = data.draw(st.sampled_from(removable), label="remove")
            del argv[index:index + (1 if index + 1 == len(argv) or argv[index + 1].startswith("--") else 2)]
            continue
        if flag in ("--balance", "--no-balance", "--sync-bn", "--overwrite"):
            argv.append(flag if data.draw(st.booleans(), label="plain") else f"{flag}=yes")
            continue
        if flag == "--data":
            value = case.paths[data.draw(st.sampled_from(corpus.PATH_CHOICES), label="data")]
        elif flag == "--out":
            value = case.output(data.draw(st.sampled_from(["fresh", *corpus.PATH_CHOICES]).filter(
                lambda k: k != "dev_null"), label="out"))  # never /dev/null: root could replace the device
            if value == str(case.run) and not case.run.exists():
                case.copy_run()
        elif flag == "--weights":
            kind = data.draw(st.sampled_from(corpus.CHECKPOINT_KINDS + ["hostile"]), label="weights")
            value = data.draw(flag_values(flag, ["DEFAULT", "none"])) if kind == "hostile" else case.checkpoint(kind)
        elif flag == "--config":
            value = case.config(data.draw(st.sampled_from(sorted(corpus.CONFIG_FILES)), label="config"))
        elif flag == "--resume":
            if command != "train":
                continue
            damage = data.draw(st.sampled_from([None, *corpus.RUN_DAMAGE]), label="resume damage")
            value = str(case.copy_run(damage)) if not case.run.exists() else str(case.run)
            writes_run = True
        else:
            value = data.draw(flag_values(flag, TRAIN_VALUE_FLAGS.get(flag, [])), label=flag)
        argv += [f"{flag}={value}"] if data.draw(st.booleans(), label="=form") and value else [flag, value]
    case.writes_checkpoints = writes_run or str(case.run) in argv
    return argv, writes_run


# -- the sub-commands ------------------------------------------------------------------------------

def test_fuzz_train(world):
    before = len(world.failures)

    @examples(world, 14)
    @given(st.data())
    def case(data):
        c = Case(world)
        argv, writes_run = _train_like_argv(c, data, "train", TINY_TRAIN)
        run_case(c, argv, writes_run=writes_run or c.writes_checkpoints)

    case()
    _report(world, before)


def test_fuzz_train_resume(world):
    """``train --resume RUN`` on every kind of damaged run folder, maybe with more epochs."""
    before = len(world.failures)

    @examples(world, 14)
    @given(st.sampled_from(corpus.RUN_DAMAGE), st.sampled_from([[], ["--epochs", "2"], ["--lr", "nan"]]))
    def case(damage, extra):
        c = Case(world)
        c.copy_run(damage)
        c.writes_checkpoints = True
        run_case(c, ["train", "--resume", str(c.run), "--quiet", *extra], writes_run=True)

    case()
    _report(world, before)


def test_fuzz_lr_find(world):
    before = len(world.failures)

    @examples(world, 6)
    @given(st.data())
    def case(data):
        c = Case(world)
        argv, _ = _train_like_argv(c, data, "lr-find", [*TINY_TRAIN[:-3], "--steps", "3"])
        for flag in data.draw(st.lists(st.sampled_from(["--steps", "--start-lr", "--end-lr"]), max_size=2), label="lr"):
            argv += [flag, data.draw(flag_values(flag, ["1", "2", "1e-9", "1e9"]), label=flag)]
        run_case(c, argv, writes_run=str(c.run) in argv)

    case()
    _report(world, before)


def test_fuzz_audit(world):
    """``audit`` with one or two hostile parts: the data, --out, the model or weights, a (damaged)
    --run instead of --model, or a flag's value (--folds, --image-size, --batch-size, --val-split)."""
    before = len(world.failures)
    flags = {"--folds": ["1", "2", "13", "100000"], "--image-size": ["8", "100000"], "--batch-size": ["1", "100000"],
             "--val-split": ["0.999", "1e-9"], "--seed": ["1"], "--device": ["cuda", "cpu:0"]}

    @examples(world, 10)
    @given(st.data())
    def case(data):
        c = Case(world)
        hostile = data.draw(st.lists(st.sampled_from(["data", "out", "model", "run", "flags"]), min_size=1,
                                     max_size=2, unique=True), label="hostile")
        target = c.paths[data.draw(st.sampled_from(corpus.PATH_CHOICES), label="data")] if "data" in hostile \
            else str(world.data)
        argv = ["audit", "--data", target, "--device", "cpu", "--image-size", "32", "--batch-size", "4"]
        if "run" in hostile:
            argv += ["--run", _run_argv(c, data, ["run"])]
        elif "model" in hostile:
            argv += ["--model", data.draw(st.sampled_from(corpus.MODEL_NAMES), label="model"), "--weights",
                     data.draw(st.sampled_from(["none", "DEFAULT", "checkpoint"]), label="weights")]
            if argv[-1] == "checkpoint":
                argv[-1] = c.checkpoint(data.draw(st.sampled_from(corpus.CHECKPOINT_KINDS), label="kind"))
        else:
            argv += ["--model", "timm:test_resnet", "--weights", "none"]
        out = data.draw(st.sampled_from(["missing", "a_file", "empty_dir", "proc", "unicode_dir", "victim_link"]),
                        label="out") if "out" in hostile else "fresh"
        argv += ["--out", c.output(out)]
        argv += _extras(data, flags) if "flags" in hostile else []
        run_case(c, argv)

    case()
    _report(world, before)


def _run_argv(c: Case, data: st.DataObject, hostile: list[str]) -> str:
    """The good run folder, or (when "run" is hostile) a damaged one or one of the hostile paths."""
    if "run" not in hostile:
        return str(c.copy_run())
    if data.draw(st.integers(0, 4), label="run is a path") == 0:
        return c.paths[data.draw(st.sampled_from(corpus.PATH_CHOICES), label="run path")]
    return str(c.copy_run(data.draw(st.sampled_from(corpus.RUN_DAMAGE), label="run damage")))


def _hostile_parts(data: st.DataObject, parts: list[str]) -> list[str]:
    """Which parts of an otherwise valid command line are hostile: mostly the run folder."""
    first = data.draw(st.sampled_from(["run", "run", *parts]), label="hostile")
    more = data.draw(st.lists(st.sampled_from(["run", *parts]), max_size=1), label="also hostile")
    return [first, *more]


def _extras(data: st.DataObject, flags: dict[str, list[str] | None]) -> list[str]:
    argv = []
    for flag in data.draw(st.lists(st.sampled_from(sorted(flags)), min_size=1, max_size=2, unique=True), label="flags"):
        if flags[flag] is None:
            argv.append(flag)
        else:
            argv += [flag, data.draw(flag_values(flag, flags[flag]), label=flag)]
    return argv


def test_fuzz_evaluate(world):
    before = len(world.failures)

    @examples(world, 14)
    @given(st.data())
    def case(data):
        c = Case(world)
        hostile = _hostile_parts(data, ["data", "flags"])
        run = _run_argv(c, data, hostile)
        target = c.paths[data.draw(st.sampled_from(corpus.PATH_CHOICES), label="data")] if "data" in hostile \
            else str(world.data / "val")
        extra = _extras(data, {"--batch-size": ["1", "100000"], "--checkpoint": ["last", "worst"],
                               "--device": ["cpu", "cuda"], "--json": None, "--backend": ["onnx", "tensorrt"],
                               "--model-file": ["missing.onnx"]}) if "flags" in hostile else []
        run_case(c, ["evaluate", "--run", run, "--data", target, "--device", "cpu", *extra])

    case()
    _report(world, before)


def test_fuzz_predict(world):
    before = len(world.failures)

    @examples(world, 14)
    @given(st.data())
    def case(data):
        c = Case(world)
        hostile = _hostile_parts(data, ["paths", "flags"])
        run = _run_argv(c, data, hostile)
        paths = [c.paths[k] for k in data.draw(st.lists(st.sampled_from(corpus.PATH_CHOICES), min_size=1,
                                                        max_size=3), label="paths")] if "paths" in hostile \
            else [str(world.data / "val")]
        extra = _extras(data, {"--top-k": ["1", "2", "100000"], "--batch-size": ["1", "100000"],
                               "--checkpoint": ["last", "worst"], "--json": None, "--backend": ["onnx", "tensorrt"],
                               "--model-file": ["missing.onnx"]}) if "flags" in hostile else []
        run_case(c, ["predict", "--run", run, *paths, "--device", "cpu", *extra])

    case()
    _report(world, before)


def test_fuzz_explain(world):
    before = len(world.failures)

    @examples(world, 8)
    @given(st.data())
    def case(data):
        c = Case(world)
        hostile = _hostile_parts(data, ["paths", "out", "flags"])
        run = _run_argv(c, data, hostile)
        paths = [c.paths[k] for k in data.draw(st.lists(st.sampled_from(corpus.PATH_CHOICES), min_size=1,
                                                        max_size=2), label="paths")] if "paths" in hostile \
            else [str(world.data / "val" / "red")]
        out = c.output(data.draw(st.sampled_from(["missing", "a_file", "empty_dir", "proc", "unicode_dir",
                                                  "victim_link"]), label="out")) if "out" in hostile \
            else c.output("missing")
        extra = _extras(data, {"--method": ["eigencam", "scorecam", "magic"], "--label": ["red", "purple", ""],
                               "--batch-size": ["1", "100000"], "--checkpoint": ["last", "worst"]}) \
            if "flags" in hostile else []
        run_case(c, ["explain", "--run", run, *paths, "--out", out, "--device", "cpu", *extra])

    case()
    _report(world, before)


def test_fuzz_report(world):
    before = len(world.failures)

    @examples(world, 10)
    @given(st.data())
    def case(data):
        c = Case(world)
        hostile = _hostile_parts(data, ["out", "flags"])
        argv = ["report", "--run", _run_argv(c, data, hostile)]
        if "out" in hostile:
            argv += ["--out", c.output(data.draw(st.sampled_from(["missing", "a_file", "empty_dir", "proc",
                                                                  "unicode_dir", "victim_link"]), label="out"))]
        argv += _extras(data, {"--max-wrong": ["1", "100000"]}) if "flags" in hostile else []
        run_case(c, argv, writes_run=True)

    case()
    _report(world, before)


def test_fuzz_export(world):
    before = len(world.failures)
    # ONNX export takes ~20 s per success on 2 cores: the default size exports TorchScript only.
    formats = ["onnx", "tflite", ""] if world.long else ["tflite", ""]

    @examples(world, 8)
    @given(st.data())
    def case(data):
        c = Case(world)
        hostile = _hostile_parts(data, ["format", "out", "flags"])
        argv = ["export", "--run", _run_argv(c, data, hostile), "--format",
                data.draw(st.sampled_from(formats), label="format") if "format" in hostile else "torchscript"]
        if "out" in hostile:
            argv += ["--out", c.output(data.draw(st.sampled_from(["missing", "a_file", "empty_dir", "proc",
                                                                  "victim_link"]), label="out"))]
        argv += _extras(data, {"--tolerance": ["1e-9", "1"], "--checkpoint": ["last", "worst"],
                               "--quantize": ["int8", "int4"], "--max-accuracy-drop": ["-1", "nan"],
                               "--calibration-images": ["0", "1"]}) if "flags" in hostile else []
        if "onnx" in argv:  # onnxruntime itself keeps a device id in ~/.cache/Microsoft (README: Reliability)
            c.writable.append(world.env / "home" / ".cache")
        run_case(c, argv, writes_run=True)

    case()
    _report(world, before)


def test_fuzz_inspect(world):
    before = len(world.failures)

    @examples(world, 8)
    @given(st.sampled_from(corpus.CHECKPOINT_KINDS), st.sampled_from([".safetensors", ".ckpt", ".pth", ""]),
           st.lists(st.sampled_from(["--all", "--json", "--allow-unsafe"]), unique=True, max_size=3))
    def case(kind, suffix, flags):
        if kind in corpus.CODE_KINDS and "--allow-unsafe" in flags:
            flags.remove("--allow-unsafe")  # the user vouched for the file: its code runs by design
        c = Case(world)
        run_case(c, ["inspect", c.checkpoint(kind, suffix), *flags])

    case()
    _report(world, before)


def test_fuzz_convert(world):
    """A valid conversion with one or two of its parts made hostile: the checkpoint, the model name,
    --out (its own input included: issue 11 item 5), the --match rules file, --num-classes, flags."""
    before = len(world.failures)
    parts = ["checkpoint", "model", "out", "match", "num-classes", "flags", "source-model"]

    @examples(world, 20)
    @given(st.data())
    def case(data):
        c = Case(world)
        hostile = data.draw(st.lists(st.sampled_from(parts), min_size=1, max_size=2, unique=True), label="hostile")
        kind = data.draw(st.sampled_from(corpus.CHECKPOINT_KINDS), label="checkpoint") \
            if "checkpoint" in hostile else "good_safetensors"
        source = c.checkpoint(kind, data.draw(st.sampled_from([".safetensors", ".pth"]), label="suffix"))
        model = data.draw(st.sampled_from(corpus.MODEL_NAMES[1:]), label="model") if "model" in hostile \
            else "timm:test_resnet"
        argv = ["convert", source, "--model", model]
        out = data.draw(st.sampled_from(["input", "missing", "a_file", "empty_dir", "proc", "victim_link", "none",
                                         "fresh.pth"]), label="out") if "out" in hostile else "fresh.safetensors"
        if out.startswith("fresh"):
            argv += ["--out", str(c.out / out)]
        elif out == "input":
            argv += ["--out", source]  # never overwrite the input (issue 11 item 5): not made writable
        elif out != "none":
            argv += ["--out", c.output(out)]
        if "match" in hostile:
            match = data.draw(st.sampled_from(["file", "file", "name", "order", "bogus", ""]), label="match")
            argv += ["--match", c.config(data.draw(st.sampled_from(sorted(corpus.RULES_FILES)), label="rules"),
                                         corpus.RULES_FILES) if match == "file" else match]
        if "flags" in hostile:
            flags = ["--dry-run", "--strict", "--ema", "--json"] + ([] if kind in corpus.CODE_KINDS else ["--allow-unsafe"])
            argv += data.draw(st.lists(st.sampled_from(flags), unique=True, min_size=1, max_size=3), label="flags")
        if "num-classes" in hostile:
            argv += ["--num-classes", data.draw(flag_values("--num-classes", ["1", "3", "1000000000"]), label="n")]
        if "source-model" in hostile:
            argv += ["--source-model", data.draw(flag_values("--source-model", ["timm:test_resnet", "resnet18", "no_such_net", "a:b:c"]), label="source")]
        run_case(c, argv, exit_1_ok="--strict" in argv)

    case()
    _report(world, before)


def test_fuzz_shard(world):
    """``shard --data DIR --out DIR``: hostile data and output paths, sizes, splits and seeds."""
    before = len(world.failures)

    @examples(world, 8)
    @given(st.data())
    def case(data):
        c = Case(world)
        source = c.paths[data.draw(st.sampled_from(corpus.PATH_CHOICES), label="data")] \
            if data.draw(st.booleans(), label="hostile data") else str(world.data)
        out = c.output(data.draw(st.sampled_from(["fresh", *corpus.PATH_CHOICES]).filter(lambda k: k != "dev_null"),
                                 label="out"))
        c.writable.append(Path(out))
        argv = ["shard", "--data", source, "--out", out]
        argv += _extras(data, {"--shard-size": ["1GB", "10KB", "1", "-5MB"], "--val-split": ["0.5", "1"],
                               "--seed": ["1"]}) if data.draw(st.booleans(), label="flags") else []
        run_case(c, argv)

    case()
    _report(world, before)


def test_fuzz_inspect_every_checkpoint_kind(world):
    """Cheap, so every kind of the corpus, each under every suffix a user might give it."""
    before = len(world.failures)
    for index, kind in enumerate(corpus.CHECKPOINT_KINDS):
        c = Case(world)
        suffix = [".safetensors", ".ckpt", ".pth", ""][index % 4]
        flags = [["--json"], ["--all"], [], ["--allow-unsafe"]][index % 4 if kind not in corpus.CODE_KINDS else 0]
        run_case(c, ["inspect", c.checkpoint(kind, suffix), *flags])
    _report(world, before)


def test_fuzz_models(world):
    before = len(world.failures)

    @examples(world, 10)
    @given(st.sampled_from(corpus.MODELS_PATTERNS + ["none"]), st.sampled_from(["all", "timm", "torchvision", "keras"]),
           st.lists(st.sampled_from(["--json", "--params"]), unique=True))
    def case(pattern, source, flags):
        if "--params" in flags and pattern not in ("zzz", "timm:test_*", "日本"):
            flags.remove("--params")  # counting every timm model's parameters is slow, not hostile
        c = Case(world)
        run_case(c, ["models", *([] if pattern == "none" else [pattern]), "--source", source, *flags],
                 exit_1_ok=True)

    case()
    _report(world, before)


def test_fuzz_demo_at_the_help_level(world):
    """The demo trains for a minute, so only what stops before it starts: help and bad flags."""
    before = len(world.failures)

    @examples(world, 6)
    @given(st.sampled_from([["--help"], ["-h"], ["--per-class", "1"], ["--per-class", "-5"], ["--epochs", "ten"],
                            ["--image-size", "nan"], ["--device", "tpu"], ["--bogus"], ["--per-class", "½"],
                            ["--out"], ["--quiet", "--quiet", "--per-class", "0"]]))
    def case(extra):
        c = Case(world)
        run_case(c, ["demo", *extra])

    case()
    _report(world, before)


def test_fuzz_top_level(world):
    """Before any sub-command: no command, unknown commands, --version, --help, stray arguments."""
    before = len(world.failures)

    @examples(world, 6)
    @given(st.sampled_from([[], ["--help"], ["--version"], ["trian"], [""], ["--debug"], ["-x"], ["日本"],
                            ["train", "--help"], ["evaluate"], ["predict", "--run"], ["inspect"], ["convert", "x"]]))
    def case(argv):
        run_case(Case(world), argv)

    case()
    _report(world, before)


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("scenario", ["fresh run", "resumed run"])
def test_fuzz_ctrl_c_before_an_epoch(world, scenario):
    """Ctrl-C as the first (next) epoch starts: exit 130 with one line, the good checkpoints kept, and
    the same command run again afterwards works (a half-made folder must not block it)."""
    from visiontune.commands.train import ConsoleReporter

    before = len(world.failures)
    c = Case(world)
    if scenario == "fresh run":
        argv = ["train", "--data", str(world.data), *TINY_TRAIN, "--out", c.output("fresh")]
    else:
        c.copy_run()
        c.writes_checkpoints = True
        argv = ["train", "--resume", str(c.run), "--quiet", "--epochs", "2"]
    saved = ConsoleReporter.start_epoch
    ConsoleReporter.start_epoch = _interrupt
    try:
        outcome = invoke_in(c, argv)
    finally:
        ConsoleReporter.start_epoch = saved
    problems = _judge(outcome, exit_1_ok=False) + _lost_checkpoints(c, trained=c.writes_checkpoints)
    if outcome.status != 130:
        problems.append(f"exit {outcome.status} instead of 130")
    world.outcomes[f"exit {outcome.status}"] += 1
    if problems:
        world.failures.append(f"visiontune {' '.join(_show(a, c) for a in argv)}  (Ctrl-C at the epoch's start)\n    "
                              + "\n    ".join(problems))
    again = run_case(c, argv, writes_run=True)  # the same command again, not interrupted
    if again.status != 0:
        world.failures.append(f"the same command after Ctrl-C: exit {again.status}: {again.stderr.strip()[:200]}")
    _report(world, before)


def test_in_process_capture_sees_what_a_real_process_prints(world):
    """The harness runs main() in-process; a real ``python -m visiontune`` (its own logging setup,
    its own stderr) must give the same status and the same stderr for a case."""
    import subprocess

    c = Case(world)
    argv = ["inspect", c.checkpoint("truncated_safetensors")]
    in_process = invoke_in(c, argv)
    real = subprocess.run([sys.executable, "-m", "visiontune", *argv], capture_output=True, text=True, timeout=300,
                          cwd=c.work, env=dict(os.environ), check=False)
    assert (real.returncode, real.stderr) == (in_process.status, in_process.stderr)
    assert real.returncode == 2 and len(real.stderr.splitlines()) == 1


# -- sweeps: every item of a corpus list at least once (hypothesis above samples combinations) -------

SWEEP_COMMANDS = ["evaluate", "predict --checkpoint last", "report", "export", "train --resume", "explain"]


def _sweep_argv(command: str, c: Case) -> tuple[list[str], bool]:
    run, data = str(c.run), str(c.world.data / "val")
    return {
        "evaluate": (["evaluate", "--run", run, "--data", data, "--device", "cpu"], False),
        "predict --checkpoint last": (["predict", "--run", run, data, "--checkpoint", "last", "--device", "cpu"], False),
        "report": (["report", "--run", run], True),
        "export": (["export", "--run", run, "--format", "torchscript"], True),
        "train --resume": (["train", "--resume", run, "--quiet", "--epochs", "2"], True),
        "train --resume (finished)": (["train", "--resume", run, "--quiet"], True),
        "explain": (["explain", "--run", run, data, "--out", str(c.out / "why"), "--device", "cpu"], False),
    }[command]


def test_fuzz_every_run_damage(world):
    """Each damaged run folder of the corpus once, through one of the commands that read a run (in
    turn), a damaged checkpoint also through ``train --resume`` (it reads both); with --fuzz-long
    every damage through all of them."""
    before = len(world.failures)
    for index, damage in enumerate(corpus.RUN_DAMAGE):
        commands = SWEEP_COMMANDS if world.long else [SWEEP_COMMANDS[index % len(SWEEP_COMMANDS)]]
        if damage[0] == "last.ckpt" and "train --resume" not in commands:
            commands.append("train --resume")
        if damage[0] == "best.safetensors":  # a finished run resumed reads best.safetensors for its report
            commands.append("train --resume (finished)")
        for command in commands:
            c = Case(world)
            c.copy_run(damage)
            argv, writes_run = _sweep_argv(command, c)
            c.writes_checkpoints = command.startswith("train --resume")
            run_case(c, argv, writes_run=writes_run)
    _report(world, before)


def test_fuzz_every_config_file(world):
    """Each config file of the corpus as ``train --config`` (flags it sets itself are left off)."""
    before = len(world.failures)
    for kind, content in corpus.CONFIG_FILES.items():
        c = Case(world)
        flags = {"data": str(world.data), "model": "timm:test_resnet", "epochs": "1"}
        given = [f"--{key}={value}" for key, value in flags.items() if key.encode() not in content]
        argv = ["train", "--config", c.config(kind), *given, "--weights", "none", "--image-size", "32",
                "--workers", "0", "--device", "cpu", "--quiet", "--out", c.output("fresh")]
        run_case(c, argv)
    _report(world, before)


def test_fuzz_every_rules_file(world):
    """Each ``convert --match FILE`` rules file of the corpus."""
    before = len(world.failures)
    for kind in corpus.RULES_FILES:
        c = Case(world)
        run_case(c, ["convert", c.checkpoint("good_safetensors"), "--model", "timm:test_resnet", "--match",
                     c.config(kind, corpus.RULES_FILES), "--out", str(c.out / "converted.safetensors")])
    _report(world, before)


def test_fuzz_issue_11_reproductions(world):
    """The hostile inputs of issue 11 that random draws may miss, every time: absurd sizes (item 3),
    a huge seed and a batch of one through BatchNorm (item 6), a conversion onto its own input
    (item 5), NaN weights evaluated (item 7), a folder whose images are all unreadable (item 4)."""
    before = len(world.failures)
    tiny = [arg for arg in TINY_TRAIN if arg not in ("--image-size", "32", "--batch-size", "4")]
    for name in ("image size", "classes", "seed", "batch of one", "own input", "nan weights", "unreadable"):
        c = Case(world)
        train = ["train", "--data", str(world.data), *tiny, "--out", c.output("fresh")]
        if name == "image size":
            argv = [*train, "--image-size", "100000", "--batch-size", "4"]
        elif name == "classes":
            argv = ["convert", c.checkpoint("good_safetensors"), "--model", "timm:test_resnet", "--num-classes",
                    "1000000000", "--out", str(c.out / "converted.safetensors")]
        elif name == "seed":
            argv = [*train, "--image-size", "32", "--seed", "99999999999999999999999"]
        elif name == "batch of one":
            argv = [*train, "--image-size", "32", "--batch-size", "1"]
        elif name == "own input":
            source = c.checkpoint("good_safetensors")
            argv = ["convert", source, "--model", "timm:test_resnet", "--num-classes", "5", "--out", source]
        elif name == "nan weights":
            argv = ["evaluate", "--run", str(c.copy_run(("best.safetensors", "nan_safetensors"))), "--data",
                    str(world.data / "val"), "--device", "cpu"]
        else:
            argv = ["evaluate", "--run", str(c.copy_run()), "--data", c.paths["bad_images"], "--device", "cpu"]
        run_case(c, argv)
    _report(world, before)
