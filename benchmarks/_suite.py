"""What a run collects: one record per case and variant, and the comparisons between them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._timing import Stats, TimingConfig, measure

OK = "ok"
SKIPPED = "skipped"
OVER_LIMIT = "over limit"
ERROR = "error"


@dataclass
class Record:
    """One variant of one case: its timing, or why there is none."""

    group: str
    name: str
    variant: str
    bytes: int
    reference: bool = False  # a reference point (raw call, memcpy, bare gRPC echo, ...)
    status: str = OK
    note: str = ""
    stats: Stats | None = None

    def key(self) -> tuple[str, str, str, int]:
        return (self.group, self.name, self.variant, self.bytes)

    def as_dict(self) -> dict[str, Any]:
        timing: dict[str, Any] = (
            self.stats.as_dict()
            if self.stats is not None
            else {"median_s": None, "p10_s": None, "p90_s": None, "repetitions": 0, "loops": 0}
        )
        return {
            "group": self.group,
            "name": self.name,
            "variant": self.variant,
            "bytes": self.bytes,
            "reference": self.reference,
            "status": self.status,
            "note": self.note,
            **timing,
        }

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        """The record ``as_dict`` wrote (a saved run, or a child process's records)."""
        stats = None if row["median_s"] is None else Stats(
            row["median_s"], row["p10_s"], row["p90_s"], row["repetitions"], row["loops"])
        return cls(row["group"], row["name"], row["variant"], row["bytes"],
                   reference=row["reference"], status=row["status"], note=row["note"],
                   stats=stats)


@dataclass(frozen=True)
class Target:
    """A goal on ``variant median / reference median`` from one of the issues."""

    op: str  # "<=" or ">="
    value: float
    source: str  # where the target comes from, e.g. "issue 2"
    text: str = ""  # how to read it when the ratio alone is not obvious

    def met(self, ratio: float) -> bool:
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def describe(self) -> str:
        symbol = "≤" if self.op == "<=" else "≥"
        extra = f" ({self.text})" if self.text else ""
        return f"{symbol} {self.value:g}{extra}"


@dataclass
class Comparison:
    group: str
    name: str
    bytes: int
    variant: str
    reference: str
    target: Target | None = None
    ratio: float | None = None
    result: str = "n/a"  # PASS, MISS, "n/a" (no target, or a side is missing)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "bytes": self.bytes,
            "variant": self.variant,
            "reference": self.reference,
            "ratio": self.ratio,
            "target": None
            if self.target is None
            else {
                "op": self.target.op,
                "value": self.target.value,
                "source": self.target.source,
                "text": self.target.text,
            },
            "result": self.result,
        }


@dataclass
class Suite:
    """Collects records and comparisons while the groups run."""

    config: TimingConfig
    quick: bool
    records: list[Record] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # per-group facts for the JSON
    # servers and connections a group opened; the CLI closes them even when a task fails
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def measure(
        self,
        group: str,
        name: str,
        nbytes: int,
        variants: dict[str, Callable[[], Any]],
        references: tuple[str, ...] = (),
        config: TimingConfig | None = None,
        blocks: int = 0,
    ) -> None:
        """Time the variants side by side and record each; ``references`` name the floors.
        ``blocks``: take turns by blocks of samples instead of sample by sample (see
        ``measure``)."""
        stats = measure(variants, config or self.config, blocks)
        for variant, result in stats.items():
            self.records.append(
                Record(group, name, variant, nbytes, reference=variant in references, stats=result)
            )

    def add(self, record: Record) -> None:
        self.records.append(record)

    def skip(self, group: str, name: str, reason: str, variant: str = "-", nbytes: int = 0) -> None:
        self.records.append(Record(group, name, variant, nbytes, status=SKIPPED, note=reason))

    def compare(
        self,
        group: str,
        name: str,
        nbytes: int,
        variant: str,
        reference: str,
        target: Target | None = None,
    ) -> None:
        self.comparisons.append(Comparison(group, name, nbytes, variant, reference, target))

    def find(self, group: str, name: str, variant: str, nbytes: int) -> Record | None:
        for record in self.records:
            if record.key() == (group, name, variant, nbytes):
                return record
        return None

    def resolve(self) -> None:
        """Fill in each comparison's ratio and PASS / MISS from the records."""
        for comparison in self.comparisons:
            mine = self.find(
                comparison.group, comparison.name, comparison.variant, comparison.bytes
            )
            ref = self.find(
                comparison.group, comparison.name, comparison.reference, comparison.bytes
            )
            if (
                mine is None
                or ref is None
                or mine.stats is None
                or ref.stats is None
                or not math.isfinite(mine.stats.median_s)
                or ref.stats.median_s <= 0
            ):
                comparison.ratio = None
                comparison.result = "n/a"
                continue
            comparison.ratio = mine.stats.median_s / ref.stats.median_s
            if comparison.target is None:
                comparison.result = "n/a"
            else:
                comparison.result = "PASS" if comparison.target.met(comparison.ratio) else "MISS"
