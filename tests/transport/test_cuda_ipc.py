"""CUDA IPC transport: descriptor validation, GPU UUIDs, routing and ``transport="auto"``.

The GPU-free parts are pure functions and run everywhere. Tests marked ``gpu`` exercise the
real thing (cupy, cudaMalloc, cudaIpcOpenMemHandle in a second process, JAX on the GPU) and
are skipped with a reason where no GPU is present. Nothing is mocked.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings, strategies as st

from torch_jax_interop._errors import SliceOutOfBoundsError, TransportError
from torch_jax_interop.transport import cuda
from torch_jax_interop.transport.cuda import (
    CUDA_ALIGNMENT,
    check_cuda_descriptor,
    choose_transport,
    expandable_segments_enabled,
    format_gpu_uuid,
    parse_gpu_uuid,
    route_device,
    shared_namespaces,
    validate_cuda_slice,
)

UUID_A = "GPU-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5f"
UUID_B = "GPU-00000000-0000-0000-0000-000000000001"
HAS_CUPY = importlib.util.find_spec("cupy") is not None

# -- validate_cuda_slice --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "offset", "nbytes"),
    [(4096, 0, 4096), (4096, 256, 0), (4096, 4096, 0), (2 << 20, 1 << 20, 1 << 20),
     (2**64 - 1, 2**64 - 256, 255)],
)
def test_slices_inside_the_region_pass(size: int, offset: int, nbytes: int) -> None:
    validate_cuda_slice(size, offset, nbytes)


@pytest.mark.parametrize(
    ("size", "offset", "nbytes", "message"),
    [
        (4096, 64, 16, "not a multiple of 256"),
        (4096, 4352, 0, "beyond the end"),
        (4096, 3840, 512, "runs past the end"),
        (4096, 256, 2**64 - 1, "runs past the end"),
        (2**64 - 1, 2**64 - 256, 2**64 - 1, "runs past the end"),
        (4096, -256, 16, "cannot be negative"),
        (4096, 0, -1, "cannot be negative"),
    ],
)
def test_bad_slices_are_refused_with_a_reason(size: int, offset: int, nbytes: int,
                                              message: str) -> None:
    with pytest.raises(SliceOutOfBoundsError, match=message):
        validate_cuda_slice(size, offset, nbytes)


def test_alignment_is_configurable_and_must_be_positive() -> None:
    validate_cuda_slice(4096, 64, 16, alignment=64)
    with pytest.raises(ValueError, match="positive"):
        validate_cuda_slice(4096, 0, 16, alignment=0)
    with pytest.raises(SliceOutOfBoundsError, match="must be an int"):
        validate_cuda_slice(4096, 0.0, 16)  # type: ignore[arg-type]


_U64 = st.one_of(
    st.integers(0, 2**64 - 1),
    st.integers(2**64 - 2**20, 2**64 - 1),  # near the top, where a fixed-width sum wraps
    st.integers(0, 1 << 24).map(lambda n: n * CUDA_ALIGNMENT),
)


@settings(max_examples=500, deadline=None)
@given(size=_U64, offset=_U64, nbytes=_U64)
def test_validation_equals_the_exact_rule_near_2_to_the_64(size: int, offset: int,
                                                          nbytes: int) -> None:
    inside = offset % CUDA_ALIGNMENT == 0 and offset + nbytes <= size  # exact: Python ints
    try:
        validate_cuda_slice(size, offset, nbytes)
        accepted = True
    except SliceOutOfBoundsError:
        accepted = False
    assert accepted == inside


# -- check_cuda_descriptor ------------------------------------------------------------------


def _descriptor(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = dict(region_size=1 << 21, offset=512, nbytes=64,
                                     expected_nbytes=64)
    fields.update(overrides)
    return fields


def test_a_descriptor_inside_its_region_passes() -> None:
    check_cuda_descriptor(**_descriptor())  # type: ignore[arg-type]
    check_cuda_descriptor(**_descriptor(expected_nbytes=None))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nbytes": 32}, "holds 32 bytes but the tensor's shape and dtype need 64"),
        ({"offset": 100}, "not a multiple of 256"),
        ({"offset": (1 << 21) - 256, "nbytes": 512, "expected_nbytes": 512}, "runs past"),
    ],
)
def test_bad_descriptors_say_what_is_wrong(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(SliceOutOfBoundsError, match=message):
        check_cuda_descriptor(**_descriptor(**overrides))  # type: ignore[arg-type]


# -- GPU UUIDs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (UUID_A, UUID_A),
        (UUID_A.upper(), UUID_A),
        ("gpu-8F6A2C1E-1B2D-4C3E-9F10-0A1B2C3D4E5F", UUID_A),
        (UUID_A[len("GPU-"):], UUID_A),  # str(torch.cuda.get_device_properties(i).uuid)
        (f"  {UUID_A}\n", UUID_A),
        ("MIG-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5f", "MIG-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5f"),
    ],
)
def test_uuids_are_normalised(text: str, canonical: str) -> None:
    assert parse_gpu_uuid(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "", "GPU-", "GPU-0", "0", "cuda:0",
        "GPU-8f6a2c1e1b2d4c3e9f100a1b2c3d4e5f",  # no dashes
        "GPU-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5",  # one digit short
        "GPU-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5f0",  # one digit too many
        "GPU-8f6a2c1g-1b2d-4c3e-9f10-0a1b2c3d4e5f",  # not hex
        "XPU-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5f",
        "GPU-8f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5f/0/0",
        "GPU-\u0668f6a2c1e-1b2d-4c3e-9f10-0a1b2c3d4e5",  # a non-ASCII digit
        "x" * 1000,
    ],
)
def test_malformed_uuids_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="malformed GPU UUID"):
        parse_gpu_uuid(text)


def test_a_uuid_must_be_a_string() -> None:
    with pytest.raises(ValueError, match="must be a str, got bytes"):
        parse_gpu_uuid(UUID_A.encode())


def test_raw_driver_bytes_format_like_nvidia_smi_zero_bytes_included() -> None:
    raw = bytes.fromhex(UUID_A[4:].replace("-", ""))
    assert format_gpu_uuid(raw) == UUID_A
    # cupy's getDeviceProperties()["uuid"] loses everything after a zero byte; ctypes does not
    assert format_gpu_uuid(bytes(15) + b"\x01") == UUID_B
    assert parse_gpu_uuid(format_gpu_uuid(bytes(range(16)))) == format_gpu_uuid(bytes(range(16)))
    with pytest.raises(ValueError, match="16 bytes, got 15"):
        format_gpu_uuid(bytes(15))


@given(raw=st.binary(min_size=16, max_size=16))
def test_formatting_then_parsing_is_the_identity(raw: bytes) -> None:
    text = format_gpu_uuid(raw)
    assert parse_gpu_uuid(text) == text
    assert bytes.fromhex(text[4:].replace("-", "")) == raw


# -- routing ----------------------------------------------------------------------------------


def test_devices_are_routed_by_uuid_not_index() -> None:
    # The client's cuda:0 is UUID_A; the worker (CUDA_VISIBLE_DEVICES=1,0) calls it cuda:1.
    assert route_device(UUID_A, [UUID_B, UUID_A.upper()]) == 1
    assert route_device(UUID_A.lower(), [UUID_A]) == 0


def test_a_gpu_the_worker_cannot_see_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(TransportError, match=r"GPU `GPU-8f6a2c1e-.*` is not visible to the "
                       r"worker \(CUDA_VISIBLE_DEVICES='1'\); it sees 0: GPU-00000000-") as e:
        route_device(UUID_A, [UUID_B])
    assert "shared memory" in str(e.value)
    with pytest.raises(TransportError, match="it sees none"):
        route_device(UUID_A, [])
    with pytest.raises(ValueError, match="malformed"):
        route_device("cuda:0", [UUID_A])


# -- environment ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ("", False),
        ("expandable_segments:True", True),
        ("max_split_size_mb:128,expandable_segments:True", True),
        (" expandable_segments : true ", True),
        ("expandable_segments:False", False),
        ("expandable_segments:True,expandable_segments:False", False),
        ("backend:cudaMallocAsync", False),
    ],
)
def test_expandable_segments_setting_is_parsed(conf: str, expected: bool) -> None:
    assert expandable_segments_enabled(conf) is expected


def test_expandable_segments_is_read_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert expandable_segments_enabled()
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert not expandable_segments_enabled()
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    assert expandable_segments_enabled()


@pytest.mark.skipif(not os.path.isdir("/proc/self/ns"), reason="needs /proc/<pid>/ns (Linux)")
def test_namespaces_of_a_process_here_are_shared_and_a_missing_pid_is_not() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert shared_namespaces(child.pid) in (True, None)  # None: /proc hides them
        assert shared_namespaces(os.getpid()) in (True, None)
    finally:
        child.kill()
        child.wait()
    assert shared_namespaces(child.pid) is False  # reaped: no such pid in our namespace
    assert shared_namespaces(0) is None


# -- choose_transport: every decision, with its reason ----------------------------------------

_GOOD = dict(tensor_is_cuda=True, same_host=True, client_uuid=UUID_A,
             worker_visible_uuids=[UUID_A], shared_namespaces=True)


@pytest.mark.parametrize("requested", ["auto", "cuda_ipc"])
def test_cuda_tensors_use_cuda_ipc_when_the_worker_can_open_the_handles(requested: str) -> None:
    transport, reason = choose_transport(requested, **_GOOD)  # type: ignore[arg-type]
    assert transport == "cuda_ipc"
    assert "same host" in reason and UUID_A in reason
    # Unknown worker GPUs / namespaces: CUDA IPC is tried; registering the first buffer decides.
    assert choose_transport(requested, tensor_is_cuda=True, same_host=True)[0] == "cuda_ipc"


@pytest.mark.parametrize(
    ("changes", "transport", "reason"),
    [
        ({"same_host": False}, "inline", r"the worker runs on another host \(different boot id\)"),
        ({"shared_namespaces": False}, "shm",
         "does not share this process's IPC and PID namespaces"),
        ({"expandable_segments": True, "exports_torch_memory": True}, "shm",
         "expandable_segments:True"),
        ({"client_cuda_ipc": "cupy is not installed"}, "shm",
         "this process cannot export CUDA IPC handles: cupy is not installed"),
        ({"worker_visible_uuids": [UUID_B]}, "shm",
         f"the worker cannot see GPU `{UUID_A}` \\(it sees {UUID_B}\\)"),
        ({"worker_visible_uuids": []}, "shm", "the worker cannot see GPU .* \\(it sees no GPU\\)"),
        ({"client_uuid": None}, "shm", "GPU UUID is unknown"),
        ({"tensor_is_cuda": False}, "shm", "the tensor is in host memory"),
        ({"tensor_is_cuda": False, "same_host": False}, "inline", "in host memory"),
    ],
)
def test_auto_falls_back_and_says_why(changes: dict[str, object], transport: str,
                                      reason: str) -> None:
    got, why = choose_transport("auto", **{**_GOOD, **changes})  # type: ignore[arg-type]
    assert got == transport
    assert re.search(reason, why), why


def test_expandable_segments_do_not_matter_for_dedicated_buffers() -> None:
    # CudaIpcPool exports its own cudaMalloc buffers, never caching-allocator segments.
    got, _ = choose_transport("auto", expandable_segments=True, **_GOOD)  # type: ignore[arg-type]
    assert got == "cuda_ipc"


def test_the_first_reason_is_the_most_basic_one() -> None:
    _, why = choose_transport("auto", tensor_is_cuda=True, same_host=False,
                              shared_namespaces=False, client_cuda_ipc="no cupy")
    assert "another host" in why


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"same_host": False}, "another host"), ({"shared_namespaces": False}, "namespaces"),
     ({"worker_visible_uuids": [UUID_B]}, "cannot see GPU")],
)
def test_cuda_ipc_insists_and_raises_with_the_reason(changes: dict[str, object],
                                                     reason: str) -> None:
    with pytest.raises(TransportError, match=f"transport='cuda_ipc' is not possible: .*{reason}"):
        choose_transport("cuda_ipc", **{**_GOOD, **changes})  # type: ignore[arg-type]
    # CPU tensors still take the host path under transport='cuda_ipc'.
    assert choose_transport("cuda_ipc", **{**_GOOD, "tensor_is_cuda": False})[0] == "shm"


@pytest.mark.parametrize(("requested", "same_host", "transport"),
                         [("shm", True, "shm"), ("inline", True, "inline"),
                          ("shm", False, "inline")])
def test_explicit_host_transports_are_obeyed(requested: str, same_host: bool,
                                             transport: str) -> None:
    got, why = choose_transport(requested, tensor_is_cuda=True, same_host=same_host)
    assert got == transport and f"transport='{requested}' was asked for" in why


def test_unknown_transport_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'auto', 'cuda_ipc', 'shm', 'inline'"):
        choose_transport("nccl", tensor_is_cuda=True, same_host=True)


# -- without a GPU: what this process reports, and the client's decision ----------------------


@pytest.mark.skipif(HAS_CUPY, reason="cupy is installed here: covered by the gpu tests")
def test_without_cupy_there_is_no_support_and_the_message_says_what_to_do() -> None:
    support = cuda.cuda_ipc_support()
    assert not support.available and "cupy" in support.reason
    message = cuda.no_support_message(support)
    assert "no CUDA IPC support" in message and "shared memory" in message
    with pytest.raises(TransportError, match="no CUDA IPC support"):
        cuda.open_region(bytes(64), 2 << 20, UUID_A)


@pytest.mark.skipif(HAS_CUPY, reason="cupy is installed here: covered by the gpu tests")
def test_client_channel_without_cupy_falls_back_once_and_logs_why(
        caplog: pytest.LogCaptureFixture) -> None:
    registered: list[object] = []
    channel = cuda.CudaIpcChannel(
        "auto", register=lambda buffer: registered.append(buffer) or 1,  # type: ignore[func-returns-value]
        release=lambda region_id: None, same_host=True, worker_pid=os.getpid(),
    )
    with caplog.at_level("WARNING", logger="torch_jax_interop.transport"):
        assert channel.pool_for(0) is None
        assert channel.pool_for(0) is None  # decided once
    assert registered == []
    assert "cupy" in channel.reasons[0]
    assert [r.getMessage() for r in caplog.records if "fall back" in r.getMessage()] == [
        f"CUDA tensors on cuda:0 fall back to the host path (through host memory): "
        f"{channel.reasons[0]}"
    ]
    insisting = cuda.CudaIpcChannel(
        "cuda_ipc", register=lambda buffer: 1, release=lambda region_id: None,
        same_host=True, worker_pid=os.getpid(),
    )
    with pytest.raises(TransportError, match="transport='cuda_ipc' is not possible: .*cupy"):
        insisting.pool_for(0)


def test_client_channel_for_a_remote_worker_registers_nothing() -> None:
    channel = cuda.CudaIpcChannel(
        "auto", register=lambda buffer: (_ for _ in ()).throw(AssertionError("registered")),
        release=lambda region_id: None, same_host=False, worker_pid=1,
    )
    assert channel.pool_for(0) is None
    assert "another host" in channel.reasons[0] or "cupy" in channel.reasons[0]
    channel.close(release_regions=True)


def test_importing_the_transport_imports_no_gpu_library(run_python) -> None:  # noqa: ANN001
    result = run_python("""
        import sys
        import torch_jax_interop.transport.cuda
        import torch_jax_interop.server._codec  # noqa: F401 (imports jax, not torch/cupy)
        print(sorted(m for m in ("cupy", "torch") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- on a GPU -----------------------------------------------------------------------------------


@pytest.fixture
def gpu_pool():  # noqa: ANN201
    """A CudaIpcPool on cuda:0 whose regions get ids 1, 2, ... (no worker involved)."""
    ids = iter(range(1, 1000))
    buffers: list[object] = []

    def register(buffer: object) -> tuple[int, int]:
        buffers.append(buffer)
        region_id = next(ids)
        return region_id, region_id

    pool = cuda.CudaIpcPool(register, 0, min_region_bytes=4 << 20)
    yield pool, buffers
    pool.close()


@pytest.mark.gpu
def test_pool_slices_are_aligned_reused_and_viewed_without_copies(gpu_pool) -> None:  # noqa: ANN001
    import torch

    pool, buffers = gpu_pool
    a, b = pool.allocate(1000), pool.allocate(1)
    assert len(buffers) == 1 and buffers[0].size == 4 << 20
    assert a.offset % 256 == 0 and b.offset % 256 == 0 and b.offset >= a.offset + 1000
    assert pool.device_uuid == parse_gpu_uuid(str(torch.cuda.get_device_properties(0).uuid))
    view = a.torch_bytes()
    assert view.is_cuda and view.numel() == 1000 and view.data_ptr() == a.ptr
    view.fill_(7)
    torch.cuda.synchronize()
    assert int(view.sum()) == 7000
    offset = a.offset
    a.release()
    assert pool.allocate(1000).offset == offset  # reused, not a new buffer
    big = pool.allocate(5 << 20)  # larger than a region: a new buffer, in 2 MiB multiples
    assert len(buffers) == 2 and buffers[1].size == 6 << 20 and big.offset == 0


@pytest.mark.gpu
def test_a_slice_is_released_when_its_last_view_dies(gpu_pool) -> None:  # noqa: ANN001
    import gc

    pool, _ = gpu_pool
    piece = pool.allocate(512)
    view = piece.torch_bytes(release_when_collected=True)[256:].view(2, 128)
    gc.collect()
    assert not piece.released
    del view
    gc.collect()
    assert piece.released


_WORKER_SIDE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from torch_jax_interop.transport import cuda
from torch_jax_interop.transport.cuda import _worker
handle, uuid = bytes.fromhex(sys.argv[1]), sys.argv[3]
size, offset, out_offset = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
first = cuda.open_region(handle, size, uuid)
second = cuda.open_region(handle, size, uuid)  # the same session re-registering
x = first.jax_array(offset, np.float32, (1024,))
aliased = x.unsafe_buffer_pointer() == first.ptr + offset
bf = first.jax_array(offset, jnp.bfloat16, (8,))
first.write(out_offset, x * 2)
print(json.dumps({"sum": float(x.sum()), "aliased": aliased, "opened": _worker.open_count,
                  "same_ptr": first.ptr == second.ptr, "bf16": bf.dtype.name,
                  "platform": x.devices().pop().platform}))
"""


@pytest.mark.gpu
def test_the_worker_side_aliases_the_clients_buffer_and_writes_into_it(gpu_pool) -> None:  # noqa: ANN001
    import torch

    pool, buffers = gpu_pool
    data = pool.allocate(4096)
    out = pool.allocate(4096)
    data.torch_bytes().view(torch.float32).copy_(torch.arange(1024, dtype=torch.float32,
                                                              device="cuda"))
    torch.cuda.synchronize()
    buffer = buffers[0]
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WORKER_SIDE), buffer.handle.hex(),
         str(buffer.size), buffer.device_uuid, str(data.offset), str(out.offset)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"sum": float(sum(range(1024))), "aliased": True, "opened": 1,
                      "same_ptr": True, "bf16": "bfloat16", "platform": "gpu"}
    got = out.torch_bytes().view(torch.float32)
    assert torch.equal(got, torch.arange(1024, dtype=torch.float32, device="cuda") * 2)
