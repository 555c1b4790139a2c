"""Step-based learning-rate schedules: warmup + cosine, 1cycle, SGDR restarts, constant.

Every schedule is a ``keras.optimizers.schedules.LearningRateSchedule`` called with the
optimizer's iteration counter (``optimizer.iterations``, int64, 0 on the first update) and
returning a scalar float32 tensor. They use ``keras.ops`` only, so they trace inside the
compiled train step; the custom ones are registered (package ``tfpneumo``) with
``get_config`` so an optimizer saved inside a ``.keras`` file reloads with its schedule.

Conventions shared by all schedules:

- Linear warmup goes from 0 at step 0 to the peak lr at step ``warmup_steps`` (so the very
  first update has lr 0, as with Keras' ``CosineDecay`` warmup).
- "End of training" is step ``total_steps = epochs * steps_per_epoch``; the final value is
  reached there and held afterwards (the last update, at ``total_steps - 1``, uses a value
  one step short of it).
- Under Keras' ``gradient_accumulation_steps`` the iteration counter counts micro-batches,
  so ``steps_per_epoch`` must count batches, not optimizer updates.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from tfpneumo.config import ConfigError, OptimizerConfig

# PyTorch OneCycleLR defaults (Smith & Topin 2018): start at max_lr / 25, end 1e4 lower.
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4
# Warmup fraction of 1cycle when optimizer.warmup_epochs is 0 (PyTorch's pct_start).
ONECYCLE_PCT_START = 0.3
# Steps closer than this to an SGDR cycle start count as the start (float rounding).
_BOUNDARY_EPS = 1e-6


def _cosine_interp(start: float, end: float, fraction):
    """``start`` at fraction 0 to ``end`` at fraction 1 along half a cosine; float32 tensor."""
    c = 0.5 * (1.0 + ops.cos(math.pi * fraction))
    # A weighted sum, not end + (start - end) * c: no cancellation when end >> start.
    return start * c + end * (1.0 - c)


def _as_step(step):
    return ops.cast(step, "float32")


@keras.saving.register_keras_serializable(package="tfpneumo")
class WarmupConstant(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to ``lr`` over ``warmup_steps`` steps, then ``lr`` forever."""

    def __init__(self, lr: float, warmup_steps: int = 0, name: str = "WarmupConstant"):
        super().__init__()
        self.lr = float(lr)
        self.warmup_steps = int(warmup_steps)
        self.name = name

    def __call__(self, step):
        s = _as_step(step)
        w = float(max(self.warmup_steps, 1))  # guards the division; s < 0 is never true
        return ops.where(s < self.warmup_steps, self.lr * s / w, self.lr)

    def get_config(self) -> dict:
        return {"lr": self.lr, "warmup_steps": self.warmup_steps, "name": self.name}


