"""The worker's memory and request bounds, with a real worker over real gRPC (issue 13,
findings 8-11, 16, 17 and the long function name of 19):

* leaves per request (``--max-leaves``) are checked before anything is decoded or compiled;
* inline bytes are summed over the request (``--max-inline-bytes``);
* residuals are budgeted in bytes (``--max-residual-bytes``): the oldest are dropped, one
  larger than the budget is refused;
* cotangents must match the forward's outputs (shape, and dtype for floating outputs); a
  refused Backward leaves the residual in place, so the retry succeeds;
* bool bytes other than 0/1 read as True, inline and in shared memory;
* the compile cache is bounded (``--max-compiled-signatures``);
* an unknown function with a very long name is NOT_FOUND, its name truncated.

Requests are built by hand (``pb``), as a buggy or hostile peer would send them.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from support.workers import RSS_STEADY_ENV, WorkerProcess, rss_mib, start_worker, stop_worker

from torch_jax_interop._dtypes import DTYPE_TO_ENUM
from torch_jax_interop._wire import PROTOCOL_VERSION
from torch_jax_interop.client import connect
from torch_jax_interop.proto.v1 import interop_pb2 as pb, interop_pb2_grpc as pb_grpc

_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32",
          np.dtype(np.bool_): "bool", np.dtype(np.float64): "float64"}


@pytest.fixture(scope="module")
def bounded() -> Iterator[WorkerProcess]:
    """A worker with small limits, so that the tests stay small."""
    with tempfile.TemporaryDirectory(prefix="tjib", dir="/tmp") as tmp:
        worker = start_worker(tmp, extra=["--max-leaves", "64", "--max-inline-bytes", "1m",
                                          "--max-residual-bytes", "800k"])
        try:
            yield worker
        finally:
            stop_worker(worker)


class _Peer:
    """A hand-made client: one session, requests built from numpy arrays (inline)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 << 20),
                              ("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.JaxWorkerServiceStub(self.channel)
        self.stream = self.stub.OpenSession(pb.OpenSessionRequest(
            protocol_version=PROTOCOL_VERSION, client_pid=os.getpid()))
        self.session_id = next(self.stream).session_id

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()

    @staticmethod
    def tree(arrays: list[Any], tree: Any) -> None:
        """A tuple of ``arrays``; a list among them is a nested tuple."""
        tree.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=len(arrays))
        for array in arrays:
            if isinstance(array, list):
                tree.nodes.add(kind=pb.TreeNode.KIND_TUPLE, num_children=len(array))
            for item in array if isinstance(array, list) else [array]:
                tree.nodes.add(kind=pb.TreeNode.KIND_LEAF)
                leaf = tree.leaves.add(dtype=DTYPE_TO_ENUM[_NAMES[item.dtype]],
                                       shape=list(item.shape))
                leaf.inline_data = np.ascontiguousarray(item).tobytes()

    def call(self, function: str, *arrays: Any, keep: bool = False,
             no_grad: list[int] | None = None) -> Any:
        request = pb.CallRequest(session_id=self.session_id, function=function,
                                 keep_residuals=keep, no_grad_leaves=no_grad or [])
        self.tree(list(arrays), request.args)
        return self.stub.Call(request, timeout=60)

    def backward(self, residual_id: int, *cotangents: np.ndarray, keep: bool = False) -> Any:
        request = pb.BackwardRequest(session_id=self.session_id, residual_id=residual_id,
                                     keep_residuals=keep)
        # The outputs' structure: one output is a single leaf, several a tuple.
        if len(cotangents) == 1:
            request.cotangents.nodes.add(kind=pb.TreeNode.KIND_LEAF)
            leaf = request.cotangents.leaves.add(
                dtype=DTYPE_TO_ENUM[_NAMES[cotangents[0].dtype]], shape=list(cotangents[0].shape))
            leaf.inline_data = cotangents[0].tobytes()
        else:
            self.tree(list(cotangents), request.cotangents)
        return self.stub.Backward(request, timeout=60)


def _array(message: Any) -> np.ndarray:
    names = {v: k for k, v in DTYPE_TO_ENUM.items()}
    return np.frombuffer(message.inline_data, dtype=names[message.dtype]).reshape(
        tuple(message.shape))


@pytest.fixture
def peer(bounded: WorkerProcess) -> Iterator[_Peer]:
    p = _Peer(bounded.address)
    try:
        yield p
    finally:
        p.close()


def _refused(caught: pytest.ExceptionInfo[grpc.RpcError], code: grpc.StatusCode,
             pattern: str) -> None:
    import re

    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    assert re.search(pattern, caught.value.details() or ""), caught.value.details()


