"""`python -m alphamath.model [DIR]` (make setup; the Docker build with DIR): build decode.cpp's and
avx2.cpp's kernels. Compiling needs neither CPU, but importing a module needs its CPU (SIGILL
elsewhere): there the build runs in a child process and only the library's presence is checked (an
image built on one machine runs on others); without DIR, on such a CPU, that module is not built,
since nothing here would use it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alphamath.model import avx2, decode
from alphamath.model.dtype import cpu_has_fast_bf16


def build_one(directory: str | None, module, usable: bool, need: str) -> int:
    """Build `module`'s kernels (decode or avx2); 1 if a build that was asked for failed."""
    if usable:
        print(f"{module.NAME} built:", module.build(directory).__file__)
        return 0
    if directory is None:
        print(f"{module.NAME} not built: this CPU lacks {need}, so torch ops compute what it would")
        return 0
    subprocess.run([sys.executable, "-c", f"from {module.__name__} import build; build({directory!r})"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found = sorted(Path(directory).glob(f"{module.NAME}*.so"))
    if not found:
        print(f"build failed: no {module.NAME}*.so in {directory}", file=sys.stderr)
        return 1
    print(f"{module.NAME} built (not loaded: this CPU lacks {need}):", found[0])
    return 0


def main(argv: list[str]) -> int:
    directory = argv[0] if argv else None
    failed = build_one(directory, decode, cpu_has_fast_bf16(), "AVX512-BF16")
    failed += build_one(directory, avx2, avx2.cpu_ok(), "AVX2, FMA and F16C")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
