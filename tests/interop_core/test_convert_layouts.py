"""torch layouts through torch_to_jax (and back): when memory is shared and when it is copied.

Every layout × dtype × ``copy`` × direction case checks the values (raw bytes) and the data
pointers: JAX imports contiguous and transposed / permuted tensors (any size-1 strides) in
place, and must copy steps, expanded (stride 0) and overlapping dims, a data pointer that is
not 64-byte aligned, and conjugate / negative bits. ``copy=False`` raises
``CopyRequiredError`` exactly where a copy is forced; ``copy=True`` never shares memory.
A hypothesis test then checks random views of random tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from torch_jax_interop import CopyRequiredError, jax_to_torch, torch_to_jax
from torch_jax_interop._dtypes import BY_NAME, SHARED_DTYPES, DTypeInfo

# CPU tests: JAX arrays they create stay on the CPU even where JAX has a GPU.
pytestmark = pytest.mark.usefixtures("jax_default_cpu")


def torch_bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:  # a zero-size view may keep strides that .view(uint8) refuses
        return b""
    t = t.detach().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
    t = t.reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def jax_bytes(a: jax.Array) -> bytes:
    return np.ascontiguousarray(np.asarray(a)).tobytes()


def random_tensor(info: DTypeInfo, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if info.kind == "b":
        return torch.randint(0, 2, shape, generator=generator).to(torch.bool)
    numel = int(np.prod(shape))
    raw = torch.randint(0, 256, (numel * info.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(getattr(torch, info.name)).reshape(shape)


def storage_span(t: torch.Tensor) -> range:
    start = t.untyped_storage().data_ptr()
    return range(start, start + t.untyped_storage().nbytes())


def meaningful_strides(t: torch.Tensor) -> tuple[int | None, ...]:
    """Strides of the dims longer than 1 (a size-1 dim's stride is never used)."""
    return tuple(s if n > 1 else None for n, s in zip(t.shape, t.stride(), strict=True))


class Layout(NamedTuple):
    make: Callable[[torch.Tensor], torch.Tensor]  # a view of a (6, 8) contiguous base
    shares: bool | None  # True: zero-copy; False: a copy is forced; None: zero-size, no data
    refusal: str  # what CopyRequiredError says when copy=False and a copy is forced
    kinds: str = "fciub"  # dtype kinds the layout applies to


STRIDES = r"cannot import strides .* copy=False.*\.contiguous\(\)"
UNALIGNED = r"not 64-byte aligned.*copy=False"
BITS = r"conjugate or negative bit.*copy=False.*resolve_conj"

LAYOUTS = {
    "contiguous": Layout(lambda b: b, True, ""),
    "transposed": Layout(lambda b: b.T, True, ""),
    "permuted_3d": Layout(lambda b: b.reshape(2, 3, 8).permute(2, 0, 1), True, ""),
    "size1_odd_strides": Layout(lambda b: b.as_strided((6, 1, 8), (8, 37, 1)), True, ""),
    "size1_transposed_odd": Layout(lambda b: b.as_strided((8, 1, 6), (1, 99, 8)), True, ""),
    "size1_stride0": Layout(lambda b: b.reshape(-1).as_strided((1, 8), (0, 1)), True, ""),
    "0d": Layout(lambda b: b.reshape(-1)[0], True, ""),
    "zero_size": Layout(lambda b: b[:0], None, ""),
    "zero_size_transposed": Layout(lambda b: b[:, :0].T, None, ""),
    "zero_size_stepped": Layout(lambda b: b[:0, ::2], None, ""),
    "step": Layout(lambda b: b[:, ::2], False, STRIDES),
    "step_rows": Layout(lambda b: b[::2], False, STRIDES),
    "expanded": Layout(lambda b: b[:, :1].expand(6, 8), False, STRIDES),
    "expanded_scalar": Layout(lambda b: b.reshape(-1)[0].expand(3, 4), False, STRIDES),
    "overlapping": Layout(lambda b: b.reshape(-1).as_strided((3, 3), (1, 1)), False, STRIDES),
    "unaligned": Layout(lambda b: b.reshape(-1)[1:], False, UNALIGNED),
    "unaligned_0d": Layout(lambda b: b.reshape(-1)[1], False, UNALIGNED),
    "unaligned_transposed": Layout(lambda b: b[:, 1:].T, False, UNALIGNED),
    "conj": Layout(lambda b: b.conj(), False, BITS, kinds="c"),
    "neg": Layout(torch._neg_view, False, BITS, kinds="fc"),
    "conj_neg_transposed": Layout(lambda b: torch._neg_view(b.conj()).T, False, BITS, kinds="c"),
}

# Item sizes 1, 2, 4 and 8, each kind; float8 has no negation kernel in torch, so no "neg".
LAYOUT_DTYPES = ["float32", "bfloat16", "int8", "uint16", "bool", "complex64", "float8_e5m2"]


def cases() -> list[tuple[str, str]]:
    out = []
    for layout_name, layout in LAYOUTS.items():
        for name in LAYOUT_DTYPES:
            info = BY_NAME[name]
            if info.kind not in layout.kinds or (layout_name == "neg" and info.itemsize == 1):
                continue
            out.append((layout_name, name))
    return out


@pytest.mark.parametrize("direction", ["torch->jax", "torch->jax->torch"])
@pytest.mark.parametrize("copy", [None, False, True])
@pytest.mark.parametrize(("layout_name", "dtype_name"), cases())
def test_layout(layout_name: str, dtype_name: str, copy: bool | None, direction: str) -> None:
    layout = LAYOUTS[layout_name]
    base = random_tensor(BY_NAME[dtype_name], (6, 8))
    view = layout.make(base)
    expected = torch_bytes(view)
    assert base.data_ptr() % 64 == 0, "torch's CPU allocator is 64-byte aligned"

    if copy is False and layout.shares is False:
        with pytest.raises(CopyRequiredError, match=layout.refusal):
            torch_to_jax(view, copy=False)
        return

    a = torch_to_jax(view, copy=copy)
    assert a.shape == tuple(view.shape)
    assert jax_bytes(a) == expected
    result_ptr = a.unsafe_buffer_pointer()
    if direction == "torch->jax->torch":
        back = jax_to_torch(a)
        assert back.dtype == view.dtype and back.shape == view.shape
        assert torch_bytes(back) == expected
        assert back.data_ptr() == result_ptr
        if layout.shares and not copy:  # the same view of the same memory
            assert meaningful_strides(back) == meaningful_strides(view)

    if layout.shares is None:  # no data: nothing to share or copy
        return
    if copy:
        assert result_ptr not in storage_span(view)
    else:
        assert (result_ptr == view.data_ptr()) is layout.shares
        assert (result_ptr in storage_span(view)) is layout.shares
    if copy or not layout.shares:  # a copy: later writes to the source are not seen
        if base.dtype == torch.bool:
            base.logical_not_()
        else:
            base.view(torch.uint8).bitwise_not_()
        assert jax_bytes(a) == expected


def test_every_layout_has_cases() -> None:
    covered = {layout for layout, _ in cases()}
    assert covered == set(LAYOUTS)


@pytest.mark.parametrize("copy", [None, False])
def test_zero_copy_import_computes_with_the_right_strides(copy: bool | None) -> None:
    """A permuted import is read through its strides by XLA, not as if it were row-major."""
    t = torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1)
    a = torch_to_jax(t, copy=copy)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    np.testing.assert_array_equal(np.asarray(a.sum(axis=0)), t.sum(0).numpy())
    np.testing.assert_array_equal(np.asarray(a @ a.transpose(0, 2, 1)), (t @ t.mT).numpy())


