"""The docs site's generated tables: performance from a benchmark run, reliability from a test run.

Nothing in these tables is typed by hand. ``scripts/mkdocs_hooks.py`` calls ``performance()``
and ``reliability()`` while the site builds and puts their Markdown where a page says
``<!-- generated: performance -->`` or ``<!-- generated: reliability -->``.

* Performance: ``benchmarks/results/latest.json`` (written by ``python -m benchmarks``) when
  it holds a full run, else the committed ``benchmarks/results/reference.json`` (written by
  ``python -m benchmarks --reference``); the Markdown writer is the benchmarks' own
  (``benchmarks/_report.py``).
* Reliability: ``.cache/reliability.json``, which the reliability tests write (see
  ``tests/support/reliability.py``), when it holds every section, else the committed snapshot
  ``docs/data/reliability.json``. ``python scripts/docs_tables.py snapshot`` refreshes the
  snapshot from the last test run (and from ``.cache/soak.json``, written by
  ``scripts/soak.py --json .cache/soak.json``, when present).

``python scripts/docs_tables.py performance`` (or ``reliability``) prints a table;
``python scripts/docs_tables.py readme`` rewrites the README's block between
``<!-- begin generated: targets -->`` and ``<!-- end generated: targets -->`` (the remote-call
targets of the chosen run), which ``tests/test_docs.py`` checks is up to date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PERFORMANCE_SOURCES = (RESULTS / "latest.json", RESULTS / "reference.json")
THROUGHPUT_PLOT = RESULTS / "throughput.png"
RELIABILITY_RUN = ROOT / ".cache" / "reliability.json"
SOAK_RUN = ROOT / ".cache" / "soak.json"
RELIABILITY_SNAPSHOT = ROOT / "docs" / "data" / "reliability.json"
# what the reliability tests record (tests/support/reliability.py), by test module
RELIABILITY_SECTIONS = {
    "fuzz": "tests/server/test_fuzz.py",
    "recovery": "tests/server/test_recovery.py",
    "limits": "tests/server/test_limits.py",
    "load": "tests/server/test_load.py",
}


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ---------------------------------------------------------------------------------------
# Performance


def performance_source() -> Path:
    """The run the performance tables come from: a full ``latest.json``, else the reference."""
    for path in PERFORMANCE_SOURCES:
        if path.is_file() and not json.loads(path.read_text()).get("quick", True):
            return path
    raise FileNotFoundError(
        f"no full benchmark run in {_relative(RESULTS)}: run `python -m benchmarks` "
        "(reference.json is committed; was it deleted?)"
    )


def performance() -> str:
    """The benchmarks' own Markdown tables for the chosen run, naming the file they came from."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import _report

    source = performance_source()
    suite, machine, command = _report.from_json(json.loads(source.read_text()))
    tables = _report.to_markdown(suite, machine, command)
    return f"Source: `{_relative(source)}`.\n\n{tables}"


README_TARGETS_RUN = RESULTS / "reference.json"  # `python -m benchmarks --reference`
README_TARGETS_SOURCE = "issue 16"  # the README shows these targets; the docs show them all
README_BEGIN = "<!-- begin generated: targets -->"
README_END = "<!-- end generated: targets -->"


def readme_targets() -> str:
    """The README's table: the remote-call and overhead targets of the chosen run, with the
    machine and the command that measured them, from the committed reference run (so a local
    benchmark run leaves the README alone)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import _report

    source = README_TARGETS_RUN
    suite, machine, command = _report.from_json(json.loads(source.read_text()))
    rows = []
    for c in suite.comparisons:
        if c.target is None or c.target.source != README_TARGETS_SOURCE:
            continue
        rows.append([c.name if c.group != "remote" else f"remote {c.name}",
                     _report._named_median(suite, c, c.variant),
                     _report._named_median(suite, c, c.reference),
                     _report.format_ratio(c.ratio), c.target.describe(),
                     c.result if c.ratio is not None else "n/a (not measured)"])
    lines = _table(["case", "measured", "reference", "ratio", "target", "result"], rows)
    return "\n".join([
        f"Measured by `{command}` on {_report.machine_line(machine)} "
        f"(`{_relative(source)}`):", "", *lines])


def write_readme(readme: Path = ROOT / "README.md") -> bool:
    """Put ``readme_targets()`` between the README's markers; whether the file changed."""
    text = readme.read_text()
    head, begin, rest = text.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise ValueError(f"{readme.name} lacks the markers {README_BEGIN} ... {README_END}")
    new = f"{head}{README_BEGIN}\n{readme_targets()}\n{README_END}{tail}"
    readme.write_text(new)
    return new != text


# ---------------------------------------------------------------------------------------
# Reliability


def reliability_source() -> Path:
    """The last test run's counts when complete, else the committed snapshot."""
    if RELIABILITY_RUN.is_file():
        try:
            data = json.loads(RELIABILITY_RUN.read_text())
        except ValueError:
            data = {}
        if all(section in data for section in RELIABILITY_SECTIONS):
            return RELIABILITY_RUN
    return RELIABILITY_SNAPSHOT


