"""Streaming WebDataset shards: ``--data "shards/train-{000000..000099}.tar"``.

A shard is a tar file of samples (``KEY.jpg``/``.png``/``.webp`` + ``KEY.cls`` or ``KEY.json``);
the class list lives beside the shards in ``classes.json`` (written by ``visiontune shard``, with
each shard's sample count), so nothing has to list or hold the whole set. Reading goes through
the ``webdataset`` library (``url_opener`` + ``tarfile_samples``), so any URL it opens works
(local paths, ``pipe:`` commands, ``http(s)://``).

How an epoch is cut from the shards (:class:`ShardStream`):

* shards are split between torchrun processes (process ``r`` of ``W`` owns shards ``r, r+W, ...``)
  and, inside a process, between loader workers, so no two readers ever open the same shard;
* each reader streams its shards in passes (pass ``p`` in an order seeded by ``seed + p``) and an
  epoch is the next ``epoch_samples / (W x workers)`` samples of that endless stream -- an epoch
  is a sample count (as ``WebDataset.with_epoch``), not necessarily one pass;
* those samples go through a shuffle buffer seeded by ``(seed, epoch)`` that is emptied at the end
  of the epoch, and each image's augmentation is seeded per sample.

So epoch ``e`` is a pure function of ``(seed, e, W, workers, shards)``: a resumed run skips the
samples of epochs ``0..e-1`` (whole shards by their counts, without opening them) and continues
at the same shard and sample position with the same order. "Exact" means: the same samples in the
same order with the same augmentation, provided the shards, the process count and the worker
count are the ones the run started with. Checkpoints are written per epoch, so an interruption
mid-epoch resumes at the start of that epoch.
"""

from __future__ import annotations

import json
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from visiontune.data.images import DEFAULT_BACKGROUND, RGB, BadImageError, load_image_bytes
from visiontune.errors import ConfigError, DataError, shown

log = logging.getLogger(__name__)

SHARD_INDEX = "classes.json"  # beside the shards: {"classes": [...], "shards": {name: samples}, "splits": {...}}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
DEFAULT_SHUFFLE_BUFFER = 1000  # samples held (still encoded) for shuffling: ~ a few MB of small JPEGs
_WEBDATASET_EXTRA = "pip install 'visiontune[webdataset]'"


def webdataset():
    """The ``webdataset`` module, imported only when shards are used (an optional extra)."""
    try:
        import webdataset as wds  # noqa: PLC0415 - optional extra, imported where it is needed
    except ImportError:
        raise ConfigError(f"reading or writing WebDataset shards needs the webdataset package: {_WEBDATASET_EXTRA}") from None
    return wds


def is_shard_source(data: str | Path | None) -> bool:
    """True for a shard pattern or URL (``x-{000..009}.tar``, ``pipe:...``, ``https://.../x.tar``)."""
    if data is None:
        return False
    text = str(data)
    if _is_local(text) and Path(text).expanduser().is_dir():  # a folder named like a shard is still a folder
        return False
    return text.startswith("pipe:") or text.split("::")[0].rstrip("}").split("?")[0].endswith(SHARD_SUFFIXES) \
        or (".tar" in text and "{" in text)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


@dataclass
class ShardSet:
    """The shard URLs of one source, the classes, and each shard's sample count where known."""

    pattern: str
    urls: list[str]
    classes: list[str]
    counts: dict[str, int] = field(default_factory=dict)  # shard file name -> samples
    index: dict = field(default_factory=dict)  # classes.json as read

    @property
    def total(self) -> int | None:
        """Samples in all the shards, or None when a shard's count is unknown."""
        names = [_name(url) for url in self.urls]
        return sum(self.counts[name] for name in names) if all(name in self.counts for name in names) else None

    def count(self, url: str) -> int | None:
        return self.counts.get(_name(url))


def _name(url: str) -> str:
    return url.rstrip("/").split("/")[-1].split("?")[0]


