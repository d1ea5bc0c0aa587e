"""Calls through a real worker: transports agree, pytrees and dtypes survive, errors are clear."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from support.workers import FUNCTIONS, WorkerProcess

from torch_jax_interop._dtypes import DTYPE_NAMES
from torch_jax_interop.client import (
    AuthenticationError,
    FunctionNotFoundError,
    InvalidArgumentError,
    RemoteExecutionError,
    connect,
)

TRANSPORTS = ["inline", "shm", "inproc"]


def _connect(worker: WorkerProcess, transport: str):  # noqa: ANN202
    if transport == "inproc":
        return connect("inproc", functions=FUNCTIONS)
    return connect(worker.address, transport=transport, timeout=60)


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values of ``dtype``: any bit pattern for integers, finite values for floats."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randn(shape, generator=g) > 0
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for dim in shape:
        count *= dim
    raw = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


NARROWED = {"float64": torch.float32, "int64": torch.int32, "uint64": torch.uint32,
            "complex128": torch.complex64}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_identity_round_trips_every_dtype(worker: WorkerProcess, transport: str,
                                          name: str) -> None:
    dtype = getattr(torch, name)
    small = _sample(dtype, (3, 5))
    large = _sample(dtype, (256, 300), seed=1)  # > 64 KiB for most dtypes: shared memory
    if name in ("int64", "uint64"):  # values the x64-off worker accepts (see below)
        small = torch.arange(15).reshape(3, 5).to(dtype)
        large = (torch.arange(256 * 300) % 1000).reshape(256, 300).to(dtype)
    with _connect(worker, transport) as w:
        out = w.function("identity")({"small": small, "large": large, "scalar": small[0, 0]})
    for key, sent in (("small", small), ("large", large), ("scalar", small[0, 0])):
        got = out[key]
        if name in NARROWED:
            # Worker runs with JAX's x64 mode off: documented narrowing to 32 bits.
            assert got.dtype == NARROWED[name]
            assert torch.equal(got, sent.to(NARROWED[name]))
        else:
            assert _same_bits(got, sent), (key, got, sent)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pytree_structure_is_kept(worker: WorkerProcess, transport: str) -> None:
    x = torch.arange(6.0).reshape(2, 3)
    tree = {"b": (x, [x + 1, None]), "a": (x * 2,), "c": []}
    with _connect(worker, transport) as w:
        out = w.function("identity")(tree)
    # Dict outputs of a jitted JAX function come back with sorted keys (JAX's own rule).
    assert sorted(out) == ["a", "b", "c"]
    assert isinstance(out["b"], tuple) and isinstance(out["b"][1], list)
    assert out["b"][1][1] is None and out["c"] == [] and isinstance(out["a"], tuple)
    assert torch.equal(out["b"][1][0], x + 1) and torch.equal(out["a"][0], x * 2)


@pytest.mark.parametrize("transport", ["inline", "shm"])
def test_transports_give_identical_results(worker: WorkerProcess, transport: str) -> None:
    params = {
        "w1": torch.randn(784, 256) * 0.05, "b1": torch.zeros(256),
        "w2": torch.randn(256, 10) * 0.05, "b2": torch.zeros(10),
    }
    x = torch.randn(64, 784)
    with connect("inproc", functions=FUNCTIONS) as local:
        expected = local.function("mlp_apply")(params, x)
    with _connect(worker, transport) as w:
        got = w.function("mlp_apply")(params, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_picks_shared_memory_on_the_same_host(worker: WorkerProcess) -> None:
    with connect(worker.address, transport="auto") as w:
        assert w.transport == "shared memory"
        big = torch.randn(1 << 18)
        assert torch.equal(w.function("identity")(big), big)
    assert "uses shared memory" in worker.log()


def test_outputs_in_shared_memory_are_not_overwritten_by_later_calls(
        worker: WorkerProcess) -> None:
    with connect(worker.address, transport="shm") as w:
        f = w.function("identity")
        first_in = torch.full((1 << 17,), 1.0)
        first = f(first_in)
        second = f(torch.full((1 << 17,), 2.0))
        assert torch.all(first == 1.0) and torch.all(second == 2.0)


def test_functions_lists_names_and_signatures(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        infos = {f.name: f for f in w.functions()}
    assert set(infos) == set(FUNCTIONS)
    assert infos["scale"].signature.startswith("(params")
    assert "one-parameter" in infos["scale"].doc
    assert infos["mlp"].target == "torch_jax_interop.examples.mlp:apply"


def test_unknown_function_is_not_found_and_worker_keeps_serving(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        with pytest.raises(FunctionNotFoundError, match="unknown function `nope`.*serves:"):
            w.function("nope")(torch.ones(2))
        assert torch.equal(w.function("add_one")(torch.ones(2)), torch.full((2,), 2.0))


def test_wrong_arity_is_invalid_argument(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        with pytest.raises(InvalidArgumentError, match="argument"):
            w.function("add_one")(torch.ones(2), torch.ones(2))
        assert torch.equal(w.function("add_one")(torch.zeros(1)), torch.ones(1))


def test_a_shape_the_function_cannot_take_is_its_error(worker: WorkerProcess) -> None:
    """Decoded fine, but the function's own JAX code raised: RemoteExecutionError naming the
    JAX error (shapes the request itself gets wrong are InvalidArgumentError, see
    test_faults.py)."""
    params = {"w1": torch.ones(3, 4), "b1": torch.ones(4), "w2": torch.ones(4, 2),
              "b2": torch.ones(2)}
    with connect(worker.address) as w:
        with pytest.raises(RemoteExecutionError,
                           match="`mlp_apply` raised TypeError: dot_general .* same shape"):
            w.function("mlp_apply")(params, torch.ones(5, 7))
        assert torch.equal(w.function("add_one")(torch.zeros(1)), torch.ones(1))


def test_function_that_raises_gives_remote_execution_error(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        with pytest.raises(RemoteExecutionError, match="always fails"):
            w.function("fails")(torch.ones(2))
        assert torch.equal(w.function("identity")(torch.ones(2)), torch.ones(2))


@pytest.mark.parametrize("grad", [False, True], ids=["call", "forward-with-residuals"])
def test_a_value_error_of_the_function_is_remote_execution_error(worker: WorkerProcess,
                                                                 grad: bool) -> None:
    """Whatever the exception's type: a ValueError raised by the served function is not an
    InvalidArgumentError (that one means the request was wrong)."""
    with connect(worker.address) as w:
        x = torch.ones(2, 3, requires_grad=grad)
        with pytest.raises(RemoteExecutionError) as caught:
            w.function("rejects_input")(x)
        assert not isinstance(caught.value, InvalidArgumentError)
        assert "(UNKNOWN): `rejects_input` raised ValueError: rejects_input takes no input, " \
            "got shape (2, 3)" in str(caught.value)
        assert torch.equal(w.function("identity")(torch.ones(2)), torch.ones(2))


def test_non_tensor_leaves_are_refused_before_sending(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        with pytest.raises(TypeError, match=r"torch\.tensor"):
            w.function("add_one")(3)


def test_tcp_needs_the_token(worker: WorkerProcess) -> None:
    assert worker.tcp_address is not None
    with pytest.raises(AuthenticationError, match="token"):
        connect(worker.tcp_address, token="wrong", transport="inline", timeout=30)
    with connect(worker.tcp_address, token=worker.token, transport="inline") as w:
        assert torch.equal(w.function("add_one")(torch.zeros(3)), torch.ones(3))


def test_unix_socket_is_private(worker: WorkerProcess) -> None:
    assert worker.socket_path is not None
    mode = stat.S_IMODE(os.stat(worker.socket_path).st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_has_aux_outputs_come_back(worker: WorkerProcess) -> None:
    from torch_jax_interop._call import Call
    from torch_jax_interop.client._connect import RemoteBackend

    with connect(worker.address) as w:
        backend = RemoteBackend(w, "with_aux")
        call, tensors = Call.of(backend, True, (torch.tensor(2.0), torch.tensor([3.0, 4.0])), {})
        outputs, out_spec, aux = backend.flat_call(call, tensors)
    out = out_spec.unflatten(outputs)
    assert torch.equal(out, torch.tensor([6.0, 8.0]))
    assert torch.allclose(aux["norm"], torch.tensor(5.0))


def test_64_bit_integers_that_do_not_fit_are_refused_with_the_fix(worker: WorkerProcess) -> None:
    with connect(worker.address) as w:
        with pytest.raises(InvalidArgumentError, match="does not fit int32.*JAX_ENABLE_X64"):
            w.function("identity")(torch.tensor([2**40]))


@pytest.mark.parametrize("transport", ["inline", "shm"])
def test_x64_worker_round_trips_64_bit_values_exactly(short_tmp: str, transport: str) -> None:
    from support.workers import start_worker, stop_worker

    process = start_worker(short_tmp, env={"JAX_ENABLE_X64": "1"})
    try:
        values = {
            "i": torch.tensor([2**40, -(2**62), 7] * 5000, dtype=torch.int64),
            "f": torch.randn(20000, dtype=torch.float64),
            "c": torch.randn(300, dtype=torch.complex128),
        }
        with connect(process.address, transport=transport) as w:
            out = w.function("identity")(values)
        for key, sent in values.items():
            assert _same_bits(out[key], sent), key
    finally:
        assert stop_worker(process) == 0


def test_one_function_object_takes_every_argument_structure_in_turn(
        worker: WorkerProcess) -> None:
    """A ``RemoteFunction`` remembers the plan of tensor-only calls by their count: calls of
    other counts, with keywords or with pytrees, in any order, each get their own."""
    with connect(worker.address, timeout=60) as w:
        scale = w.function("scale")
        identity = w.function("identity")
        p, x = torch.tensor(3.0), torch.arange(4.0)
        for _ in range(2):
            assert torch.equal(scale(p, x), 3 * x)
            assert torch.equal(scale(p, x=x), 3 * x)
            out = identity({"a": x, "b": (p, x)})
            assert torch.equal(out["a"], x) and torch.equal(out["b"][0], p)
            assert torch.equal(identity(x), x)
            # the structure sent is this call's own (one argument), not the last one's
            with pytest.raises(InvalidArgumentError, match="cannot take 1 positional"):
                scale(p)
            with pytest.raises(TypeError, match="wrap numbers with torch.tensor"):
                scale(3.0, x)
