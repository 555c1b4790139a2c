"""The training engine: devices and precision, the optimizer, and the Keras train step.

``Trainer`` wraps the plain functional network (``build_model``) so that the saved
``.keras`` files stay free of training-only code: the train step (gradient accumulation
that works under MirroredStrategy) lives here, the network in ``models/unet.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import keras
import tensorflow as tf

from tfpneumo.config import Config, TrainConfig

# ----------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Runtime:
    """What the training run executes on, resolved from the config and the machine."""

    strategy: tf.distribute.Strategy
    strategy_name: str  # one_device | mirrored | multi_worker
    precision: str  # float32 | mixed_float16 | mixed_bfloat16
    jit_compile: bool
    replicas: int

    def describe(self) -> str:
        return (f"{self.strategy_name} x{self.replicas}, {self.precision}, "
                f"XLA {'on' if self.jit_compile else 'off'}")


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """Chooses the strategy, precision and XLA setting.

    auto strategy: MultiWorkerMirroredStrategy when TF_CONFIG names several workers,
    MirroredStrategy over the GPUs when there are several, otherwise no strategy.
    auto precision: mixed_float16 on GPU (tensor cores, with loss scaling), mixed_bfloat16 on
    TPU, float32 on CPU (measured faster than bfloat16 on this class of CPU; bench_train.py).
    auto XLA: on for one GPU; Keras turns it off under tf.distribute, and on CPU it is slower.
    """
    gpus = tf.config.list_logical_devices("GPU")
    tpus = tf.config.list_logical_devices("TPU")
    kind = cfg.strategy
    if kind == "auto":
        workers = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", [])
        kind = "multi_worker" if len(workers) > 1 else "mirrored" if len(gpus) > 1 else "one_device"
    if kind == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif kind == "mirrored":
        # Several logical CPUs stand in for GPUs in tests; MirroredStrategy() alone would
        # take only /cpu:0 when there is no GPU.
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    else:
        strategy = tf.distribute.get_strategy()
    precision = cfg.precision
    if precision == "auto":
        precision = "mixed_float16" if gpus else "mixed_bfloat16" if tpus else "float32"
    if cfg.jit_compile == "auto":
        jit = kind == "one_device" and bool(gpus)
    else:
        jit = cfg.jit_compile == "on"
    return Runtime(strategy, kind, precision, jit, strategy.num_replicas_in_sync)


# ----------------------------------------------------------------------------- optimizer


@keras.saving.register_keras_serializable(package="tfpneumo")
class LayerwiseAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is multiplied by ``encoder_lr_mult`` for encoder variables.

    Scaling the gradients would not do it (Adam is invariant to gradient scale), so the
    multiplier is applied to the learning rate of each update. The set of encoder variables
    is given by their paths before the optimizer is built.
    """

    def __init__(self, *args, encoder_lr_mult: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder_lr_mult = encoder_lr_mult
        self.encoder_paths: set[str] = set()
        self._encoder_indices: set[int] = set()

    def build(self, var_list):
        super().build(var_list)
        self._encoder_indices = {i for i, v in enumerate(var_list) if v.path in self.encoder_paths}

    def update_step(self, gradient, variable, learning_rate):
        if self.encoder_lr_mult != 1.0 and self._get_variable_index(variable) in self._encoder_indices:
            learning_rate = keras.ops.multiply(learning_rate, self.encoder_lr_mult)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "encoder_lr_mult": self.encoder_lr_mult}


def build_optimizer(cfg: Config, schedule, encoder_paths: set[str], precision: str):
    opt = cfg.optimizer
    optimizer = LayerwiseAdamW(
        learning_rate=schedule,
        weight_decay=opt.weight_decay,
        global_clipnorm=opt.clipnorm or None,
        encoder_lr_mult=opt.encoder_lr_mult,
    )
    optimizer.encoder_paths = set(encoder_paths)
    if precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def learning_rate(optimizer) -> float:
    """The current learning rate of a (possibly loss-scaled) optimizer."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    lr = inner.learning_rate
    return float(keras.ops.convert_to_numpy(lr))


# ----------------------------------------------------------------------------- train step


class Trainer(keras.Model):
    """Trains ``net`` (a functional model with outputs ``mask`` and ``label``).

    ``accumulation_steps`` > 1 splits each replica's batch into that many micro-batches and
    sums their gradients inside one train step before a single optimizer update. Keras'
    own ``gradient_accumulation_steps`` fails under MirroredStrategy (merge_call inside a
    cond); doing it inside the step needs no cross-replica call until the update.
    """

    def __init__(self, net: keras.Model, accumulation_steps: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.accumulation_steps = accumulation_steps

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    def _forward_backward(self, x, y, variables):
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = self.optimizer.scale_loss(loss)
        return loss, y_pred, tape.gradient(scaled, variables)

    def train_step(self, data):
        x, y = data[0], data[1]
        variables = self.trainable_weights
        n = self.accumulation_steps
        if n == 1:
            loss, y_pred, grads = self._forward_backward(x, y, variables)
            self._update_trackers(loss, x)
            self.optimizer.apply(grads, variables)
            return self.compute_metrics(x, y, y_pred)

        xs = tf.split(x, n, axis=0)
        ys = {k: tf.split(v, n, axis=0) for k, v in y.items()}
        total = None
        for i in range(n):  # n is small and static: unrolled, chained so only one is live
            deps = [] if total is None else [g for g in total if g is not None]
            with tf.control_dependencies(deps):
                y_i = {k: v[i] for k, v in ys.items()}
                loss, y_pred, grads = self._forward_backward(xs[i], y_i, variables)
            self._update_trackers(loss, xs[i])
            self.compute_metrics(xs[i], y_i, y_pred)
            if total is None:
                total = list(grads)
            else:
                total = [a if b is None else a + b for a, b in zip(total, grads, strict=True)]
        self.optimizer.apply([None if g is None else g / n for g in total], variables)
        return self.get_metrics_result()

    def _update_trackers(self, loss, x):
        from keras.src.losses import loss as loss_module

        self._loss_tracker.update_state(
            loss_module.unscale_loss_for_distribution(loss), sample_weight=tf.shape(x)[0])
