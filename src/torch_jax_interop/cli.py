"""``torch-jax-interop`` command line: ``worker``, ``health``, ``train``, ``demo``.

Each subcommand imports only what it needs: ``worker`` imports JAX (no torch), ``train``
imports torch (no JAX), ``health`` imports neither, and ``worker --ranks N`` (a launcher
that starts N worker processes) imports neither in the launcher itself.

Note [Exit statuses of the command line]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
* 0: done (a worker stopped by SIGTERM/SIGINT after draining; ``health``: SERVING).
* 1: the work failed at run time (``health``: unreachable or not serving; a worker of
  ``--ranks N`` exited; ``train``: no worker answered, the remote function raised).
* 2: a usage error: argparse's own (an unknown option, a malformed value), every
  ``UsageError`` of ``_cli_args.py`` (a bad ``--function``, an address without a scheme, a
  missing socket directory, TCP without a token, a missing extra...), all found before
  anything starts, and the few the client meets only when it connects
  (``_USAGE_ERRORS_AT_RUN_TIME``: a socket path that is missing or not private, an unknown
  function, a wrong token).
Usage errors and the project's own errors (``InteropError``) print ONE line ``error: <what>;
<how to fix>`` on stderr, without a traceback unless ``--debug`` (or ``--log-level
debug``). Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from typing import Any

from ._cli_args import (
    CliHelpFormatter,
    CliParser,
    UsageError,
    add_import_paths,
    check_connect_address,
    check_directory,
    check_function_specs,
    check_listen_address,
    check_output_file,
    format_size,
    load_functions,
    non_negative_int,
    non_negative_seconds,
    parse_metrics_listen,
    parse_size,
    positive_int,
    positive_seconds,
    require,
    spin_microseconds,
    split_function_spec,
)
from ._logging import LOG_FORMATS, LOG_LEVELS, setup_logging
from ._names import (
    DEFAULT_MAX_COMPILED_SIGNATURES,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_LEAVES,
    DEFAULT_MAX_RESIDUAL_BYTES,
    DEFAULT_SPIN_US,
    TOKEN_ENV,
    TRANSPORTS,
)
from ._version import __version__
from .errors import AuthenticationError, FunctionNotFoundError, InteropError, UntrustedSocketError

log = logging.getLogger("torch_jax_interop.cli")

# What the client finds only once it runs, yet is the command line's mistake: exit 2 as
# well (a socket path that is missing or not private, a function the worker does not serve,
# a wrong token). Any other of the project's errors (a worker that does not answer, a
# remote function that raised) exits 1, also on one line.
_USAGE_ERRORS_AT_RUN_TIME: tuple[type[Exception], ...] = (
    UntrustedSocketError, FunctionNotFoundError, AuthenticationError)

PROG = "torch-jax-interop"

_DESCRIPTION = """\
PyTorch and JAX on the same tensors. A worker serves JAX functions over gRPC; a torch
trainer calls them with tensors in shared memory (or CUDA IPC, or inline bytes).

Exit status: 0 done, 1 the work failed, 2 a usage error (one `error:` line on stderr;
--debug shows the traceback)."""


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--log-level``, ``--log-format`` and ``--debug``, accepted before and after the
    subcommand (the subcommand's copies default to SUPPRESS, so they override only when
    given)."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    said = "" if top else " (default: %s)"  # SUPPRESS hides the default from the formatter
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", choices=LOG_LEVELS, default=default("info"),
                       help="least severe log records shown" + (said and said % "info"))
    group.add_argument("--log-format", choices=LOG_FORMATS, default=default("text"),
                       help="text: time, level, logger, pid, message; json: one JSON object "
                            "per line with those fields" + (said and said % "text"))
    group.add_argument("--debug", action="store_true", default=default(False),
                       help="show the traceback of errors and log at debug level (the same "
                            "as --log-level debug)")


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The options every worker of ``worker --ranks N`` gets (all but ``--listen``,
    ``--ready-file`` and the rank options, which the launcher sets per worker; Note [Worker
    processes inherit the log settings] in ``_logging.py``)."""
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
    argv += ["--max-frame-bytes", str(args.max_frame_bytes), "--spin-us", str(args.spin_us)]
    argv += ["--max-connections", str(args.max_connections),
             "--handshake-timeout", str(args.handshake_timeout),
             "--idle-timeout", str(args.idle_timeout),
             "--max-streams-per-connection", str(args.max_streams_per_connection)]
    for flag, value in (("--token-file", args.token_file), ("--tls-cert", args.tls_cert),
                        ("--tls-key", args.tls_key), ("--tls-client-ca", args.tls_client_ca),
                        ("--metrics-listen", args.metrics_listen)):
        if value is not None:
            argv += [flag, value]
    if args.app_dir is not None:  # the workers run in this directory, but say it absolutely
        argv += ["--app-dir", os.path.abspath(args.app_dir)]
    if args.insecure:
        argv.append("--insecure")
    argv += ["--log-level", args.log_level, "--log-format", args.log_format]
    if args.debug:
        argv.append("--debug")
    return argv


