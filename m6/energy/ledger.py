"""Streaming energy accounting: sensor timelines in, joules per stage, window and step group out.

The ledger is fed two streams: sensor samples (cumulative joules per sensor, from
the sampling thread) and boundary events (step ends, window begins and ends, from
the training thread, timestamped there and nothing more). Energy at an event's
moment is interpolated on each sensor's timeline, so boundaries cost the hot path
a clock read and an append, never a device synchronisation or a sensor read.

Everything telescopes: the joules attributed to stages, to window instances and
to step groups are differences of the same interpolated cumulative values, so
per-step figures add up to the counter difference over the same span.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

UNSTAGED = "unstaged"
"""The stage energy is attributed to while no window is open."""
STEP, BEGIN, END = "step", "begin", "end"
MAX_STEP_GROUPS = 10000
"""Step groups kept; past twice this, neighbours merge pairwise (sums are unchanged, resolution halves)."""
MAX_POWER_BINS = 4000
"""The power-over-time series keeps at most this many bins; the bin width doubles when it would grow past it."""


@dataclass
class Event:
    """A boundary the training thread marked: ``t_s`` monotonic seconds, ``kind`` step/begin/end."""

    t_s: float
    kind: str
    stage: str = ""
    step: int = 0
    tokens: int = 0


@dataclass
class _Group:
    first: int
    t0_s: float
    e0: list[float]
    last: int = 0
    t1_s: float = 0.0
    e1: list[float] = field(default_factory=list)
    n_steps: int = 0
    tokens: int = 0


class Ledger:
    """Attributes the energy of ``n`` sensors to stages, window instances and step groups.

    Args:
        lags_s: per sensor, how old a reading is on average when taken (see ``Sensor.lag_s``).
        stepped_s: per sensor, the update period of a counter that advances in steps (NVML's
            energy counter), or 0 for one read as continuous. A stepped counter's update is placed
            midway between the poll that last saw the old value and the poll that saw the new one.
        counted: per sensor, whether it adds to totals (False for cross-check sensors).
        min_window_s: step groups span at least this long (the slowest sensor's refresh period),
            so a step shorter than the sensor can resolve is never given a figure of its own.
        t0_s: monotonic start time; energy before it is not counted.
        bin_s: initial width of the power-over-time bins.
    """

    def __init__(self, *, lags_s: list[float], counted: list[bool], min_window_s: float, t0_s: float,
                 bin_s: float = 0.25, stepped_s: list[float] | None = None):
        n = len(lags_s)
        self.stepped_s = list(stepped_s) if stepped_s is not None else [0.0] * n
        self._prev_poll_s: list[float | None] = [None] * n
        self._provisional = [x > 0 for x in self.stepped_s]
        self.n = n
        self.lags_s = list(lags_s)
        self.counted = list(counted)
        self.min_window_s = min_window_s
        self.t0_s = t0_s
        self.points: list[collections.deque] = [collections.deque() for _ in range(n)]
        self.pending: collections.deque[Event] = collections.deque()
        self.tau_s: float | None = None
        self.e_tau = [0.0] * n
        self.stack: list[str] = []
        self.stage_j: dict[str, list[float]] = {}
        self.stage_time_s: dict[str, float] = {}
        self.windows: list[dict] = []
        self._open: list[tuple[str, float, list[float]]] = []
        self.groups: list[dict] = []
        self._group: _Group | None = None
        self._boundary: tuple[float, list[float]] = (t0_s, [0.0] * n)
        self.steps = 0
        self.tokens = 0
        self.last_step = -1
        self.bin_s = bin_s
        self.bins: list[list[float]] = []
        self.last_power_w = [0.0] * n
        self.stop_s: float | None = None
        """Set when the run stops: nothing after it is attributed, however far the timelines reach."""

    # ------------------------------------------------------------------ input

    def add_event(self, ev: Event) -> None:
        """Queue a boundary; it is applied once every sensor's timeline reaches its moment."""
        self.pending.append(ev)

    def add_sample(self, t_s: float, energies_j: list[float]) -> None:
        """Record one poll of every sensor (cumulative joules) taken at monotonic ``t_s``."""
        for i, e in enumerate(energies_j):
            pts = self.points[i]
            if self.stepped_s[i] > 0:
                self._add_stepped(i, t_s, e)
                continue
            t_est = t_s - self.lags_s[i]
            if pts and t_est <= pts[-1][0]:
                # A lagged timestamp may not move past the previous point; keep the newest value.
                if e >= pts[-1][1]:
                    pts[-1] = (pts[-1][0], e)
                continue
            pts.append((t_est, e))
        if self.tau_s is None:
            # Accounting starts once every timeline covers t0: a lagged reading taken after the start
            # may describe a moment before it, and must not be counted.
            h = self.horizon()
            if h is None or h < self.t0_s:
                return
            self.tau_s = self.t0_s
            self.e_tau = [self.energy_at(i, self.tau_s) for i in range(self.n)]
            self._boundary = (self.tau_s, list(self.e_tau))
        self.advance()

    def _add_stepped(self, i: int, t_s: float, e: float) -> None:
        pts, step_s, prev = self.points[i], self.stepped_s[i], self._prev_poll_s[i]
        self._prev_poll_s[i] = t_s
        if not pts or prev is None:
            pts.append((t_s - step_s / 2, e))  # provisional: when the first value was set is not known yet
        elif e != pts[-1][1]:
            pts.append((max((prev + t_s) / 2, pts[-1][0] + 1e-6), e))
            if self._provisional[i] and len(pts) == 3:
                # Two updates seen: date the first value from the rate between them, so the start
                # of the run is not off by up to a whole counter period.
                (t0, e0), (t1, e1), (t2, e2) = pts
                if e2 > e1:
                    t_first = t1 - (e1 - e0) * (t2 - t1) / (e2 - e1)
                    pts[0] = (min(max(t_first, t1 - 2 * step_s), t1 - 1e-6), e0)
                self._provisional[i] = False
        elif t_s - step_s > pts[-1][0] + 2 * step_s:
            # Unchanged for several periods (an idle device): the value held at least until a period ago.
            pts.append((t_s - step_s, e))

    def horizon(self) -> float | None:
        """The latest moment every sensor's timeline covers."""
        if any(not p for p in self.points) or any(self._provisional):
            return None
        return min(p[-1][0] for p in self.points)

    # ------------------------------------------------------------------ processing

    def energy_at(self, i: int, t_s: float) -> float:
        """Sensor ``i``'s cumulative joules at ``t_s``, linearly interpolated between its samples."""
        pts = self.points[i]
        if t_s <= pts[0][0]:
            return pts[0][1]
        if t_s >= pts[-1][0]:
            return pts[-1][1]
        lo, hi = 0, len(pts) - 1
        while hi - lo > 1:  # bisect on a deque
            mid = (lo + hi) // 2
            if pts[mid][0] <= t_s:
                lo = mid
            else:
                hi = mid
        (ta, ea), (tb, eb) = pts[lo], pts[hi]
        return ea + (eb - ea) * (t_s - ta) / (tb - ta)

    def advance(self, until_s: float | None = None) -> None:
        """Apply queued events the timelines now cover and attribute energy up to the horizon."""
        h = self.horizon()
        if h is None or self.tau_s is None:
            return
        if until_s is not None:
            h = until_s  # past the horizon, energy_at holds each sensor's newest value
        if self.stop_s is not None:
            h = min(h, self.stop_s)
        while self.pending and self.pending[0].t_s <= h:
            ev = self.pending.popleft()
            self._move_to(max(ev.t_s, self.tau_s))
            self._apply(ev)
        self._move_to(h)
        self._trim()

    def _move_to(self, t_s: float) -> None:
        if t_s <= self.tau_s:
            return
        e = [self.energy_at(i, t_s) for i in range(self.n)]
        stage = self.stack[-1] if self.stack else UNSTAGED
        acc = self.stage_j.setdefault(stage, [0.0] * self.n)
        dt = t_s - self.tau_s
        for i in range(self.n):
            d = e[i] - self.e_tau[i]
            acc[i] += d
            if dt > 1e-9:
                self.last_power_w[i] = d / dt
        self.stage_time_s[stage] = self.stage_time_s.get(stage, 0.0) + dt
        self._bin(self.tau_s, t_s, [e[i] - self.e_tau[i] for i in range(self.n)])
        self.tau_s, self.e_tau = t_s, e

    def _bin(self, ta: float, tb: float, d: list[float]) -> None:
        """Spread the increments ``d`` over the power bins overlapping ``[ta, tb]``, pro rata of time."""
        span = tb - ta
        a = (ta - self.t0_s) / self.bin_s
        b = (tb - self.t0_s) / self.bin_s
        k = int(math.floor(a))
        while k < b:
            lo, hi = max(a, k), min(b, k + 1)
            share = (hi - lo) * self.bin_s / span if span > 0 else 1.0
            while len(self.bins) <= k:
                self.bins.append([0.0] * self.n)
            row = self.bins[k]
            for i in range(self.n):
                row[i] += d[i] * share
            k += 1
        while len(self.bins) > MAX_POWER_BINS:
            merged = [[x + y for x, y in zip(self.bins[j], self.bins[j + 1] if j + 1 < len(self.bins) else [0.0] * self.n)]
                      for j in range(0, len(self.bins), 2)]
            self.bins, self.bin_s = merged, self.bin_s * 2

    def _total(self, e: list[float]) -> float:
        return sum(x for x, c in zip(e, self.counted) if c)

    def _apply(self, ev: Event) -> None:
        t, e = self.tau_s, list(self.e_tau)
        if ev.kind == STEP:
            g = self._group
            if g is None:
                bt, be = self._boundary
                g = self._group = _Group(first=ev.step, t0_s=bt, e0=be)
            g.last, g.t1_s, g.e1 = ev.step, t, e
            g.n_steps += 1
            g.tokens += ev.tokens
            self.steps += 1
            self.tokens += ev.tokens
            self.last_step = ev.step
            self._boundary = (t, e)
            if g.t1_s - g.t0_s >= self.min_window_s:
                self._close_group()
            return
        # A window boundary interrupts a step group: the group ends at its last step, and the next
        # step starts here, so energy of nested non-step windows (eval, checkpoint) is not a step's.
        self._close_group()
        self._boundary = (t, e)
        if ev.kind == BEGIN:
            self.stack.append(ev.stage)
            self._open.append((ev.stage, t, e))
        elif ev.kind == END:
            for j in range(len(self._open) - 1, -1, -1):
                if self._open[j][0] == ev.stage:
                    stage, t0, e0 = self._open.pop(j)
                    self.windows.append(self._window(stage, t0, e0, t, e, closed=True))
                    break
            for j in range(len(self.stack) - 1, -1, -1):
                if self.stack[j] == ev.stage:
                    del self.stack[j]
                    break

    def _window(self, stage: str, t0: float, e0: list[float], t1: float, e1: list[float], *, closed: bool) -> dict:
        per = [b - a for a, b in zip(e0, e1)]
        return {"stage": stage, "t0_s": t0 - self.t0_s, "t1_s": t1 - self.t0_s, "energy_j": self._total(per),
                "per_sensor_j": per, "closed": closed}

    def _close_group(self) -> None:
        g = self._group
        if g is None:
            return
        self._group = None
        per = [b - a for a, b in zip(g.e0, g.e1)]
        self.groups.append({"first": g.first, "last": g.last, "n_steps": g.n_steps, "t0_s": g.t0_s - self.t0_s,
                            "t1_s": g.t1_s - self.t0_s, "energy_j": self._total(per), "tokens": g.tokens})
        if len(self.groups) > 2 * MAX_STEP_GROUPS:
            self.groups = [merge_groups(self.groups[j:j + 2]) for j in range(0, len(self.groups), 2)]

    def _trim(self) -> None:
        """Drop samples no future interpolation can need (older than the second-newest before tau)."""
        for pts in self.points:
            while len(pts) > 2 and pts[1][0] <= self.tau_s:
                pts.popleft()

    def finish(self, t_s: float) -> None:
        """Apply everything up to ``t_s``, close the open step group and any window left open."""
        self.advance(until_s=t_s)
        self._close_group()
        while self._open:
            stage, t0, e0 = self._open.pop()
            self.windows.append(self._window(stage, t0, e0, self.tau_s, list(self.e_tau), closed=False))
        self.stack.clear()

    # ------------------------------------------------------------------ results

    def sensor_totals_j(self) -> list[float]:
        """Per-sensor joules attributed so far (all stages)."""
        out = [0.0] * self.n
        for per in self.stage_j.values():
            for i, x in enumerate(per):
                out[i] += x
        return out

    def total_j(self) -> float:
        """Joules attributed so far over counted sensors."""
        return self._total(self.sensor_totals_j())

    def power_series(self) -> tuple[float, list[list[float]]]:
        """``(bin_s, watts[bin][sensor])``: mean power per bin (the last bin may be partial)."""
        watts = [[x / self.bin_s for x in row] for row in self.bins]
        if watts and self.tau_s is not None:
            covered = (self.tau_s - self.t0_s) / self.bin_s - (len(self.bins) - 1)
            if 0 < covered < 1:
                watts[-1] = [x / covered for x in watts[-1]]
        return self.bin_s, watts


def merge_groups(groups: list[dict]) -> dict:
    """One step group spanning consecutive ``groups`` (joules, tokens and steps summed)."""
    a, b = groups[0], groups[-1]
    return {"first": a["first"], "last": b["last"], "n_steps": sum(g["n_steps"] for g in groups),
            "t0_s": a["t0_s"], "t1_s": b["t1_s"], "energy_j": sum(g["energy_j"] for g in groups),
            "tokens": sum(g["tokens"] for g in groups)}