def open_shards(pattern: str, classes: list[str] | None = None) -> ShardSet:
    """Expand ``pattern`` (braces, ``::`` lists) and read the class list beside the shards."""
    wds = webdataset()
    urls = list(wds.shardlists.expand_urls(str(pattern)))
    if not urls:
        raise DataError(f"--data {shown(pattern)} names no shard; give e.g. 'shards/train-{{000000..000009}}.tar'")
    missing = [url for url in urls if _is_local(url) and not Path(url).expanduser().is_file()]
    if missing:
        raise DataError(f"shard {missing[0]} does not exist ({len(missing)} of the {len(urls)} shards of "
                        f"{shown(pattern)} are missing); check the pattern's range")
    index = read_shard_index(urls[0])
    found = index.get("classes") or (_classes_in_first_sample(urls[0]) if classes is None else None)
    if classes is None:
        if not found:
            raise DataError(f"no class list for the shards {shown(pattern)}: put a {SHARD_INDEX} "
                            '({"classes": ["cat", "dog"]}) beside them, as visiontune shard writes it, or a '
                            '"classes" list in each sample\'s json')
        classes = [str(name) for name in found]
    elif found and [str(name) for name in found] != list(classes):
        raise DataError(f"the shards {shown(pattern)} have classes {found[:5]}... but the run's are {classes[:5]}...; "
                        "validation shards must use the training classes in the same order")
    if len(classes) < 2:
        raise DataError(f"{SHARD_INDEX} beside {shown(pattern)} lists {len(classes)} class(es); a classifier needs two")
    counts = {str(name): int(count) for name, count in (index.get("shards") or {}).items()}
    return ShardSet(str(pattern), urls, list(classes), counts, index)


def _classes_in_first_sample(url: str) -> list | None:
    """The class list a sample's json may carry (``{"label": 3, "classes": [...]}``), read from the first sample."""
    for sample in iter_shard(url):
        meta = json.loads(bytes(sample["json"]).decode("utf-8")) if "json" in sample else None
        names = meta.get("classes") if isinstance(meta, dict) else None
        return names if isinstance(names, list) else None
    return None


def read_shard_index(first_url: str) -> dict:
    """``classes.json`` in the folder of ``first_url`` ({} when there is none or it is remote)."""
    if not _is_local(first_url):
        return {}
    path = Path(first_url).expanduser().parent / SHARD_INDEX
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}; rewrite it with visiontune shard") from None
    if not isinstance(index, dict):
        raise DataError(f"{path} must hold a JSON object with a 'classes' list, got {type(index).__name__}")
    return index


def val_pattern_beside(shards: ShardSet) -> str | None:
    """The validation shards ``visiontune shard`` wrote beside the training ones, if any."""
    val = (shards.index.get("splits") or {}).get("val")
    if not val or not _is_local(shards.urls[0]):
        return None
    return str(Path(shards.urls[0]).expanduser().parent / val)


# -- reading samples -------------------------------------------------------------------------------


def iter_shard(url: str) -> Iterator[dict]:
    """The raw samples of one shard (``{"__key__": ..., "jpg": bytes, "cls": bytes, ...}``), undecoded."""
    wds = webdataset()
    try:
        yield from wds.tariterators.tarfile_samples([{"url": url}])
    except (OSError, EOFError, ValueError, tarfile.TarError) as error:
        # webdataset appends the stream and URL to the arguments; the first is what went wrong
        reason = error.args[0] if error.args else type(error).__name__
        raise DataError(f"cannot read shard {url}: {str(reason).splitlines()[0][:300]}; check that it is a tar file "
                        "(tar tf) and, for pipe: or remote URLs, that the command or address works") from None


def list_samples(shards: ShardSet) -> list[tuple[str, int]]:
    """``("URL#KEY", label)`` of every sample in ``shards``, in order, images left undecoded
    (validation only: its predictions are written per sample)."""
    return [(f"{url}#{sample['__key__']}", sample_label(sample, shards.classes))
            for url in shards.urls for sample in iter_shard(url)]


def sample_label(sample: dict, classes: list[str]) -> int:
    """The class index of a raw sample: its ``cls`` (an index), or its ``json``'s label (index or name)."""
    where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
    if "cls" in sample:
        text = bytes(sample["cls"]).decode("utf-8").strip()
        label = int(text) if text.lstrip("-").isdigit() else text
    elif "json" in sample:
        meta = json.loads(bytes(sample["json"]).decode("utf-8"))
        label = next((meta[key] for key in ("label", "cls", "class") if isinstance(meta, dict) and key in meta), None)
        if label is None:
            raise DataError(f"sample {where}: its json has no 'label', 'cls' or 'class'; add one")
    else:
        raise DataError(f"sample {where} has no label (no .cls or .json file); write shards with visiontune shard")
    if isinstance(label, str):
        if label not in classes:
            raise DataError(f"sample {where} has class {shown(label)}, not one of the {len(classes)} in {SHARD_INDEX}")
        return classes.index(label)
    if not 0 <= int(label) < len(classes):
        raise DataError(f"sample {where} has label {label}, outside 0..{len(classes) - 1} of {SHARD_INDEX}")
    return int(label)


def sample_image(sample: dict, background: RGB = DEFAULT_BACKGROUND):
    where = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
    key = next((key for key in IMAGE_KEYS if key in sample), None)
    if key is None:
        raise DataError(f"sample {where} has no image ({', '.join(IMAGE_KEYS)}); its files: "
                        f"{', '.join(k for k in sample if not k.startswith('__'))}")
    return load_image_bytes(bytes(sample[key]), f"{where}.{key}", background)