def _worker_tls(args: argparse.Namespace) -> Any:
    """The worker's TLS settings from its flags (a ``TlsConfig`` or None)."""
    from ._tls import TlsConfig

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key: client "
                             "certificates are checked only on a TLS listener")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise UsageError("give --tls-cert and --tls-key together (the worker's certificate "
                         "and its private key, PEM files)")
    return TlsConfig(ca_file=args.tls_client_ca, cert_file=args.tls_cert, key_file=args.tls_key)


def _worker_addresses(args: argparse.Namespace) -> list[str]:
    """Every address some worker will bind (all ranks' with ``--ranks``), checked."""
    from ._ranks import is_rank_template, local_rank_addresses, rank_address

    try:
        if args.ranks is not None:
            concrete = [a for t in args.listen for a in local_rank_addresses(t, args.ranks)]
        else:
            listen = args.listen
            if args.local_rank is not None:
                listen = [rank_address(t, local_rank=args.local_rank) for t in listen]
            templates = [t for t in listen if is_rank_template(t)]
            if templates:
                raise UsageError(
                    f"`{templates[0]}` is an address template: give --ranks N to start a "
                    "worker per local rank, or --local-rank I for one of them")
            args.listen = concrete = listen
    except ValueError as error:
        raise UsageError(str(error)) from None
    for address in concrete:
        check_listen_address(address)
    return concrete


def _metrics_listen(args: argparse.Namespace) -> None:
    """Check ``--metrics-listen`` (every rank's, with ``--ranks``) before anything starts."""
    if args.metrics_listen is None:
        return
    from ._ranks import local_rank_addresses, rank_address

    require("--metrics-listen", "server", "prometheus_client")
    try:
        if args.ranks is not None and "{" not in args.metrics_listen:
            filled = [args.metrics_listen] * args.ranks  # the same port: fine only if 0
        elif args.ranks is not None:
            filled = local_rank_addresses(args.metrics_listen, args.ranks)
        else:
            filled = [rank_address(args.metrics_listen, local_rank=args.local_rank)]
    except ValueError as error:
        raise UsageError(f"--metrics-listen: {error}") from None
    ports = [parse_metrics_listen(address)[1] for address in filled]
    if len(set(ports)) < len(ports) and 0 not in ports:
        raise UsageError("every worker of --ranks N needs its own metrics port: write e.g. "
                         "--metrics-listen 127.0.0.1:910{local_rank}, or port 0")
    if args.ranks is None:
        args.metrics_listen = filled[0]


def _worker_token(args: argparse.Namespace, addresses: list[str]) -> str | None:
    from ._tls import is_tcp, read_token_file

    if args.token_file is not None:
        try:
            token: str | None = read_token_file(args.token_file)
        except ValueError as error:
            raise UsageError(f"--token-file: {error}") from None
    else:
        token = os.environ.get(args.token_env) if args.token_env else None
    tcp = [a for a in addresses if is_tcp(a)]
    if tcp and not token:
        raise UsageError(
            f"a TCP listener (`{tcp[0]}`) needs a token and ${args.token_env} is unset or "
            f"empty; set it (or name another variable with --token-env, or give "
            "--token-file PATH), or listen on a unix:// socket for a local worker")
    return token


