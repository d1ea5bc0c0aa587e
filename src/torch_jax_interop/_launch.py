"""Start one JAX worker process per local rank, and stop them all cleanly.

What ``torch-jax-interop worker --ranks N`` runs, and what tests and benchmarks use to get N
workers. Each worker is an ordinary ``python -m torch_jax_interop.server`` process bound to
the address template filled for its local rank (``_ranks.local_rank_addresses``), so the
trainer's ranks find theirs with the same template (``connect()`` fills it from the
variables ``torchrun`` sets).

This module imports neither framework and never the server: it starts processes by command
line, so it runs as well inside a torch process (a test, a benchmark) as in the CLI.

Note [Stopping a worker group]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A worker installs its SIGTERM handler (drain in-flight calls, end the sessions, remove its
socket, exit 0) before it writes its ready file, so the group waits for every ready file
before it reports the workers up, and ``stop()`` sends SIGTERM, waits ``stop_timeout``
seconds, then SIGKILLs what is left and reaps it. Nothing under ``/dev/shm`` depends on a
clean stop: the trainers own every region (Note [Shared memory ownership] in
``transport/_shm.py``). The workers run in the launcher's process group, so a Ctrl-C in a
terminal reaches all of them, and ``kill -- -PGID`` stops a group whose launcher was
SIGKILLed; with ``kill_with_parent=True`` (what the CLI sets) each worker also gets SIGTERM
from the kernel when the launcher dies (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._ranks import local_rank_addresses

log = logging.getLogger("torch_jax_interop.launch")

WORKER_MODULE = "torch_jax_interop.server"
"""``python -m WORKER_MODULE ...`` is ``torch-jax-interop worker ...`` (JAX only, no torch)."""


STOP_MARGIN_S = 5.0
"""Seconds the launcher waits past the workers' ``--grace`` before it SIGKILLs them."""


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when its parent dies, or None
    where that is not available. libc is loaded here, before the fork, so the child only
    makes one system call between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return set_signal


