"""Group `remote`: service mode against one memcpy, a bare gRPC echo and the floors of one
round trip between two Python processes (an eventfd and a unix socketpair ping-pong).

Variants: ``fast path`` (the same-host data plane, shared memory; Note [Same-host data
plane] in transport/_data_plane.py), ``fast path, pool input`` (its input allocated in the
session's pool with ``worker.empty``: no copy on the way in), ``shm`` and ``inline`` (calls
over gRPC), ``auto`` (what ``connect`` picks: the fast path here) and ``inproc``.

Starts its own JAX worker and echo server as subprocesses on unix sockets in a short
temporary directory, and stops both when the group ends (or fails). Checks that no
``/dev/shm/tji-*`` segment it made outlives it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _models
from ._processes import ServerProcess, shm_segments
from ._suite import ERROR, OVER_LIMIT, Record, Suite, Target
from ._timing import TimingConfig

GROUP = "remote"
ROUND_TRIP = "identity round trip"
SMALL = "small call, 16 floats"
MLP = "MLP 784-256-10 train step, batch 256"
MEMCPY = "memcpy (np.copyto)"
# The same copy between two shared anonymous mappings, the kind of memory the pool and the
# arena are: what a round trip whose input is already in the pool copies at least, once.
MEMCPY_SHARED = "memcpy between shared mappings (np.copyto, shared-memory pages)"
ECHO = "bare gRPC echo"
LIBRARY = "library mode (WrappedJaxFunction)"
KIB, MIB = 2**10, 2**20
SIZES = (4 * KIB, 64 * KIB, 1 * MIB, 16 * MIB, 64 * MIB, 256 * MIB)
QUICK_SIZES = (4 * KIB, 1 * MIB)
FAST = "fast path"
FAST_POOL = "fast path, pool input"
FAST_POOL_MLP = "fast path, parameters and batch in the pool"
TRANSPORTS = ("inproc", FAST, "shm", "inline")  # variants, in plot order
EVENTFD = "floor: eventfd ping-pong"
SOCKETPAIR = "floor: unix socketpair ping-pong"
FLOORS = (EVENTFD, SOCKETPAIR)
TARGET_SIZE = 64 * MIB
BLOCKS = 4  # small call and MLP step: variants take turns by blocks of samples
FUNCTIONS = {"identity": "benchmarks._models:identity", "mlp": "benchmarks._models:mlp_apply"}


class RemoteState:
    """Servers and connections shared by the group's cases; ``close()`` stops everything."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.workers: dict[str, Any] = {}  # variant name -> connected client
        self.errors: dict[str, str] = {}  # variant name -> why it has no connection
        self.echo: Any = None
        self.shm_before: set[str] = shm_segments()
        self.directory: Path | None = None

    def close(self) -> None:
        self.stack.close()


def tasks(suite: Suite) -> list[tuple[str, Callable[[], None]]]:
    state = RemoteState()
    suite.resources.callback(state.close)  # a failure in any task still stops the servers
    try:
        from torch_jax_interop.client import connect
    except ImportError as error:
        connect = None
        state.errors = {
            variant: f"skipped: the service client is not available yet ({error})"
            for variant in (*TRANSPORTS, "auto")
        }

    sizes = QUICK_SIZES if suite.quick else SIZES
    work: list[tuple[str, Callable[[], None]]] = [
        ("remote: start servers", lambda: start(suite, state, connect))
    ]
    for size in sizes:
        work.append(
            (f"remote round trip {_size_label(size)}", _bind(round_trip, suite, state, size))
        )
    work.append(("remote small call", lambda: small_call(suite, state)))
    work.append(("remote MLP train step", lambda: mlp_step(suite, state)))
    work.append(("remote: stop servers", lambda: stop(suite, state)))
    return work


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)


