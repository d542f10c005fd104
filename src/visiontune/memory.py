"""The host-RAM budget that a run's in-memory caches share.

Two caches keep whole datasets in RAM: the decoded images (:mod:`visiontune.data.decoded_cache`)
and the backbone's features (:mod:`visiontune.features.store`). Each used to assume a quarter of
the free RAM was its own, so together they could take half. Now one :class:`MemoryBudget` per
run, measured once when the run starts, is drawn on by both: what the decoded images claim, the
features cannot have, so the caches together never hold more than :data:`MEMORY_FRACTION` of
the RAM that was available. What does not fit is read from files (images) or memory-mapped from
disk (features) instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Of the RAM available when the run starts; the rest is for the model, its activations, the
# optimizer state, data-loader workers and everything else on the machine.
MEMORY_FRACTION = 0.25


def available_memory_bytes() -> int:
    """RAM available to new allocations now (Linux ``MemAvailable``, else free pages; 0 if unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kibibytes
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class MemoryBudget:
    """Bytes of RAM the caches of one run may hold together, and how many they hold now."""

    total_bytes: int
    claimed_bytes: int = 0

    @classmethod
    def from_available(cls, fraction: float = MEMORY_FRACTION) -> MemoryBudget:
        """A budget of ``fraction`` of the RAM available now."""
        if not 0 < fraction <= 1:
            raise ValueError(f"the memory fraction must be in (0, 1], got {fraction}")
        return cls(int(available_memory_bytes() * fraction))

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.claimed_bytes)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.free_bytes

    def claim(self, nbytes: int, what: str) -> bool:
        """Take ``nbytes`` for ``what`` when they fit in what is left; False (nothing taken) otherwise."""
        fits = self.fits(nbytes)
        log.debug("%s need %.1f MiB of the %.1f MiB left of the cache budget: %s", what, nbytes / 2**20,
                  self.free_bytes / 2**20, "kept in memory" if fits else "too much")
        if fits:
            self.claimed_bytes += nbytes
        return fits

    def force(self, nbytes: int, what: str) -> None:
        """Record ``nbytes`` held in memory whether or not they fit (the user asked for memory), so
        later claims see them; warns when the budget is exceeded."""
        if not self.fits(nbytes):
            log.warning("%s take %.0f MiB, over the %.0f MiB left of the cache budget", what, nbytes / 2**20,
                        self.free_bytes / 2**20)
        self.claimed_bytes += nbytes

    def release(self, nbytes: int) -> None:
        """Give back bytes claimed earlier (a cache that was dropped)."""
        self.claimed_bytes = max(0, self.claimed_bytes - nbytes)
