"""Progress of long steps, one style everywhere: training, sampling, feature extraction, the
probe's attack, the copy detector.

On a terminal: a tqdm bar. When stderr is not a terminal (a log file, a batch job): a plain
`ProgressLog` line every ~1% of the work (at least every 10 units) and at least every
`max_interval_s` seconds, instead of one endless bar line that a log shows only at the end.

    for batch in progress(batches, total=n_batches, desc="sample", unit="batch"):
        ...
    bar = progress(total=steps, desc="diffusion")  # or driven by hand
    bar.update(1); bar.set_postfix(loss="0.12"); bar.close()
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

MAX_INTERVAL_S = 30.0  # a log line at least this often, however slow each unit is


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "step",
             initial: int = 0, enabled: bool = True):
    """A progress bar (`update`, `set_postfix`, `close`; iterable when given `iterable`):
    tqdm on a terminal, `ProgressLog` lines otherwise, nothing when not `enabled` (e.g. on a
    process other than the main one)."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and not sys.stderr.isatty():
        return ProgressLog(total or 0, initial, desc, unit=unit, iterable=iterable)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True, unit=unit, disable=not enabled,
                leave=False)


class ProgressLog:
    """The part of tqdm's interface medgen uses (`update`, `set_postfix`, `close`, iteration),
    writing `desc: unit N/T (P%), R unit/s, ETA, postfix` to stderr every `every` units (default
    ~1% of the work, at least 10), at the end, and at least every `max_interval_s` seconds."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", every: int | None = None,
                 max_interval_s: float = MAX_INTERVAL_S, unit: str = "step", iterable: Iterable | None = None):
        self.total, self.n, self.start, self.desc, self.unit = int(total), int(initial), int(initial), desc, unit
        self.every = every or max(10, (self.total - self.start) // 100)  # ~1% of the work, >= 10 units
        self.next_line = self.start + self.every
        self.max_interval_s = max_interval_s
        self.iterable = iterable
        self.postfix = ""
        self.t0 = self.last = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if self.n >= self.next_line or self.n >= self.total or now - self.last >= self.max_interval_s:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last = now
        self.next_line = self.n + self.every
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        pct = 100.0 * self.n / max(self.total, 1)
        print(f"{self.desc}: {self.unit} {self.n}/{self.total} ({pct:.0f}%), {rate:.2f} {self.unit}/s, "
              f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}" + (f", {self.postfix}" if self.postfix else ""),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        pass
