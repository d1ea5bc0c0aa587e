"""Group `pipeline`: a torch stage and a JAX worker stage, sequential against overlapped.

Each of ``BATCHES`` batches goes through a torch stage (``STEPS`` rounds of
``tanh(x @ w)`` in torch) and then a JAX stage in a real worker (the same computation in
JAX, ``jax_stage`` below). Each stage keeps about one core busy (torch with one thread; the
worker's XLA without its multi-threaded Eigen, whose CPU runtime still runs the chain on
its own pool of threads, but one step after the other: its threads' CPU time adds up to
the call's wall time), so that on a small machine the two can really run side by side;
the records of the stages alone show that they take about the same time ``T``.
Sequential: ``N`` batches cost ``2 N T``. Overlapped with ``fn.submit``: batch ``i``'s JAX
stage runs while the torch stage prepares batch ``i + 1``, so ``(N + 1) T``: the ratio
tends to 0.5 (0.53 for 16 batches).

The worker loads ``jax_stage`` from this module: it imports JAX at call time only, and
torch nowhere at import time.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._processes import ServerProcess
from ._suite import ERROR, Record, Suite, Target

GROUP = "pipeline"
CASE = "two-stage pipeline, torch stage + JAX worker stage"
SEQUENTIAL = "sequential (fn(x) after each torch stage)"
ASYNC = "async (fn.submit overlaps the next torch stage)"
TORCH_STAGE = "torch stage alone"
JAX_STAGE = "JAX stage alone (through the worker)"
# one torch stage and one JAX stage started together (`fn.submit`, then the torch stage,
# then the result): what an overlapped batch costs at best on this machine. Against the
# torch stage alone it shows what running side by side costs each stage (two busy cores
# sharing caches, memory bandwidth, and on a VM perhaps one physical core), which no
# library can remove; the async row cannot beat ((N - 1) * this + 2 T) / (2 N T).
SIDE_BY_SIDE = "one torch stage side by side with one JAX stage"
BATCHES = 16
QUICK_BATCHES = 4
SHAPE = (64, 256)
STEPS = 24  # rounds of tanh(x @ w) per stage: about 5 ms per stage on one core here
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false"


def _weights(np: Any) -> Any:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((SHAPE[1], SHAPE[1])) / np.sqrt(SHAPE[1])).astype(np.float32)


def jax_stage(x: Any) -> Any:
    """The worker's stage: ``STEPS`` rounds of ``tanh(x @ w)`` (``w`` fixed)."""
    import jax.numpy as jnp
    import numpy as np

    w = jnp.asarray(_weights(np))
    for _ in range(STEPS):
        x = jnp.tanh(x @ w)
    return x


def tasks(suite: Suite) -> list[tuple[str, Callable[[], None]]]:
    try:
        import torch  # noqa: F401

        from torch_jax_interop.client import connect  # noqa: F401
    except ImportError as error:
        reason = f"skipped: torch and the client are needed ({error})"
        return [("pipeline: skipped", lambda: suite.skip(GROUP, CASE, reason))]
    suite.compare(GROUP, CASE, 0, ASYNC, SEQUENTIAL,
                  Target("<=", 0.6, "issue 16", "overlapped / sequential"))
    suite.compare(GROUP, CASE, 0, TORCH_STAGE, JAX_STAGE)
    suite.compare(GROUP, CASE, 0, SIDE_BY_SIDE, TORCH_STAGE)
    return [("pipeline: two stages", lambda: _guard(suite, lambda: pipeline_case(suite)))]


def _guard(suite: Suite, run: Callable[[], None]) -> None:
    try:
        run()
    except Exception as error:
        suite.add(Record(GROUP, CASE, ASYNC, 0, status=ERROR,
                         note=f"{type(error).__name__}: {error}"[:300]))


def pipeline_case(suite: Suite) -> None:
    import numpy as np
    import torch

    from torch_jax_interop.client import connect

    stack = contextlib.ExitStack()
    suite.resources.enter_context(stack)
    directory = Path(tempfile.mkdtemp(prefix="tjip-", dir="/tmp"))  # socket paths <= 107 B
    stack.callback(shutil.rmtree, directory, True)
    address = f"unix://{directory}/w.sock"
    stack.enter_context(ServerProcess(
        "torch_jax_interop.server",
        ["--listen", address, "--grace", "2", "--function", f"stage={__name__}:jax_stage"],
        directory / "worker.ready", directory / "worker.log",
        env={"XLA_FLAGS": SINGLE_THREAD_XLA},
    ))
    worker = stack.enter_context(connect(address, timeout=60.0))
    fn = worker.function("stage")
    w = torch.from_numpy(_weights(np))
    batches = [torch.randn(*SHAPE, generator=torch.Generator().manual_seed(i))
               for i in range(QUICK_BATCHES if suite.quick else BATCHES)]

    def torch_stage(x: torch.Tensor) -> torch.Tensor:
        for _ in range(STEPS):
            x = torch.tanh(x @ w)
        return x

    def sequential() -> None:
        for x in batches:
            fn(torch_stage(x))

    def overlapped() -> None:
        pending = None
        for x in batches:
            y = torch_stage(x)  # runs while the worker computes the previous batch
            if pending is not None:
                pending.result()
            pending = fn.submit(y)
        assert pending is not None
        pending.result()

    def side_by_side() -> None:
        future = fn.submit(batches[0])
        torch_stage(batches[0])
        future.result()

    expected = fn(torch_stage(batches[0]))
    future = fn.submit(torch_stage(batches[0]))
    torch.testing.assert_close(future.result(), expected)  # the same call, overlapped
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            suite.measure(GROUP, CASE, 0, {SEQUENTIAL: sequential, ASYNC: overlapped},
                          references=(SEQUENTIAL,))
            suite.measure(GROUP, CASE, 0, {TORCH_STAGE: lambda: torch_stage(batches[0]),
                                           JAX_STAGE: lambda: fn(batches[0]),
                                           SIDE_BY_SIDE: side_by_side},
                          references=(JAX_STAGE, TORCH_STAGE))
    finally:
        torch.set_num_threads(threads)
    suite.extra.setdefault(GROUP, {})["batches"] = len(batches)
