"""`make proto`: compile proto/alphamath/v1/*.proto into the committed stubs in alphamath/pb/.

protoc writes `from alphamath.v1 import x_pb2`, which would need a top-level `alphamath.v1`
package; we flatten the output into alphamath/pb/ and rewrite those imports to be
package-relative (`from . import x_pb2`). Output is deterministic, so tests/test_proto.py can
regenerate into a temporary directory and fail when the committed stubs are stale.

    python -m alphamath.protogen [--out DIR] [--check]
"""
from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = "alphamath/v1"
DEFAULT_OUT = ROOT / "alphamath" / "pb"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
INIT = '"""Generated gRPC/protobuf stubs of package alphamath.v1 (`make proto`; do not edit)."""\n'

_ABS_IMPORT = re.compile(r"^from alphamath\.v1 import (\w+_pb2)", re.M)


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Compile every proto into out_dir (flat, imports fixed); return the files written."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed (see the messages above)")
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.iterdir():
            if stale.name.endswith(SUFFIXES):
                stale.unlink()
        written = []
        for src in sorted((Path(tmp) / PACKAGE_DIR).iterdir()):
            if not src.name.endswith(SUFFIXES):
                continue
            dst = out_dir / src.name
            dst.write_text(_ABS_IMPORT.sub(r"from . import \1", src.read_text()))
            written.append(dst)
    (out_dir / "__init__.py").write_text(INIT)
    return written + [out_dir / "__init__.py"]


def stale_files(out_dir: Path = DEFAULT_OUT) -> list[str]:
    """Names of stub files that differ from a fresh generation (missing, extra or changed)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {p.name for p in Path(tmp).iterdir() if p.is_file()}
        have = {p.name for p in Path(out_dir).iterdir()
                if p.is_file() and (p.name.endswith(SUFFIXES) or p.name == "__init__.py")}
        diff = sorted(fresh ^ have)
        diff += sorted(n for n in fresh & have
                       if not filecmp.cmp(Path(tmp) / n, Path(out_dir) / n, shallow=False))
        return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--check", action="store_true", help="exit 1 if the stubs in --out are stale")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        if stale:
            print("stale generated stubs (run `make proto`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
