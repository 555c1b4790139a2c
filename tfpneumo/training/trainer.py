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

from tfpneumo import compat
from tfpneumo.config import Config, TrainConfig
from tfpneumo.errors import TfpneumoError

# ----------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Runtime:
    """What the training run executes on, resolved from the config and the machine."""

    strategy: tf.distribute.Strategy
    strategy_name: str  # one_device | mirrored | multi_worker
    precision: str  # float32 | mixed_float16 | mixed_bfloat16
    jit_compile: bool
    replicas: int
    workers: int = 1  # processes (machines) training together
    worker_index: int = 0  # this process's place among them; 0 is the chief

    @property
    def is_chief(self) -> bool:
        """The one process that writes the run folder."""
        return self.worker_index == 0

    def describe(self) -> str:
        where = f", worker {self.worker_index} of {self.workers}" if self.workers > 1 else ""
        return (f"{self.strategy_name} x{self.replicas}{where}, {self.precision}, "
                f"XLA {'on' if self.jit_compile else 'off'}")


def choose_strategy_name(cfg: TrainConfig, n_gpus: int, tf_config_env: str | None) -> str:
    """The strategy ``resolve_runtime`` builds: one_device | mirrored | multi_worker.

    A pure function of the config, the number of GPUs and the ``TF_CONFIG`` environment
    value (None when unset), so the choice can be tested without building a strategy
    (``MultiWorkerMirroredStrategy()`` would try to reach the other workers).
    auto: multi_worker when TF_CONFIG names several workers, mirrored when there are several
    GPUs, otherwise one_device. Raises TfpneumoError on a TF_CONFIG that is not JSON.
    """
    if cfg.strategy != "auto":
        return cfg.strategy
    try:
        tf_config = json.loads(tf_config_env or "{}")
    except json.JSONDecodeError as e:
        raise TfpneumoError(f"environment variable TF_CONFIG: not valid JSON ({e.msg})") from None
    cluster = tf_config.get("cluster", {}) if isinstance(tf_config, dict) else {}
    workers = cluster.get("worker", []) if isinstance(cluster, dict) else []
    if len(workers) > 1:
        return "multi_worker"
    return "mirrored" if n_gpus > 1 else "one_device"


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """Chooses the strategy, precision and XLA setting.

    auto strategy: see :func:`choose_strategy_name`.
    auto precision: mixed_float16 on GPU (tensor cores, with loss scaling), mixed_bfloat16 on
    TPU, float32 on CPU: mixed_bfloat16 measured ~1.4x more images per CPU-second on an
    avx512_bf16 CPU (bench_train.py), but the demo did not learn in it within its minute;
    set it explicitly.
    auto XLA: on for one GPU; Keras turns it off under tf.distribute, and on CPU it is slower.
    """
    # Physical devices only: listing logical devices starts the runtime, after which
    # MultiWorkerMirroredStrategy fails ("Collective ops must be configured at program startup").
    gpus = tf.config.list_physical_devices("GPU")
    kind = choose_strategy_name(cfg, len(gpus), os.environ.get("TF_CONFIG"))
    workers, worker_index = 1, 0
    if kind == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        workers, worker_index = _worker_place(strategy.cluster_resolver)
    gpus = tf.config.list_logical_devices("GPU")
    tpus = tf.config.list_logical_devices("TPU")
    if kind == "mirrored":
        # Several logical CPUs stand in for GPUs in tests; MirroredStrategy() alone would
        # take only /cpu:0 when there is no GPU.
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif kind == "one_device":
        strategy = tf.distribute.get_strategy()
    precision = cfg.precision
    if precision == "auto":
        precision = "mixed_float16" if gpus else "mixed_bfloat16" if tpus else "float32"
    if cfg.jit_compile == "auto":
        jit = kind == "one_device" and bool(gpus)
    else:
        jit = cfg.jit_compile == "on"
    return Runtime(strategy, kind, precision, jit, strategy.num_replicas_in_sync, workers,
                   worker_index)


