"""The in-process engine: one local model serving policy and value, and the sandbox."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Engine:
    policy: object
    value: object
    sandbox: object
    lm: object
    model_dir: Path


def load_engine(model_dir: str | None = None, dtype: str | None = None, device: str = "cpu",
                sandbox=None) -> Engine:
    """Load `model_dir` (default: the embedded SmolLM2 checkpoint, materialised on first use) on
    `device`; the sandbox defaults to an Executor with the ALPHAMATH_SANDBOX_* limits."""
    from alphamath.lm import LocalLM
    from alphamath.model import embedded_checkpoint
    from alphamath.local import LocalPolicy, LocalValue
    from alphamath.sandbox.executor import Executor

    path = Path(model_dir) if model_dir else embedded_checkpoint()
    lm = LocalLM(path, dtype=dtype, device=device)
    return Engine(LocalPolicy(lm), LocalValue(lm), sandbox or Executor.from_env(), lm, path)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss is in KiB on Linux).
    Reported by eval, generate and the benchmark: the figure the memory targets are set in."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)
