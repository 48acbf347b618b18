"""Interleaved timing: every repeat runs each provider once, in a rotating order, so that drift (other
load on the machine, frequency changes, a warming cache) hits all providers alike.

For one (case, mode) and its providers:

1. warm-up: each provider runs until it has run twice and for ``warmup_s`` (one call if a call is
   slower than that); warm-up calls are never counted. The fastest warm-up call estimates the time.
2. calls per sample: a provider whose call is shorter than ``min_sample_s`` runs ``number`` calls per
   sample (each with its own untimed setup) and the sample is their mean, so the timer's resolution
   and Python's per-call jitter stay small against what is measured.
3. repeats: as many as fit in ``budget_s`` for all providers together, but at least ``min_repeats``
   and at most ``max_repeats``.

Python's garbage collector is off inside the timed region (as in ``timeit``); CUDA is synchronised
before and after it. ``torch.set_num_threads`` is left as it is (the report states it).

A split unit (``Unit.split``, see ``cases.train_unit``) is also timed from its mark to its end, call
by call (synchronised at the mark and at the end): that gives the backward alone from the very calls
that give forward+backward.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable

import torch

from fusedformer.bench.cases import Unit

__all__ = ["Stats", "TimingConfig", "measure"]


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    max_repeats: int = 10
    min_repeats: int = 3
    budget_s: float = 2.5  # for all providers of one (case, mode) together
    min_sample_s: float = 0.02
    warmup_s: float = 0.05
    max_number: int = 1000


@dataclasses.dataclass
class Stats:
    """Per-call times in milliseconds, one per sample, warm-up excluded."""

    samples_ms: list[float]
    number: int  # calls averaged in each sample
    tail_samples_ms: list[float] | None = None  # a split unit's mark-to-end time (its backward)

    def tail(self) -> Stats:
        """The statistics of the mark-to-end part of a split unit's calls."""
        if self.tail_samples_ms is None:
            raise ValueError("not a split unit: no time after a mark")
        return Stats(self.tail_samples_ms, self.number)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        xs = sorted(self.samples_ms)
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def q1_ms(self) -> float:
        return self.quantile(0.25)

    @property
    def q3_ms(self) -> float:
        return self.quantile(0.75)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def spread_pct(self) -> float:
        """Half the interquartile range, in percent of the median: the table's ``±``."""
        return 50.0 * self.iqr_ms / self.median_ms if self.median_ms > 0 else float("nan")


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _timed_calls(u: Unit, number: int, sync: Callable[[], None]) -> tuple[float, float]:
    """Seconds for ``number`` calls of ``u.run`` (their setups run before, untimed), and for a split
    unit the seconds spent after each call's mark (0.0 otherwise)."""
    states = [u.setup() if u.setup is not None else None for _ in range(number)]
    marks: list[float] = []

    def mark() -> None:
        sync()
        marks.append(time.perf_counter())

    tail = 0.0
    sync()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        if u.split:
            for s in states:
                u.run(s, mark)
                sync()
                tail += time.perf_counter() - marks[-1]
        else:
            for s in states:
                u.run(s)
            sync()
        t1 = time.perf_counter()
    finally:
        if gc_was_enabled:
            gc.enable()
    del states
    if u.split and len(marks) != number:
        raise RuntimeError(f"a split unit must call mark() once per call; it did {len(marks)} times in {number}")
    return t1 - t0, tail


def measure(
    units: dict[str, Unit],
    config: TimingConfig,
    device: torch.device,
    on_sample: Callable[[], None] | None = None,
) -> dict[str, Stats | BaseException]:
    """Time every provider's unit, interleaved; a provider that raises gets its exception instead."""
    sync = _synchronizer(device)
    results: dict[str, Stats | BaseException] = {}
    estimate: dict[str, float] = {}
    for name, u in units.items():
        try:
            calls, spent, best = 0, 0.0, math.inf
            while calls < 2 or spent < config.warmup_s:
                t, _ = _timed_calls(u, 1, sync)
                calls, spent, best = calls + 1, spent + t, min(best, t)
                if t >= config.warmup_s:  # slow: one warm-up call is enough
                    break
            estimate[name] = best
        except Exception as e:  # reported in the row; the other providers go on
            results[name] = e
    live = [n for n in units if n in estimate]
    number = {
        n: max(1, min(config.max_number, math.ceil(config.min_sample_s / max(estimate[n], 1e-9))))
        for n in live
    }
    per_repeat = sum(estimate[n] * number[n] for n in live)
    fit = int(config.budget_s // per_repeat) if per_repeat > 0 else config.max_repeats
    repeats = max(config.min_repeats, min(config.max_repeats, fit))
    samples: dict[str, list[float]] = {n: [] for n in live}
    tails: dict[str, list[float]] = {n: [] for n in live}
    for r in range(repeats):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for name in order:
            if name in results:  # failed in an earlier repeat
                continue
            try:
                total, tail = _timed_calls(units[name], number[name], sync)
            except Exception as e:
                results[name] = e
                continue
            samples[name].append(1e3 * total / number[name])
            tails[name].append(1e3 * tail / number[name])
        if on_sample is not None:
            on_sample()
    for name in live:
        if name not in results:
            results[name] = Stats(samples[name], number[name], tails[name] if units[name].split else None)
    return {n: results[n] for n in units}
