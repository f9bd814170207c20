"""Regenerate the Python stubs beside the .proto files: python protos/generate.py

The stubs are committed (the light client needs no grpcio-tools); tests/test_protos.py
fails when they drift from the .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTOS = Path(__file__).resolve().parent


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "sdmesh" / "v1").glob("*.proto"))
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *files,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed ({code})")


if __name__ == "__main__":
    generate(PROTOS)
    sys.exit(0)
