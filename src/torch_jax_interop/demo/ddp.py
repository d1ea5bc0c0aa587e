"""Data-parallel training, a JAX worker per rank: the recipe, runnable under ``torchrun``.

Each rank holds the demo model (torch layers around a ``WrappedJaxFunction`` whose JAX MLP
runs in that rank's own worker process), wrapped in ``DistributedDataParallel``. DDP treats
the wrapped function's parameters like any other: their gradients come back from the worker
in backward and are all-reduced in DDP's buckets, so every rank keeps the same parameters.
One script serves every rank: the worker address is a template that each rank fills with
its ``LOCAL_RANK`` (``connect()`` does it)::

    torch-jax-interop worker --ranks 2 --listen 'unix:///tmp/tji/worker-{local_rank}.sock' \\
        --function mlp=torch_jax_interop.examples.mlp:apply &
    torchrun --standalone --nproc_per_node=2 -m torch_jax_interop.demo.ddp \\
        --address 'unix:///tmp/tji/worker-{local_rank}.sock' --steps 100

Gloo on CPU, NCCL when torch sees a GPU (each rank on ``cuda:LOCAL_RANK``). Imports torch,
never JAX: the trainer image has no JAX.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .._cli_args import CliParser
from .._names import TRANSPORTS
from ..client import TlsConfig, connect, rank_address
from . import BATCH, build_model, synthetic_batch


@contextlib.contextmanager
def process_group(backend: str | None = None) -> Iterator[torch.device]:
    """Join the ``torchrun`` job (``init_process_group`` from its variables); yield this
    rank's device; leave the group on exit. Gloo on CPU, NCCL on a GPU, unless told."""
    if "RANK" not in os.environ:
        raise RuntimeError(
            "the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, ...) are missing: "
            "start this script with `torchrun --nproc_per_node=N -m torch_jax_interop.demo.ddp`"
        )
    if torch.cuda.is_available() and backend in (None, "nccl"):
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = backend or "gloo"
    dist.init_process_group(backend)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def local_shard(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch (its size must divide evenly, so that
    DDP's mean of the ranks' gradients is the gradient of the global batch's mean loss)."""
    if tensor.shape[0] % world_size:
        raise ValueError(f"a global batch of {tensor.shape[0]} does not split evenly over "
                         f"{world_size} ranks")
    return tensor.chunk(world_size)[rank]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One optimiser step over ``micro_batches`` (gradient accumulation): DDP all-reduces
    only in the last backward; the others run under ``model.no_sync()``. Returns the loss."""
    optimizer.zero_grad()
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync: Callable[[], Any] = (contextlib.nullcontext if last or not isinstance(
            model, DistributedDataParallel) else model.no_sync)
        with sync():
            loss = torch.nn.functional.mse_loss(model(x), y) / len(micro_batches)
            loss.backward()
        total += loss.item()
    optimizer.step()
    return total


def train_ddp(address: str, *, steps: int, global_batch: int = BATCH, accumulate: int = 1,
              transport: str = "auto", timeout: float = 60.0, seed: int = 0,
              backend: str | None = None, tls: TlsConfig | None = None) -> list[float]:
    """Train the demo model on this rank's share of each global batch; the losses (rank 0's
    are the global mean). Call in every rank of a ``torchrun`` job. ``tls``: reach TCP
    workers over TLS (the token comes from ``TORCH_JAX_INTEROP_TOKEN``)."""
    with process_group(backend) as device:
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = rank_address(address)
        with connect(mine, timeout=timeout, transport=transport, tls=tls) as worker:
            print(f"rank {rank}/{world} (pid {os.getpid()}): worker {mine}; transport: "
                  f"{worker.transport}", flush=True)
            model = DistributedDataParallel(build_model(worker.function("mlp"), seed).to(device))
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
            losses = []
            for step in range(steps):
                x, y = synthetic_batch(step, global_batch)
                x = local_shard(x, rank, world).to(device)
                y = local_shard(y, rank, world).to(device)
                micro = list(zip(x.chunk(accumulate), y.chunk(accumulate), strict=True))
                loss = torch.tensor(train_step(model, optimizer, micro), device=device)
                dist.all_reduce(loss)
                losses.append(loss.item() / world)
            if rank == 0:
                print(f"moved by rank 0: {worker.stats}", flush=True)
    return losses


def build_parser() -> argparse.ArgumentParser:
    """The script's options (what follows ``-m torch_jax_interop.demo.ddp``)."""
    parser = CliParser(  # usage errors: one `error:` line, exit 2, like the CLI's
        prog="torchrun --nproc_per_node=N -m torch_jax_interop.demo.ddp",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--address", required=True,
                        help="worker address template, e.g. "
                             "unix:///tmp/tji/worker-{local_rank}.sock")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--global-batch", type=int, default=BATCH,
                        help="samples per step over all ranks (split evenly)")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches per step per rank (no_sync gradient accumulation)")
    parser.add_argument("--transport", default="auto", choices=TRANSPORTS)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--backend", default=None, choices=("gloo", "nccl"))
    parser.add_argument("--tls-ca", default=None, metavar="PEM",
                        help="reach TCP workers over TLS, trusting this CA (workers on "
                             "another host; the token comes from TORCH_JAX_INTEROP_TOKEN)")
    parser.add_argument("--tls-server-name", default=None,
                        help="the name the workers' certificate is for, when the address "
                             "names them otherwise (an IP address)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tls = (TlsConfig(ca_file=args.tls_ca, server_name=args.tls_server_name)
           if args.tls_ca or args.tls_server_name else None)
    losses = train_ddp(args.address, steps=args.steps, global_batch=args.global_batch,
                       accumulate=args.accumulate, transport=args.transport,
                       timeout=args.timeout, backend=args.backend, tls=tls)
    if os.environ.get("RANK") != "0":
        return 0
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"data-parallel training: loss {first:.4f} -> {last:.4f}", flush=True)
    if not all(math.isfinite(loss) for loss in losses):
        print("error: the loss is not finite", file=sys.stderr)
        return 1
    if args.steps >= 50 and last >= first:
        print("error: the loss did not fall", file=sys.stderr)  # a few steps are noise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