def _worker(args: argparse.Namespace) -> int:
    from ._tls import check_listen_security

    if not args.function:
        raise UsageError("give at least one --function NAME=package.module:attr, e.g. "
                         "--function mlp=torch_jax_interop.examples.mlp:apply")
    if args.ranks is None:
        require("worker", "server", "jax", "grpc", "google.protobuf", "grpc_health")
    else:  # the launcher imports neither framework; its workers import JAX
        require("worker --ranks", "server", "jax", "grpc", "grpc_health")
    addresses = _worker_addresses(args)
    tls = _worker_tls(args)
    try:
        check_listen_security(addresses, tls=tls is not None, insecure=args.insecure)
        if tls is not None:
            tls.server_credentials()  # reads the files: a wrong path is a usage error
    except ValueError as error:
        raise UsageError(str(error)) from None
    token = _worker_token(args, addresses)
    _metrics_listen(args)
    from .transport._shm import SHM_DIR_ENV, default_shm_dir

    check_directory(args.shm_dir or default_shm_dir(),
                    "--shm-dir" if args.shm_dir else f"${SHM_DIR_ENV}",
                    "the shared-memory directory the clients create their regions in "
                    "(/dev/shm unless they set another)")
    check_output_file(args.ready_file, "--ready-file")
    add_import_paths(args.app_dir)
    if args.ranks is not None:
        check_function_specs(args.function)
        from ._launch import serve_ranks  # starts processes; imports no framework

        return serve_ranks(args.listen, args.ranks, _worker_argv(args),
                           ready_file=args.ready_file, grace=args.grace)

    load_functions(args.function)  # imports the targets (and so JAX): user errors exit 2
    # the worker gets the specs, so each function's `target` reaches FunctionInfo
    functions = {name: f"{module}:{attr}"
                 for name, module, attr in map(split_function_spec, args.function)}
    from .server import ConnectionLimits, WorkerConfig, create_server
    from .server._server import run_until_stopped

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
        metrics_listen=args.metrics_listen,
        fast_path=not args.no_fast_path,
        max_frame_bytes=args.max_frame_bytes,
        spin_us=args.spin_us,
    )
    limits = ConnectionLimits(max_connections=args.max_connections,
                              handshake_timeout=args.handshake_timeout,
                              idle_timeout=args.idle_timeout,
                              max_streams_per_connection=args.max_streams_per_connection)
    try:
        server, bound, servicer = create_server(
            functions, args.listen, token=token, config=config, tls=tls,
            insecure=args.insecure, connection_limits=limits)
    except (ValueError, UntrustedSocketError) as error:
        raise UsageError(str(error)) from error
    except OSError as error:  # an address in use, a port we may not bind
        if error.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            raise
        raise UsageError(f"{error.strerror or error}; stop what listens there or choose "
                         "another address") from error
    return run_until_stopped(server, bound, servicer, ready_file=args.ready_file,
                             grace=args.grace)


def _health(args: argparse.Namespace) -> int:
    require("health", "client", "grpc", "grpc_health")
    import grpc

    from ._health import check_health  # grpc only: no torch, no JAX (cheap, frequent probes)
    from ._ranks import is_rank_template, local_rank_addresses
    from ._tls import TlsConfig

    try:
        if args.ranks is None and is_rank_template(args.address):
            raise UsageError(f"`{args.address}` is an address template: give --ranks N to "
                             "check the workers of local ranks 0..N-1")
        addresses = ([args.address] if args.ranks is None
                     else local_rank_addresses(args.address, args.ranks))
    except ValueError as error:
        raise UsageError(str(error)) from None
    for address in addresses:
        check_connect_address(address)
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        try:
            tls = TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert,
                            key_file=args.tls_key, server_name=args.tls_server_name)
            tls.channel_credentials()  # reads the files: a wrong path exits with 2
        except ValueError as error:
            raise UsageError(str(error).replace("cert_file and key_file",
                                                "--tls-cert and --tls-key")) from None
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
    require("train", "client", "torch", "grpc", "grpc_health")
    check_connect_address(args.address, "--address")
    from .demo import train_remote

    return train_remote(args.address, steps=args.steps, transport=args.transport,
                        function=args.function, timeout=args.timeout)


