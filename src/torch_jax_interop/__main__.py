"""``python -m torch_jax_interop ...`` is the ``torch-jax-interop`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
