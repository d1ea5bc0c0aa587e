"""``python -m torch_jax_interop.demo [--steps N] [--transport NAME]`` is
``torch-jax-interop demo ...`` (``--help`` lists the transports)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