def _demo(args: argparse.Namespace) -> int:
    require("demo", "server,client", "torch", "jax", "grpc", "grpc_health")
    from .demo import run_local_demo

    return run_local_demo(steps=args.steps, transport=args.transport)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (help shows each option's default)."""
    parser = CliParser(prog=PROG, description=_DESCRIPTION, formatter_class=CliHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, helptext: str, description: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=helptext, description=description,
                             formatter_class=CliHelpFormatter)
        # Also here: `python -m torch_jax_interop.server --version` is `worker --version`.
        cmd.add_argument("--version", action="version", version=f"{PROG} {__version__}")
        _add_common(cmd, top=False)
        return cmd

    worker = command("worker", "serve JAX functions over gRPC",
                     "Serve JAX functions over gRPC (imports JAX, never torch).\nSizes accept "
                     "units: 64MiB, 1G (powers of 1024), or plain bytes.")
    worker.add_argument("--listen", action="append", required=True, metavar="ADDRESS",
                        help="unix:///path/worker.sock or HOST:PORT (repeatable); with --ranks "
                             "or --local-rank a template such as "
                             "unix:///run/tji/worker-{local_rank}.sock")
    ranks = worker.add_mutually_exclusive_group()
    ranks.add_argument("--ranks", type=positive_int, default=None, metavar="N",
                       help="start N worker processes, one per local rank (0..N-1), each on "
                            "--listen filled with its {local_rank}; SIGTERM stops them all")
    ranks.add_argument("--local-rank", type=non_negative_int, default=None, metavar="I",
                       help="serve as the worker of local rank I: fill {local_rank} in --listen")
    worker.add_argument("--function", action="append", default=[], metavar="NAME=MODULE:ATTR",
                        help="serve this JAX function under NAME (repeatable), e.g. "
                             "mlp=torch_jax_interop.examples.mlp:apply; MODULE is found in "
                             "--app-dir, the current directory, then the installed packages")
    worker.add_argument("--app-dir", default=None, metavar="DIR",
                        help="look for the modules of --function in DIR first")
    worker.add_argument("--token-env", default=TOKEN_ENV, metavar="VAR",
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
    worker.add_argument("--metrics-listen", default=None, metavar="HOST:PORT",
                        help="serve Prometheus metrics over plain HTTP at http://HOST:PORT/"
                             "metrics (port 0 picks one; with --ranks a template such as "
                             "127.0.0.1:910{local_rank}); off unless given. No token, no TLS: "
                             "bind a loopback or private address")
    worker.add_argument("--max-connections", type=positive_int, default=256, metavar="N",
                        help="connections each listener accepts at once; more are closed at "
                             "once (bounds descriptors an idle flood can take)")
    worker.add_argument("--handshake-timeout", type=positive_seconds, default=10.0,
                        metavar="SECONDS",
                        help="a connection must finish its TLS/HTTP2 handshake within this")
    worker.add_argument("--idle-timeout", type=positive_seconds, default=300.0,
                        metavar="SECONDS",
                        help="close a connection after this long without a call")
    worker.add_argument("--max-streams-per-connection", type=positive_int, default=128,
                        metavar="N", help="calls one connection may have in flight at once")
    worker.add_argument("--shm-dir", default=None, metavar="DIR",
                        help="shared-memory directory (default $TORCH_JAX_INTEROP_SHM_DIR "
                             "or /dev/shm)")
    worker.add_argument("--allow-unsealed-regions", action="store_true",
                        help="also map shared-memory files that are not sealed memfds (clients "
                             "in another PID namespace); a local peer of this user could then "
                             "shrink one and kill the worker with SIGBUS")
    worker.add_argument("--no-fast-path", action="store_true",
                        help="serve calls over gRPC only: offer no same-host data plane "
                             "(a private unix socket; docs/same-host.md)")
    worker.add_argument("--max-frame-bytes", type=parse_size,
                        default=format_size(DEFAULT_MAX_FRAME_BYTES), metavar="SIZE",
                        help="largest request frame read on the same-host data plane; a "
                             "peer announcing more is cut off (RESOURCE_EXHAUSTED)")
    worker.add_argument("--spin-us", type=spin_microseconds, default=DEFAULT_SPIN_US,
                        metavar="US",
                        help="on the data plane, how long a session's thread polls for its "
                             "next request before sleeping (a wake-up costs tens of "
                             "microseconds; 0: sleep at once, saving CPU)")
    worker.add_argument("--max-sessions", type=positive_int, default=64, metavar="N",
                        help="client sessions served at once; more are refused "
                             "(RESOURCE_EXHAUSTED)")
    worker.add_argument("--max-residuals", type=positive_int, default=1024, metavar="N",
                        help="vjp residuals kept per session before the oldest are dropped")
    worker.add_argument("--max-residual-bytes", type=parse_size,
                        default=format_size(DEFAULT_MAX_RESIDUAL_BYTES), metavar="SIZE",
                        help="bytes of vjp residuals kept per session; past it the oldest "
                             "are dropped, and a call whose residuals alone exceed it is "
                             "refused (RESOURCE_EXHAUSTED)")
    worker.add_argument("--max-tensor-bytes", type=parse_size, default=format_size(4 << 30),
                        metavar="SIZE", help="bytes of one tensor a request may describe")
    worker.add_argument("--max-inline-bytes", type=parse_size, default=format_size(64 << 20),
                        metavar="SIZE",
                        help="inline tensor bytes per request (the sum over its tensors) "
                             "and per output")
    worker.add_argument("--max-leaves", type=positive_int, default=DEFAULT_MAX_LEAVES,
                        metavar="N",
                        help="tensors per request (arguments, or cotangents), checked "
                             "before anything is decoded or compiled")
    worker.add_argument("--max-compiled-signatures", type=positive_int,
                        default=DEFAULT_MAX_COMPILED_SIGNATURES, metavar="N",
                        help="compiled input signatures kept per served function (least "
                             "recently used dropped)")
    worker.add_argument("--ready-file", default=None, metavar="PATH",
                        help="write {addresses, pid, metrics} as JSON here once serving (with "
                             "--ranks: once every worker serves)")
    worker.add_argument("--grace", type=non_negative_seconds, default=30.0, metavar="SECONDS",
                        help="seconds in-flight calls get to finish on SIGTERM")
    worker.set_defaults(run=_worker)

    health = command("health", "standard gRPC health check; exit 0 when SERVING",
                     "Ask a worker whether it serves (the standard gRPC health service; no\n"
                     "token needed). Exit 0 when SERVING, 1 otherwise. Imports neither "
                     "framework.")
    health.add_argument("address", metavar="ADDRESS",
                        help="the worker: unix:///path/worker.sock or HOST:PORT")
    health.add_argument("--ranks", type=positive_int, default=None, metavar="N",
                        help="ADDRESS is a template: check the workers of local ranks 0..N-1")
    health.add_argument("--timeout", type=positive_seconds, default=5.0, metavar="SECONDS",
                        help="give up on a worker after this long")
    health.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="check a TLS worker: the CA that signed its certificate")
    health.add_argument("--tls-cert", default=None, metavar="PEM",
                        help="client certificate, for a worker that requires one (mTLS)")
    health.add_argument("--tls-key", default=None, metavar="PEM", help="key of --tls-cert")
    health.add_argument("--tls-server-name", default=None, metavar="NAME",
                        help="the name the worker's certificate is checked against")
    health.set_defaults(run=_health)

    transports = ", ".join(TRANSPORTS)
    for name, helptext, run in (("train", "train the demo torch model against a worker",
                                 _train),
                                ("demo", "start a local worker and train against it", _demo)):
        cmd = command(name, helptext, f"{helptext[0].upper()}{helptext[1:]}.")
        if name == "train":
            cmd.add_argument("--address", required=True, metavar="ADDRESS",
                             help="the worker: unix:///path/worker.sock or HOST:PORT")
            cmd.add_argument("--function", default="mlp", metavar="NAME",
                             help="the served function to train")
            cmd.add_argument("--timeout", type=positive_seconds, default=60.0,
                             metavar="SECONDS", help="deadline of each call")
        cmd.add_argument("--steps", type=positive_int, default=200, metavar="N",
                         help="training steps")
        cmd.add_argument("--transport", default="auto", choices=TRANSPORTS, metavar="NAME",
                         help=f"how tensors travel: one of {transports}")
        cmd.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``argv``: ``sys.argv[1:]`` by default); the exit status (Note
    [Exit statuses of the command line])."""
    args = build_parser().parse_args(argv)
    debug = args.debug or args.log_level == "debug"
    if debug:
        args.debug, args.log_level = True, "debug"
    setup_logging(args.log_level, args.log_format)
    try:
        return int(args.run(args))
    except (UsageError, InteropError) as error:  # _USAGE_ERRORS_AT_RUN_TIME are InteropErrors
        if debug:
            traceback.print_exception(error)
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(error, (UsageError, *_USAGE_ERRORS_AT_RUN_TIME)) else 1
    except KeyboardInterrupt:  # Ctrl-C before a worker installed its own handler
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
