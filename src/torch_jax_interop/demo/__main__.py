"""``python -m torch_jax_interop.demo [--steps N] [--transport auto|shm|inline]``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
