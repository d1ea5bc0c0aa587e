"""torch_jax_interop.proto.v1 messages and service stubs (generated)."""
