"""Group `gpu`: CUDA IPC against shared memory and inline bytes for CUDA tensors.

Skips with a reason where torch sees no CUDA GPU. The worker runs with
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (its default) so both processes fit on one GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import _remote
from ._suite import ERROR, Record, Suite

GROUP = "gpu"
CASE = "identity round trip, cuda tensor"
SIZES = (64 * 2**10, 16 * 2**20, 64 * 2**20, 256 * 2**20, 2**30)  # 1 GiB: issue 6 target
QUICK_SIZES = (64 * 2**10,)
TRANSPORTS = ("cuda_ipc", "shm", "inline")


def tasks(suite: Suite) -> list[tuple[str, Callable[[], None]]]:
    reason = _no_gpu_reason()
    if reason is not None:
        return [("gpu: skipped", lambda: suite.skip(GROUP, "all", f"skipped: {reason}"))]
    return [("gpu: CUDA IPC vs shm vs inline", lambda: run(suite))]


def _no_gpu_reason() -> str | None:
    try:
        import torch
    except ImportError as error:
        return f"torch is not importable ({error})"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    try:
        from torch_jax_interop.client import connect  # noqa: F401
    except ImportError as error:
        return f"the service client is not available yet ({error})"
    return None


def run(suite: Suite) -> None:
    import torch

    from torch_jax_interop.client import connect

    state = _remote.RemoteState()
    suite.resources.callback(state.close)
    _remote.start(suite, state, None)  # the echo server and the temporary directory
    directory = state.directory
    assert directory is not None
    address = f"unix://{directory}/w.sock"
    worker = _remote.ServerProcess(
        "torch_jax_interop.server",
        ["--listen", address, "--function", f"identity={_remote.FUNCTIONS['identity']}"],
        directory / "worker.ready",
        directory / "worker.log",
    )
    state.stack.enter_context(worker)
    connections: dict[str, Any] = {}
    for transport in TRANSPORTS:
        try:
            connections[transport] = state.stack.enter_context(
                connect(address, timeout=60.0, transport=transport)
            )
        except Exception as error:
            suite.add(
                Record(
                    GROUP,
                    CASE,
                    transport,
                    0,
                    status=ERROR,
                    note=f"{type(error).__name__}: {error}"[:300],
                )
            )
    for nbytes in QUICK_SIZES if suite.quick else SIZES:
        tensor = torch.randn(nbytes // 4, device="cuda")
        copy_target = torch.empty_like(tensor)
        variants: dict[str, Callable[[], Any]] = {
            "cuda memcpy (device to device)": lambda t=tensor, c=copy_target: (
                c.copy_(t),
                torch.cuda.synchronize(),
            ),
        }
        for transport, connection in connections.items():
            function = connection.function("identity")
            call = _remote._bind1(function, tensor)
            if _remote._first_call(suite, CASE, transport, nbytes, call, tensor, group=GROUP):
                variants[transport] = call
        suite.measure(GROUP, CASE, nbytes, variants, references=("cuda memcpy (device to device)",))
        suite.compare(GROUP, CASE, nbytes, "cuda_ipc", "shm")
    state.close()
