"""Server subprocesses the benchmarks start and always stop (a worker, the gRPC echo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """Start ``python -m <module> ... --ready-file F``, wait for F, and stop it on exit.

    ``with ServerProcess(...) as server:`` never leaves a process behind: SIGTERM first (the
    servers drain and unlink what they made), SIGKILL after ``stop_timeout`` seconds.
    """

    def __init__(
        self,
        module: str,
        args: list[str],
        ready_file: Path,
        log_file: Path,
        start_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = [sys.executable, "-m", module, *args, "--ready-file", str(ready_file)]
        self.ready_file = ready_file
        self.log_file = log_file
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.env = env or {}  # set for the server only (e.g. its XLA_FLAGS)

    def __enter__(self) -> ServerProcess:
        env = dict(os.environ)
        # the worker imports benchmark functions as `benchmarks._models:...`
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
        )
        env.setdefault("XLA_FLAGS", "")
        env.update(self.env)
        self.ready_file.unlink(missing_ok=True)  # a killed predecessor's file is not readiness
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=env,
            )
        deadline = time.monotonic() + self.start_timeout
        while not self.ready_file.exists():
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"`{' '.join(self.argv[1:4])}` exited with {self.process.returncode} before "
                    f"it was ready: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"no ready file after {self.start_timeout:.0f} s: {self.log_tail()}"
                )
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode

    def log_tail(self, chars: int = 600) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:].strip()
        except OSError:
            return "(no log)"


def shm_segments(prefix: str = "tji-") -> set[str]:
    try:
        return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}
    except FileNotFoundError:
        return set()
