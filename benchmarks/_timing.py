"""Timing: medians of repeated samples, variants interleaved, tiny calls looped.

Standard library only: ``_original_runner.py`` imports this file by path from another
virtual environment (the original torch-jax-interop's), which has none of our code.

How a measurement runs (``measure``):

1. every variant is called ``warmup`` times (compilation, caches, page faults);
2. each variant is timed once to size its inner loop so that one *sample* lasts at least
   ``min_sample_s`` (a 3 us call is looped ~300 times for a 1 ms sample; a 100 ms call is
   not looped). A sample's value is its wall time divided by its loop count;
3. samples are taken round-robin (variant A, B, C, A, B, C, ...), so that a burst of load
   from the other processes on this shared machine hits every variant alike instead of
   skewing one of them;
4. it stops after ``repeats`` rounds, or earlier once ``budget_s`` is spent and at least
   ``min_repeats`` rounds are in.

With ``blocks`` (for variants that disturb whatever runs right after them), variants take
turns by blocks of consecutive samples instead (A A A B B B A A A B B B ...), each block
after ``BLOCK_SETTLE_S`` of untimed calls.

The result per variant is the median and the 10th / 90th percentiles of the samples.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TimingConfig:
    repeats: int = 25
    min_repeats: int = 5
    warmup: int = 3
    min_sample_s: float = 1e-3
    budget_s: float = 8.0
    max_loops: int = 100_000

    @classmethod
    def quick(cls) -> TimingConfig:
        return cls(repeats=3, min_repeats=3, warmup=1, min_sample_s=1e-4, budget_s=1.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "repeats": self.repeats,
            "min_repeats": self.min_repeats,
            "warmup": self.warmup,
            "min_sample_s": self.min_sample_s,
            "budget_s": self.budget_s,
        }


@dataclass(frozen=True)
class Stats:
    median_s: float
    p10_s: float
    p90_s: float
    repetitions: int  # number of samples the statistics come from
    loops: int  # calls per sample

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median_s,
            "p10_s": self.p10_s,
            "p90_s": self.p90_s,
            "repetitions": self.repetitions,
            "loops": self.loops,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        raise ValueError("no samples")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    below = sorted_values[low]
    # `a + (b - a) * f`, not `a * (1 - f) + b * f`: equal neighbours give exactly their value
    # (the latter can land an ulp off, so that p10 came out above an equal median)
    return below + (sorted_values[high] - below) * fraction


def summarize(samples: list[float], loops: int) -> Stats:
    ordered = sorted(samples)
    median = percentile(ordered, 50)
    return Stats(
        median_s=median,
        # ordered as percentiles are, whatever the rounding between distant neighbours
        p10_s=min(percentile(ordered, 10), median),
        p90_s=max(percentile(ordered, 90), median),
        repetitions=len(ordered),
        loops=loops,
    )


def _time_loop(fn: Callable[[], Any], loops: int) -> float:
    clock = time.perf_counter_ns
    start = clock()
    for _ in range(loops):
        fn()
    return (clock() - start) / 1e9


BLOCK_SETTLE_S = 0.1  # untimed calls at the start of a block, at least this long


def measure(
    variants: dict[str, Callable[[], Any]], config: TimingConfig, blocks: int = 0
) -> dict[str, Stats]:
    """Time each zero-argument callable; see the module docstring for the method.

    ``blocks`` > 0: instead of one sample at a time, variants take turns in ``blocks``
    blocks of consecutive samples each (after untimed calls for ``BLOCK_SETTLE_S``), for
    variants that disturb what runs right after them for longer than a sample (a torch
    step leaves its OpenMP threads spinning, which slows down pure JAX samples timed within
    tens of milliseconds after it). Blocks still alternate, so slow drifts of the machine's
    load hit every variant.
    """
    for fn in variants.values():
        for _ in range(config.warmup):
            fn()
    loops: dict[str, int] = {}
    for name, fn in variants.items():
        once = max(_time_loop(fn, 1), 1e-9)
        loops[name] = max(1, min(config.max_loops, math.ceil(config.min_sample_s / once)))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    started = time.perf_counter()
    if blocks > 0:
        per_block = max(1, math.ceil(config.repeats / blocks))
        for _ in range(blocks):
            for name, fn in variants.items():
                settle_until = time.perf_counter() + BLOCK_SETTLE_S
                calls = 0
                while calls < config.warmup or time.perf_counter() < settle_until:
                    fn()
                    calls += 1
                for _ in range(per_block):
                    samples[name].append(_time_loop(fn, loops[name]) / loops[name])
        return {name: summarize(samples[name], loops[name]) for name in variants}
    for round_index in range(config.repeats):
        for name, fn in variants.items():
            samples[name].append(_time_loop(fn, loops[name]) / loops[name])
        spent = time.perf_counter() - started
        if round_index + 1 >= config.min_repeats and spent > config.budget_s:
            break
    return {name: summarize(samples[name], loops[name]) for name in variants}
