"""Adaptive request concurrency: one provider project's limit, decided from its answers and round trips.

A pure state machine (the time of each answer is passed in), modelled on Vector's adaptive request
concurrency (its RFC 1858, `src/sinks/util/adaptive_concurrency/controller.rs`), which is AIMD on
the round-trip time (RTT):

- Time is cut into windows of one smoothed RTT. At the end of a window its mean RTT is compared with
  the exponentially weighted moving average (EWMA) of the previous windows' means and its deviation.
- The limit grows by one when the window used the whole limit (there was work to use more) and its
  mean RTT did not exceed the EWMA: more parallel requests did not make them slower.
- It is multiplied by `decrease_ratio` when the window's mean RTT rose above the EWMA by more than
  `rtt_deviation_scale` deviations (the provider is queueing), or when more than `error_tolerance`
  of the window's answers were 5xx or broken connections.

Where this departs from Vector, and why (each was needed against the sandbox's log-normal latency
with p99 at 6.7 times the median; tests/test_concurrency.py simulates it):

- A 429 or a timeout (`Signal.OVERLOAD`) decreases at once, not at the window's end, and at most once
  per window. A 429 is answered in a millisecond, so a request slot that meets one is free again at
  once; waiting a window to react would let that slot draw hundreds of further 429s.
- After a 429 at limit L, the limit climbs back to L - 1 as usual but tries L again only after
  `probe_windows` clean windows: at a small L the climb takes a window or two, and the 429 share
  would be one request in a few dozen.
- 5xx count only when more than one and above a share of the window (`error_tolerance`): a provider
  failing one request in 500 at random is not overloaded, and backing off on each would hold the
  limit far below capacity (as random loss holds TCP Reno's window down). The breaker handles outages.
- An RTT rise must hold for `rise_windows` (2) windows, the second against the threshold from before
  the first, and be at least `rtt_rise_floor` (25 %) of the mean: with long-tailed latencies one
  window in a few dozen is above 2.5 deviations by chance, a quiet spell shrinks the deviation until
  a busy host's scheduling noise looks like a rise, and each false decrease costs ten windows of
  regrowth at a limit of 100.
- A slow start, as TCP's: until the first decrease the limit grows by half per window instead of by
  one, and the first decrease takes it back to the limit before the last step (the last one without
  trouble). Vector starts at 1 and adds 1 per RTT, which takes half a minute to reach 100 at 150 ms.
  Half, not TCP's doubling: every request beyond the capacity in the overshooting window meets a 429.
- A baseline: a low quantile of the smoothed RTT (it follows it down at `baseline_down` and up at
  `baseline_up` per window, from windows of at least `min_samples` answers). A window whose mean
  RTT exceeds `rtt_tolerance` times it also decreases: a provider that queues requests beyond its
  capacity makes the RTT creep up by 1/C per extra request, too slowly for the deviation test,
  which follows the creep; the limit settles where the RTT is about `rtt_tolerance` times the
  no-load RTT (the capacity fully used, at that latency). If the RTT is as high after the limit
  has been halved, the rise was the provider's own (a slower region, a deploy) and not our load:
  the baseline is dropped and rebuilt at the new latency.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Signal(enum.Enum):
    """What one answer says about the provider's load."""

    OK = "ok"  # the provider processed the request: its round trip is a latency sample
    OVERLOAD = "overload"  # 429, or no answer before the timeout: too much at once
    ERROR = "error"  # 5xx, a reset or refused connection: counted against error_tolerance
    IGNORE = "ignore"  # says nothing about the provider (cancelled, no verdict)


