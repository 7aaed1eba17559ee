"""Regenerate the protobuf code in consortium/proto/v1 from protos/, or check it.

    python scripts/gen_protos.py          # regenerate
    python scripts/gen_protos.py --check  # exit 1 when the committed code drifted

The proto package path equals the import path (`package consortium.proto.v1;`
lives in protos/consortium/proto/v1), so generated imports need no rewriting.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("consortium/proto/v1")


def generate(out_dir: Path) -> list[Path]:
    # protoc finds the mypy-protobuf plugins on PATH; they sit beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    sources = sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_dir / PACKAGE).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on drift, write nothing")
    options = parser.parse_args()
    target = ROOT / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        names = {p.name for p in generated}
        committed = {p.name for p in target.glob("*_pb2*.py*")}
        if options.check:
            drifted = sorted(names ^ committed)
            drifted += sorted(
                n
                for n in names & committed
                if not filecmp.cmp(Path(tmp) / PACKAGE / n, target / n, shallow=False)
            )
            if drifted:
                print("generated protobuf code drifted from protos/: " + ", ".join(drifted))
                print("run: python scripts/gen_protos.py")
                return 1
            print(f"protobuf code up to date ({len(names)} files)")
            return 0
        for stale in committed - names:
            (target / stale).unlink()
        for path in generated:
            shutil.copyfile(path, target / path.name)
        print(f"wrote {len(generated)} files to {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
