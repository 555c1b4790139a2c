"""Learning-rate schedules at closed-form points, against a loop oracle, and round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tfpneumo.config import ConfigError, OptimizerConfig

keras = pytest.importorskip("keras")

from tfpneumo.training.schedules import (  # noqa: E402
    OneCycle,
    WarmupConstant,
    WarmupCosineRestarts,
    build_schedule,
)

LR = 1e-3


def values(schedule, steps) -> np.ndarray:
    return np.array([float(schedule(s)) for s in steps], dtype=np.float64)


def at(schedule, step: int) -> float:
    return float(schedule(step))


def cfg(**kw) -> OptimizerConfig:
    return OptimizerConfig(**{"lr": LR, **kw})


# ----------------------------------------------------------------------------- cosine

def test_cosine_closed_form_points():
    # 10 steps/epoch, 10 epochs = 100 steps; warmup 2 epochs = 20 steps; decay over 80.
    s = build_schedule(cfg(schedule="cosine", warmup_epochs=2.0, min_lr_ratio=0.1), 10, 10)
    low = LR * 0.1
    assert at(s, 0) == 0.0
    assert at(s, 10) == pytest.approx(LR / 2, rel=1e-6)
    assert at(s, 20) == pytest.approx(LR, rel=1e-6)
    assert at(s, 60) == pytest.approx((LR + low) / 2, rel=1e-5)  # halfway through the decay
    # a quarter into the decay: low + (LR - low) * (1 + cos(pi/4)) / 2
    assert at(s, 40) == pytest.approx(low + (LR - low) * (1 + math.cos(math.pi / 4)) / 2,
                                      rel=1e-5)
    assert at(s, 100) == pytest.approx(low, rel=1e-5)
    assert at(s, 250) == pytest.approx(low, rel=1e-5)  # held after the end
    v = values(s, range(0, 101))
    assert np.all(np.diff(v[:21]) > 0)
    assert np.all(np.diff(v[20:]) <= 1e-9)


def test_cosine_without_warmup_starts_at_lr():
    s = build_schedule(cfg(schedule="cosine", warmup_epochs=0.0, min_lr_ratio=0.0), 5, 4)
    assert at(s, 0) == pytest.approx(LR, rel=1e-6)
    assert at(s, 10) == pytest.approx(LR / 2, rel=1e-5)
    assert at(s, 20) == pytest.approx(0.0, abs=1e-10)


def test_cosine_fractional_warmup_rounds_to_steps():
    s = build_schedule(cfg(schedule="cosine", warmup_epochs=0.5), 10, 4)  # 5 warmup steps
    assert at(s, 5) == pytest.approx(LR, rel=1e-6)
    assert at(s, 4) == pytest.approx(LR * 4 / 5, rel=1e-6)


def test_warmup_longer_than_training_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer.warmup_epochs"):
        build_schedule(cfg(schedule="cosine", warmup_epochs=3.0), 10, 3)
    with pytest.raises(ConfigError, match="optimizer.warmup_epochs"):
        build_schedule(cfg(schedule="onecycle", warmup_epochs=5.0), 10, 3)
    with pytest.raises(ValueError):
        build_schedule(cfg(), 0, 3)


# ----------------------------------------------------------------------------- onecycle

def test_onecycle_start_peak_end():
    s = build_schedule(cfg(schedule="onecycle", warmup_epochs=3.0), 10, 10)  # peak at step 30
    start, end = LR / 25, LR / 25 / 1e4
    assert at(s, 0) == pytest.approx(start, rel=1e-6)
    assert at(s, 15) == pytest.approx((start + LR) / 2, rel=1e-5)
    assert at(s, 30) == pytest.approx(LR, rel=1e-6)
    assert at(s, 65) == pytest.approx((LR + end) / 2, rel=1e-5)
    assert at(s, 100) == pytest.approx(end, rel=1e-4)
    assert at(s, 130) == pytest.approx(end, rel=1e-4)
    v = values(s, range(0, 101))
    assert np.argmax(v) == 30
    assert np.all(np.diff(v[:31]) > 0)
    assert np.all(np.diff(v[30:]) < 0)


def test_onecycle_default_warmup_is_30_percent():
    s = build_schedule(cfg(schedule="onecycle", warmup_epochs=0.0), 5, 20)  # 100 steps
    assert isinstance(s, OneCycle) and s.warmup_steps == 30
    assert np.argmax(values(s, range(0, 101))) == 30


# ----------------------------------------------------------------------------- restarts

def restarts_oracle(step: int, lr: float, low: float, warmup: int, t0: float,
                    mult: float) -> float:
    """Walks the cycles one by one (independent of the closed form in the schedule)."""
    if step < warmup:
        return lr * step / warmup
    s, start, length = step - warmup, 0.0, t0
    while s >= start + length:
        start += length
        length *= mult
    return low + (lr - low) * 0.5 * (1 + math.cos(math.pi * (s - start) / length))


def test_restarts_closed_form_points_mult_2():
    # 4 steps/epoch: warmup 4 steps, first cycle 8 steps, then 16, 32:
    # cycles start at steps 4, 12, 28, 60.
    c = cfg(schedule="cosine_restarts", warmup_epochs=1.0, restart_epochs=2.0, restart_mult=2.0,
            min_lr_ratio=0.1)
    s = build_schedule(c, 4, 30)
    low = LR * 0.1
    assert at(s, 0) == 0.0
    assert at(s, 2) == pytest.approx(LR / 2, rel=1e-6)
    for start, length in [(4, 8), (12, 16), (28, 32), (60, 64)]:
        assert at(s, start) == pytest.approx(LR, rel=1e-6), start
        assert at(s, start + length // 2) == pytest.approx((LR + low) / 2, rel=1e-5), start
        if start > 4:  # the step before a restart is near the bottom: lr jumps back up
            assert at(s, start - 1) < low + 0.05 * (LR - low), start
        cyc = [float(s.cycle(k)[0]) for k in range(start, start + length)]
        assert set(cyc) == {cyc[0]}  # one cycle index over the whole cycle
    assert [float(s.cycle(k)[0]) for k in (4, 12, 28, 60)] == [0.0, 1.0, 2.0, 3.0]
    v = values(s, range(4, 12))
    assert np.all(np.diff(v) < 0)


@pytest.mark.parametrize("mult", [1.0, 1.5, 2.0, 3.0])
def test_restarts_match_loop_oracle(mult):
    low = LR * 0.05
    s = WarmupCosineRestarts(LR, first_cycle_steps=8, warmup_steps=3, cycle_mult=mult,
                             min_lr=low)
    steps = np.arange(0, 700)
    want = np.array([restarts_oracle(k, LR, low, 3, 8, mult) for k in steps])
    got = np.asarray(s(steps), np.float64)  # element-wise ops: a vector of steps works
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


def test_restarts_match_keras_cosine_decay_restarts_without_warmup():
    # Keras' own SGDR (no warmup) as a second reference, away from cycle boundaries where
    # its float32 floor(log(...)) may be one cycle off.
    mine = WarmupCosineRestarts(LR, first_cycle_steps=10, warmup_steps=0, cycle_mult=2.0,
                                min_lr=0.2 * LR)
    ref = keras.optimizers.schedules.CosineDecayRestarts(LR, 10, t_mul=2.0, alpha=0.2)
    steps = [k for k in range(0, 160, 3) if k not in (0, 10, 30, 70, 150)]
    np.testing.assert_allclose(values(mine, steps), values(ref, steps), rtol=1e-4)


# ----------------------------------------------------------------------------- constant

def test_constant_with_warmup():
    s = build_schedule(cfg(schedule="constant", warmup_epochs=1.0), 8, 5)
    assert at(s, 0) == 0.0
    assert at(s, 4) == pytest.approx(LR / 2, rel=1e-6)
    assert at(s, 8) == pytest.approx(LR, rel=1e-6)
    assert at(s, 1000) == pytest.approx(LR, rel=1e-6)
    s0 = build_schedule(cfg(schedule="constant", warmup_epochs=0.0), 8, 5)
    assert at(s0, 0) == pytest.approx(LR, rel=1e-6)


# ----------------------------------------------------------------------------- graph mode, saving

ALL = [
    cfg(schedule="cosine", warmup_epochs=1.0),
    cfg(schedule="onecycle", warmup_epochs=1.0),
    cfg(schedule="cosine_restarts", warmup_epochs=1.0, restart_epochs=1.0, restart_mult=2.0),
    cfg(schedule="constant", warmup_epochs=1.0),
]
IDS = [c.schedule for c in ALL]
PROBE = [0, 1, 3, 5, 7, 10, 13, 19, 24, 30]


@pytest.mark.parametrize("c", ALL, ids=IDS)
def test_serialize_round_trip(c):
    s = build_schedule(c, 5, 6)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
    assert type(again) is type(s)
    assert again.get_config() == s.get_config()
    np.testing.assert_array_equal(values(again, PROBE), values(s, PROBE))


@pytest.mark.parametrize("c", ALL, ids=IDS)
def test_in_tf_function_with_int64_step(c, tf):
    s = build_schedule(c, 5, 6)
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def lr_at():
        return s(step)

    got = []
    for k in PROBE:
        step.assign(k)
        got.append(float(lr_at()))
    np.testing.assert_allclose(got, values(s, PROBE), rtol=1e-6)


@pytest.mark.parametrize("c", ALL, ids=IDS)
def test_adamw_with_schedule_serializes_and_steps(c, tf):
    s = build_schedule(c, 5, 6)
    opt = keras.optimizers.AdamW(learning_rate=s, weight_decay=1e-4)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again._learning_rate) is type(s)
    var = keras.Variable(np.ones(3, np.float32))

    @tf.function
    def step():
        opt.apply_gradients([(tf.ones(3), var)])

    for k in range(7):
        # the lr an update uses is schedule(iterations) before the increment
        assert float(opt.learning_rate) == pytest.approx(float(s(k)), rel=1e-6, abs=1e-12)
        again.iterations.assign(k)
        assert float(again.learning_rate) == pytest.approx(float(s(k)), rel=1e-6, abs=1e-12)
        step()
    assert int(opt.iterations) == 7


def test_keras_file_round_trip_keeps_schedule(tmp_path):
    c = cfg(schedule="cosine_restarts", restart_epochs=1.0, restart_mult=2.0)
    s = build_schedule(c, 5, 6)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=s), loss="mse")
    model.fit(np.ones((4, 2), np.float32), np.ones((4, 1), np.float32), epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    got = loaded.optimizer._learning_rate
    assert isinstance(got, WarmupCosineRestarts)
    assert got.get_config() == s.get_config()
    assert int(loaded.optimizer.iterations) == 1
    np.testing.assert_array_equal(values(got, PROBE), values(s, PROBE))


def test_warmup_constant_direct():
    s = WarmupConstant(2.0, warmup_steps=4)
    np.testing.assert_allclose(values(s, [0, 1, 2, 3, 4, 9]), [0, 0.5, 1.0, 1.5, 2.0, 2.0])
