"""Load: 8 client processes x 500 checked calls each against one worker, mixed sizes.

Each client process runs 500 calls on one connection (inline sizes, shared-memory sizes,
pytrees, and now and then a 24 MiB tensor that makes its pool grow a new region), and
meanwhile opens short-lived second connections (new sessions register regions and drop them
when they close) and runs a thread that registers a region, calls through it and releases
it (RegisterRegion / ReleaseRegion while other calls are in flight). Every call is checked:
identity results bit for bit (and by CRC32), ``checksum`` results against the exact sum.
Zero mismatches and zero errors are required; the counts go to ``.cache/reliability.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from support.reliability import record
from support.workers import WorkerProcess, start_worker, stop_worker

CLIENTS = 8
CALLS = 500

CLIENT = r"""
import json, os, random, sys, threading, traceback, zlib
import numpy as np
import torch
import grpc
from torch_jax_interop._wire import PROTOCOL_VERSION
from torch_jax_interop.client import connect
from torch_jax_interop.proto.v1 import interop_pb2 as pb
from torch_jax_interop.proto.v1 import interop_pb2_grpc as pb_grpc
from torch_jax_interop.transport import SharedMemoryRegion, region_tag

address, seed, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
torch.manual_seed(seed)
# float32 element counts: inline (<= 64 KiB), just over the inline threshold, shared memory
SIZES = [1, 1000, 16384, 16385, 65536, 262144, 1 << 20]
BIG = 6 << 20  # 24 MiB: more than the first 8 MiB region, so the pool grows
stats = {"calls": 0, "checked": 0, "mismatches": 0, "errors": 0, "big": 0,
         "short_sessions": 0, "region_cycles": 0, "error_messages": []}
lock = threading.Lock()


def crc(t):
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes())


def note(ok, error=None):
    with lock:
        stats["calls"] += 1
        if error is not None:
            stats["errors"] += 1
            if len(stats["error_messages"]) < 5:
                stats["error_messages"].append(error)
        elif ok:
            stats["checked"] += 1
        else:
            stats["mismatches"] += 1


def one_call(w, index):
    kind = rng.choice(["identity", "identity", "checksum", "pytree"])
    n = BIG if index % 100 == 99 else rng.choice(SIZES)
    if n == BIG:
        stats["big"] += 1
    if kind == "identity":
        x = torch.randn(n)
        y = w.function("identity")(x)
        return torch.equal(y, x) and crc(y) == crc(x)
    if kind == "checksum":
        x = torch.randint(0, 4, (n,)).float()  # the sum is exact in float32 (< 2**24)
        return float(w.function("checksum")(x)) == float(x.double().sum())
    tree = {"a": torch.randn(rng.choice(SIZES)), "b": [torch.randn(n),
            torch.randint(-5, 5, (7,), dtype=torch.int32)]}
    out = w.function("identity")(tree)
    return (torch.equal(out["a"], tree["a"]) and torch.equal(out["b"][0], tree["b"][0])
            and torch.equal(out["b"][1], tree["b"][1]))


def checked(w, index):
    try:
        note(one_call(w, index))
    except Exception as error:
        note(False, f"{type(error).__name__}: {error}"[:500])


def short_session():
    # A new client: its session registers a region, calls, and drops it all on close.
    with connect(address, transport="shm", timeout=120) as w2:
        for i in range(3):
            checked(w2, 1000 + i)
    with lock:
        stats["short_sessions"] += 1


def region_churn(cycles):
    try:
        _region_churn(cycles)
    except Exception:
        note(False, "churn: " + traceback.format_exc()[-1500:])