def _worker_place(resolver) -> tuple[int, int]:
    """(processes in the cluster, this one's index with the chief first) from TF_CONFIG: a
    ``chief`` task when the cluster names one, else worker 0, as TensorFlow counts them."""
    cluster = resolver.cluster_spec().as_dict()
    chiefs, workers = len(cluster.get("chief", [])), len(cluster.get("worker", []))
    task, index = resolver.task_type, int(resolver.task_id or 0)
    if task not in ("chief", "worker"):
        raise TfpneumoError(f"environment variable TF_CONFIG: task type {task!r} does not "
                            "train; use 'worker' (or 'chief')")
    return chiefs + workers, index if task == "chief" else chiefs + index


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

    def _is_encoder(self, variable) -> bool:
        return self._get_variable_index(variable) in self._encoder_indices

    def update_step(self, gradient, variable, learning_rate):
        if self.encoder_lr_mult != 1.0 and self._is_encoder(variable):
            learning_rate = keras.ops.multiply(learning_rate, self.encoder_lr_mult)
        if self.amsgrad or not isinstance(gradient, tf.Tensor):  # e.g. IndexedSlices
            super().update_step(gradient, variable, learning_rate)
            return
        # Keras' Adam formula in one fused kernel (TensorFlow's ResourceApplyAdam: m, v and
        # the weight in one pass) instead of Keras' eight elementwise ops, each a pass over
        # 24 M weights: they were 12 % of the 256 px train step's op time on a CPU.
        dtype = tf.as_dtype(variable.dtype)
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)

        def scalar(x):
            return tf.cast(x, dtype)

        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]),
            beta1_power=tf.pow(scalar(self.beta_1), step),
            beta2_power=tf.pow(scalar(self.beta_2), step), lr=scalar(learning_rate),
            beta1=scalar(self.beta_1), beta2=scalar(self.beta_2), epsilon=scalar(self.epsilon),
            grad=tf.cast(gradient, dtype))

    def _apply_weight_decay(self, variables):
        """Decoupled decay ``w -= lr * wd * w`` with the encoder's lr scaled like its updates.

        Keras (TF backend) decays every variable with the base lr; PyTorch's AdamW with
        parameter groups, which a layer-wise lr imitates, decays each group with its own lr.
        The factor ``lr * wd`` is a scalar first: one multiplication of the weights, not two.
        """
        if self.weight_decay is None:
            return

        def decay(variable, mult):
            if self._use_weight_decay(variable):
                rate = (tf.cast(self.learning_rate, variable.dtype) * mult
                        * tf.cast(self.weight_decay, variable.dtype))
                variable.assign_sub(variable * rate)

        def cross_replica(distribution, variables):
            for variable in variables:
                mult = self.encoder_lr_mult if self._is_encoder(variable) else 1.0
                value = variable.value if isinstance(variable, keras.Variable) else variable
                distribution.extended.update(value, decay, args=(mult,), group=False)

        compat.merge_call(
            cross_replica, self._distribution_strategy, variables)

    def _clip_gradients(self, grads):
        # Keras clips before its cross-replica sum (in _backend_update_step), so under
        # MirroredStrategy a global norm would be the norm of one replica's part. Clipping
        # happens in _backend_update_step instead, after the sum.
        return grads

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Sums the gradients over replicas, clips them, then updates (TF backend)."""
        variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        pairs = self._all_reduce_sum_gradients(list(zip(grads, variables, strict=True)))
        clipped = super()._clip_gradients([g for g, _ in pairs])
        compat.merge_call(
            self._distributed_tf_update_step, self._distribution_strategy,
            list(zip(clipped, [v for _, v in pairs], strict=True)), learning_rate)

    def get_config(self):
        return {**super().get_config(), "encoder_lr_mult": self.encoder_lr_mult}


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable (inside a strategy's update, a
    distributed variable's handle is this device's copy)."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


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


def finish_on_device(x, y):
    """Training batches from ``train_dataset(device_finish=True)`` -> model input and targets.

    Those batches carry uint8 crops and per-image grey-level tables (1/4 of the bytes of the
    float32 batch through tf.data service, host memory and the PCIe bus); the float32
    batch is made here, inside the train step, on the training device. Other batches pass.
    """
    if not isinstance(x, dict):
        return x, y
    from tfpneumo.data.augment import finish_batch

    images, masks = finish_batch(x["image"], y["mask"], x["lut"])
    return images, {**y, "mask": masks}


def logits_view(net: keras.Model) -> keras.Model:
    """``net`` with each output that ends in a sigmoid ``Activation`` layer also given before
    it: outputs ``mask``, ``label`` (probabilities, as ``net``) plus ``mask_logits`` and
    ``label_logits`` where ``net`` has them. Shares ``net``'s layers and weights."""
    outputs = dict(net.output) if isinstance(net.output, dict) else {}
    for name in ("mask", "label"):
        layer = net.get_layer(name) if name in outputs else None
        if isinstance(layer, keras.layers.Activation) and layer.get_config()["activation"] == "sigmoid":
            outputs[f"{name}_logits"] = layer.input
    return keras.Model(net.inputs, outputs, name=f"{net.name}_with_logits")