def _still_serves(p: _Peer) -> None:
    out = p.call("add_one", np.arange(3, dtype=np.float32)).outputs.leaves[0]
    assert _array(out).tolist() == [1.0, 2.0, 3.0]


# -- leaves per request (finding 8) ------------------------------------------------------


def test_a_call_with_too_many_leaves_is_refused_before_it_is_compiled(peer: _Peer) -> None:
    many = [np.full((1,), i, np.float32) for i in range(65)]
    with pytest.raises(grpc.RpcError) as caught:
        peer.call("identity", many)
    _refused(caught, grpc.StatusCode.RESOURCE_EXHAUSTED, r"65 tensors.*limit of 64.*--max-leaves")
    # At the limit the call runs.
    out = peer.call("identity", many[:64]).outputs
    assert [float(_array(leaf)[0]) for leaf in out.leaves] == list(range(64))


def test_the_default_leaf_limit_refuses_8000_leaves_at_once(worker: WorkerProcess) -> None:
    """8,000 leaves cost 8.5 s of CPU and ~700 MiB before the limit; now a fast refusal."""
    p = _Peer(worker.address)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            p.call("identity", [np.zeros((1,), np.float32)] * 8000)
        elapsed = time.monotonic() - started
        _refused(caught, grpc.StatusCode.RESOURCE_EXHAUSTED, r"8000 tensors.*--max-leaves")
        assert elapsed < 2.0, elapsed
        _still_serves(p)
    finally:
        p.close()


def test_a_backward_with_too_many_cotangents_is_refused_and_keeps_its_residual(
        peer: _Peer) -> None:
    response = peer.call("checksum", np.arange(4, dtype=np.float32), keep=True)
    with pytest.raises(grpc.RpcError) as caught:
        peer.backward(response.residual_id, *[np.array(1, np.float32)] * 65)
    _refused(caught, grpc.StatusCode.RESOURCE_EXHAUSTED, r"65 tensors.*--max-leaves")
    grads = peer.backward(response.residual_id, np.array(1, np.float32)).grad_args
    assert _array(grads.leaves[0]).tolist() == [1.0] * 4


# -- inline bytes per request (finding 11) -----------------------------------------------


def test_inline_bytes_are_summed_over_the_request(peer: _Peer) -> None:
    half = np.zeros(160 << 10, np.float32)  # 640 KiB: each under 1 MiB, both over it
    with pytest.raises(grpc.RpcError) as caught:
        peer.call("identity", [half, half])
    _refused(caught, grpc.StatusCode.RESOURCE_EXHAUSTED,
             r"more than 1048576 bytes of inline tensors.*--max-inline-bytes")
    assert len(peer.call("identity", half).outputs.leaves) == 1
    _still_serves(peer)


# -- cotangents and the residual they would consume (findings 10, 16) ---------------------


def test_a_scalar_output_refuses_a_large_cotangent_and_keeps_its_residual(peer: _Peer) -> None:
    x = np.arange(4, dtype=np.float32)
    response = peer.call("checksum", x, keep=True)
    assert response.residual_id
    big = np.ones(1 << 18, np.float32)  # 1 MiB for a scalar output: it used to broadcast
    with pytest.raises(grpc.RpcError) as caught:
        peer.backward(response.residual_id, big[: (1 << 18) - 16])
    _refused(caught, grpc.StatusCode.INVALID_ARGUMENT,
             r"cotangent of output 0 must have the output's shape \[\] and dtype float32, got "
             r"shape \[262128\]")
    with pytest.raises(grpc.RpcError) as caught:
        peer.backward(response.residual_id, np.array(1, np.int32))
    _refused(caught, grpc.StatusCode.INVALID_ARGUMENT, r"dtype float32, got shape \[\] and "
             r"dtype int32")
    with pytest.raises(grpc.RpcError) as caught:  # wrong structure: two for one output
        peer.backward(response.residual_id, np.array(1, np.float32), np.array(1, np.float32))
    _refused(caught, grpc.StatusCode.INVALID_ARGUMENT, r"got 2 cotangents for 1 outputs")
    # The refusals consumed nothing: the retry with the right cotangent succeeds.
    grads = peer.backward(response.residual_id, np.array(2, np.float32)).grad_args
    assert _array(grads.leaves[0]).tolist() == [2.0, 2.0, 2.0, 2.0]