def _counts(counts: dict[str, int]) -> str:
    return "; ".join(f"{value:,} {name}" for name, value in sorted(counts.items()))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def reliability_rows(data: dict[str, Any]) -> list[list[str]]:
    """One row per recorded figure; a section the run did not record is left out."""
    rows: list[list[str]] = []
    where = {key: f"`{path.split('/')[-1]}`" for key, path in RELIABILITY_SECTIONS.items()}
    if "recovery" in data:
        recovery = data["recovery"]
        rows.append(["faults injected (processes killed, a region released mid-call)",
                     f"**{recovery['faults_injected']}**: {_counts(recovery['faults'])}",
                     where["recovery"]])
    if "limits" in data:
        limits = data["limits"]
        rows.append(["limit and access checks",
                     f"**{limits['limit_and_access_checks']}**: {_counts(limits['checks'])}",
                     where["limits"]])
    if "fuzz" in data:
        fuzz = data["fuzz"]
        statuses = fuzz["statuses"]
        internal = statuses.get("INTERNAL", 0) + statuses.get("UNKNOWN", 0)
        # the test also counts, among the kinds, the accepted calls it checked byte for byte
        kinds = dict(fuzz["cases_by_kind"])
        checked = {k: kinds.pop(k) for k in list(kinds) if k.startswith("accepted")}
        rows += [
            ["generated bad inputs sent to a live worker",
             f"**{fuzz['generated_cases']:,}**: {_counts(kinds)}", where["fuzz"]],
            ["the worker's answers to them",
             f"{_counts(statuses)}; **{internal} INTERNAL or UNKNOWN**; "
             + "".join(f"{_counts({name: value})}; " for name, value in checked.items())
             + f"worker alive after: {'yes' if fuzz['worker_alive_after'] else '**no**'}",
             where["fuzz"]],
            ["bytes changed outside the output arenas",
             f"**{fuzz['bytes_changed_outside_arenas']}**", where["fuzz"]],
        ]
    if "load" in data:
        load = data["load"]
        rows.append(["concurrent calls checked byte for byte",
                     f"**{load['concurrent_calls_checked']:,}** from {load['client_processes']} "
                     f"client processes ({load['client_processes']} × "
                     f"{load['calls_per_process_main_loop']} on long-lived connections, "
                     f"{load['short_lived_sessions']} short-lived sessions, "
                     f"{load['register_release_cycles']} register → call → release cycles, "
                     f"{load['big_tensors']} calls of 24 MiB): **{load['mismatches']} "
                     f"mismatches, {load['errors']} errors**",
                     where["load"]])
    if "soak" in data:
        soak = data["soak"]
        start, end = soak["start"], soak["end"]
        rows.append([f"soak: {soak['steps']:,} remote training steps ({soak['transport']})",
                     f"{soak['seconds']} s, {soak['steps_per_second']} steps/s; worker RSS "
                     f"{start['worker_rss_mib']} → {end['worker_rss_mib']} MiB, client RSS "
                     f"{start['client_rss_mib']} → {end['client_rss_mib']} MiB (from step "
                     f"{start['step']}); {soak['worker_residual_cap_evictions']} residual-cap "
                     f"evictions; {len(soak['segments_left'])} segments left",
                     "`scripts/soak.py`"])
    return rows


def _soak_summary() -> dict[str, Any]:
    return {k: v for k, v in json.loads(SOAK_RUN.read_text()).items() if k != "reports"}


def reliability() -> str:
    source = reliability_source()
    data = json.loads(source.read_text())
    if source == RELIABILITY_RUN and SOAK_RUN.is_file():
        data["soak"] = _soak_summary()
    commands = sorted({entry["command"] for entry in data.values() if "command" in entry})
    recorded = sorted(entry["recorded"] for entry in data.values() if "recorded" in entry)
    lines = [
        f"Source: `{_relative(source)}`, recorded {recorded[0]} – {recorded[-1]} by "
        + ", ".join(f"`{command}`" for command in commands) + ".",
        "",
        *_table(["what", "figure", "test"], reliability_rows(data)),
    ]
    return "\n".join(lines) + "\n"


def snapshot() -> Path:
    """Copy the last test run's counts (and the soak's summary) into the committed snapshot."""
    if reliability_source() != RELIABILITY_RUN:
        missing = [s for s in RELIABILITY_SECTIONS
                   if s not in json.loads(RELIABILITY_RUN.read_text() or "{}")] \
            if RELIABILITY_RUN.is_file() else list(RELIABILITY_SECTIONS)
        raise SystemExit(
            f"error: {_relative(RELIABILITY_RUN)} lacks {', '.join(missing)}: run "
            f"`python -m pytest {' '.join(RELIABILITY_SECTIONS.values())}` first"
        )
    data = json.loads(RELIABILITY_RUN.read_text())
    if SOAK_RUN.is_file():
        data["soak"] = _soak_summary()
    RELIABILITY_SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    RELIABILITY_SNAPSHOT.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return RELIABILITY_SNAPSHOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["performance", "reliability", "snapshot", "readme"])
    args = parser.parse_args(argv)
    if args.what == "readme":
        print("README.md " + ("updated" if write_readme() else "already up to date"))
    elif args.what == "snapshot":
        print(f"wrote {_relative(snapshot())}")
    else:
        print(performance() if args.what == "performance" else reliability(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
