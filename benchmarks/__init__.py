"""The benchmark suite: ``python -m benchmarks [--quick] [--only GROUP,...] [--out DIR]``.

Groups: ``convert``, ``autograd``, ``remote``, ``original``, ``gpu``. Every case is timed
next to its reference (raw DLPack call, plain JAX / torch, one memcpy, a bare gRPC echo,
torch-jax-interop 0.0.8) in the same run. See ``_cli.py`` for what is written where.

This package imports nothing at import time: ``_original_runner.py`` and the worker load
single modules of it from other environments.
"""
