"""Regenerate the checked-in protobuf / gRPC code from proto/.

    python scripts/gen_proto.py            # writes src/torch_jax_interop/proto/v1/*
    python scripts/gen_proto.py --out DIR  # writes DIR/torch_jax_interop/proto/v1/* (tests)

The generator is pinned: grpcio-tools 1.62.3 (protoc 25.1, protobuf gencode 4.25). Its output
carries no runtime version check, so it imports with every protobuf from 4.25 to 7.x and
every grpcio from 1.62 on (the GPU machines run a newer protobuf than this one). The tool is
installed into .cache/codegen, away from the project's environment, whose protobuf is newer.
The .proto itself is checked by Buf (buf.yaml; scripts/test.sh runs `buf lint` and
`buf breaking`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

GRPCIO_TOOLS = "grpcio-tools==1.62.3"
ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
TOOL_DIR = ROOT / ".cache" / "codegen"


def ensure_tool() -> None:
    marker = TOOL_DIR / ".installed"
    if marker.exists() and marker.read_text() == GRPCIO_TOOLS:
        return
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "--no-compile", "--no-warn-conflicts", "--upgrade", "--target", str(TOOL_DIR),
         GRPCIO_TOOLS],
        check=True,
    )
    marker.write_text(GRPCIO_TOOLS)


def generate(out: Path) -> list[Path]:
    ensure_tool()
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", "import sys; from grpc_tools import protoc; "
         "sys.exit(protoc.main(sys.argv))", "-I", str(PROTO_ROOT), f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}",
         *(str(p.relative_to(PROTO_ROOT)) for p in protos)],
        check=True, cwd=PROTO_ROOT, env={"PYTHONPATH": str(TOOL_DIR), "PATH": "/usr/bin:/bin"},
    )
    generated = out / "torch_jax_interop" / "proto"
    return sorted(p for p in generated.rglob("*_pb2*") if p.suffix in (".py", ".pyi"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "src")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