# ---------------------------------------------------------------------------------------
# hypothesis: random views of random tensors

PROPERTY_DTYPES = [info.name for info in SHARED_DTYPES if info.narrow is None]


@st.composite
def views(draw: st.DrawFn) -> torch.Tensor:
    """A random tensor (0-4 dims, sizes 0-5), then random steps, offsets, permutations,
    transposes and expansions."""
    info = BY_NAME[draw(st.sampled_from(PROPERTY_DTYPES))]
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    t = random_tensor(info, shape, seed=draw(st.integers(0, 2**16)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["slice", "permute", "expand", "offset", "select"]))
        if op == "slice" and t.ndim:
            dim = draw(st.integers(0, t.ndim - 1))
            start = draw(st.integers(0, t.shape[dim]))
            step = draw(st.integers(1, 3))
            t = t.narrow(dim, start, t.shape[dim] - start)[
                (slice(None),) * dim + (slice(None, None, step),)
            ]
        elif op == "permute" and t.ndim:
            t = t.permute(*draw(st.permutations(range(t.ndim))))
        elif op == "expand" and t.ndim < 4:
            dim = draw(st.integers(0, t.ndim))
            t = t.unsqueeze(dim)
            size = draw(st.integers(0, 4))
            t = t.expand(*t.shape[:dim], size, *t.shape[dim + 1 :])
        elif op == "offset" and t.numel() > 1:
            t = t.reshape(-1)[1:] if t.is_contiguous() else t
        elif op == "select" and t.ndim and t.shape[0]:
            t = t[draw(st.integers(0, t.shape[0] - 1))]
    return t


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(view=views())
def test_random_views_convert_correctly(view: torch.Tensor) -> None:
    expected = torch_bytes(view)
    a = torch_to_jax(view)
    assert a.shape == tuple(view.shape) and jax_bytes(a) == expected
    back = jax_to_torch(a)
    assert back.shape == view.shape and torch_bytes(back) == expected
    if view.numel() and view.is_contiguous() and view.data_ptr() % 64 == 0:
        assert a.unsafe_buffer_pointer() == view.data_ptr()
    try:
        strict = torch_to_jax(view, copy=False)
    except CopyRequiredError:
        pass
    else:  # copy=False never copies
        assert jax_bytes(strict) == expected
        if view.numel():
            assert strict.unsafe_buffer_pointer() == view.data_ptr()
