"""Writing a folder or CSV dataset into WebDataset shards (``visiontune shard``).

Each split becomes ``train-000000.tar, ...`` and ``val-000000.tar, ...`` (samples ``KEY.<ext>`` with
the file's original bytes -- never re-encoded -- and ``KEY.cls``, the class index); ``classes.json``
beside them holds the class list, each shard's sample count (what lets a resumed run skip whole
shards) and the two splits' shard patterns. Written with ``webdataset.ShardWriter``; a shard is
closed once it reaches ``shard_size`` bytes.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from visiontune.atomic_io import write_text_atomically
from visiontune.data.datasets import discover
from visiontune.data.images import load_image
from visiontune.data.samples import Sample
from visiontune.data.shards import SHARD_INDEX, webdataset
from visiontune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_STORED_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # kept as they are


def parse_size(text: str) -> int:
    """``1GB``, ``500MB``, ``2e8`` -> bytes."""
    match = _SIZE.match(str(text))
    if match is None:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"--shard-size {text!r} is not a size; give e.g. 1GB, 500MB or a number of bytes") from None
    else:
        value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not value >= 1e4:
        raise ConfigError(f"--shard-size {text!r} is below 10KB; shards that small only add overhead")
    return int(value)


@dataclass
class ShardSummary:
    out: Path
    classes: list[str]
    counts: dict[str, int]  # shard name -> samples
    skipped: list[tuple[str, str]]  # (path, reason) of files that could not be read

    def samples(self, split: str) -> int:
        return sum(count for name, count in self.counts.items() if name.startswith(f"{split}-"))


def write_shards(data: str | Path, out: str | Path, *, shard_size: int = int(1e9), val_split: float | None = None,
                 seed: int = 0) -> ShardSummary:
    """Write the train and val samples of ``data`` (a folder or CSV, split as training would split
    it) into shards under ``out``, in a seeded shuffled order (so each shard mixes the classes)."""
    wds = webdataset()
    split = discover(data, val_split=val_split, seed=seed)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the shards")
    if out.is_dir() and any(out.glob("*.tar")):
        raise ConfigError(f"--out {out} already holds .tar shards; give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    patterns = {}
    for name, samples in (("train", split.train), ("val", split.val)):
        shards = _write_split(wds, out, name, _shuffled(samples, seed), split.classes, shard_size, counts, skipped)
        patterns[name] = f"{name}-{{000000..{shards - 1:06d}}}.tar"
    index = {"classes": split.classes, "shards": counts, "splits": patterns,
             "source": str(Path(data).expanduser().absolute())}
    write_text_atomically(out / SHARD_INDEX, json.dumps(index, indent=1) + "\n")
    return ShardSummary(out, split.classes, counts, skipped)


def _shuffled(samples: list[Sample], seed: int) -> list[Sample]:
    order = list(samples)
    random.Random(f"shard/{seed}").shuffle(order)
    return order


def _write_split(wds, out: Path, name: str, samples: list[Sample], classes: list[str], shard_size: int,
                 counts: dict[str, int], skipped: list[tuple[str, str]]) -> int:
    """Returns the number of shards written (at least one, possibly empty)."""
    writer = wds.ShardWriter(str(out / f"{name}-%06d.tar"), maxsize=shard_size, maxcount=10**9, verbose=0)
    try:
        for index, sample in enumerate(samples):
            try:
                suffix, payload = _payload(sample.path)
            except DataError as error:
                skipped.append((str(sample.path), str(error)))
                continue
            record = {"__key__": f"{index:09d}", suffix: payload, "cls": str(sample.label).encode()}
            if writer.count == 0 or writer.count >= writer.maxcount or writer.size >= writer.maxsize:
                # A shard's first sample carries the class list, so shards moved away from classes.json
                # (object storage, pipe: URLs) still name their classes.
                record["json"] = json.dumps({"label": sample.label, "classes": classes}).encode()
            writer.write(record)
            shard = Path(writer.fname).name
            counts[shard] = counts.get(shard, 0) + 1
    finally:
        writer.close()
    written = sorted(out.glob(f"{name}-*.tar"))
    for path in written:
        counts.setdefault(path.name, 0)
    return max(1, len(written))


def _payload(path: Path) -> tuple[str, bytes]:
    """The file's own bytes when readers decode its format anyway, else a lossless PNG."""
    suffix = _STORED_SUFFIXES.get(path.suffix.lower())
    image = load_image(path)  # refuses unreadable files before they reach a shard
    if suffix is not None:
        return suffix, path.read_bytes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()
