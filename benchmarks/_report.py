"""Writes a run's results: ``latest.json``, ``latest.md`` and ``throughput.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import _distributed
from ._suite import OK, OVER_LIMIT, Comparison, Record, Suite, Target
from ._timing import TimingConfig

SCHEMA_VERSION = 1
JSON_NAME = "latest.json"
MARKDOWN_NAME = "latest.md"
PLOT_NAME = "throughput.png"
ROUND_TRIP = ("remote", "identity round trip")
# plot order and style: the transports, then the two floors
PLOT_LINES = (
    ("inproc", {"marker": "o"}),
    ("fast path", {"marker": "D"}),
    ("fast path, pool input", {"marker": "*"}),
    ("shm", {"marker": "s"}),
    ("inline", {"marker": "^"}),
    ("bare gRPC echo", {"marker": "v", "linestyle": "--"}),
    ("memcpy (np.copyto)", {"color": "black", "linewidth": 2.5}),
)


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_bytes(nbytes: int) -> str:
    if nbytes <= 0:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def format_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3f}×" if ratio < 0.1 else f"{ratio:.2f}×"


def write_all(
    suite: Suite, machine: dict[str, Any], command: str, out_dir: Path
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    suite.resolve()
    document = to_json(suite, machine, command)
    paths = {
        "json": out_dir / JSON_NAME,
        "markdown": out_dir / MARKDOWN_NAME,
        "plot": out_dir / PLOT_NAME,
    }
    paths["json"].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    paths["markdown"].write_text(to_markdown(suite, machine, command), encoding="utf-8")
    plot_throughput(suite, machine, paths["plot"])
    return paths


def to_json(suite: Suite, machine: dict[str, Any], command: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "quick": suite.quick,
        "machine": machine,
        "timing": suite.config.as_dict(),
        "records": [record.as_dict() for record in suite.records],
        "comparisons": [comparison.as_dict() for comparison in suite.comparisons],
        "facts": suite.extra,
    }


def from_json(document: dict[str, Any]) -> tuple[Suite, dict[str, Any], str]:
    """The inverse of ``to_json``: ``(suite, machine, command)``, so that the tables can be
    written again from a saved run (the docs site does, from ``latest.json``)."""
    if document.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"benchmark results of schema version {document.get('schema_version')!r}, this "
            f"code reads version {SCHEMA_VERSION}: rerun `python -m benchmarks`"
        )
    suite = Suite(config=TimingConfig(**document["timing"]), quick=bool(document["quick"]))
    for row in document["records"]:
        suite.add(Record.from_dict(row))
    for row in document["comparisons"]:
        target = None if row["target"] is None else Target(**row["target"])
        suite.compare(row["group"], row["name"], row["bytes"], row["variant"], row["reference"],
                      target)
    suite.extra.update(document.get("facts", {}))
    suite.resolve()
    return suite, document["machine"], document["command"]


# ---------------------------------------------------------------------------------------
# Markdown


def _median(suite: Suite, comparison: Comparison, variant: str) -> float | None:
    record = suite.find(comparison.group, comparison.name, variant, comparison.bytes)
    return None if record is None or record.stats is None else record.stats.median_s


def _named_median(suite: Suite, comparison: Comparison, variant: str) -> str:
    return f"{variant}: {format_seconds(_median(suite, comparison, variant))}"


def _is_dtype_case(comparison: Comparison) -> bool:
    return comparison.group == "convert" and " dtype " in comparison.name


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def machine_line(machine: dict[str, Any]) -> str:
    versions = machine.get("versions", {})
    libs = ", ".join(
        f"{name} {versions.get(name)}"
        for name in ("torch", "jax", "grpcio", "protobuf")
        if versions.get(name)
    )
    load = ""
    if machine.get("load_average_start"):
        start, end = machine["load_average_start"][0], (machine.get("load_average_end") or ["?"])[0]
        load = f"; 1-min load average {start} at the start, {end} at the end"
    return (
        f"{machine.get('cpu')}, {machine.get('cores')} cores, GPU: {machine.get('gpu')}; "
        f"Python {machine.get('python')}, {libs}; {machine.get('date')}{load}"
    )


def targets_rows(suite: Suite) -> list[list[str]]:
    rows: list[list[str]] = []
    for comparison in suite.comparisons:
        if comparison.target is None or _is_dtype_case(comparison):
            continue
        rows.append(
            [
                comparison.group,
                comparison.name,
                format_bytes(comparison.bytes),
                _named_median(suite, comparison, comparison.variant),
                _named_median(suite, comparison, comparison.reference),
                format_ratio(comparison.ratio),
                comparison.target.describe(),
                comparison.result if comparison.ratio is not None else "n/a (not measured)",
            ]
        )
    # every dtype, per direction: one row with the worst ratio
    for direction in ("torch_to_jax", "jax_to_torch"):
        cases = [
            c
            for c in suite.comparisons
            if _is_dtype_case(c) and c.name.startswith(direction) and c.target is not None
        ]
        measured = [c for c in cases if c.ratio is not None]
        if not cases:
            continue
        target = cases[0].target
        assert target is not None
        if measured:
            worst = max(measured, key=lambda c: c.ratio or 0.0)
            ratios = sorted(c.ratio or 0.0 for c in measured)
            median_ratio = ratios[len(ratios) // 2]
            ratio_text = (
                f"worst {format_ratio(worst.ratio)} ({worst.name.split()[-1]}), "
                f"median {format_ratio(median_ratio)}"
            )
            result = "PASS" if all(c.result == "PASS" for c in measured) else "MISS"
            if len(measured) < len(cases):
                result += f" ({len(cases) - len(measured)} not measured)"
        else:
            ratio_text, result = "-", "n/a (not measured)"
        rows.append(
            [
                "convert",
                f"{direction}, each of {len(cases)} zero-copy dtypes",
                "16 elements",
                "ours",
                "raw DLPack call",
                ratio_text,
                target.describe(),
                result,
            ]
        )
    return rows


def throughput_rows(suite: Suite) -> tuple[list[str], list[list[str]]]:
    records = [r for r in suite.records if (r.group, r.name) == ROUND_TRIP]
    sizes = sorted({r.bytes for r in records if r.bytes > 0})
    variants = [name for name, _ in PLOT_LINES if any(r.variant == name for r in records)]
    rows = []
    for size in sizes:
        row = [format_bytes(size)]
        for variant in variants:
            record = next((r for r in records if r.bytes == size and r.variant == variant), None)
            row.append(_throughput_cell(record))
        rows.append(row)
    return ["payload", *variants], rows


def _throughput_cell(record: Record | None) -> str:
    if record is None:
        return "-"
    if record.status != OK or record.stats is None:
        return record.status
    gbps = record.bytes / record.stats.median_s / 1e9
    return f"{gbps:.3g} GB/s ({format_seconds(record.stats.median_s)})"


def to_markdown(suite: Suite, machine: dict[str, Any], command: str) -> str:
    samples = sorted({r.stats.repetitions for r in suite.records if r.stats is not None})
    sample_text = (
        f"{samples[0]}–{samples[-1]}"
        if samples and samples[0] != samples[-1]
        else (str(samples[0]) if samples else "0")
    )
    lines = [
        f"<!-- generated by `{command}`; rerun it instead of editing -->",
        f"Measured with `{command}` on {machine_line(machine)}.",
        f"Each figure is the median of {sample_text} samples (p10 / p90 in `latest.json`); "
        "ratio = variant median / reference median, so below 1 means faster than the reference.",
        "",
    ]
    if suite.quick:
        lines += [
            "**Quick mode: too few samples to quote; run without `--quick` for figures.**",
            "",
        ]
    lines += ["#### Targets", ""]
    lines += _table(
        ["group", "case", "size", "measured", "reference", "ratio", "target", "result"],
        targets_rows(suite),
    )
    header, rows = throughput_rows(suite)
    if rows:
        lines += ["", "#### Remote identity round trip (payload bytes / round-trip median)", ""]
        lines += _table(header, rows)
    others = [c for c in suite.comparisons if c.target is None and not _is_dtype_case(c)]
    if others:
        lines += ["", "#### Other comparisons (no target)", ""]
        lines += _table(
            ["group", "case", "size", "measured", "reference", "ratio"],
            [
                [
                    c.group,
                    c.name,
                    format_bytes(c.bytes),
                    _named_median(suite, c, c.variant),
                    _named_median(suite, c, c.reference),
                    format_ratio(c.ratio),
                ]
                for c in others
            ],
        )
    scaling = suite.extra.get(_distributed.GROUP, {})
    if scaling.get("ranks"):
        lines += ["", "#### Data-parallel training, a worker per rank (no target)", ""]
        lines += _table(_distributed.MARKDOWN_HEADER, _distributed.markdown_rows(scaling))
    dtype_rows = _dtype_rows(suite)
    if dtype_rows:
        lines += ["", "#### Conversion of 16 elements, by dtype (ours / raw DLPack call)", ""]
        lines += _table(["dtype", "torch_to_jax", "ratio", "jax_to_torch", "ratio"], dtype_rows)
    problems = [r for r in suite.records if r.status != OK]
    if problems:
        lines += ["", "#### Not measured", ""]
        lines += _table(
            ["group", "case", "variant", "size", "status", "reason"],
            [
                [
                    r.group,
                    r.name,
                    r.variant,
                    format_bytes(r.bytes),
                    r.status,
                    r.note.replace("\n", " ")[:160],
                ]
                for r in problems
            ],
        )
    return "\n".join(lines) + "\n"


def _dtype_rows(suite: Suite) -> list[list[str]]:
    by_dtype: dict[str, dict[str, Comparison]] = {}
    for comparison in suite.comparisons:
        if _is_dtype_case(comparison):
            direction, _, dtype = comparison.name.split()
            by_dtype.setdefault(dtype, {})[direction] = comparison
    rows = []
    for dtype, directions in by_dtype.items():
        row = [
            dtype
            if directions["torch_to_jax"].target is not None
            else f"{dtype} (narrowed, copies)"
        ]
        for direction in ("torch_to_jax", "jax_to_torch"):
            c = directions.get(direction)
            if c is None:
                row += ["-", "-"]
                continue
            mine, ref = _median(suite, c, c.variant), _median(suite, c, c.reference)
            row.append(f"{format_seconds(mine)} vs {format_seconds(ref)}")
            row.append(format_ratio(c.ratio))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# Plot


def _plot_latency_floors(suite: Suite, records: list[Record], axes: Any) -> int:
    """The ping-pong floors as lines: payload / one round trip between two processes, the
    throughput a call of that size would reach if moving its bytes cost nothing."""
    from ._remote import FLOORS, SMALL

    sizes = sorted({r.bytes for r in records})
    if not sizes:
        return 0
    drawn = 0
    for r in suite.records:
        if (r.group, r.name) != ("remote", SMALL) or r.variant not in FLOORS or not r.stats:
            continue
        what = r.variant.removeprefix("floor: ")
        axes.plot(sizes, [size / r.stats.median_s / 1e9 for size in sizes], linestyle=":",
                  label=f"floor: payload / one {what} ({format_seconds(r.stats.median_s)})")
        drawn += 1
    return drawn


def plot_throughput(suite: Suite, machine: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    records = [r for r in suite.records if (r.group, r.name) == ROUND_TRIP and r.stats is not None]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    drawn = 0
    for variant, style in PLOT_LINES:
        points = sorted(
            (r.bytes, r.bytes / r.stats.median_s / 1e9)
            for r in records
            if r.variant == variant and r.stats
        )
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        label = (
            variant
            if variant not in ("inproc", "shm", "inline", "fast path", "fast path, pool input")
            else f"{variant} (identity round trip)"
        )
        over = [
            format_bytes(r.bytes)
            for r in suite.records
            if (r.group, r.name) == ROUND_TRIP and r.variant == variant and r.status == OVER_LIMIT
        ]
        if over:
            label += f"; over its limit at {', '.join(over)}"
        axes.plot(xs, ys, label=label, **style)
        drawn += 1
    floors = _plot_latency_floors(suite, records, axes)
    drawn += floors
    if drawn:
        axes.set_xscale("log", base=2)
        sizes = sorted({r.bytes for r in records})
        axes.set_xticks(sizes, [format_bytes(size) for size in sizes])
        axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axes.set_yscale("log")
        if floors and records:  # the measured lines set the scale; the floors only cross it
            axes.set_ylim(top=3 * max(r.bytes / r.stats.median_s / 1e9 for r in records
                                      if r.stats))
        axes.set_xlabel("payload (bytes)")
        axes.set_ylabel("throughput (GB/s, payload / median time)")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(loc="best", fontsize="small")
    else:
        axes.set_axis_off()
        reasons = sorted({r.note for r in suite.records if r.group == "remote" and r.note})
        axes.text(
            0.5,
            0.5,
            "no remote round-trip measurements in this run\n" + "\n".join(reasons[:3]),
            ha="center",
            va="center",
            wrap=True,
            fontsize="small",
        )
    mode = " (quick mode)" if suite.quick else ""
    axes.set_title(
        f"torch-jax-interop service round trip vs floors{mode}\n{machine.get('cpu')}, "
        f"{machine.get('cores')} cores, GPU: {machine.get('gpu')}",
        fontsize="small",
    )
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