# -- the epoch stream ------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """``(transform(image), label)`` for one process's part of an epoch (see the module docstring).

    ``train=False`` reads every shard once in order, unshuffled, in every process (validation)."""

    def __init__(self, shards: ShardSet, transform: Callable | None, *, seed: int = 0,
                 epoch_samples: int | None = None, train: bool = True, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, targets: list[int] | None = None,
                 on_bad_image: str = "skip"):
        self.shards, self.transform, self.seed, self.train = shards, transform, seed, train
        self.rank, self.world, self.shuffle_buffer, self.epoch = rank, world, shuffle_buffer, 0
        self.on_bad_image = on_bad_image  # skip: an undecodable image is left out of its epoch (logged)
        self.classes = shards.classes
        self._targets = list(targets or [])  # known for validation (listed); never for training
        total = shards.total
        self.epoch_samples = epoch_samples if epoch_samples is not None else total
        if self.epoch_samples is None:
            raise ConfigError(f"the shards {shown(shards.pattern)} do not say how many samples they hold (no counts in "
                              f"{SHARD_INDEX}); give --epoch-samples N, the training samples per epoch")
        if train and len(shards.urls) < world:
            raise DataError(f"{len(shards.urls)} shard(s) for {world} processes: each process needs its own shards; "
                            "write smaller shards (visiontune shard --shard-size) or use fewer processes")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples this process yields per epoch (every process reads all of validation)."""
        return self.epoch_samples // self.world if self.train else self.epoch_samples

    @property
    def readers_per_process(self) -> int:
        """How many loader workers can each read shards of their own in this process."""
        return len(self.shards.urls[self.rank::self.world])

    @property
    def targets(self) -> list[int]:
        # Validation's labels, listed up front; training's are unknown without reading the stream
        # (so class weights, --balance, are refused for shards).
        return self._targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        if not self.train:
            for url in self.shards.urls:
                for sample in iter_shard(url):
                    yield self._prepared(sample, None)
            return
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        own = self.shards.urls[self.rank::self.world]
        if len(own) < workers:
            raise DataError(f"process {self.rank} has {len(own)} shard(s) for {workers} loader workers; use "
                            f"--workers {len(own)} or fewer, or write smaller shards")
        per_process = len(self)
        quota = per_process // workers + (worker_id < per_process % workers)
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker_id}")
        samples = _take(self._reader_stream(own, worker_id, workers, skip=self.epoch * quota), quota)
        for sample in _buffer_shuffle(samples, self.shuffle_buffer, rng):
            seed = rng.getrandbits(62)  # drawn whether or not the image decodes: later samples keep their seeds
            try:
                yield self._prepared(sample, seed)
            except BadImageError as error:
                if self.on_bad_image == "error":
                    raise
                log.warning("skipping %s: %s", error.path, error.reason)

    def _reader_stream(self, own: list[str], worker_id: int, workers: int, skip: int) -> Iterator[dict]:
        """The endless stream of this reader's shards, pass after pass, ``skip`` samples dropped
        (whole shards by their counts, without opening them)."""
        passes = 0
        while True:
            order = own[:]
            random.Random(f"{self.seed}/pass/{passes}/{self.rank}").shuffle(order)
            mine = order[worker_id::workers]
            read_any = False
            for url in mine:
                count = self.shards.count(url)
                if count is not None and skip >= count:
                    skip -= count
                    read_any = read_any or count > 0
                    continue
                for sample in iter_shard(url):
                    read_any = True
                    if skip > 0:
                        skip -= 1
                        continue
                    yield sample
            if not read_any:
                raise DataError(f"the shards {', '.join(mine[:3])} hold no samples; check them with tar tf")
            passes += 1

    def _prepared(self, sample: dict, seed: int | None):
        label = sample_label(sample, self.classes)
        image = sample_image(sample)
        if self.transform is None:
            return image, label
        with _seeded(seed):
            return self.transform(image), label


def _take(stream: Iterator[dict], count: int) -> Iterator[dict]:
    for index, sample in enumerate(stream):
        if index >= count:
            return
        yield sample


def _buffer_shuffle(stream: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle with a buffer of ``size`` samples; the buffer is emptied when ``stream`` ends."""
    buffer: list[dict] = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


@contextmanager
def _seeded(seed: int | None):
    """The sample's augmentation under its own seed, leaving the process's RNG streams untouched
    (as training.samplers does for map-style datasets; the data layer cannot import it)."""
    if seed is None:
        yield
        return
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
