"""Generated protobuf / gRPC code of the wire protocol (``torch_jax_interop.v1``).

Produced by ``scripts/gen_proto.py`` from ``proto/``; do not edit the generated files. The
``.proto`` lives under ``proto/torch_jax_interop/proto/v1/`` (not ``.../v1/``) so that the
absolute imports protoc writes (``from torch_jax_interop.proto.v1 import ...``) resolve
inside this package.
"""

from .v1 import interop_pb2 as interop_pb2
from .v1 import interop_pb2_grpc as interop_pb2_grpc

__all__ = ["interop_pb2", "interop_pb2_grpc"]
