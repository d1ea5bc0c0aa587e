"""torch_jax_interop.v1 messages and service stubs (generated)."""
