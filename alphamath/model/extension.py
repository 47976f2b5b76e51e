"""Building and loading the C++ kernels (decode.cpp, avx2.cpp) with torch.utils.cpp_extension.

Both compile on first use (g++ and ninja; cached under TORCH_EXTENSIONS_DIR), or come prebuilt from
ALPHAMATH_KERNEL_DIR, where the image puts them (`python -m alphamath.model DIR`): pods have a
read-only root filesystem and no compiler.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def build(directory: str | None, name: str, source: Path, flags: list[str]):
    """Compile (or load the cached build of) one extension; raises if the toolchain cannot. torch's build
    cache keys on the source and the flags, not on included headers, so the headers beside the source
    (attention_args.h) go into the flags by their hash: editing one rebuilds."""
    import hashlib

    from torch.utils.cpp_extension import load
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))).hexdigest()[:16]
    return load(name=name, sources=[str(source)], extra_cflags=flags + [f"-DALPHAMATH_HEADERS={headers}"],
                extra_ldflags=["-fopenmp"], build_directory=directory, verbose=False)


def prebuilt(name: str):
    """The module `name` built into ALPHAMATH_KERNEL_DIR at image build time, or None."""
    import importlib.util
    directory = os.environ.get("ALPHAMATH_KERNEL_DIR")
    found = sorted(Path(directory).glob(f"{name}*.so")) if directory else []
    if not found:
        return None
    spec = importlib.util.spec_from_file_location(name, found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Kernel:
    """One extension for one process: calling it gives the module, loaded once (prebuilt, else built), or
    None where it cannot run here, with the reason (`reason()`) said once in the log;
    ALPHAMATH_DECODE_KERNEL=0 turns it off."""

    def __init__(self, name: str, source: Path, flags: list[str], cannot_run: Callable[[], str | None], what: str):
        """`cannot_run()`: why this CPU cannot run the module, or None; `what` names it in the log."""
        self.name, self.source, self.flags, self.what = name, source, flags, what
        self._cannot_run = cannot_run
        self._lock = threading.Lock()
        self.module = None
        self.failed: str | None = None

    def build(self, directory: str | None = None):
        """Compile (or load the cached build of) the module, into `directory` if given; raises if the toolchain cannot."""
        return build(directory, self.name, self.source, self.flags)

    def reason(self) -> str | None:
        """Why the module is None here (None while it loads or where it did)."""
        return self.failed

    def __call__(self):
        if self.module is not None or self.failed is not None:
            return self.module
        with self._lock:
            if self.module is not None or self.failed is not None:
                return self.module
            if os.environ.get("ALPHAMATH_DECODE_KERNEL", "1") == "0":
                self.failed = "ALPHAMATH_DECODE_KERNEL=0"
            else:
                self.failed = self._cannot_run()
            if self.failed is None:
                try:
                    self.module = prebuilt(self.name) or self.build()
                except Exception as e:  # no compiler, no ninja: the torch path computes the same numbers
                    last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                    self.failed = f"build failed: {type(e).__name__}: {last}"
                    log.warning("%s unavailable (%s); using torch ops", self.what, self.failed)
            if self.failed is not None:
                log.info("%s: torch path (%s)", self.what, self.failed)
            return self.module
