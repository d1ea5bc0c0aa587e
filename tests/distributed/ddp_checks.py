"""Run by ``test_ddp.py`` under ``torchrun --nproc_per_node=2``: every rank trains the demo
model (a ``WrappedJaxFunction`` served by this rank's own worker) three ways and saves what
the test compares; rank 0 also trains one plain model on the whole global batch.

1. ``DistributedDataParallel`` (default buckets, ``find_unused_parameters=False``), one
   micro-batch per step; and again with buckets of 64 KiB, so that the wrapped function's
   parameters are spread over several buckets;
2. the same with two micro-batches per step, the first under ``no_sync()``;
3. FSDP2: ``fully_shard`` on the wrapped function and on the whole model;

and records what FSDP2 does with the same model in library mode (``connect("inproc")``: the
JAX function in this process, reading the parameters in place): it is refused at wrap time.

A comm hook counts DDP's all-reduces (per bucket), so the test can see that ``no_sync()``
really skipped the first micro-batch's. Writes ``<out>/<run>-rank<R>.pt`` (state dicts) and
``<out>/meta-rank<R>.json``. Imports torch; JAX only for the library-mode attempt.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from torch_jax_interop.client import connect, rank_address
from torch_jax_interop.demo import build_model, synthetic_batch
from torch_jax_interop.demo.ddp import local_shard, train_step

SEED = 0
LR = 0.05

# The wrapped function's outputs are views of the client's output arena (they share its
# memory; README, Service mode). FSDP2 warns about any view output because an in-place op on
# one would skip its pre-backward hook; this model applies none.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def counting_allreduce(counter: dict[str, int]) -> Any:
    # No annotations: DDP checks them against the classes, and `from __future__ import
    # annotations` would make them strings.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        counter["all_reduces"] += 1
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def run(model: torch.nn.Module, steps: int, global_batch: int, accumulate: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(steps):
        x, y = synthetic_batch(step, global_batch)
        x, y = local_shard(x, rank, world), local_shard(y, rank, world)
        micro = list(zip(x.chunk(accumulate), y.chunk(accumulate), strict=True))
        train_step(model, optimizer, micro)


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k.removeprefix("module."): (v.full_tensor() if hasattr(v, "full_tensor") else v)
            .detach().clone() for k, v in state.items()}


def library_mode_fsdp(global_batch: int) -> dict[str, Any]:
    """Where FSDP2 fails with the JAX function in this process: wrap, first forward, or not."""
    rank, world = dist.get_rank(), dist.get_world_size()
    functions = {"mlp": "torch_jax_interop.examples.mlp:apply"}
    with connect("inproc", functions=functions) as local:
        model = build_model(local.function("mlp"), SEED)
        try:
            fully_shard(model[1])
            fully_shard(model)
        except Exception as error:
            return {"stage": "wrap", "error": f"{type(error).__name__}: {error}"}
        x, y = synthetic_batch(0, global_batch)
        try:
            loss = torch.nn.functional.mse_loss(model(local_shard(x, rank, world)),
                                                local_shard(y, rank, world))
            loss.backward()
        except Exception as error:
            return {"stage": "first step", "error": f"{type(error).__name__}: {error}"}
        return {"stage": "none", "error": ""}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=64)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    address = rank_address(args.address)
    meta: dict[str, Any] = {"rank": rank, "world_size": dist.get_world_size(),
                            "pid": os.getpid(), "address": address}
    with connect(address, timeout=120) as worker:
        meta["transport"] = worker.transport
        function = worker.function("mlp")
        if rank == 0:
            torch.save(plain_state(build_model(function, SEED)), f"{args.out}/init.pt")

        for name, accumulate, bucket_mb in (("ddp", 1, None), ("accumulate", 2, None),
                                            ("small-buckets", 1, 64 / 1024)):
            counter = {"all_reduces": 0}
            options = {} if bucket_mb is None else {"bucket_cap_mb": bucket_mb}
            model = DistributedDataParallel(build_model(function, SEED), **options)
            model.register_comm_hook(dist.group.WORLD, counting_allreduce(counter))
            run(model, args.steps, args.global_batch, accumulate)
            torch.save(plain_state(model), f"{args.out}/{name}-rank{rank}.pt")
            meta[f"{name}_all_reduces"] = counter["all_reduces"]

        model = build_model(function, SEED)
        fully_shard(model[1])  # the WrappedJaxFunction: its own all-gather / reduce-scatter
        fully_shard(model)
        meta["fsdp_parameter_types"] = sorted({type(p).__name__ for p in model.parameters()})
        run(model, args.steps, args.global_batch, 1)
        torch.save(plain_state(model), f"{args.out}/fsdp-rank{rank}.pt")

        if rank == 0:  # one process, the whole global batch, no torch.distributed
            model = build_model(function, SEED)
            optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
            for step in range(args.steps):
                train_step(model, optimizer, [synthetic_batch(step, args.global_batch)])
            torch.save(plain_state(model), f"{args.out}/single.pt")
        meta["moved"] = str(worker.stats)
    meta["fsdp_library_mode"] = library_mode_fsdp(args.global_batch)
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{args.out}/meta-rank{rank}.json", "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main()
