"""``torch-jax-interop`` command line: ``worker``, ``health``, ``train``, ``demo``.

Each subcommand imports only what it needs: ``worker`` imports JAX (no torch), ``train``
imports torch (no JAX), ``health`` imports neither, and ``worker --ranks N`` (a launcher
that starts N worker processes) imports neither in the launcher itself.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from ._names import (
    DEFAULT_MAX_COMPILED_SIGNATURES,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_LEAVES,
    DEFAULT_MAX_RESIDUAL_BYTES,
    TOKEN_ENV,
    TRANSPORTS,
)
from ._tls import TlsConfig, check_listen_security, read_token_file


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("ib").rstrip("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The options every worker of ``worker --ranks N`` gets (all but ``--listen``,
    ``--ready-file`` and the rank options, which the launcher sets per worker)."""
    argv = [arg for spec in args.function for arg in ("--function", spec)]
    argv += ["--token-env", args.token_env, "--max-sessions", str(args.max_sessions),
             "--max-residuals", str(args.max_residuals),
             "--max-residual-bytes", str(args.max_residual_bytes),
             "--max-leaves", str(args.max_leaves),
             "--max-compiled-signatures", str(args.max_compiled_signatures),
             "--max-tensor-bytes", str(args.max_tensor_bytes),
             "--max-inline-bytes", str(args.max_inline_bytes), "--grace", str(args.grace)]
    if args.shm_dir is not None:
        argv += ["--shm-dir", args.shm_dir]
    if args.allow_unsealed_regions:
        argv.append("--allow-unsealed-regions")
    if args.no_fast_path:
        argv.append("--no-fast-path")
    argv += ["--max-frame-bytes", str(args.max_frame_bytes)]
    argv += ["--max-connections", str(args.max_connections),
             "--handshake-timeout", str(args.handshake_timeout),
             "--idle-timeout", str(args.idle_timeout),
             "--max-streams-per-connection", str(args.max_streams_per_connection)]
    for flag, value in (("--token-file", args.token_file), ("--tls-cert", args.tls_cert),
                        ("--tls-key", args.tls_key), ("--tls-client-ca", args.tls_client_ca)):
        if value is not None:
            argv += [flag, value]
    if args.insecure:
        argv.append("--insecure")
    return argv


