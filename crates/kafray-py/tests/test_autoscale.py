"""The autoscaling policy alone: KEDA's lag rule, the time-lag objective, bounds and delays."""
import pytest

from kafray.autoscale import LagAutoscaler, parse_bounds


def policy(**kw):
    settings = dict(min_workers=1, max_workers=8, lag_threshold=1000, upscale_delay_s=10, downscale_delay_s=60)
    return LagAutoscaler(**{**settings, **kw})


def test_keda_rule_asks_for_ceil_of_lag_over_threshold_once_the_upscale_delay_has_passed():
    p = policy()
    first = p.decide(0, current=1, lag=3500, rate=900.0, partitions=8)
    assert (first.target, first.desired, first.action) == (4, 1, "hold"), first
    assert p.decide(9.9, 1, 3500, 900.0, 8).action == "hold"
    up = p.decide(10, 1, 3500, 900.0, 8)
    assert (up.desired, up.action, up.objective) == (4, "up", "lag_threshold"), up
    assert "lag 3500 / threshold 1000 -> 4" in up.reason


def test_a_break_in_the_ask_restarts_the_delay():
    p = policy()
    p.decide(0, 1, 3500, None, 8)
    assert p.decide(5, 1, 200, None, 8).action == "hold"  # the lag fell back: no longer asked
    assert p.decide(12, 1, 3500, None, 8).action == "hold", "the delay counts from the new ask"
    assert p.decide(22, 1, 3500, None, 8).action == "up"


def test_quiet_scales_down_to_min_only_after_the_downscale_delay():
    p = policy(min_workers=2)
    assert p.decide(0, 4, 0, 500.0, 8).action == "hold"
    down = p.decide(60, 4, 0, 500.0, 8)
    assert (down.desired, down.action, down.objective) == (2, "down", "min"), down


def test_never_more_workers_than_partitions_or_max():
    capped = policy(upscale_delay_s=0).decide(0, 1, 100_000, None, partitions=3)
    assert (capped.desired, capped.objective) == (3, "partitions"), capped
    at_max = policy(upscale_delay_s=0, max_workers=5).decide(0, 1, 100_000, None, partitions=12)
    assert (at_max.desired, at_max.objective) == (5, "max"), at_max


def test_time_lag_objective_scales_with_the_seconds_the_backlog_needs():
    p = LagAutoscaler(1, 8, max_lag_seconds=2.0, upscale_delay_s=0, downscale_delay_s=0)
    # 2 workers drain 1000/s; 6000 behind is 6 s of work: 3x the objective, so 6 workers.
    d = p.decide(0, 2, 6000, 1000.0, 16)
    assert (d.desired, d.objective) == (6, "max_lag_seconds"), d
    stuck = p.decide(1, 2, 50, 0.0, 16)
    assert stuck.desired == 8, "a backlog that does not drain asks for MAX"


def test_both_objectives_take_the_larger():
    p = LagAutoscaler(1, 8, lag_threshold=1000, max_lag_seconds=1.0, upscale_delay_s=0)
    assert p.decide(0, 1, 2500, 500.0, 8).desired == 5  # time lag 5 s -> 5 beats 3 from the lag rule


def test_unknown_lag_holds():
    d = policy(upscale_delay_s=0).decide(0, 3, None, None, 8)
    assert (d.action, d.desired) == ("hold", 3)


@pytest.mark.parametrize("kw, message", [
    (dict(min_workers=0, max_workers=2, lag_threshold=5), "MIN"),
    (dict(min_workers=3, max_workers=2, lag_threshold=5), "MIN <= MAX"),
    (dict(min_workers=1, max_workers=2), "--lag-threshold FRAMES"),
    (dict(min_workers=1, max_workers=2, lag_threshold=0), "at least 1"),
    (dict(min_workers=1, max_workers=2, max_lag_seconds=0), "above 0"),
])
def test_bad_settings_name_the_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        LagAutoscaler(**kw)


def test_bounds_parse_and_refuse_nonsense():
    assert parse_bounds("2:6") == (2, 6)
    for bad in ("4", "a:b", "0:3", "5:2"):
        with pytest.raises(ValueError, match="--autoscale"):
            parse_bounds(bad)