@dataclass(frozen=True, slots=True)
class AdaptiveSettings:
    """Bounds and tuning of one adaptive limit; the defaults besides the bounds are Vector's."""

    min_limit: int = 1
    max_limit: int = 200
    initial: int = 8
    decrease_ratio: float = 0.9
    ewma_alpha: float = 0.4
    rtt_deviation_scale: float = 2.5
    error_tolerance: float = 0.05
    rtt_tolerance: float = 2.0
    min_samples: int = 16  # a window with fewer RTT samples is too noisy for the baseline test
    baseline_down: float = 0.1  # how fast the baseline follows a lower smoothed RTT (per window)
    baseline_up: float = 0.002  # and a higher one: over hundreds of windows, slower than a queue builds
    rise_windows: int = 2
    rtt_rise_floor: float = 0.25  # a rise smaller than this share of the mean is never one (a quiet spell shrinks
    # the deviation until the scheduling noise of a busy host looks like a rise)
    probe_windows: int = 20

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(f"need 1 <= min_limit <= max_limit, got {self.min_limit} and {self.max_limit}")
        if not self.min_limit <= self.initial <= self.max_limit:
            raise ValueError(f"initial {self.initial} is outside [{self.min_limit}, {self.max_limit}]")
        if not 0.0 < self.decrease_ratio < 1.0 or not 0.0 < self.ewma_alpha <= 1.0:
            raise ValueError("decrease_ratio must be in (0, 1) and ewma_alpha in (0, 1]")


class Ewma:
    """An exponentially weighted mean and variance (West's incremental form, as Vector's EwmaVar)."""

    __slots__ = ("alpha", "mean", "variance")

    def __init__(self, alpha: float, first: float) -> None:
        self.alpha = alpha
        self.mean = first
        self.variance = 0.0

    def update(self, value: float) -> None:
        diff = value - self.mean
        inc = self.alpha * diff
        self.mean += inc
        self.variance = (1.0 - self.alpha) * (self.variance + diff * inc)

    @property
    def deviation(self) -> float:
        return math.sqrt(self.variance)


class Reason(enum.Enum):
    """Why the limit changed (for logs and tests)."""

    SLOW_START = "slow_start"
    INCREASE = "increase"
    OVERLOAD = "overload"
    ERRORS = "errors"
    RTT_RISE = "rtt_rise"
    QUEUEING = "queueing"


