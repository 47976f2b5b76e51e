"""The checkpoint registry: where the trainer's checkpoints (and data) live, which checkpoint is in
force, and how a checkpoint's lineage is named and split.

It exists so that training (trainer_svc.train), rounds (trainer_svc.round), the promotion gate
(trainer_svc.promote), the service (trainer_svc.server, `python -m trainer_svc`) and the learning
benchmark share one bookkeeping without importing one another: it depends only on the store's
interface and the example split (trainer_svc.examples), never on the modules that use it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from alphamath.paths import cache_root
from trainer_svc.examples import held_out

if TYPE_CHECKING:
    from alphamath.tree import Tree
    from trainer_svc.store import CheckpointRow, Store

EMBEDDED_ID = "embedded"  # the round-0 checkpoint: the embedded model, as the serving pods call it
DEFAULT_DATA = Path(os.environ.get("ALPHAMATH_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))


def checkpoint_root() -> Path:
    return Path(os.environ.get("ALPHAMATH_CHECKPOINT_DIR") or cache_root() / "checkpoints")


def base_checkpoint(store: "Store", model_dir: str | Path | None = None) -> "CheckpointRow":
    """The checkpoint in force: the latest promoted one; before round 1 the embedded model,
    registered (at `model_dir`, default: the embedded SmolLM2 materialised in the cache) as the
    promoted round-0 checkpoint `embedded`, the id the serving pods and the trees it built carry."""
    current = store.current_checkpoint()
    if current is None:
        if model_dir is None:
            from alphamath.model import embedded_checkpoint  # loads torch: only when it is needed
            model_dir = embedded_checkpoint()
        current = store.add_checkpoint(EMBEDDED_ID, str(model_dir), round=0, promoted=True)
    return current


def candidate_id(base_id: str, rnd: int, data_fingerprint: str) -> str:
    """`round-<n>-<hash>`, a function of base, round and `data_fingerprint` (base, data and config,
    trainer_svc.train.fingerprint): a training Job that is restarted (pod evicted, backoffLimit
    retry) lands in the same directory and resumes from its saved state."""
    h = hashlib.sha256(f"{base_id}\x00{rnd}\x00".encode() + data_fingerprint.encode())
    return f"round-{rnd}-{h.hexdigest()[:8]}"


def held_out_trees(store: "Store", checkpoint: str, share: float) -> "list[Tree]":
    """The trees `checkpoint` built whose questions were kept out of its candidate's training."""
    return [t for t in store.trees(checkpoint) if held_out(t.question_id or "", share)]


def lineage_trees(store: "Store", checkpoint: str, generations: int) -> "list[Tree]":
    """The trees built by `checkpoint` and its ancestors, `generations` checkpoints in all (the
    newest first): what the value head is refit on. Its input is the trunk's frozen output, so it
    can learn from every question seen, and more questions is what lifts it (tests/value_probe.py,
    96 base-model trees: held-out AUC 0.59 / 0.62 / 0.66 fit on 18 / 36 / 72 questions)."""
    out, seen, cur = [], set(), store.checkpoint(checkpoint)
    while cur is not None and len(seen) < generations and cur.id not in seen:
        seen.add(cur.id)
        out += store.trees(cur.id)
        cur = store.checkpoint(cur.parent) if cur.parent else None
    return out
