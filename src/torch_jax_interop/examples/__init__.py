"""Example JAX functions a worker can serve (``--function NAME=torch_jax_interop.examples...``)."""