def _worker_tls(args: argparse.Namespace) -> TlsConfig | None:
    """The worker's TLS settings from its flags; ``ValueError`` when they do not fit."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: client "
                             "certificates are checked only on a TLS listener")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("give --tls-cert and --tls-key together (the worker's certificate "
                         "and its private key, PEM files)")
    return TlsConfig(ca_file=args.tls_client_ca, cert_file=args.tls_cert, key_file=args.tls_key)


def _worker(args: argparse.Namespace) -> int:
    if not args.function:
        print("error: give at least one --function NAME=package.module:attr", file=sys.stderr)
        return 2
    from ._ranks import is_rank_template, local_rank_addresses, rank_address

    try:
        tls = _worker_tls(args)
        # Before any worker starts (or JAX loads): a misconfigured listener exits with 2.
        check_listen_security(args.listen, tls=tls is not None, insecure=args.insecure)
        if tls is not None:
            tls.server_credentials()  # reads the files: a wrong path fails here, with 2
        if args.token_file is not None:
            read_token_file(args.token_file)
        if args.ranks is not None:
            from ._launch import serve_ranks  # starts processes; imports no framework

            logging.basicConfig(level=logging.INFO,
                                format="%(asctime)s workers %(levelname)s %(message)s")
            for template in args.listen:
                local_rank_addresses(template, args.ranks)  # fails early on a bad template
            return serve_ranks(args.listen, args.ranks, _worker_argv(args),
                               ready_file=args.ready_file, grace=args.grace)
        if args.local_rank is not None:
            args.listen = [rank_address(t, local_rank=args.local_rank) for t in args.listen]
        templates = [t for t in args.listen if is_rank_template(t)]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if templates:
        print(f"error: `{templates[0]}` is an address template: give --ranks N to start a "
              "worker per local rank, or --local-rank I for one of them", file=sys.stderr)
        return 2

    from ._targets import load_function
    from .errors import UntrustedSocketError
    from .server import ConnectionLimits, WorkerConfig, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
    functions = {}
    for spec in args.function:
        name, _fn, target = load_function(spec)  # fails early on a bad spec
        functions[name] = target
    if args.token_file is not None:
        token: str | None = read_token_file(args.token_file)
    else:
        token = os.environ.get(args.token_env) if args.token_env else None
    config = WorkerConfig(
        max_sessions=args.max_sessions,
        max_residuals=args.max_residuals,
        max_residual_bytes=args.max_residual_bytes,
        max_leaves=args.max_leaves,
        max_compiled_signatures=args.max_compiled_signatures,
        max_tensor_bytes=args.max_tensor_bytes,
        max_inline_bytes=args.max_inline_bytes,
        shm_dir=args.shm_dir,
        allow_unsealed_regions=args.allow_unsealed_regions,
        fast_path=not args.no_fast_path,
        max_frame_bytes=args.max_frame_bytes,
    )
    limits = ConnectionLimits(max_connections=args.max_connections,
                              handshake_timeout=args.handshake_timeout,
                              idle_timeout=args.idle_timeout,
                              max_streams_per_connection=args.max_streams_per_connection)
    try:
        return serve(functions, args.listen, token=token, config=config,
                     ready_file=args.ready_file, grace=args.grace, tls=tls,
                     insecure=args.insecure, connection_limits=limits)
    except UntrustedSocketError as error:  # a socket others could swap: say so, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno != errno.EADDRINUSE:
            raise
        print(f"error: {error.strerror}", file=sys.stderr)
        return 2


def _health(args: argparse.Namespace) -> int:
    import grpc

    from ._health import check_health  # grpc only: no torch, no JAX (cheap, frequent probes)
    from ._ranks import is_rank_template, local_rank_addresses

    try:
        if args.ranks is None and is_rank_template(args.address):
            raise ValueError(f"`{args.address}` is an address template: give --ranks N to "
                             "check the workers of local ranks 0..N-1")
        addresses = ([args.address] if args.ranks is None
                     else local_rank_addresses(args.address, args.ranks))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        try:
            tls = TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert,
                            key_file=args.tls_key, server_name=args.tls_server_name)
            tls.channel_credentials()  # reads the files: a wrong path exits with 2
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    healthy = True
    for address in addresses:  # every worker of a group must serve
        try:
            status = check_health(address, timeout=args.timeout, tls=tls)
        except grpc.RpcError as error:
            print(f"{address}: unreachable ({error.code().name})", file=sys.stderr)
            return 1
        print(f"{address}: {status}")
        healthy = healthy and status == "SERVING"
    return 0 if healthy else 1


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
                        help="unix:///path/worker.sock or HOST:PORT (repeatable); with --ranks "
                             "or --local-rank a template such as "
                             "unix:///run/tji/worker-{local_rank}.sock")
    ranks = worker.add_mutually_exclusive_group()
    ranks.add_argument("--ranks", type=int, default=None, metavar="N",
                       help="start N worker processes, one per local rank (0..N-1), each on "
                            "--listen filled with its {local_rank}; SIGTERM stops them all")
    ranks.add_argument("--local-rank", type=int, default=None, metavar="I",
                       help="serve as the worker of local rank I: fill {local_rank} in --listen")
    worker.add_argument("--function", action="append", default=[],
                        help="NAME=package.module:attr (repeatable)")
    worker.add_argument("--token-env", default=TOKEN_ENV,
                        help="environment variable holding the token TCP clients must send")
    worker.add_argument("--token-file", default=None, metavar="PATH",
                        help="read the token from this file instead (e.g. /run/secrets/tji)")
    worker.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="serve TCP over TLS with this certificate chain (with --tls-key)")
    worker.add_argument("--tls-key", default=None, metavar="PEM",
                        help="private key of --tls-cert")
    worker.add_argument("--tls-client-ca", default=None, metavar="PEM",
                        help="require TCP clients to present a certificate signed by this CA "
                             "(mTLS)")
    worker.add_argument("--insecure", action="store_true",
                        help="allow a TCP listener on a non-loopback address without TLS "
                             "(token and tensors in cleartext: a trusted network only)")
    worker.add_argument("--max-connections", type=int, default=256,
                        help="connections each listener accepts at once; more are closed at "
                             "once (bounds descriptors an idle flood can take)")
    worker.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="a connection must finish its TLS/HTTP2 handshake within this")
    worker.add_argument("--idle-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="close a connection after this long without a call")
    worker.add_argument("--max-streams-per-connection", type=int, default=128,
                        help="calls one connection may have in flight at once")
    worker.add_argument("--shm-dir", default=None,
                        help="shared-memory directory (default $TORCH_JAX_INTEROP_SHM_DIR "
                             "or /dev/shm)")
    worker.add_argument("--allow-unsealed-regions", action="store_true",
                        help="also map shared-memory files that are not sealed memfds (clients "
                             "in another PID namespace); a local peer of this user could then "
                             "shrink one and kill the worker with SIGBUS")
    worker.add_argument("--no-fast-path", action="store_true",
                        help="serve calls over gRPC only: offer no same-host data plane "
                             "(a private unix socket; docs/same-host.md)")
    worker.add_argument("--max-frame-bytes", type=_size, default=DEFAULT_MAX_FRAME_BYTES,
                        metavar="BYTES",
                        help="largest request frame read on the same-host data plane")
    worker.add_argument("--max-sessions", type=int, default=64)
    worker.add_argument("--max-residuals", type=int, default=1024,
                        help="vjp residuals kept per session before the oldest are dropped")
    worker.add_argument("--max-residual-bytes", type=_size, default=DEFAULT_MAX_RESIDUAL_BYTES,
                        help="bytes of vjp residuals kept per session; past it the oldest "
                             "are dropped, and a call whose residuals alone exceed it is "
                             "refused (RESOURCE_EXHAUSTED)")
    worker.add_argument("--max-tensor-bytes", type=_size, default=4 << 30)
    worker.add_argument("--max-inline-bytes", type=_size, default=64 << 20,
                        help="inline tensor bytes per request (the sum over its tensors) "
                             "and per output")
    worker.add_argument("--max-leaves", type=_positive, default=DEFAULT_MAX_LEAVES,
                        help="tensors per request (arguments, or cotangents), checked "
                             "before anything is decoded or compiled")
    worker.add_argument("--max-compiled-signatures", type=_positive,
                        default=DEFAULT_MAX_COMPILED_SIGNATURES,
                        help="compiled input signatures kept per served function (least "
                             "recently used dropped)")
    worker.add_argument("--ready-file", default=None,
                        help="write {addresses, pid} as JSON here once serving (with --ranks: "
                             "once every worker serves)")
    worker.add_argument("--grace", type=float, default=30.0,
                        help="seconds in-flight calls get to finish on SIGTERM")
    worker.set_defaults(run=_worker)

    health = sub.add_parser("health", help="standard gRPC health check; exit 0 when SERVING")
    health.add_argument("address")
    health.add_argument("--ranks", type=int, default=None, metavar="N",
                        help="ADDRESS is a template: check the workers of local ranks 0..N-1")
    health.add_argument("--timeout", type=float, default=5.0)
    health.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="check a TLS worker: the CA that signed its certificate")
    health.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="client certificate, for a worker that requires one (mTLS)")
    health.add_argument("--tls-key", default=None, metavar="PEM", help="key of --tls-cert")
    health.add_argument("--tls-server-name", default=None, metavar="NAME",
                        help="the name the worker's certificate is checked against")
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