class Trainer(keras.Model):
    """Trains ``net`` (a functional model with outputs ``mask`` and ``label``).

    Losses compiled with ``from_logits=True`` (:func:`tfpneumo.training.losses.build_losses`
    does) get the logits before ``net``'s final sigmoids (:func:`logits_view`): a loss on
    clipped probabilities has no gradient once a logit saturates, which is how a mask output
    collapsed to "empty everywhere" and stayed there. Metrics get the probabilities.

    ``accumulation_steps`` > 1 splits each replica's batch into that many micro-batches and
    sums their gradients inside one train step before a single optimizer update. Keras'
    own ``gradient_accumulation_steps`` fails under MirroredStrategy (merge_call inside a
    cond); doing it inside the step needs no cross-replica call until the update.
    """

    def __init__(self, net: keras.Model, accumulation_steps: int = 1,
                 gated_thresholds: tuple[float, ...] = (), **kwargs):
        super().__init__(**kwargs)
        self.net = net
        self.view = logits_view(net)
        self.accumulation_steps = accumulation_steps
        # Dice of the mask gated by the classification head (empty when p(label) <= 0.5): with
        # the mask loss on positive images only, the mask of a negative image is unconstrained
        # and only the head says it is empty (as in the 2nd and 4th place solutions).
        from tfpneumo.training.metrics import KaggleDice

        self.gated_dice = [KaggleDice(threshold=t, name=f"gated_dice@{t:g}")
                           for t in gated_thresholds]

    def call(self, inputs, training=False):
        return self.view(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        chosen = {}
        for name, value in y_pred.items():
            if name.endswith("_logits"):
                continue
            loss = self.loss.get(name) if isinstance(self.loss, dict) else None
            if getattr(loss, "from_logits", False):
                if f"{name}_logits" not in y_pred:
                    raise TfpneumoError(f"loss on {name!r} takes logits, but the network's "
                                        f"{name!r} output is not a sigmoid Activation layer")
                value = y_pred[f"{name}_logits"]
            chosen[name] = value
        rows = tf.shape(next(iter(chosen.values())))[0]
        with compat.loss_figures_per_image(self, y, chosen, rows):
            return super().compute_loss(x=x, y=y, y_pred=chosen, sample_weight=sample_weight,
                                        training=training)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        y_pred = {k: v for k, v in y_pred.items() if not k.endswith("_logits")}
        if self.gated_dice:
            gate = tf.cast(tf.reshape(y_pred["label"], [-1, 1, 1, 1]) > 0.5, y_pred["mask"].dtype)
            for metric in self.gated_dice:
                metric.update_state(y["mask"], y_pred["mask"] * gate)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def _forward_backward(self, x, y, variables):
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = self.optimizer.scale_loss(loss)
        return loss, y_pred, tape.gradient(scaled, variables)

    def train_step(self, data):
        x, y = finish_on_device(data[0], data[1])
        variables = self.trainable_weights
        n = self.accumulation_steps
        if n == 1:
            loss, y_pred, grads = self._forward_backward(x, y, variables)
            self._update_trackers(loss, x)
            self.optimizer.apply(self._agree_on_finite(grads), variables)
            return self.compute_metrics(x, y, y_pred)

        from tfpneumo.training.losses import accumulating

        xs = tf.split(x, n, axis=0)
        ys = {k: tf.split(v, n, axis=0) for k, v in y.items()}
        total = None
        for i in range(n):  # n is small and static: unrolled, chained so only one is live
            deps = [] if total is None else [g for g in total if g is not None]
            with tf.control_dependencies(deps), accumulating(y["mask"], n):
                y_i = {k: v[i] for k, v in ys.items()}
                loss, y_pred, grads = self._forward_backward(xs[i], y_i, variables)
            self._update_trackers(loss, xs[i])
            self.compute_metrics(xs[i], y_i, y_pred)
            if total is None:
                total = list(grads)
            else:
                total = [a if b is None else a + b for a, b in zip(total, grads, strict=True)]
        grads = [None if g is None else g / n for g in total]
        self.optimizer.apply(self._agree_on_finite(grads), variables)
        return self.get_metrics_result()

    def _agree_on_finite(self, grads):
        """Makes every replica's gradients non-finite when any replica's are (loss scaling).

        Keras' LossScaleOptimizer decides whether to skip a step from the first replica's
        gradients *before* the cross-replica sum; when only another replica overflowed, the
        inf reached the weights through the sum (measured on 2 logical CPUs: every weight NaN
        after one step, where one device skips the step and halves the scale).
        """
        if not isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            return grads
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return grads
        present = [g for g in grads if g is not None]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in present])
        bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
        first = next(i for i, g in enumerate(grads) if g is not None)
        dtype = grads[first].dtype
        poison = tf.where(bad > 0, tf.constant(float("nan"), dtype), tf.constant(0.0, dtype))
        return [g + poison if i == first else g for i, g in enumerate(grads)]

    def _update_trackers(self, loss, x):
        self._loss_tracker.update_state(
            compat.unscale_loss_for_distribution(loss), sample_weight=tf.shape(x)[0])
