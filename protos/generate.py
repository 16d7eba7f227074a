"""Regenerate the Python stubs of every .proto here: `python -m protos.generate [OUT_DIR]` (or `make protos`).

Pinned to grpcio-tools 1.84.0: its stubs need grpcio >= 1.84 and protobuf >= the gencode version it writes,
which both this machine's environment and the GPU image satisfy."""

from __future__ import annotations

import os
import sys


def generate(out_dir: str) -> None:
    from grpc_tools import protoc

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    protos = sorted(f"protos/{f}" for f in os.listdir(os.path.join(root, "protos")) if f.endswith(".proto"))
    for proto in protos:
        rc = protoc.main(["protoc", f"-I{root}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                          f"--pyi_out={out_dir}", os.path.join(root, proto)])
        if rc:
            raise SystemExit(f"protoc failed on {proto}")


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
