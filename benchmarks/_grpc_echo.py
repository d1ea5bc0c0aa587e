"""A bare gRPC bytes echo: the floor for a remote call (no protobuf message, no tensors).

Runs in its own process, as the JAX worker does, so client and server do not share a GIL::

    python -m benchmarks._grpc_echo --listen unix:///tmp/d/echo.sock --ready-file /tmp/d/ready

One generic unary method, ``/bench.Echo/Echo``, returns the request bytes unchanged
(no (de)serializers: grpcio hands the handler the raw bytes).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

METHOD = "/bench.Echo/Echo"
MAX_MESSAGE = 1 << 30  # 1 GiB: the 256 MiB case needs limits far above gRPC's 4 MiB default
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


def create_server(address: str) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    return server, port


def _echo(request: bytes, context: Any) -> bytes:
    return request


class EchoClient:
    """``with EchoClient(address) as echo: echo(b"...")``; every call has a deadline."""

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.timeout = timeout
        self._call = self.channel.unary_unary(METHOD)
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def __call__(self, payload: bytes) -> bytes:
        return self._call(payload, timeout=self.timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EchoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="e.g. unix:///tmp/d/echo.sock")
    parser.add_argument("--ready-file", required=True, type=Path)
    args = parser.parse_args(argv)
    server, port = create_server(args.listen)
    server.start()
    stopped = threading.Event()

    def stop(*_: object) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    args.ready_file.write_text(json.dumps({"address": args.listen, "port": port}))
    stopped.wait()
    server.stop(grace=0.5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
