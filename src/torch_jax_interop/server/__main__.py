"""``python -m torch_jax_interop.server ...`` is ``torch-jax-interop worker ...``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