class WorkerGroup:
    """``ranks`` worker processes, one per local rank, from one address template.

    ``with WorkerGroup("unix:///tmp/tji/worker-{local_rank}.sock", 2, ["--function",
    "mlp=torch_jax_interop.examples.mlp:apply"]) as group: ...`` starts both workers, waits
    until both serve, and stops both on exit (Note [Stopping a worker group]).

    Args:
        listen: an address template, or several (each worker binds every one of them,
            filled for its rank). ``{local_rank}`` tells the workers apart.
        ranks: how many workers (local ranks ``0 .. ranks-1``).
        worker_args: further ``torch-jax-interop worker`` options, the same for every
            worker (``--function``, ``--grace``, limits, ...) but for ``{local_rank}``,
            filled per worker (``--metrics-listen 127.0.0.1:910{local_rank}``).
        env: the workers' environment (default: this process's).
        start_timeout: seconds every worker gets to import JAX and serve.
        stop_timeout: seconds the workers get to drain after SIGTERM before SIGKILL.
        stdout: where the workers' output goes (a file object, or None to inherit).
        kill_with_parent: make the kernel SIGTERM each worker when this process dies. Uses
            a ``preexec_fn``, which Python documents as unsafe when other threads run: the
            CLI sets it, a library caller (a torch process has threads) should not.

    Raises (from ``start``):
        ValueError: a bad template for this number of ranks (``local_rank_addresses``).
        RuntimeError: a worker exited before it served (its exit code in the message).
        TimeoutError: a worker did not serve within ``start_timeout``.
    """

    def __init__(
        self,
        listen: str | Sequence[str],
        ranks: int,
        worker_args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 40.0,
        stdout: Any = None,
        kill_with_parent: bool = False,
    ) -> None:
        templates = [listen] if isinstance(listen, str) else list(listen)
        if not templates:
            raise ValueError("give at least one address template to listen on")
        per_template = [local_rank_addresses(t, ranks) for t in templates]
        self.ranks = ranks
        self.addresses: list[list[str]] = [list(a) for a in zip(*per_template, strict=True)]
        """Per local rank, the addresses its worker binds (as given; see ``bound``)."""
        self.bound: list[list[str]] = []
        """Per local rank, the addresses its worker reported once serving (a TCP port 0
        becomes the port it got)."""
        self.worker_args = list(worker_args)
        self.env = dict(os.environ if env is None else env)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.stdout = stdout
        self.kill_with_parent = kill_with_parent
        self.processes: list[subprocess.Popen[bytes]] = []
        self._ready_dir: str | None = None

    def argv(self, local_rank: int, ready_file: str) -> list[str]:
        """The command line of one rank's worker."""
        listen = [arg for address in self.addresses[local_rank] for arg in ("--listen", address)]
        worker_args = [arg.replace("{local_rank}", str(local_rank)) for arg in self.worker_args]
        return [sys.executable, "-m", WORKER_MODULE, *listen, "--ready-file", ready_file,
                *worker_args]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def start(self, cancel: threading.Event | None = None) -> WorkerGroup:
        """Start every worker at once and wait until all of them serve; a ``cancel`` event
        set meanwhile stops them and raises ``RuntimeError``."""
        if self.processes:
            raise RuntimeError("this WorkerGroup was started already")
        self._ready_dir = tempfile.mkdtemp(prefix="tji-ranks-")
        preexec = _parent_death_signal() if self.kill_with_parent else None
        ready_files = [os.path.join(self._ready_dir, f"worker-{i}.json") for i in range(self.ranks)]
        try:
            for rank, ready in enumerate(ready_files):
                self.processes.append(subprocess.Popen(
                    self.argv(rank, ready), env=self.env, stdin=subprocess.DEVNULL,
                    stdout=self.stdout, stderr=subprocess.STDOUT if self.stdout else None,
                    preexec_fn=preexec,
                ))
            self.bound = self._wait_ready(ready_files, cancel)
        except BaseException:
            self.stop()
            raise
        # Read: gone at once, so that not even a SIGKILL of this process leaves them.
        shutil.rmtree(self._ready_dir, ignore_errors=True)
        self._ready_dir = None
        for rank, (process, bound) in enumerate(zip(self.processes, self.bound, strict=True)):
            log.info("worker for local rank %d (pid %d) serves %s", rank, process.pid,
                     ", ".join(bound))
        return self

    def _wait_ready(self, ready_files: list[str],
                    cancel: threading.Event | None) -> list[list[str]]:
        deadline = time.monotonic() + self.start_timeout
        bound: dict[int, list[str]] = {}
        while len(bound) < self.ranks:
            if cancel is not None and cancel.is_set():
                raise RuntimeError("the workers were stopped before all of them served")
            for rank, ready in enumerate(ready_files):
                if rank in bound:
                    continue
                if os.path.exists(ready):
                    with open(ready) as f:
                        bound[rank] = list(json.load(f)["addresses"])
                    continue
                code = self.processes[rank].poll()
                if code is not None:
                    raise RuntimeError(
                        f"the worker for local rank {rank} "
                        f"({', '.join(self.addresses[rank])}) exited with code {code} before "
                        "it served; its output says why (a bad --function, an address in use, "
                        "a directory that does not exist)"
                    )
            if len(bound) == self.ranks:
                break
            if time.monotonic() > deadline:
                waiting = sorted(set(range(self.ranks)) - set(bound))
                raise TimeoutError(
                    f"the workers for local ranks {waiting} did not serve within "
                    f"{self.start_timeout:.0f} s (importing JAX on a busy machine can take "
                    "long: raise start_timeout)"
                )
            time.sleep(0.05)
        return [bound[rank] for rank in range(self.ranks)]

    def exited(self) -> list[tuple[int, int]]:
        """``(local rank, exit code)`` of every worker that has exited."""
        return [(rank, code) for rank, p in enumerate(self.processes)
                if (code := p.poll()) is not None]

    def stop(self, timeout: float | None = None) -> list[int | None]:
        """SIGTERM every worker, SIGKILL those still running after ``timeout`` seconds
        (default ``stop_timeout``), reap them; their exit codes (0 after a clean drain)."""
        timeout = self.stop_timeout if timeout is None else timeout
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for rank, process in enumerate(self.processes):
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker for local rank %d (pid %d) ignored SIGTERM for %.0f s: "
                            "killing it", rank, process.pid, timeout)
                process.kill()
                process.wait()
        if self._ready_dir is not None:
            shutil.rmtree(self._ready_dir, ignore_errors=True)
            self._ready_dir = None
        return [p.returncode for p in self.processes]

    def __enter__(self) -> WorkerGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_ranks(
    listen: Sequence[str],
    ranks: int,
    worker_args: Sequence[str],
    *,
    ready_file: str | None = None,
    grace: float = 30.0,
    start_timeout: float = 300.0,
) -> int:
    """Run ``ranks`` workers until SIGTERM / SIGINT, then stop them; what the CLI runs.

    Returns 0 when every worker drained and exited 0. When a worker exits on its own, the
    others are stopped and the return code is 1: an orchestrator's restart policy then
    restarts the whole group, whose trainers' sessions are lost anyway. ``ready_file``
    gets ``{"addresses": [first address of each rank], "workers": [{"local_rank",
    "pid", "addresses"}], "pid"}`` as JSON once every worker serves.
    """
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    # A worker drains for up to `grace` seconds; the group waits a little longer (and an
    # orchestrator's stop timeout should be longer still: compose's stop_grace_period).
    group = WorkerGroup(listen, ranks, worker_args, start_timeout=start_timeout,
                        stop_timeout=grace + STOP_MARGIN_S, kill_with_parent=True)
    try:
        try:
            group.start(cancel=stop)
        except (RuntimeError, TimeoutError) as error:
            if stop.is_set():  # stopped while starting: not a failure
                return 0
            log.error("%s", error)
            return 1
        if ready_file:
            document = {
                "addresses": [bound[0] for bound in group.bound],
                "workers": [{"local_rank": rank, "pid": pid, "addresses": bound}
                            for rank, (pid, bound) in enumerate(zip(group.pids, group.bound,
                                                                    strict=True))],
                "pid": os.getpid(),
            }
            tmp = f"{ready_file}.tmp"
            with open(tmp, "w") as f:
                json.dump(document, f)
            os.replace(tmp, ready_file)
        failed: list[tuple[int, int]] = []
        while not stop.wait(0.5):
            failed = group.exited()
            if failed:
                break
        if failed:
            for rank, code in failed:
                log.error("the worker for local rank %d exited with code %d; stopping the "
                          "other workers", rank, code)
        else:
            log.info("signal %s received: stopping %d workers", received[0], ranks)
        codes = group.stop()
        if failed:
            return 1
        bad = {rank: code for rank, code in enumerate(codes) if code != 0}
        if bad:
            log.error("workers exited with codes %s (local rank: code)", bad)
            return 1
        log.info("all %d workers stopped", ranks)
        return 0
    finally:
        group.stop()
        if ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ready_file)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


__all__ = ["STOP_MARGIN_S", "WORKER_MODULE", "WorkerGroup", "serve_ranks"]
