"""Streaming WebDataset shards: ``--data "shards/train-{000000..000099}.tar"``.

A shard is a tar file of samples (``KEY.jpg``/``.png``/``.webp`` + ``KEY.cls`` or ``KEY.json``);
the class list lives beside the shards in ``classes.json`` (written by ``visiontune shard``, with
each shard's sample count), so nothing has to list or hold the whole set. Reading goes through
the ``webdataset`` library (``url_opener`` + ``tarfile_samples``), so any URL it opens works
(local paths, ``pipe:`` commands, ``http(s)://``).

How an epoch is cut from these shards: :mod:`visiontune.data.shard_stream`.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from visiontune.data.images import DEFAULT_BACKGROUND, RGB, load_image_bytes
from visiontune.errors import ConfigError, DataError, shown

log = logging.getLogger(__name__)

SHARD_INDEX = "classes.json"  # beside the shards: {"classes": [...], "shards": {name: samples}, "splits": {...}}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
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
