"""Regenerate the Python code of the ``.proto`` files in this directory.

    python -m hyperd.shim.proto.generate

runs the protoc that grpcio-tools bundles (its version is pinned in requirements.lock, so the
output is reproducible) from the repository root, writing ``*_pb2.py`` and ``*_pb2.pyi`` next to
the ``.proto`` files. The generated files are committed; tests/shim/test_proto.py checks they
match a fresh run.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]  # the directory holding the ``hyperd`` package


def protoc_argv(out_dir: Path) -> list[str]:
    """The protoc arguments that write the generated code under ``out_dir``."""
    from importlib import resources

    include = resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.relative_to(ROOT)) for p in HERE.glob("*.proto"))
    return [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *protos,
    ]


def generate(out_dir: Path = ROOT) -> None:
    """Run protoc; raises RuntimeError when it fails."""
    from grpc_tools import protoc

    status = protoc.main(protoc_argv(out_dir))
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status}")


if __name__ == "__main__":
    generate()
    sys.exit(0)
