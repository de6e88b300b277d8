"""AutoscalingState.decide with a fake clock: delays, clamping, and resets on flapping."""

from __future__ import annotations

from ladle._control.autoscaling import AutoscalingPolicy, AutoscalingState


def make(**overrides: float) -> AutoscalingState:
    options: dict[str, float] = dict(min_replicas=1, max_replicas=10, target_ongoing_requests=2,
                                     upscale_delay_s=30, downscale_delay_s=600)
    options.update(overrides)
    return AutoscalingState(AutoscalingPolicy(**options))  # type: ignore[arg-type]


def test_steady_load_keeps_the_count() -> None:
    state = make()
    for now in range(0, 2000, 10):
        assert state.decide(float(now), 2, 4.0) == 2


def test_upscale_only_after_upscale_delay() -> None:
    state = make()
    # 12 ongoing over 2 replicas at target 2 wants 6 replicas.
    assert state.decide(100.0, 2, 12.0) == 2
    assert state.decide(110.0, 2, 12.0) == 2
    assert state.decide(129.9, 2, 12.0) == 2
    assert state.decide(130.0, 2, 12.0) == 6


def test_downscale_only_after_downscale_delay() -> None:
    state = make()
    assert state.decide(0.0, 6, 2.0) == 6
    assert state.decide(300.0, 6, 2.0) == 6
    assert state.decide(599.0, 6, 2.0) == 6
    assert state.decide(600.0, 6, 2.0) == 1


def test_zero_delays_act_at_once() -> None:
    state = make(upscale_delay_s=0, downscale_delay_s=0)
    assert state.decide(0.0, 1, 8.0) == 4
    assert state.decide(1.0, 4, 0.0) == 1


def test_clamped_to_min_and_max() -> None:
    state = make(min_replicas=2, max_replicas=5, upscale_delay_s=0, downscale_delay_s=0)
    assert state.decide(0.0, 3, 1000.0) == 5
    assert state.decide(1.0, 5, 1000.0) == 5  # already at max: nothing to do
    assert state.decide(2.0, 5, 0.0) == 2
    assert state.decide(3.0, 2, 0.0) == 2  # already at min


def test_clamp_applies_after_the_delay_too() -> None:
    state = make(max_replicas=3)
    assert state.decide(0.0, 1, 100.0) == 1
    assert state.decide(30.0, 1, 100.0) == 3


def test_flapping_resets_the_upscale_timer() -> None:
    state = make()
    assert state.decide(0.0, 2, 12.0) == 2  # wants up from t=0
    assert state.decide(20.0, 2, 4.0) == 2  # load back to target: the want is gone
    assert state.decide(25.0, 2, 12.0) == 2  # wants up again from t=25
    assert state.decide(40.0, 2, 12.0) == 2  # 40s after the first want, only 15s of this one
    assert state.decide(54.9, 2, 12.0) == 2
    assert state.decide(55.0, 2, 12.0) == 6


def test_flapping_between_up_and_down_resets_both_timers() -> None:
    state = make(upscale_delay_s=10, downscale_delay_s=10)
    assert state.decide(0.0, 4, 0.0) == 4  # wants down from t=0
    assert state.decide(5.0, 4, 40.0) == 4  # wants up instead, from t=5
    assert state.decide(10.0, 4, 0.0) == 4  # down again from t=10 (not t=0)
    assert state.decide(15.0, 4, 40.0) == 4  # up again from t=15 (not t=5)
    assert state.decide(24.9, 4, 40.0) == 4
    assert state.decide(25.0, 4, 40.0) == 10


def test_timer_restarts_after_a_decision() -> None:
    state = make(upscale_delay_s=10)
    assert state.decide(0.0, 1, 4.0) == 1
    assert state.decide(10.0, 1, 4.0) == 2
    # Now at 2 replicas, more load: a new want, with a fresh delay.
    assert state.decide(11.0, 2, 8.0) == 2
    assert state.decide(20.9, 2, 8.0) == 2
    assert state.decide(21.0, 2, 8.0) == 4


def test_scale_from_zero() -> None:
    state = make(min_replicas=0, upscale_delay_s=0)
    assert state.decide(0.0, 0, 0.0) == 0
    assert state.decide(1.0, 0, 1.0) == 1


def test_smoothing_factor_slows_changes() -> None:
    state = make(upscale_delay_s=0, downscale_delay_s=0, upscaling_factor=0.5,
                 downscaling_factor=0.5)
    assert state.decide(0.0, 2, 20.0) == 6  # wants 10: moves half way from 2
    assert state.decide(1.0, 10, 4.0) == 6  # wants 2: half way down from 10
