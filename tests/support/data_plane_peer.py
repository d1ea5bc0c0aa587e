"""Run in a child process by test_fastpath.py: a hello from a process that is not the
session's client."""

from __future__ import annotations

import socket

from torch_jax_interop.proto.v1 import interop_pb2 as pb
from torch_jax_interop.transport import _data_plane as frames


def hello_from_child(path: str, session_id: str, secret_hex: str) -> str:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    frames.send_frame(sock, pb.DATA_PLANE_FRAME_KIND_HELLO, 0, pb.DataPlaneHello(
        session_id=session_id, secret=bytes.fromhex(secret_hex)).SerializeToString())
    kind, _, body = frames.recv_frame(sock, 1 << 16)
    sock.close()
    if kind == pb.DATA_PLANE_FRAME_KIND_OK:
        return "accepted"
    return pb.DataPlaneStatus.FromString(body).message
