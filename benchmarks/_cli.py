"""``python -m benchmarks``: run the groups with a progress bar and write the results.

Writes into ``--out`` (default ``benchmarks/results/``):

* ``latest.json``: one record per case and variant (group, name, variant, bytes, repetitions,
  median_s, p10_s, p90_s, status, note), the comparisons with their targets, the machine;
* ``latest.md``: the tables of the docs' Performance page (docs/performance.md);
* ``throughput.png``: remote round-trip throughput against payload size, per transport,
  with the memcpy and bare-gRPC-echo floors;
* ``reference.json`` too with ``--reference`` (the committed copy of a full run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import (
    _autograd,
    _convert,
    _distributed,
    _gpu,
    _machine,
    _original,
    _pipeline,
    _remote,
    _report,
    _torch_module,
)
from ._processes import REPO_ROOT
from ._suite import ERROR, Record, Suite
from ._timing import TimingConfig

GROUPS: dict[str, Callable[[Suite], list[tuple[str, Callable[[], None]]]]] = {
    "convert": _convert.tasks,
    "autograd": _autograd.tasks,
    "torch_module": _torch_module.tasks,
    "remote": _remote.tasks,
    "pipeline": _pipeline.tasks,
    "original": _original.tasks,
    "gpu": _gpu.tasks,
    "distributed": _distributed.tasks,
}
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time every case next to its reference; write JSON, Markdown and a PNG plot.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few tiny repetitions: proves the suite runs (seconds)",
    )
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        metavar="GROUP[,GROUP]",
        help=f"groups to run, comma-separated, from: {', '.join(GROUPS)} (default: all)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/results/)"
    )
    parser.add_argument(
        "--reference", action="store_true", help="also write reference.json (the committed copy)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    groups = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in groups if name not in GROUPS]
    if unknown or not groups:
        parser.error(f"unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    args.groups = groups
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks" + "".join(
        f" {arg}" for arg in (sys.argv[1:] if argv is None else argv)
    )
    config = TimingConfig.quick() if args.quick else TimingConfig()
    suite = Suite(config=config, quick=args.quick)
    machine = _machine.describe()
    started = time.perf_counter()

    from tqdm import tqdm

    try:
        work: list[tuple[str, str, Callable[[], None]]] = []
        for group in args.groups:
            work += [(group, title, run) for title, run in GROUPS[group](suite)]
        with tqdm(work, unit="case", disable=args.no_progress, dynamic_ncols=True) as bar:
            for group, title, run in bar:
                bar.set_description(title[:48])
                try:
                    run()
                except Exception as error:  # record it and go on with the other cases
                    bar.write(f"{title}: {type(error).__name__}: {error}")
                    suite.add(
                        Record(
                            group,
                            title,
                            "-",
                            0,
                            status=ERROR,
                            note=f"{type(error).__name__}: {error} | "
                            + traceback.format_exc(limit=3).replace("\n", " ")[-300:],
                        )
                    )
    finally:
        suite.resources.close()

    machine["load_average_end"] = _machine.load_average()
    machine["duration_s"] = round(time.perf_counter() - started, 1)
    paths = _report.write_all(suite, machine, command, args.out)
    if args.reference:
        shutil.copyfile(paths["json"], args.out / "reference.json")
    print(paths["markdown"].read_text(encoding="utf-8"))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
