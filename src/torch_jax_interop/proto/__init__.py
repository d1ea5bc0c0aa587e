"""Generated protobuf / gRPC code of the wire protocol (package ``torch_jax_interop.proto.v1``,
service ``JaxWorkerService``).

Produced by ``scripts/gen_proto.py`` from ``proto/``; do not edit the generated files. The
package names the ``.proto``'s directory, ``proto/torch_jax_interop/proto/v1/`` (Buf's
PACKAGE_DIRECTORY_MATCH), so that the absolute imports protoc writes
(``from torch_jax_interop.proto.v1 import ...``) resolve inside this package.
"""

from .v1 import interop_pb2 as interop_pb2, interop_pb2_grpc as interop_pb2_grpc

__all__ = ["interop_pb2", "interop_pb2_grpc"]