def test_a_vector_output_refuses_a_cotangent_of_another_shape(peer: _Peer) -> None:
    params, x = np.array(3, np.float32), np.arange(4, dtype=np.float32)
    response = peer.call("scale", params, x, keep=True)
    with pytest.raises(grpc.RpcError) as caught:
        peer.backward(response.residual_id, np.ones((1, 4), np.float32))
    _refused(caught, grpc.StatusCode.INVALID_ARGUMENT,
             r"shape \[4\] and dtype float32, got shape \[1, 4\]")
    grads = peer.backward(response.residual_id, np.ones(4, np.float32)).grad_args
    assert float(_array(grads.leaves[0])) == 6.0  # d/dparams sum(params * x) = sum(x)


# -- residuals in bytes (finding 9) ------------------------------------------------------


def test_residuals_are_budgeted_in_bytes(peer: _Peer, bounded: WorkerProcess) -> None:
    params = np.array(2, np.float32)
    x = np.ones(64 << 10, np.float32)  # 256 KiB kept per forward (x, for the params' grad)
    ids = [peer.call("scale", params, x, keep=True, no_grad=[1]).residual_id
           for _ in range(5)]
    # 800 KiB hold 3 of them: the two oldest were dropped.
    for dropped in ids[:2]:
        with pytest.raises(grpc.RpcError) as caught:
            peer.backward(dropped, np.ones_like(x))
        _refused(caught, grpc.StatusCode.INVALID_ARGUMENT, r"--max-residual-bytes 819200")
    for kept in ids[2:]:
        grads = peer.backward(kept, np.ones_like(x)).grad_args
        assert float(_array(grads.leaves[0])) == float(x.sum())
    assert "residual budget reached" in bounded.log()
    # A forward whose residuals alone exceed the budget is refused; the worker serves on.
    with pytest.raises(grpc.RpcError) as caught:
        peer.call("scale", params, np.ones(210 << 10, np.float32), keep=True, no_grad=[1])
    _refused(caught, grpc.StatusCode.RESOURCE_EXHAUSTED,
             r"residuals need 860160 bytes.*budget of 819200 bytes.*--max-residual-bytes")
    _still_serves(peer)


# -- bool bytes (finding 17) --------------------------------------------------------------


