"""Group `convert`: library-mode conversions against the raw DLPack calls they wrap."""

from __future__ import annotations

import warnings
from collections.abc import Callable

from ._suite import ERROR, Record, Suite, Target

GROUP = "convert"
TARGET = Target("<=", 1.05, "issue 2")
SIZES = {"16 floats": 16, "64 MiB": 64 * 2**20 // 4}


def tasks(suite: Suite) -> list[tuple[str, Callable[[], None]]]:
    try:
        import jax
        import jax.numpy as jnp
        import torch

        from torch_jax_interop import jax_to_torch, torch_to_jax
        from torch_jax_interop._dtypes import SHARED_DTYPES
    except ImportError as error:
        reason = f"skipped: cannot import the conversion API ({error})"
        return [("convert: skipped", lambda: suite.skip(GROUP, "all", reason))]

    def float32_case(label: str, count: int) -> None:
        t = torch.ones(count, dtype=torch.float32)
        a = jnp.ones(count, dtype=jnp.float32).block_until_ready()
        nbytes = count * 4
        suite.measure(
            GROUP,
            "torch_to_jax float32",
            nbytes,
            {
                "ours": lambda: torch_to_jax(t),
                "raw jax.dlpack.from_dlpack": lambda: jax.dlpack.from_dlpack(t),
            },
            references=("raw jax.dlpack.from_dlpack",),
        )
        suite.compare(
            GROUP, "torch_to_jax float32", nbytes, "ours", "raw jax.dlpack.from_dlpack", TARGET
        )
        suite.measure(
            GROUP,
            "jax_to_torch float32",
            nbytes,
            {
                "ours": lambda: jax_to_torch(a),
                "raw torch.from_dlpack": lambda: torch.from_dlpack(a),
            },
            references=("raw torch.from_dlpack",),
        )
        suite.compare(
            GROUP, "jax_to_torch float32", nbytes, "ours", "raw torch.from_dlpack", TARGET
        )

    def dtype_case(name: str, itemsize: int, narrow: str | None) -> None:
        nbytes = 16 * itemsize
        dtype = getattr(torch, name)
        t = torch.zeros(16, dtype=dtype)
        # a 64-bit dtype narrows while x64 is off: ours copies to 32 bits (a range check and
        # a cast), raw DLPack truncates silently; the ratio is reported, not held to 1.05
        target = TARGET if narrow is None else None
        for direction, ours, raw_name, make_raw, source in (
            ("torch_to_jax", torch_to_jax, "raw jax.dlpack.from_dlpack", jax.dlpack.from_dlpack, t),
            ("jax_to_torch", jax_to_torch, "raw torch.from_dlpack", torch.from_dlpack, None),
        ):
            case = f"{direction} dtype {name}"
            if source is None and narrow is not None:
                continue  # x64 off: JAX has no 64-bit arrays to convert
            if source is None:
                try:
                    source = jnp.zeros(16, dtype=getattr(jnp, name))
                except Exception as error:
                    suite.add(Record(GROUP, case, "ours", nbytes, status=ERROR, note=str(error)))
                    continue
            variants = {"ours": _bind(ours, source)}
            try:
                make_raw(source)
                variants[raw_name] = _bind(make_raw, source)
            except Exception as error:  # the raw call refuses this dtype: record why
                suite.add(
                    Record(
                        GROUP,
                        case,
                        raw_name,
                        nbytes,
                        reference=True,
                        status=ERROR,
                        note=f"raw call fails: {type(error).__name__}: {error}"[:200],
                    )
                )
            suite.measure(GROUP, case, nbytes, variants, references=(raw_name,))
            suite.compare(GROUP, case, nbytes, "ours", raw_name, target)

    work: list[tuple[str, Callable[[], None]]] = [
        (f"convert {label}", _bind2(float32_case, label, count)) for label, count in SIZES.items()
    ]

    def all_dtypes() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jax warns about 64-bit dtypes with x64 off
            for info in SHARED_DTYPES:
                dtype_case(info.name, info.itemsize, info.narrow)

    work.append(("convert every dtype", all_dtypes))
    return work


def _bind(fn: Callable[..., object], value: object) -> Callable[[], object]:
    return lambda: fn(value)


def _bind2(fn: Callable[..., None], *args: object) -> Callable[[], None]:
    return lambda: fn(*args)
