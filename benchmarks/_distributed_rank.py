"""One rank of the `distributed` group, run by ``torchrun -m benchmarks._distributed_rank``.

Every rank runs the same fixed sequence (collectives must match across ranks, so nothing
here adapts to the clock): the demo model (torch layers around a ``WrappedJaxFunction``
served by this rank's worker) under DDP, trained on this rank's share of a fixed global
batch, in two variants taking turns sample by sample:

* ``DDP``: DDP as it is (gradients all-reduced in buckets, overlapping backward);
* ``DDP, no all-reduce``: the same with a comm hook that returns the local gradients
  untouched; the difference to ``DDP`` is what the all-reduce costs a step;

and ``dist.all_reduce`` alone on a buffer the size of all gradients. Each sample starts
after a barrier. Rank 0 writes its per-step (per-call) seconds as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from torch_jax_interop.client import connect, rank_address
from torch_jax_interop.demo import build_model, synthetic_batch
from torch_jax_interop.demo.ddp import local_shard, train_step

DDP = "DDP"
NO_ALL_REDUCE = "DDP, no all-reduce"
BATCHES = 8  # distinct global batches, cycled


def no_all_reduce(state, bucket):  # type: ignore[no-untyped-def]  # DDP checks annotations
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loops", type=int, default=5, help="steps per sample")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with connect(rank_address(args.address), timeout=120) as worker:
        function = worker.function("mlp")
        batches = []
        for step in range(BATCHES):
            x, y = synthetic_batch(step, args.global_batch)
            batches.append([(local_shard(x, rank, world), local_shard(y, rank, world))])
        steps: dict[str, Any] = {}
        for variant in (DDP, NO_ALL_REDUCE):
            model = DistributedDataParallel(build_model(function, 0))
            if variant == NO_ALL_REDUCE:
                model.register_comm_hook(None, no_all_reduce)
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
            counter = iter(range(1 << 62))
            steps[variant] = (lambda m=model, o=optimizer, c=counter:
                              train_step(m, o, batches[next(c) % BATCHES]))
        numel = sum(p.numel() for p in build_model(function, 0).parameters())
        gradients = torch.zeros(numel)
        calls = {**steps, "all-reduce alone": lambda: dist.all_reduce(gradients)}

        for call in calls.values():
            for _ in range(args.warmup):
                call()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.loops):
                    call()
                samples[name].append((time.perf_counter() - start) / args.loops)
        transport = worker.transport
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "samples": samples, "loops": args.loops,
                       "gradient_bytes": numel * 4, "transport": transport,
                       "global_batch": args.global_batch}, f)


if __name__ == "__main__":
    main()
