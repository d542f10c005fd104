"""LoadReport: exactly what a load did, as a compact table for people and a dict for JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from visiontune.checkpoint.collapse import collapse_subtrees

Shape = tuple[int, ...]

_MAX_PATTERNS = 8  # per table row; the rest is counted, to_dict() has everything
_MAX_PAIRS = 4  # renamed / mismatched pairs shown one per line


@dataclass
class LoadReport:
    """What ``load_weights`` did (or, with ``dry_run``, would do).

    ``loaded`` maps model keys to checkpoint keys (as named in the file); ``renamed`` is the part of
    it whose names differ beyond prefix cleaning (``module.`` and the like); ``transformed`` the part
    built by a tensor transform (``cat(q, k, v)``, a resampled position embedding); ``missing`` model keys
    kept their values; ``unexpected`` checkpoint keys were not used; ``mismatched`` model keys had a
    counterpart whose shape cannot fit: ``{model_key: (model_shape, checkpoint_shape)}``.
    """

    loaded: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    source_format: str = "state dict"
    unwrapped_from: str | None = None
    source: str = "<in-memory>"
    match: str = "auto"
    dry_run: bool = False
    mismatched_from: dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key of a mismatch
    transformed: dict[str, str] = field(default_factory=dict)  # model key -> how it was built: "cat(q, k, v)"
    removed_prefixes: list[str] = field(default_factory=list)  # e.g. ["module."]
    notes: list[str] = field(default_factory=list)
    model_keys: list[str] = field(default_factory=list, repr=False)  # every model key, in order (for collapsing)
    checkpoint_keys: list[str] = field(default_factory=list, repr=False)  # every checkpoint key, in order

    @property
    def complete(self) -> bool:
        """Every model tensor was filled from the checkpoint."""
        return not self.missing and not self.mismatched

    def to_dict(self) -> dict:
        """A JSON-safe dict (shapes become lists)."""
        return {
            "source": self.source,
            "source_format": self.source_format,
            "unwrapped_from": self.unwrapped_from,
            "match": self.match,
            "dry_run": self.dry_run,
            "loaded": dict(self.loaded),
            "renamed": dict(self.renamed),
            "transformed": dict(self.transformed),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "mismatched": {
                key: {"model_shape": list(model), "checkpoint_shape": list(checkpoint), "checkpoint_key": self.mismatched_from.get(key)}
                for key, (model, checkpoint) in self.mismatched.items()
            },
            "removed_prefixes": list(self.removed_prefixes),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        verb = "would load" if self.dry_run else "loaded"
        wrapper = f", weights under {self.unwrapped_from!r}" if self.unwrapped_from else ""
        total = len(self.model_keys) or len(self.loaded) + len(self.missing) + len(self.mismatched)
        lines = [f"{verb} {len(self.loaded)} of {total} model tensors from {self.source} ({self.source_format}{wrapper}; match={self.match})"]
        lines.append(self._row(verb, self._patterns(self.loaded, self.model_keys), len(self.loaded)))
        if self.transformed:
            # the rare steps (a resampled embedding, adapted channels) first, so they are not hidden behind many cats
            built = sorted(self.transformed.items(), key=lambda pair: pair[1].startswith(("cat(", "chunk(")))
            lines.append(self._pairs_row("built", [f"{t} <- {s}" for t, s in built]))
        if self.renamed:
            lines.append(self._pairs_row("renamed", [f"{t} <- {s}" for t, s in self.renamed.items()]))
        if self.mismatched:
            lines.append(self._pairs_row("mismatched", [
                f"{key} {tuple(model)} <- {self.mismatched_from.get(key, '?')} {tuple(checkpoint)}"
                for key, (model, checkpoint) in self.mismatched.items()
            ]))
        lines.append(self._row("missing", self._patterns(self.missing, self.model_keys), len(self.missing)))
        lines.append(self._row("unexpected", self._patterns(self.unexpected, self.checkpoint_keys), len(self.unexpected)))
        if self.removed_prefixes:
            lines.append(f"  removed prefixes {', '.join(repr(prefix) for prefix in self.removed_prefixes)} from checkpoint keys")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    @staticmethod
    def _patterns(keys, universe: list[str]) -> list[str]:
        keys = list(keys)
        return collapse_subtrees(keys, universe if universe else keys)

    @staticmethod
    def _row(label: str, patterns: list[str], count: int) -> str:
        shown = ", ".join(patterns[:_MAX_PATTERNS]) if count else "-"
        more = f", ... ({len(patterns) - _MAX_PATTERNS} more groups)" if len(patterns) > _MAX_PATTERNS else ""
        return f"  {label:<11}{count:>5}  {shown}{more}"

    @staticmethod
    def _pairs_row(label: str, pairs: list[str]) -> str:
        lines = [f"  {label:<11}{len(pairs):>5}  {pairs[0]}"]
        lines += [f"{'':18}{pair}" for pair in pairs[1:_MAX_PAIRS]]
        if len(pairs) > _MAX_PAIRS:
            lines.append(f"{'':18}... ({len(pairs) - _MAX_PAIRS} more; see report.to_dict())")
        return "\n".join(lines)
