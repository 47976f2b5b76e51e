"""Hot-swappable model for the policy and value servers.

A promoted checkpoint must replace the model without failing requests already running. The slot
loads the new checkpoint completely beside the old one, then replaces one reference; a request
takes a snapshot (`slot.current()`) at its start and finishes on that model even if a swap
happens meanwhile. The old model is freed when its last request drops the snapshot.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """One model with the checkpoint it came from (immutable: read both fields consistently)."""

    lm: object  # alphamath.lm.LocalLM
    checkpoint: str
    path: str
    loaded_at: float


class ModelSlot:
    def __init__(self, path: str | Path, checkpoint: str = "embedded", *, dtype=None,
                 loader: Callable[[str], object] | None = None, lm: object | None = None):
        """`loader(path) -> LocalLM` (default: LocalLM(path, dtype=dtype)); pass `lm` when it is already loaded."""
        self._loader = loader or (lambda p: _load_local_lm(p, dtype))
        self._swap_lock = threading.Lock()  # one load at a time; readers never take it
        self.swaps = 0
        self._loaded = Loaded(lm if lm is not None else self._loader(str(path)), checkpoint, str(path),
                              time.time())

    def current(self) -> Loaded:
        """Snapshot for one request: keep using it until the request ends."""
        return self._loaded

    @property
    def lm(self):
        return self._loaded.lm

    @property
    def checkpoint(self) -> str:
        return self._loaded.checkpoint

    def swap(self, path: str | Path, checkpoint: str) -> bool:
        """Load `path` fully, then make it current. False (and nothing loaded) if it is already current."""
        with self._swap_lock:
            if checkpoint == self._loaded.checkpoint and str(path) == self._loaded.path:
                return False
            t0 = time.perf_counter()
            lm = self._loader(str(path))  # raises on a bad checkpoint: the old model stays
            self._loaded = Loaded(lm, checkpoint, str(path), time.time())  # atomic reference swap
            self.swaps += 1
            log.info("switched to checkpoint %s (%s) in %.2fs", checkpoint, path, time.perf_counter() - t0)
            return True

    def on_checkpoint(self, event) -> None:
        """CheckpointListener callback: switch to the promoted checkpoint."""
        self.swap(event.path, event.checkpoint_id)


def _load_local_lm(path: str, dtype=None):
    from alphamath.lm import LocalLM

    return LocalLM(path, dtype=dtype)
