"""Every private jax / jaxlib / torch API the package uses, behind one compatibility layer.

# Note [Private APIs]

The package reaches into a framework's private API only where the public one is measurably
slower or missing, and only here: ``_compat/_jax.py`` (imports JAX, never torch: the worker
uses it) and ``_compat/_torch.py`` (imports torch, never JAX: the client uses it). This
``__init__`` imports neither. Each private entry point has a public fallback that gives the
same result (zero-copy where the private one is), and a private fast path is used only after
a probe on first use showed it works with the installed version:

================================================  =====================================
private API (why)                                 public fallback
================================================  =====================================
``jax._src.lib._jax.dlpack_managed_tensor_to_     ``jax.dlpack.from_dlpack(x)``: same
buffer`` (CPU DLPack import without ~25 us of     buffer, zero-copy (64-byte aligned,
Python; probed: same data pointer)                C-contiguous CPU data)
``jax._src.lib._jax.buffer_to_dlpack_managed_     ``torch.from_dlpack(array)``:
tensor`` (CPU DLPack export; probed)              zero-copy
``jax._src.lib._jax.ArrayImpl``, ``._arrays``     ``jax.Array`` and ``a.sharding``
(concrete array type, single-buffer check)
``torch._C._to_dlpack`` / ``torch._C._from_       ``t.__dlpack__()`` /
dlpack`` (no per-call Python dispatch)            ``torch.from_dlpack``
``torch._disable_dynamo`` (imports torch._dynamo  ``torch.compiler.disable``: imports
only when first called)                           torch._dynamo at decoration (~1.9 s)
``torch._C._autograd._get_current_graph_task_     ``True`` (keep residuals; released
keep_graph`` (free residuals after backward)      with the graph instead)
``torch._C._set_grad_enabled`` (no context       ``torch.set_grad_enabled(mode)``,
object per call)                                  called as a function
``torch._subclasses.fake_tensor.FakeTensorMode``  none: shape inference falls back to
(shape inference without data)                    meta tensors and reports both errors
================================================  =====================================

``tests/interop_core/test_compat.py`` forces every fallback and checks, by data pointers,
that each stays zero-copy.
"""
