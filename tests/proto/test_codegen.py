"""The checked-in generated protobuf code is what the pinned generator makes of proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src" / "torch_jax_interop" / "proto"


def test_regenerating_changes_no_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert fresh, "the generator wrote nothing"
    checked_in = sorted(
        p.relative_to(ROOT / "src") for p in GENERATED.rglob("*_pb2*") if p.suffix != ".pyc"
    )
    assert fresh == checked_in, "generated files differ in name: run scripts/gen_proto.py"
    for relative in fresh:
        assert (tmp_path / relative).read_text() == (ROOT / "src" / relative).read_text(), (
            f"{relative} is stale: run `python scripts/gen_proto.py` and commit the result"
        )


def test_generated_code_has_no_runtime_version_pin() -> None:
    """gencode from protoc >= 26 refuses older protobuf runtimes; ours must import on 4.25+."""
    for path in GENERATED.rglob("*_pb2*.py"):
        text = path.read_text()
        assert "ValidateProtobufRuntimeVersion" not in text, path
        assert "GRPC_GENERATED_VERSION" not in text, path


def test_every_shared_dtype_has_a_wire_value() -> None:
    from torch_jax_interop._dtypes import DTYPE_NAMES
    from torch_jax_interop._wire import DTYPE_TO_ENUM
    from torch_jax_interop.proto.v1 import interop_pb2 as pb

    for name in DTYPE_NAMES:
        assert pb.Dtype.Name(DTYPE_TO_ENUM[name]) == f"DTYPE_{name.upper()}"
