"""Measures whichever `torch_jax_interop` the running interpreter imports; prints JSON.

The original torch-jax-interop 0.0.8 has the same import name as this project, so the
`original` group runs this script twice, with the same code and settings: once with the
original's virtual environment's python, once with ours. Only the standard library, numpy,
torch and JAX are imported besides `torch_jax_interop` and two stdlib-or-JAX-only modules
of this benchmark suite (`_timing`, `_models`) loaded from the repository root.

    python benchmarks/_original_runner.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # repository root

from benchmarks import _models  # noqa: E402
from benchmarks._timing import TimingConfig, measure  # noqa: E402

TINY = "WrappedJaxFunction fwd+bwd, tiny fn"
MLP = "MLP 784-256-10 train step, batch 256"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    config = TimingConfig.quick() if args.quick else TimingConfig()
    warnings.simplefilter("ignore")

    from importlib import metadata

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import torch_jax_interop as tji

    out: dict[str, Any] = {
        "version": metadata.version("torch-jax-interop"),
        "module": str(Path(tji.__file__).resolve().parent),
        "python": sys.executable,
        "records": [],
    }

    def record(name: str, nbytes: int, run: Any) -> None:
        try:
            stats = measure({"x": run}, config)["x"]
            out["records"].append({"name": name, "bytes": nbytes, **stats.as_dict()})
        except Exception as error:
            out["records"].append(
                {"name": name, "bytes": nbytes, "error": f"{type(error).__name__}: {error}"[:300]}
            )

    for count in (16, 64 * 2**20 // 4):
        t = torch.ones(count, dtype=torch.float32)
        a = jnp.ones(count, dtype=jnp.float32).block_until_ready()
        record("torch_to_jax float32", count * 4, lambda t=t: tji.torch_to_jax(t))
        record("jax_to_torch float32", count * 4, lambda a=a: tji.jax_to_torch(a))

    def tiny() -> Any:
        module = tji.WrappedJaxFunction(
            _models.tiny, jax.tree.map(jnp.asarray, _models.tiny_params())
        )
        # torch.tensor: a 64-byte aligned copy. 0.0.8 raises on a tensor that is not
        # (ValueError: "... not aligned to 64 bytes. However copy=False"), as numpy's may be
        x = torch.tensor(np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32))
        cotangent = torch.ones(4, 2)

        def run() -> None:
            module.zero_grad()
            module(x).backward(cotangent)

        return run

    def mlp() -> Any:
        module = tji.WrappedJaxFunction(
            _models.mlp_apply, jax.tree.map(jnp.asarray, _models.mlp_params())
        )
        optimizer = torch.optim.SGD(module.parameters(), lr=_models.LEARNING_RATE)
        x_np, y_np = _models.mlp_batch()
        x, y = torch.tensor(x_np), torch.tensor(y_np).long()

        def run() -> None:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()

        return run

    for name, nbytes, build in ((TINY, 0, tiny), (MLP, _models.mlp_batch()[0].nbytes, mlp)):
        try:
            run = build()
        except Exception as error:
            out["records"].append(
                {"name": name, "bytes": nbytes, "error": f"{type(error).__name__}: {error}"[:300]}
            )
            continue
        record(name, nbytes, run)

    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