@pytest.mark.parametrize(("transport", "count"), [("inline", 4), ("shm", 1 << 16)])
def test_bool_bytes_other_than_0_and_1_read_as_true(worker: WorkerProcess, transport: str,
                                                    count: int) -> None:
    """``True + 1`` is 2 whatever byte holds True (it was 3 for a byte of 2), on the inline
    path and on the zero-copy shared-memory path (64 Ki bools: above the inline threshold)."""
    raw = torch.tensor([0, 1, 2, 255], dtype=torch.uint8).repeat(count // 4)
    x = raw.view(torch.bool)
    with connect(worker.address, transport=transport, timeout=60) as w:
        assert w.transport == {"inline": "inline", "shm": "shared memory"}[transport]
        plus_one = w.function("add_one")(x)
        assert plus_one.tolist() == [1, 2, 2, 2] * (count // 4)
        back = w.function("identity")(x)
        assert back.view(torch.uint8).tolist() == [0, 1, 1, 1] * (count // 4)
        assert int(w.function("checksum")(x)) == 3 * (count // 4)


# -- compile cache (finding 8) -------------------------------------------------------------


def test_the_compile_cache_is_bounded_by_max_compiled_signatures() -> None:
    """Each input signature compiles a program (~1.1-1.5 MiB each for ``add_one``, kept
    forever up to the old fixed cap of 1,024); with ``--max-compiled-signatures 4`` a worker
    that saw 150 shapes grows by little for 150 more."""
    with tempfile.TemporaryDirectory(prefix="tjic", dir="/tmp") as tmp:
        worker = start_worker(tmp, extra=["--max-compiled-signatures", "4"], env=RSS_STEADY_ENV)
        try:
            p = _Peer(worker.address)
            try:
                for n in range(1, 151):
                    p.call("add_one", np.zeros(n, np.float32))
                before = rss_mib(worker.process.pid)
                for n in range(151, 301):
                    p.call("add_one", np.zeros(n, np.float32))
                grown = rss_mib(worker.process.pid) - before
                assert grown < 60, f"worker RSS grew by {grown:.0f} MiB over 150 new shapes"
                _still_serves(p)
            finally:
                p.close()
        finally:
            stop_worker(worker)


# -- a long unknown name (finding 19) ------------------------------------------------------


def test_an_unknown_function_with_a_long_name_is_not_found(peer: _Peer) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        peer.call("f" * 10_000, np.zeros(1, np.float32))
    _refused(caught, grpc.StatusCode.NOT_FOUND,
             r"unknown function `f{200}\.\.\. \(10000 characters\)`; this worker serves: .*add_one")
    assert len(caught.value.details()) < 1000
    _still_serves(peer)


def test_residual_memory_stays_within_the_byte_budget() -> None:
    """40 forwards of a 16 MiB inline input grew the worker by ~1 GiB: residuals were
    counted, not budgeted in bytes, and every request message stayed alive until Python's
    garbage collector ran (a reference cycle in ``_wire.decode_spec``). With
    ``--max-residual-bytes 64m`` the worker grows by about the budget."""
    with tempfile.TemporaryDirectory(prefix="tjir", dir="/tmp") as tmp:
        worker = start_worker(tmp, extra=["--max-residual-bytes", "64m"], env=RSS_STEADY_ENV)
        try:
            p = _Peer(worker.address)
            try:
                params, x = np.array(2, np.float32), np.ones(4 << 20, np.float32)
                # Warm up: compile and fill the budget.
                for _ in range(10):
                    p.call("scale", params, x, keep=True)
                before = rss_mib(worker.process.pid)
                ids = [p.call("scale", params, x, keep=True).residual_id for _ in range(30)]
                grown = rss_mib(worker.process.pid) - before
                assert grown < 64, f"worker RSS grew by {grown:.0f} MiB over 30 calls"
                grads = p.backward(ids[-1], np.ones_like(x)).grad_args
                assert float(_array(grads.leaves[0])) == float(x.sum())
            finally:
                p.close()
        finally:
            stop_worker(worker)


def test_decoding_a_structure_leaves_no_reference_cycle() -> None:
    """A cycle through the request's nodes kept each whole request (inline bytes included)
    alive until Python's garbage collector ran; decoding must free it by reference count."""
    import gc

    from torch_jax_interop import _wire

    request = pb.CallRequest()
    _Peer.tree([np.zeros(4, np.float32), [np.zeros(1, np.float32)] * 3], request.args)
    gc.collect()
    gc.disable()
    try:
        spec = _wire.decode_spec(request.args.nodes, len(request.args.leaves))
        with pytest.raises(Exception, match="4 leaves but 5 tensors"):
            _wire.decode_spec(request.args.nodes, 5)
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert spec.num_leaves == 4


def test_structures_seen_before_are_answered_by_content_not_by_counts() -> None:
    """``decode_spec`` answers a structure seen before from its cache, matched by the
    nodes' content: two structures with the same node and leaf counts (dict keys differ)
    never get each other's spec, however many share those counts."""
    from torch_jax_interop import _pytree, _wire

    def nodes_of(tree: Any) -> Any:
        message = pb.Tree()
        _wire.encode_tree_spec(_pytree.flatten(tree)[1], message)
        return message.nodes

    trees = [{f"k{i}": 0, "z": 0} for i in range(2 * _wire._MAX_CANDIDATES + 1)]
    expected = [_pytree.flatten(tree)[1] for tree in trees]
    for _ in range(2):  # the second round finds some in the cache, the rest rebuilt
        for tree, spec in zip(trees, expected, strict=True):
            decoded = _wire.decode_spec(nodes_of(tree), 2)
            assert decoded == spec
            assert decoded.unflatten([1, 2]) == spec.unflatten([1, 2])
    again = _wire.decode_spec(nodes_of(trees[-1]), 2)
    assert again is _wire.decode_spec(nodes_of(trees[-1]), 2)  # a hit: the same object
    with pytest.raises(Exception, match="2 leaves but 3 tensors"):
        _wire.decode_spec(nodes_of(trees[-1]), 3)  # the leaf count is checked on a hit too


def test_byte_sizes_seen_before_are_checked_against_each_callers_limit() -> None:
    from torch_jax_interop import _wire
    from torch_jax_interop.errors import InvalidArgumentError, ResourceExhaustedError

    assert _wire.tensor_nbytes("float32", (256, 4), limit=1 << 20) == 4096
    with pytest.raises(ResourceExhaustedError, match="4096 bytes"):
        _wire.tensor_nbytes("float32", (256, 4), limit=4095)  # cached, the limit still holds
    assert _wire.tensor_nbytes("float32", (256, 4), limit=4096) == 4096
    for _ in range(2):  # refused shapes are never cached
        with pytest.raises(InvalidArgumentError, match="negative"):
            _wire.tensor_nbytes("float32", (4, -1), limit=1 << 20)
    assert _wire.tensor_nbytes("float32", [256, 4], limit=1 << 20) == 4096  # any sequence
