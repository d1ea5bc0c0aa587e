"""Runs one ``autograd`` MLP case in this (child) process and prints its records as JSON.

``python -m benchmarks._autograd_child NAME TIMING_JSON --quick|--full``: the parent
(``_autograd.run_child``) starts it with the environment the case is about, which torch
reads only once, when it loads (``OMP_WAIT_POLICY``). The records, with the environment
the child saw, go back on the last line of stdout and join the parent's suite.
"""

from __future__ import annotations

import json
import os
import sys

from ._autograd import mlp_case
from ._suite import Suite
from ._timing import TimingConfig


def main(argv: list[str]) -> int:
    name, timing, mode = argv
    suite = Suite(config=TimingConfig(**json.loads(timing)), quick=mode == "--quick")
    mlp_case(suite, name, "jax", None)
    print(json.dumps({
        "records": [record.as_dict() for record in suite.records],
        # what the child's torch saw: the parent's JSON keeps it, the tests check it
        "environment": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