class AdaptiveLimit:
    """The limit of one provider project. Call `started()` when a request is sent and `finished()` with
    its answer; read `limit`. Holds no clock: every call that needs the time is given it."""

    def __init__(self, settings: AdaptiveSettings) -> None:
        self.settings = settings
        self.limit = settings.initial
        self.in_flight = 0
        self.slow_start = True
        self._before_step = max(settings.min_limit, settings.initial // 2)  # the limit before the last slow-start step
        self.last_change: Reason | None = None
        self._past: Ewma | None = None
        self._baseline: float | None = None  # the no-load RTT: a low quantile of the smoothed RTT
        self._next_update = -math.inf
        self._hold_until = -math.inf  # no second decrease before this: one per window
        self._rises = 0  # consecutive windows whose RTT rose beyond the deviation
        self._rise_over: float | None = None  # the threshold when the first of them came
        self._ceiling: int | None = None  # the limit the last 429 or timeout came at
        self._good = 0  # clean, saturated windows since the last 429 (probing the ceiling needs probe_windows)
        self._queueing_from: int | None = None  # the limit at the first cut of a queueing streak
        self._high = False  # the last window with min_samples RTTs was above rtt_tolerance * baseline
        self._reset_window()

    def _reset_window(self) -> None:
        self._rtt_sum = 0.0
        self._rtt_count = 0
        self._answers = 0
        self._errors = 0
        self._reached = self.in_flight >= self.limit

    def started(self) -> None:
        self.in_flight += 1
        if self.in_flight >= self.limit:
            self._reached = True

    def finished(self, now: float, signal: Signal, rtt: float | None = None) -> bool:
        """Account one answer at `now` (seconds, any monotonic origin); True when the limit changed."""
        self.in_flight = max(0, self.in_flight - 1)
        if signal is Signal.IGNORE:
            return False
        before = self.limit
        if signal is Signal.OVERLOAD:
            if now >= self._hold_until:
                self._ceiling, self._good = self.limit, 0
                self._decrease(now, Reason.OVERLOAD)
                self._next_update = now + self._interval()
                self._reset_window()
            return self.limit != before
        self._answers += 1
        if signal is Signal.ERROR:
            self._errors += 1
        elif rtt is not None:
            self._rtt_sum += rtt
            self._rtt_count += 1
        if now >= self._next_update:
            self._end_window(now)
        return self.limit != before

    def _interval(self) -> float:
        return self._past.mean if self._past is not None else 0.0

    def _decrease(self, now: float, reason: Reason) -> None:
        s = self.settings
        if self.slow_start:
            # The last step overshot: the limit before it was the last one without trouble.
            new = self._before_step
            self.slow_start = False
        else:
            new = min(self.limit - 1, int(self.limit * s.decrease_ratio))
        new = max(s.min_limit, new)
        if new != self.limit:
            self.limit = new
            self.last_change = reason
        self._hold_until = now + self._interval()

    def _end_window(self, now: float) -> None:
        s = self.settings
        current = self._rtt_sum / self._rtt_count if self._rtt_count else None
        past = self._past
        if past is None:
            if current is not None:
                self._past = Ewma(s.ewma_alpha, current)
                self._next_update = now + current
            self._reset_window()
            return
        errors = self._errors > max(1.0, s.error_tolerance * self._answers)
        # One window above the deviation is as likely noise as not (RTTs have long tails); two are a trend.
        # The second is held to the threshold from before the first, which has widened the deviation since.
        threshold = past.mean + max(s.rtt_deviation_scale * past.deviation, s.rtt_rise_floor * past.mean)
        above = current is not None and current > (threshold if self._rise_over is None else self._rise_over)
        if above:
            self._rises += 1
            if self._rise_over is None:
                self._rise_over = threshold
        else:
            self._rises, self._rise_over = 0, None
        rising = self._rises >= s.rise_windows
        if rising:
            self._rises, self._rise_over = 0, None
        queueing = self._queueing(current)
        if errors or rising or queueing:
            if now >= self._hold_until:
                self._decrease(now, Reason.ERRORS if errors else Reason.RTT_RISE if rising else Reason.QUEUEING)
                if queueing and self._queueing_from is None:
                    self._queueing_from = self.limit
        elif self._reached and current is not None and current <= past.mean:
            self._grow()
        if current is not None:
            past.update(current)
            if self._rtt_count >= s.min_samples:
                self._track_baseline(past.mean)
        self._next_update = now + past.mean
        self._reset_window()

    def _grow(self) -> None:
        s = self.settings
        self._good += 1
        if self.limit >= s.max_limit:
            return
        if self.slow_start:
            self._before_step = self.limit
            self.limit = min(s.max_limit, max(self.limit + 1, self.limit * 3 // 2))
            self.last_change = Reason.SLOW_START
            return
        if self._ceiling is not None:
            if self.limit >= self._ceiling:
                self._ceiling = None  # a clean window at the old ceiling: the capacity has grown
            elif self.limit + 1 >= self._ceiling and self._good < s.probe_windows:
                return  # a step below where the last 429 came: stay, and try again later
        self.limit += 1
        self.last_change = Reason.INCREASE

    def _track_baseline(self, smoothed: float) -> None:
        """Follow the smoothed RTT down quickly and up slowly: a low quantile of it, not its minimum,
        which would sink with every lucky window (long tails make many) until noise looks like queueing."""
        b = self._baseline
        if b is None:
            self._baseline = smoothed
        else:
            rate = self.settings.baseline_down if smoothed < b else self.settings.baseline_up
            self._baseline = b + rate * (smoothed - b)

    def _queueing(self, current: float | None) -> bool:
        """The RTT is `rtt_tolerance` times the baseline, as of the last window with enough samples to tell."""
        s = self.settings
        if current is None or self._baseline is None:
            return False
        if self._rtt_count >= s.min_samples:
            self._high = current > s.rtt_tolerance * self._baseline
            if not self._high:
                self._queueing_from = None
        if self._high and self._queueing_from is not None and self.limit <= self._queueing_from // 2:
            # Half the load and the RTT is as high: this latency is the provider's own (a slower
            # region, a deploy), not a queue of ours. It becomes the reference.
            self._baseline = None
            self._queueing_from = None
            self._high = False
        return self._high
