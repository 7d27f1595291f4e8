"""How many workers the backlog asks for: the rule of KEDA's Kafka scaler, with Ray Serve's delays.

A pure policy (no Ray, no broker): :class:`LagAutoscaler.decide` takes what the deployment
measured and returns a :class:`Decision`. ``kafray.ray`` runs it in the deployment's controller.

- Lag objective (KEDA): desired = ceil(total lag / ``lag_threshold``).
- Time-lag objective: lag / rate (seconds the backlog needs at the rate the workers sustain now)
  at most ``max_lag_seconds``; desired = ceil(current x time lag / max_lag_seconds).
- With both, the larger wins. The result is kept within MIN..MAX and never above the partition
  count (a consumer beyond it would own nothing).
- A change happens only once the rule has asked for it without a break for ``upscale_delay_s``
  (up) or ``downscale_delay_s`` (down), as Ray Serve's autoscaler does; a lag that blinks does
  not make the deployment flap.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Ray Serve's defaults (upscale_delay_s, downscale_delay_s).
UPSCALE_DELAY_S = 30.0
DOWNSCALE_DELAY_S = 600.0


@dataclass(frozen=True)
class Decision:
    at: float
    current: int
    target: int  # what the rule asks for now, within bounds
    desired: int  # what the deployment should have now: the target once its delay has passed
    action: str  # "up", "down" or "hold"
    objective: str  # what set the target: lag_threshold, max_lag_seconds, min, max, partitions, unknown
    reason: str
    lag: int | None
    rate: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def parse_bounds(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (min, max), with a message that names the fix."""
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--autoscale {text!r}: expected MIN:MAX, e.g. --autoscale 1:4") from None
    if not 1 <= low <= high:
        raise ValueError(f"--autoscale {text!r}: need 1 <= MIN <= MAX (a deployment keeps at least one worker)")
    return low, high


class LagAutoscaler:
    def __init__(self, min_workers: int, max_workers: int, *, lag_threshold: int | None = None,
                 max_lag_seconds: float | None = None, upscale_delay_s: float = UPSCALE_DELAY_S,
                 downscale_delay_s: float = DOWNSCALE_DELAY_S):
        if not 1 <= min_workers <= max_workers:
            raise ValueError(f"autoscale bounds {min_workers}:{max_workers}: need 1 <= MIN <= MAX")
        if lag_threshold is None and max_lag_seconds is None:
            raise ValueError("autoscaling needs an objective: --lag-threshold FRAMES (KEDA's rule: one worker "
                             "per FRAMES of lag) or --max-lag-seconds S (the backlog drains within S s)")
        if lag_threshold is not None and lag_threshold < 1:
            raise ValueError(f"--lag-threshold {lag_threshold}: must be at least 1 frame")
        if max_lag_seconds is not None and max_lag_seconds <= 0:
            raise ValueError(f"--max-lag-seconds {max_lag_seconds}: must be above 0")
        if upscale_delay_s < 0 or downscale_delay_s < 0:
            raise ValueError("--upscale-delay-s and --downscale-delay-s must be >= 0")
        self.min_workers, self.max_workers = min_workers, max_workers
        self.lag_threshold, self.max_lag_seconds = lag_threshold, max_lag_seconds
        self.upscale_delay_s, self.downscale_delay_s = upscale_delay_s, downscale_delay_s
        self._asked_since: tuple[str, float] | None = None  # ("up" | "down", since when)

    def settings(self) -> dict:
        return {"min_workers": self.min_workers, "max_workers": self.max_workers,
                "lag_threshold": self.lag_threshold, "max_lag_seconds": self.max_lag_seconds,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}

    def _target(self, current: int, lag: int, rate: float | None,
                 partitions: int | None) -> tuple[int, str, str]:
        wants = []
        if self.lag_threshold is not None:
            n = math.ceil(lag / self.lag_threshold)
            wants.append((n, "lag_threshold", f"lag {lag} / threshold {self.lag_threshold} -> {n}"))
        if self.max_lag_seconds is not None:
            if rate and rate > 0:
                seconds = lag / rate
                n = math.ceil(current * seconds / self.max_lag_seconds)
                wants.append((n, "max_lag_seconds",
                              f"time lag {seconds:.1f} s at {rate:.0f}/s vs {self.max_lag_seconds:g} s -> {n}"))
            elif lag > 0:
                wants.append((self.max_workers, "max_lag_seconds",
                              f"lag {lag} and nothing predicted: the backlog does not drain"))
            else:
                wants.append((0, "max_lag_seconds", "no lag"))
        n, objective, why = max(wants)
        cap = self.max_workers if not partitions else min(self.max_workers, partitions)
        if n > cap:
            objective = "partitions" if cap < self.max_workers else "max"
            why += f", capped at {cap} ({'the partition count' if objective == 'partitions' else 'MAX'})"
        elif n < self.min_workers:
            objective = "min"
            why += f", raised to MIN {self.min_workers}"
        return max(self.min_workers, min(n, cap)), objective, why

    def decide(self, now: float, current: int, lag: int | None, rate: float | None,
               partitions: int | None = None) -> Decision:
        """`lag`: frames behind the log end over all partitions (None: not known yet); `rate`:
        frames/s predicted lately; `partitions`: of the input topic (None: not known)."""
        if lag is None:
            self._asked_since = None
            return Decision(now, current, current, current, "hold", "unknown", "lag not known yet", lag, rate)
        target, objective, why = self._target(current, lag, rate, partitions)
        if target == current:
            self._asked_since = None
            return Decision(now, current, target, current, "hold", objective, why, lag, rate)
        direction = "up" if target > current else "down"
        if self._asked_since is None or self._asked_since[0] != direction:
            self._asked_since = (direction, now)
        delay = self.upscale_delay_s if direction == "up" else self.downscale_delay_s
        waited = now - self._asked_since[1]
        if waited < delay:
            return Decision(now, current, target, current, "hold", objective,
                            f"{why}; {direction} once asked for {delay:g} s ({waited:.0f} s so far)", lag, rate)
        self._asked_since = None
        return Decision(now, current, target, target, direction, objective, why, lag, rate)
