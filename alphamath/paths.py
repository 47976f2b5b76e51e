"""Where alphamath keeps what it makes outside the repository: the cache root.

It exists so that the embedded model (alphamath.model.embedded), the trainer's checkpoints
(trainer_svc.registry) and its local database (trainer_svc.store) agree on one directory:
`ALPHAMATH_CACHE` (as the README, the Dockerfile and the k8s checkpoint gate set it), else
~/.cache/alphamath.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ALPHAMATH_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir` if given, else $ALPHAMATH_CACHE, else ~/.cache/alphamath."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "alphamath")