@keras.saving.register_keras_serializable(package="tfpneumo")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Smith's 1cycle with cosine annealing in both phases (PyTorch ``OneCycleLR`` shape).

    lr goes from ``max_lr / div_factor`` at step 0 up to ``max_lr`` at ``warmup_steps``,
    then down to ``max_lr / div_factor / final_div_factor`` at ``total_steps`` (held after).
    """

    def __init__(self, max_lr: float, total_steps: int, warmup_steps: int,
                 div_factor: float = ONECYCLE_DIV_FACTOR,
                 final_div_factor: float = ONECYCLE_FINAL_DIV_FACTOR,
                 name: str = "OneCycle"):
        super().__init__()
        if not 0 < warmup_steps < total_steps:
            raise ValueError(f"OneCycle needs 0 < warmup_steps < total_steps, got "
                             f"warmup_steps={warmup_steps}, total_steps={total_steps}")
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.name = name

    @property
    def initial_lr(self) -> float:
        return self.max_lr / self.div_factor

    @property
    def final_lr(self) -> float:
        return self.initial_lr / self.final_div_factor

    def __call__(self, step):
        s = ops.minimum(_as_step(step), float(self.total_steps))
        w, total = float(self.warmup_steps), float(self.total_steps)
        up = _cosine_interp(self.initial_lr, self.max_lr, s / w)
        down = _cosine_interp(self.max_lr, self.final_lr, (s - w) / (total - w))
        return ops.where(s < w, up, down)

    def get_config(self) -> dict:
        return {"max_lr": self.max_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "div_factor": self.div_factor,
                "final_div_factor": self.final_div_factor, "name": self.name}


@keras.saving.register_keras_serializable(package="tfpneumo")
class WarmupCosineRestarts(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to ``lr``, then SGDR (Loshchilov & Hutter 2017) cosine warm restarts.

    After warmup, cycle ``i`` (0-based) lasts ``first_cycle_steps * cycle_mult**i`` steps and
    goes from ``lr`` down to ``min_lr`` along a cosine; at each cycle boundary the lr jumps
    back to ``lr``. Cycles keep going after the end of training (no clamping).

    Keras' ``CosineDecayRestarts`` has no warmup and finds the cycle with a float32
    ``floor(log(...))`` that can land one cycle off exactly at a boundary; here the
    estimate is corrected against the exact cycle starts.
    """

    def __init__(self, lr: float, first_cycle_steps: float, warmup_steps: int = 0,
                 cycle_mult: float = 1.0, min_lr: float = 0.0,
                 name: str = "WarmupCosineRestarts"):
        super().__init__()
        if first_cycle_steps <= 0 or cycle_mult < 1:
            raise ValueError(f"WarmupCosineRestarts needs first_cycle_steps > 0 and "
                             f"cycle_mult >= 1, got {first_cycle_steps}, {cycle_mult}")
        self.lr = float(lr)
        self.first_cycle_steps = float(first_cycle_steps)
        self.warmup_steps = int(warmup_steps)
        self.cycle_mult = float(cycle_mult)
        self.min_lr = float(min_lr)
        self.name = name

    def _cycle_start(self, i):
        """Steps after warmup at which cycle ``i`` starts (float64 tensor)."""
        t0, m = self.first_cycle_steps, self.cycle_mult
        return t0 * (ops.power(m, i) - 1.0) / (m - 1.0)

    def cycle(self, step):
        """(cycle index, fraction of that cycle done) at ``step``; float64 tensors."""
        # float64: with float32 pow/log, the start of cycle 4 for mult 1.5 (65 steps) came
        # out above 65 in a vectorised call, so the restart step got the previous minimum.
        s = ops.maximum(ops.cast(step, "float64") - float(self.warmup_steps), 0.0)
        t0, m = self.first_cycle_steps, self.cycle_mult
        if m == 1.0:
            i = ops.floor(s / t0 + _BOUNDARY_EPS)
            return i, ops.maximum(s / t0 - i, 0.0)
        # Closed form of sum_{k<i} t0*m^k <= s, then fix a possible off-by-one from rounding.
        i = ops.floor(ops.log(1.0 + s * (m - 1.0) / t0) / math.log(m))
        i = ops.where(s < self._cycle_start(i) - _BOUNDARY_EPS, i - 1.0, i)
        i = ops.where(s >= self._cycle_start(i + 1.0) - _BOUNDARY_EPS, i + 1.0, i)
        length = t0 * ops.power(m, i)
        return i, ops.maximum((s - self._cycle_start(i)) / length, 0.0)

    def __call__(self, step):
        s = _as_step(step)
        _, fraction = self.cycle(step)
        decayed = _cosine_interp(self.lr, self.min_lr, ops.cast(fraction, "float32"))
        w = float(max(self.warmup_steps, 1))
        return ops.where(s < self.warmup_steps, self.lr * s / w, decayed)

    def get_config(self) -> dict:
        return {"lr": self.lr, "first_cycle_steps": self.first_cycle_steps,
                "warmup_steps": self.warmup_steps, "cycle_mult": self.cycle_mult,
                "min_lr": self.min_lr, "name": self.name}


def build_schedule(cfg: OptimizerConfig, steps_per_epoch: int,
                   epochs: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """The schedule named by ``cfg.schedule`` for ``epochs`` epochs of ``steps_per_epoch``.

    - ``cosine``: linear warmup 0 -> ``lr`` over ``warmup_epochs``, then cosine down to
      ``lr * min_lr_ratio`` at the end of training (Keras ``CosineDecay``: its ``alpha`` is a
      fraction of ``warmup_target`` when warmup is on, which is exactly ``min_lr_ratio``).
    - ``onecycle``: cosine up from ``lr/25`` to ``lr`` over ``warmup_epochs`` (30% of
      training when ``warmup_epochs`` is 0), then cosine down to ``lr/25/1e4``;
      ``min_lr_ratio`` is not used.
    - ``cosine_restarts``: linear warmup, then SGDR cycles from ``lr`` to ``lr *
      min_lr_ratio``, the first ``restart_epochs`` long, each next ``restart_mult`` times
      longer; a cycle cut by the end of training stays cut.
    - ``constant``: linear warmup, then ``lr``.

    Fractional epochs are rounded to whole steps. Raises :class:`ConfigError` when the
    warmup leaves no steps to decay in (cosine, onecycle).
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"build_schedule needs steps_per_epoch >= 1 and epochs >= 1, got "
                         f"{steps_per_epoch}, {epochs}")
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        return WarmupConstant(cfg.lr, warmup)
    if cfg.schedule == "cosine_restarts":
        first = max(cfg.restart_epochs * steps_per_epoch, 1.0)
        return WarmupCosineRestarts(cfg.lr, first, warmup, cfg.restart_mult,
                                    cfg.lr * cfg.min_lr_ratio)
    if cfg.schedule == "onecycle":
        # 1cycle needs a rising phase of at least one step.
        pct = cfg.warmup_epochs / epochs if cfg.warmup_epochs > 0 else ONECYCLE_PCT_START
        warmup = max(round(pct * total), 1)
    if warmup >= total:
        raise ConfigError(f"config key optimizer.warmup_epochs: {cfg.warmup_epochs} epochs of "
                          f"warmup ({warmup} steps) leave nothing of {epochs} epochs "
                          f"({total} steps) for the {cfg.schedule} decay")
    if cfg.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0, decay_steps=total - warmup, alpha=cfg.min_lr_ratio,
            warmup_target=cfg.lr, warmup_steps=warmup)
    if cfg.schedule == "onecycle":
        return OneCycle(cfg.lr, total, warmup)
    raise ConfigError(f"config key optimizer.schedule: unknown schedule {cfg.schedule!r}")
