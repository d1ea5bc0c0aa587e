"""The main job: a torch training loop whose middle layer is a JAX function in a worker.

``python -m torch_jax_interop.demo`` (what ``bash scripts/demo.sh`` runs) starts a worker on a
unix socket, trains against it with a progress bar, repeats the same training in-process
(same seed) and checks both give the same parameters, then stops the worker and checks that
no shared-memory segment is left. ``torch-jax-interop train --address ...`` runs only the
trainer (torch only: the docker trainer image has no JAX).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from ..client import connect

FUNCTION_SPEC = "torch_jax_interop.examples.mlp:apply"
IN, HIDDEN, MID, OUT = 8, 128, 64, 1
BATCH = 256  # activations of 256 x 128 float32 = 128 KiB: over the inline threshold


def init_params_torch(seed: int) -> dict[str, torch.Tensor]:
    """Parameters of the remote JAX MLP, made with torch (the trainer has no JAX)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(HIDDEN, 2 * HIDDEN, generator=g) / HIDDEN**0.5,
        "b1": torch.zeros(2 * HIDDEN),
        "w2": torch.randn(2 * HIDDEN, MID, generator=g) / (2 * HIDDEN) ** 0.5,
        "b2": torch.zeros(MID),
    }


def build_model(function: Any, seed: int) -> torch.nn.Module:
    from .._wrapped import WrappedJaxFunction

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN),
        WrappedJaxFunction(function, init_params_torch(seed)),
        torch.nn.Tanh(),
        torch.nn.Linear(MID, OUT),
    )


def synthetic_batch(step: int, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(batch, IN, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * x[:, :1] ** 2
    return x, y


def train(function: Any, *, steps: int, seed: int = 0, progress: bool = True,
          label: str = "") -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train the demo model; returns (losses, final state_dict).

    The progress bar needs tqdm (the ``demo`` extra); without it, a line every tenth of the
    steps reports the loss instead.
    """
    model = build_model(function, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses: list[float] = []
    bar = _progress(steps, label or "train", progress)
    for step in bar:
        x, y = synthetic_batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


class _PlainProgress:
    """What the demo draws without tqdm: a line every tenth of the steps."""

    def __init__(self, steps: int, label: str, enabled: bool) -> None:
        self._steps, self._label, self._enabled = steps, label, enabled
        self._every = max(1, steps // 10)
        self._step, self._next = 0, 0

    def __iter__(self) -> Any:
        for step in range(self._steps):
            self._step = step
            yield step

    def set_postfix(self, *, loss: str) -> None:
        if self._enabled and self._step >= self._next:
            print(f"{self._label}: step {self._step}/{self._steps}, loss {loss}", flush=True)
            self._next = self._step + self._every


def _progress(steps: int, label: str, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # the demo extra is not installed: no bar, a few lines
        return _PlainProgress(steps, label, enabled)
    return tqdm(range(steps), desc=label, disable=not enabled, file=sys.stdout, mininterval=0.5)


def _summary(losses: list[float]) -> str:
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return f"loss {first:.4f} -> {last:.4f}"


def train_remote(address: str, *, steps: int = 200, transport: str = "auto",
                 function: str = "mlp", timeout: float = 60.0) -> int:
    """The trainer alone, against a running worker; exit code 0 when the loss fell."""
    with connect(address, timeout=timeout, transport=transport) as worker:
        print(f"connected to {address}; transport: {worker.transport}", flush=True)
        losses, _ = train(worker.function(function), steps=steps, label="remote")
        print(f"moved: {worker.stats}", flush=True)
    print(f"remote training: {_summary(losses)}", flush=True)
    if not all(math.isfinite(loss) for loss in losses):
        print("error: the loss is not finite", file=sys.stderr)
        return 1
    k = max(1, len(losses) // 10)
    if steps >= 50 and sum(losses[-k:]) >= sum(losses[:k]):
        print("error: the loss did not fall", file=sys.stderr)  # a few steps are noise
        return 1
    return 0


def _segments_of(*pids: int) -> set[str]:
    """Shared-memory entries made by these processes (names carry the creator's pid)."""
    directory = os.environ.get("TORCH_JAX_INTEROP_SHM_DIR", "/dev/shm")
    prefixes = tuple(f"tji-{pid}-" for pid in pids)
    try:
        return {n for n in os.listdir(directory) if n.startswith(prefixes)}
    except FileNotFoundError:
        return set()


def start_worker(socket_path: str, functions: dict[str, str],
                 timeout: float = 120.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``torch-jax-interop worker`` as a subprocess; wait until it serves."""
    ready = socket_path + ".ready"
    for stale in (ready, socket_path):  # left by a killed predecessor: not readiness
        if os.path.exists(stale):
            os.unlink(stale)
    cmd = [sys.executable, "-m", "torch_jax_interop.server", "--listen",
           f"unix://{socket_path}", "--ready-file", ready]
    for name, target in functions.items():
        cmd += ["--function", f"{name}={target}"]
    process = subprocess.Popen(cmd)
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with code {process.returncode}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError("worker did not become ready")
        time.sleep(0.05)
    with open(ready) as f:
        address = json.load(f)["addresses"][0]
    return process, address


def run_local_demo(*, steps: int = 200, transport: str = "auto") -> int:
    """Worker process + remote training + the same training in-process; compare; clean up."""
    with tempfile.TemporaryDirectory(prefix="tji-demo-", dir="/tmp") as tmp:
        process, address = start_worker(os.path.join(tmp, "w.sock"), {"mlp": FUNCTION_SPEC})
        try:
            with connect(address, transport=transport) as worker:
                print(f"worker pid {process.pid} on {address}; transport: {worker.transport}",
                      flush=True)
                remote_losses, remote_state = train(worker.function("mlp"), steps=steps,
                                                    label="remote (worker process)")
                print(f"moved: {worker.stats}", flush=True)
        finally:
            process.terminate()
            code = process.wait(timeout=60)
    print(f"worker stopped (exit code {code})")
    with connect("inproc", functions={"mlp": FUNCTION_SPEC}) as local:
        local_losses, local_state = train(local.function("mlp"), steps=steps,
                                          label="in-process      ")
    print(f"remote training:     {_summary(remote_losses)}")
    print(f"in-process training: {_summary(local_losses)}")
    worst = max((remote_state[k] - local_state[k]).abs().max().item() for k in remote_state)
    match = all(torch.allclose(remote_state[k], local_state[k], atol=1e-4, rtol=1e-4)
                for k in remote_state)
    print(f"parameters match in-process training: {match} (max abs difference {worst:.2e})")
    leaked = _segments_of(os.getpid(), process.pid)
    print(f"shared-memory segments left behind: {len(leaked)}")
    fell = sum(remote_losses[-10:]) < sum(remote_losses[:10])
    return 0 if (match and fell and not leaked and code == 0) else 1
