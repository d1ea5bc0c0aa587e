"""``torch-jax-interop`` command line: ``worker``, ``health``, ``train``, ``demo``.

Each subcommand imports only what it needs: ``worker`` imports JAX (no torch), ``train``
imports torch (no JAX), ``health`` imports neither.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ._names import TOKEN_ENV, TRANSPORTS


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("ib").rstrip("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _worker(args: argparse.Namespace) -> int:
    from ._targets import load_function
    from .server import WorkerConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
    if not args.function:
        print("error: give at least one --function NAME=package.module:attr", file=sys.stderr)
        return 2
    functions = {}
    for spec in args.function:
        name, _fn, target = load_function(spec)  # fails early on a bad spec
        functions[name] = target
    token = os.environ.get(args.token_env) if args.token_env else None
    config = WorkerConfig(
        max_sessions=args.max_sessions,
        max_residuals=args.max_residuals,
        max_tensor_bytes=args.max_tensor_bytes,
        max_inline_bytes=args.max_inline_bytes,
        shm_dir=args.shm_dir,
    )
    return serve(functions, args.listen, token=token, config=config,
                 ready_file=args.ready_file, grace=args.grace)


def _health(args: argparse.Namespace) -> int:
    import grpc

    from ._health import check_health  # grpc only: no torch, no JAX (cheap, frequent probes)

    try:
        status = check_health(args.address, timeout=args.timeout)
    except grpc.RpcError as error:
        print(f"{args.address}: unreachable ({error.code().name})", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


def _train(args: argparse.Namespace) -> int:
    from .demo import train_remote

    return train_remote(args.address, steps=args.steps, transport=args.transport,
                        function=args.function, timeout=args.timeout)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_local_demo

    return run_local_demo(steps=args.steps, transport=args.transport)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torch-jax-interop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve JAX functions over gRPC")
    worker.add_argument("--listen", action="append", required=True,
                        help="unix:///path/worker.sock or HOST:PORT (repeatable)")
    worker.add_argument("--function", action="append", default=[],
                        help="NAME=package.module:attr (repeatable)")
    worker.add_argument("--token-env", default=TOKEN_ENV,
                        help="environment variable holding the token TCP clients must send")
    worker.add_argument("--shm-dir", default=None,
                        help="shared-memory directory (default $TORCH_JAX_INTEROP_SHM_DIR "
                             "or /dev/shm)")
    worker.add_argument("--max-sessions", type=int, default=64)
    worker.add_argument("--max-residuals", type=int, default=1024,
                        help="vjp residuals kept per session before the oldest are dropped")
    worker.add_argument("--max-tensor-bytes", type=_size, default=4 << 30)
    worker.add_argument("--max-inline-bytes", type=_size, default=64 << 20)
    worker.add_argument("--ready-file", default=None,
                        help="write {addresses, pid} as JSON here once serving")
    worker.add_argument("--grace", type=float, default=30.0,
                        help="seconds in-flight calls get to finish on SIGTERM")
    worker.set_defaults(run=_worker)

    health = sub.add_parser("health", help="standard gRPC health check; exit 0 when SERVING")
    health.add_argument("address")
    health.add_argument("--timeout", type=float, default=5.0)
    health.set_defaults(run=_health)

    for name, helptext, run in (("train", "train the demo torch model against a worker",
                                 _train),
                                ("demo", "start a local worker and train against it", _demo)):
        cmd = sub.add_parser(name, help=helptext)
        if name == "train":
            cmd.add_argument("--address", required=True)
            cmd.add_argument("--function", default="mlp")
            cmd.add_argument("--timeout", type=float, default=60.0)
        cmd.add_argument("--steps", type=int, default=200)
        cmd.add_argument("--transport", default="auto", choices=TRANSPORTS)
        cmd.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
