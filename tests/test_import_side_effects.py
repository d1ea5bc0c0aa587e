"""Importing torch_jax_interop (and converting) changes no global jax or torch setting.

Each check runs in a fresh interpreter, so that nothing this test process imported or
configured earlier can hide a side effect.
"""

from __future__ import annotations

import json

SNAPSHOT = """
import json, os, sys, warnings

def snapshot():
    import jax, torch
    return {
        "jax.config": {k: repr(v) for k, v in sorted(jax.config.values.items())},
        "jax_enable_x64 (read)": bool(jax.config.read("jax_enable_x64")),
        "torch.default_dtype": str(torch.get_default_dtype()),
        "torch.default_device": str(torch.get_default_device()),
        "torch.num_threads": torch.get_num_threads(),
        "torch.num_interop_threads": torch.get_num_interop_threads(),
        "torch.grad_enabled": torch.is_grad_enabled(),
        "torch.inference_mode": torch.is_inference_mode_enabled(),
        "torch.deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch.anomaly": torch.is_anomaly_enabled(),
        "torch.float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch.printoptions": repr(torch._tensor_str.PRINT_OPTS.__dict__),
        "environ": dict(os.environ),
        "warnings.filters": repr(warnings.filters),
    }
"""


def test_importing_the_package_imports_neither_torch_nor_jax(run_python) -> None:  # noqa: ANN001
    result = run_python(
        """
        import sys
        import torch_jax_interop
        from torch_jax_interop import (
            ConversionError, CopyRequiredError, IntegerOverflowError, InteropError,
            UnsupportedTensorError, __version__,
        )
        heavy = sorted(m for m in ("torch", "jax", "jaxlib") if m in sys.modules)
        print(",".join(heavy) or "none")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_import_and_conversions_change_no_jax_or_torch_setting(run_python) -> None:  # noqa: ANN001
    result = run_python(
        SNAPSHOT
        + """
import jax, jax.numpy as jnp, torch
stages = {"before": snapshot()}
import torch_jax_interop
from torch_jax_interop import jax_to_torch, torch_to_jax
stages["after import"] = snapshot()

t = torch.arange(8.0, requires_grad=True)
torch_to_jax(t); torch_to_jax(t[::2]); torch_to_jax(t.detach()[1:], copy=True)
torch_to_jax(torch.arange(4, dtype=torch.int64))          # narrowed: x64 is off
torch_to_jax(torch.arange(4, dtype=torch.float64), device="cpu")
try:
    torch_to_jax(torch.tensor([2**40]))
except OverflowError:
    pass
jax_to_torch({"a": jnp.ones(3), "b": (jnp.zeros(2, jnp.bfloat16),)}, copy=True)
torch_to_jax(lambda x: x * 2)(torch.ones(2))
stages["after conversions"] = snapshot()

changed = {
    stage: {k: (stages["before"][k], v) for k, v in snap.items() if v != stages["before"][k]}
    for stage, snap in stages.items()
}
print(json.dumps(changed))
""",
    )
    assert result.returncode == 0, result.stderr
    changed = json.loads(result.stdout.strip().splitlines()[-1])
    assert changed == {"before": {}, "after import": {}, "after conversions": {}}