def _region_churn(cycles):
    # RegisterRegion / Call through it / ReleaseRegion, while the main loop's calls run.
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.JaxWorkerServiceStub(channel)
    stream = stub.OpenSession(pb.OpenSessionRequest(protocol_version=PROTOCOL_VERSION,
                                                    client_pid=os.getpid()))
    session = next(stream).session_id
    try:
        for cycle in range(cycles):
            region = SharedMemoryRegion.create(1 << 20, tag=region_tag(session), sealed=True)
            view = got = None
            try:
                reply = stub.RegisterRegion(pb.RegisterRegionRequest(
                    session_id=session,
                    shared_memory=pb.SharedMemoryRegion(name=region.name, size=region.size)),
                    timeout=120)
                region.unlink()
                data = np.random.default_rng(cycle).standard_normal(1 << 16, dtype=np.float32)
                view = np.frombuffer(region.buffer, np.float32)
                view[: data.size] = data
                request = pb.CallRequest(session_id=session, function="identity")
                request.args.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=1)
                request.args.nodes.add(kind=pb.TreeNode.KIND_LEAF)
                request.args.leaves.add(
                    dtype=pb.DTYPE_FLOAT32, shape=[data.size], shm=pb.SharedMemorySlice(
                        region_id=reply.region_id, offset=0, nbytes=data.nbytes))
                request.kwargs.nodes.add(kind=pb.TreeNode.KIND_DICT)
                request.output_arena.shm.CopyFrom(pb.SharedMemorySlice(
                    region_id=reply.region_id, offset=512 << 10, nbytes=512 << 10))
                try:
                    response = stub.Call(request, timeout=120)
                    out = response.outputs.leaves[0].shm
                    got = view[out.offset // 4: out.offset // 4 + data.size]
                    note(zlib.crc32(got.tobytes()) == zlib.crc32(data.tobytes()))
                except grpc.RpcError as error:
                    note(False, f"churn {error.code().name}: {error.details()}"[:500])
                del view, got
                stub.ReleaseRegion(pb.ReleaseRegionRequest(session_id=session,
                                                           region_id=reply.region_id),
                                   timeout=120)
                with lock:
                    stats["region_cycles"] += 1
            finally:
                region.unlink()
                region.close()
    finally:
        stream.cancel()
        channel.close()


churn = threading.Thread(target=region_churn, args=(25,))
try:
    with connect(address, transport="shm", timeout=120) as w:
        churn.start()
        for index in range(calls):
            checked(w, index)
            if index % 50 == 25:
                short_session()
        stats["pool_regions"] = w._session.pool.num_regions if w._session.pool else 0
    churn.join()
except Exception:
    stats["errors"] += 1
    stats["error_messages"].append(traceback.format_exc()[-1500:])
print(json.dumps(stats), flush=True)
"""


@pytest.fixture(scope="module")
def load_worker() -> Iterator[WorkerProcess]:
    with tempfile.TemporaryDirectory(prefix="tji", dir="/tmp") as tmp:
        worker = start_worker(tmp)
        try:
            yield worker
        finally:
            assert stop_worker(worker) == 0, worker.log()


@pytest.mark.slow
def test_eight_clients_times_500_checked_calls(load_worker: WorkerProcess) -> None:
    processes = [
        subprocess.Popen([sys.executable, "-c", CLIENT, load_worker.address, str(seed),
                          str(CALLS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for seed in range(CLIENTS)
    ]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=540)
            assert process.returncode == 0, (process.returncode, err[-3000:])
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    for process in processes:
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"tji-{process.pid}-")]
    total = {key: sum(r[key] for r in results)
             for key in ("calls", "checked", "mismatches", "errors", "big", "short_sessions",
                         "region_cycles")}
    messages = [m for r in results for m in r["error_messages"]]
    assert total["errors"] == 0, messages
    assert total["mismatches"] == 0, total
    assert total["checked"] == total["calls"]
    assert all(r["pool_regions"] >= 2 for r in results), results  # every pool grew
    assert total["calls"] >= CLIENTS * CALLS
    assert load_worker.process.poll() is None
    log = load_worker.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    record("load", client_processes=CLIENTS, calls_per_process_main_loop=CALLS,
           concurrent_calls_checked=total["calls"], mismatches=total["mismatches"],
           errors=total["errors"], big_tensors=total["big"],
           short_lived_sessions=total["short_sessions"],
           register_release_cycles=total["region_cycles"])
