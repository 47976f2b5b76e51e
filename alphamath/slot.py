"""The hot-swap slot: what a policy or value server serves, replaced whole when a checkpoint is promoted.

A promoted checkpoint must replace the model without failing requests already running. The new
checkpoint is loaded completely beside the old one, then one reference is replaced; a request takes
a snapshot (`slot.current()`) at its start and finishes on that model even if a swap happens
meanwhile. The old model is freed when its last request drops the snapshot.

The slot holds any record with a `checkpoint` attribute (the servers' LoadedPolicy / LoadedValue, or
`Loaded` below); `on_swap(record)` runs for the first record and after every swap (the servers
publish the model in their metrics and Info there).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """One model with the checkpoint it came from (immutable: read both fields consistently)."""

    lm: object  # alphamath.lm.LocalLM
    checkpoint: str
    path: str
    loaded_at: float = field(default_factory=time.time)


class ModelSlot:
    def __init__(self, loaded, *, on_swap: Callable[[object], None] | None = None, name: str = "model"):
        self._loaded, self._on_swap, self.name = loaded, on_swap, name
        self._load_lock = threading.Lock()  # one load at a time; readers never take it
        if on_swap is not None:
            on_swap(loaded)

    def current(self):
        """Snapshot for one request: keep using it until the request ends."""
        return self._loaded

    @property
    def checkpoint(self) -> str:
        return self._loaded.checkpoint

    def swap(self, loaded) -> None:
        """Serve `loaded` from now on (an atomic reference swap); requests running finish on the old one."""
        old, self._loaded = self._loaded, loaded
        if self._on_swap is not None:
            self._on_swap(loaded)
        log.info("%s checkpoint switched", self.name, extra={"old": old.checkpoint, "new": loaded.checkpoint})

    def follow(self, load: Callable[[str, str], object]) -> Callable[[object], None]:
        """A CheckpointListener callback: `load(path, checkpoint_id)` the promoted checkpoint fully beside
        the current one, then swap. A checkpoint already served is skipped; a load that raises leaves
        the old model in place."""
        def on_checkpoint(event) -> None:
            with self._load_lock:
                if event.checkpoint_id == self.checkpoint:
                    return
                t0 = time.perf_counter()
                loaded = load(event.path, event.checkpoint_id)
                self.swap(loaded)
                log.info("loaded %s (%s) in %.2fs", event.checkpoint_id, event.path, time.perf_counter() - t0)
        return on_checkpoint