def _size_label(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"


def start(suite: Suite, state: RemoteState, connect: Any) -> None:
    directory = Path(tempfile.mkdtemp(prefix="tjib-", dir="/tmp"))  # socket paths <= 107 B
    state.directory = directory
    state.stack.callback(shutil.rmtree, directory, True)

    echo_server = ServerProcess(
        "benchmarks._grpc_echo",
        ["--listen", f"unix://{directory}/echo.sock"],
        directory / "echo.ready",
        directory / "echo.log",
    )
    state.stack.enter_context(echo_server)
    from ._grpc_echo import EchoClient

    state.echo = state.stack.enter_context(EchoClient(f"unix://{directory}/echo.sock"))

    if connect is None:
        return
    functions: list[str] = []
    for name, target in FUNCTIONS.items():
        functions += ["--function", f"{name}={target}"]
    address = f"unix://{directory}/w.sock"
    worker = ServerProcess(
        "torch_jax_interop.server",
        ["--listen", address, "--grace", "2", *functions],
        directory / "worker.ready",
        directory / "worker.log",
    )
    try:
        state.stack.enter_context(worker)
    except Exception as error:
        for variant in (*TRANSPORTS, "auto"):
            state.errors[variant] = f"error: the worker did not start: {error}"[:400]
        return
    # the worker must be gone before the shm check (registered first, so it runs last)
    state.stack.callback(_check_cleanup, suite, state, worker)

    local_functions = {"identity": _models.identity, "mlp": _models.mlp_apply}
    attempts: dict[str, Callable[[], Any]] = {
        "inproc": lambda: connect("inproc", functions=local_functions),
        FAST: lambda: connect(address, timeout=60.0, transport="shm", data_plane="unix_socket"),
        "shm": lambda: connect(address, timeout=60.0, transport="shm", data_plane="grpc"),
        "inline": lambda: connect(address, timeout=60.0, transport="inline", data_plane="grpc"),
        "auto": lambda: connect(address, timeout=60.0),
    }
    for variant, open_connection in attempts.items():
        try:
            state.workers[variant] = state.stack.enter_context(open_connection())
        except Exception as error:
            state.errors[variant] = f"error: connect failed: {type(error).__name__}: {error}"[:400]
    auto = state.workers.get("auto")
    suite.extra.setdefault(GROUP, {})["auto_transport"] = getattr(auto, "transport", None)
    info = getattr(auto, "transport_info", None)
    suite.extra[GROUP]["auto_calls"] = getattr(info, "calls", None)


def _check_cleanup(suite: Suite, state: RemoteState, worker: ServerProcess) -> None:
    facts = suite.extra.setdefault(GROUP, {})
    facts["worker_exit_code"] = worker.stop()
    left = sorted(shm_segments() - state.shm_before)
    facts["shm_segments_left"] = left  # other engineers' tests on this machine may add some
    if left:
        print(f"warning: /dev/shm segments left after the remote group: {left}")


def stop(suite: Suite, state: RemoteState) -> None:
    state.close()


def _is_over_limit(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(
        word in text for word in ("resourceexhausted", "resource_exhausted", "limit", "too large")
    )


def _remote_functions(
    suite: Suite, state: RemoteState, name: str, nbytes: int, case: str
) -> dict[str, Any]:
    """The connected transports' `name` functions; a record says why each missing one is."""
    functions = {}
    for variant in (*TRANSPORTS, "auto"):
        worker = state.workers.get(variant)
        if worker is None:
            if variant != "auto" or case == SMALL:
                note = state.errors.get(variant, "skipped: no connection")
                status = "skipped" if note.startswith("skipped") else ERROR
                suite.add(Record(GROUP, case, variant, nbytes, status=status, note=note))
            continue
        try:
            functions[variant] = worker.function(name)
        except Exception as error:
            suite.add(
                Record(
                    GROUP,
                    case,
                    variant,
                    nbytes,
                    status=ERROR,
                    note=f"{type(error).__name__}: {error}"[:300],
                )
            )
    return functions


def _first_call(
    suite: Suite,
    case: str,
    variant: str,
    nbytes: int,
    call: Callable[[], Any],
    expected: Any,
    group: str = GROUP,
) -> bool:
    """Call once: record an over-limit or failed transport instead of timing it."""
    import torch

    try:
        out = call()
    except Exception as error:
        status = OVER_LIMIT if _is_over_limit(error) else ERROR
        suite.add(
            Record(
                group,
                case,
                variant,
                nbytes,
                status=status,
                note=f"{type(error).__name__}: {error}"[:300],
            )
        )
        return False
    if expected is not None and not (isinstance(out, torch.Tensor) and torch.equal(out, expected)):
        suite.add(
            Record(
                group,
                case,
                variant,
                nbytes,
                status=ERROR,
                note=f"wrong result: {type(out).__name__}",
            )
        )
        return False
    return True


def _config_for(suite: Suite, nbytes: int) -> TimingConfig:
    if nbytes >= 64 * MIB and not suite.quick:  # ~0.2-1 s per echo: fewer rounds
        base = suite.config
        return TimingConfig(
            repeats=9, min_repeats=5, warmup=1, min_sample_s=base.min_sample_s, budget_s=20.0
        )
    return suite.config


def round_trip(suite: Suite, state: RemoteState, nbytes: int) -> None:
    import numpy as np
    import torch

    tensor = torch.randn(nbytes // 4)
    source = tensor.numpy()
    destination = np.empty_like(source)
    payload = source.tobytes()
    variants: dict[str, Callable[[], Any]] = {MEMCPY: lambda: np.copyto(destination, source)}
    if nbytes == TARGET_SIZE:
        variants[MEMCPY_SHARED] = _shared_memcpy(source)
    if state.echo is not None:
        echo = state.echo
        variants[ECHO] = lambda: echo(payload)
    for variant, function in _remote_functions(
        suite, state, "identity", nbytes, ROUND_TRIP
    ).items():
        if variant == "auto":
            continue
        if _first_call(suite, ROUND_TRIP, variant, nbytes, _bind1(function, tensor), tensor):
            variants[variant] = _bind1(function, tensor)
        if variant == FAST:
            pooled = state.workers[FAST].empty(tensor.shape, dtype=tensor.dtype)
            pooled.copy_(tensor)
            if _first_call(suite, ROUND_TRIP, FAST_POOL, nbytes, _bind1(function, pooled),
                           tensor):
                variants[FAST_POOL] = _bind1(function, pooled)
    suite.measure(
        GROUP,
        ROUND_TRIP,
        nbytes,
        variants,
        references=(MEMCPY, MEMCPY_SHARED, ECHO),
        config=_config_for(suite, nbytes),
    )
    if nbytes == TARGET_SIZE:
        suite.compare(
            GROUP,
            ROUND_TRIP,
            nbytes,
            "shm",
            "inline",
            Target("<=", 0.1, "service-mode issue", "shm ≥10× faster than inline"),
        )
        suite.compare(
            GROUP, ROUND_TRIP, nbytes, "shm", MEMCPY, Target("<=", 4.0, "service-mode issue")
        )
        suite.compare(GROUP, ROUND_TRIP, nbytes, FAST_POOL, MEMCPY,
                      Target("<=", 1.5, "issue 16", "input allocated in the pool"))
        suite.compare(GROUP, ROUND_TRIP, nbytes, FAST, MEMCPY)
        suite.compare(GROUP, ROUND_TRIP, nbytes, MEMCPY_SHARED, MEMCPY)
        suite.compare(GROUP, ROUND_TRIP, nbytes, FAST_POOL, MEMCPY_SHARED)


def _shared_memcpy(source: Any) -> Callable[[], Any]:
    """``np.copyto`` between two shared anonymous mappings (shmem, as the pool's regions),
    pre-faulted. Anonymous: nothing in /dev/shm; unmapped once the views are collected."""
    import mmap

    import numpy as np

    views = []
    for _ in range(2):
        mapping = mmap.mmap(-1, source.nbytes)  # MAP_SHARED | MAP_ANONYMOUS: shmem pages
        view = np.frombuffer(mapping, dtype=source.dtype, count=source.size)
        view[:] = source  # every page faulted in, as the pool's are
        views.append(view)
    shared_source, shared_destination = views
    return lambda: np.copyto(shared_destination, shared_source)


def _bind1(fn: Callable[[Any], Any], value: Any) -> Callable[[], Any]:
    return lambda: fn(value)


def small_call(suite: Suite, state: RemoteState) -> None:
    import torch

    tensor = torch.randn(16)
    nbytes = tensor.numel() * 4
    payload = tensor.numpy().tobytes()
    variants: dict[str, Callable[[], Any]] = {}
    if state.echo is not None:
        echo = state.echo
        variants[ECHO] = lambda: echo(payload)
    for variant, function in _remote_functions(suite, state, "identity", nbytes, SMALL).items():
        if _first_call(suite, SMALL, variant, nbytes, _bind1(function, tensor), tensor):
            variants[variant] = _bind1(function, tensor)
    variants.update(floors(suite, state, nbytes))
    # By blocks (Note [Spin, then sleep] in transport/_data_plane.py): each variant's calls
    # back to back, as a loop makes them. Interleaved sample by sample, every sample's first
    # call would find the worker's thread asleep after the other variants' calls.
    suite.measure(GROUP, SMALL, nbytes, variants, references=(ECHO, *FLOORS), blocks=BLOCKS)
    suite.compare(GROUP, SMALL, nbytes, FAST, ECHO, Target("<=", 0.25, "issue 16"))
    for floor in FLOORS:
        if floor in variants and FAST in variants:
            suite.compare(GROUP, SMALL, nbytes, FAST, floor)
    for variant in (*TRANSPORTS, "auto"):
        if variant in variants and variant != FAST:
            suite.compare(GROUP, SMALL, nbytes, variant, ECHO)


def mlp_step(suite: Suite, state: RemoteState) -> None:
    from ._autograd import make_torch_training_step, wrapped_jax_function

    x_np, _ = _models.mlp_batch()
    nbytes = x_np.nbytes
    try:
        wrapper_class = wrapped_jax_function()
    except ImportError as error:
        suite.skip(GROUP, MLP, f"skipped: {error}", variant=LIBRARY, nbytes=nbytes)
        return
    variants: dict[str, Callable[[], Any]] = {
        LIBRARY: make_torch_training_step(lambda params: wrapper_class(_models.mlp_apply, params))
    }
    for variant in ("auto", FAST, "shm", "inline"):
        worker = state.workers.get(variant)
        if worker is None:
            note = state.errors.get(variant, "skipped: no connection")
            suite.add(
                Record(
                    GROUP,
                    MLP,
                    variant,
                    nbytes,
                    status="skipped" if note.startswith("skipped") else ERROR,
                    note=note,
                )
            )
            continue
        try:
            step = make_torch_training_step(
                lambda params, w=worker: remote_module(w, "mlp", params)
            )
            step()
        except Exception as error:
            suite.add(
                Record(
                    GROUP,
                    MLP,
                    variant,
                    nbytes,
                    status=ERROR,
                    note=f"{type(error).__name__}: {error}"[:300],
                )
            )
            continue
        variants[variant] = step
    pooled = state.workers.get(FAST)
    if pooled is not None:
        try:
            step = pool_resident_training_step(pooled)
            step()
            variants[FAST_POOL_MLP] = step
        except Exception as error:
            suite.add(Record(GROUP, MLP, FAST_POOL_MLP, nbytes, status=ERROR,
                             note=f"{type(error).__name__}: {error}"[:300]))
    suite.measure(GROUP, MLP, nbytes, variants, references=(LIBRARY,), blocks=BLOCKS)
    suite.compare(GROUP, MLP, nbytes, "auto", LIBRARY, Target("<=", 1.25, "issue 16"))
    for variant in (FAST, FAST_POOL_MLP, "shm", "inline"):
        if variant in variants:
            suite.compare(GROUP, MLP, nbytes, variant, LIBRARY)


def pool_resident_training_step(worker: Any) -> Callable[[], None]:
    """The MLP step of ``make_torch_training_step`` with its parameters and its batch
    allocated in the session's pool (``worker.empty_like``, docs/same-host.md): the worker
    reads them in place, so a call copies nothing on the way in; the optimizer updates the
    parameters where they lie."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from ._autograd import wrapped_jax_function

    params = {}
    for key, value in jax.tree.map(jnp.asarray, _models.mlp_params()).items():
        host = torch.tensor(np.asarray(value))
        params[key] = worker.empty_like(host).copy_(host)
    module = wrapped_jax_function()(worker.function("mlp"), params)  # shares `params`
    optimizer = torch.optim.SGD(module.parameters(), lr=_models.LEARNING_RATE)
    x_np, y_np = _models.mlp_batch()
    x = torch.from_numpy(x_np)
    x_pool = worker.empty_like(x).copy_(x)
    y = torch.from_numpy(y_np).long()

    def step() -> None:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x_pool), y)
        loss.backward()
        optimizer.step()

    return step


def floors(suite: Suite, state: RemoteState, nbytes: int) -> dict[str, Callable[[], Any]]:
    """One round trip between this process and a child Python process that answers at
    once (``benchmarks/_pingpong.py``): an eventfd pair, and ``nbytes`` over a unix
    socketpair. Nothing a call across processes does can be cheaper. The children live
    until the group's servers stop."""
    import os
    import socket
    import subprocess
    import sys

    variants: dict[str, Callable[[], Any]] = {}

    def child(*args: str, fds: tuple[int, ...]) -> None:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks._pingpong", *args],
                                   pass_fds=fds)
        state.stack.callback(process.wait)
        state.stack.callback(process.kill)

    if hasattr(os, "eventfd"):
        ping, pong = os.eventfd(0), os.eventfd(0)
        state.stack.callback(os.close, ping)
        state.stack.callback(os.close, pong)
        child("eventfd", str(ping), str(pong), fds=(ping, pong))

        def eventfd_round_trip() -> None:
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)

        variants[EVENTFD] = eventfd_round_trip
    else:
        suite.skip(GROUP, SMALL, "skipped: os.eventfd needs Linux", EVENTFD, nbytes)
    mine, theirs = socket.socketpair()
    state.stack.callback(mine.close)
    child("socketpair", str(theirs.fileno()), str(nbytes), fds=(theirs.fileno(),))
    theirs.close()
    message, answer = b"x" * nbytes, bytearray(nbytes)

    def socketpair_round_trip() -> None:
        mine.sendall(message)
        mine.recv_into(answer, nbytes, socket.MSG_WAITALL)

    variants[SOCKETPAIR] = socketpair_round_trip
    for function in variants.values():
        function()  # the children answer
    return variants


def remote_module(worker: Any, name: str, jax_params: Any) -> Any:
    """``WrappedJaxFunction(worker.function(name), params)``: forward and backward run in
    the worker; the parameters are torch tensors in this process."""
    import numpy as np
    import torch

    from ._autograd import wrapped_jax_function

    params = {key: torch.tensor(np.asarray(value)) for key, value in jax_params.items()}
    return wrapped_jax_function()(worker.function(name), params)
