"""Building and loading the C++ kernels (decode.cpp, avx2.cpp) with torch.utils.cpp_extension.

Both compile on first use (g++ and ninja; cached under TORCH_EXTENSIONS_DIR), or come prebuilt from
ALPHAMATH_KERNEL_DIR, where the image puts them (`python -m alphamath.model DIR`): pods have a
read-only root filesystem and no compiler.
"""
from __future__ import annotations

import os
from pathlib import Path


def build(directory: str | None, name: str, source: Path, flags: list[str]):
    """Compile (or load the cached build of) one extension; raises if the toolchain cannot."""
    from torch.utils.cpp_extension import load
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
    return load(name=name, sources=[str(source)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=directory, verbose=False)


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
