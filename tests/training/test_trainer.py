"""The training engine: gradient accumulation, MirroredStrategy, layer-wise AdamW, runtime
resolution, resumable run state, mixed precision.

Engine tests use :func:`tiny_net`, a functional network without BatchNormalization or dropout:
with them a micro-batch's (or one replica's) batch statistics differ from the whole batch's, so
accumulation and replicas could not match one device exactly. The oracle for a step is an
independent SGD step computed here with ``tf.GradientTape`` on the per-image losses (the loss
classes' ``call()``), without the positives-only scaling, Trainer or compile. Tests needing
two logical CPU devices run in a subprocess, because logical devices must be configured before
TensorFlow initialises its runtime.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tfpneumo.tfimport import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from tfpneumo import TfpneumoError  # noqa: E402
from tfpneumo.config import Config, LossConfig, ModelConfig, OptimizerConfig, TrainConfig  # noqa: E402
from tfpneumo.training.callbacks import NaNGuard, RunState  # noqa: E402
from tfpneumo.training.losses import BCELoss, build_losses  # noqa: E402
from tfpneumo.training.schedules import build_schedule  # noqa: E402
from tfpneumo.training.trainer import (  # noqa: E402
    LayerwiseAdamW,
    Trainer,
    build_optimizer,
    choose_strategy_name,
    learning_rate,
    logits_view,
    resolve_runtime,
)

SIZE = 16
TESTS_DIR = Path(__file__).resolve().parent
PLAIN_BCE = LossConfig(mask="bce", mask_positives_only=False)  # a plain mean over images
TINY_UNET = ModelConfig(encoder="resnet18", encoder_weights="none",
                        decoder_filters=(16, 16, 8, 8, 8), attention="none")


# ----------------------------------------------------------------------------- helpers
# (also imported by the two-device subprocess script below: no TensorFlow work at import)

def tiny_net(size: int = SIZE) -> keras.Model:
    """``image (B, S, S, 1) -> {"mask": (B, S, S, 1), "label": (B, 1)}``, float32 outputs.

    ``enc_conv`` plays the encoder (for the layer-wise learning rate), the rest the decoder.
    """
    image = keras.Input((size, size, 1), name="image")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="enc_conv")(image)
    m = keras.layers.Conv2D(1, 3, padding="same", name="dec_conv")(h)
    mask = keras.layers.Activation("sigmoid", dtype="float32", name="mask")(m)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    logit = keras.layers.Dense(1, name="head")(pooled)
    label = keras.layers.Activation("sigmoid", dtype="float32", name="label")(logit)
    return keras.Model(image, {"mask": mask, "label": label}, name="tiny")


def encoder_paths_of(net: keras.Model) -> set[str]:
    return {v.path for v in net.get_layer("enc_conv").weights}


def make_batch(n: int, positives, size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``x (n, S, S, 1)`` ~N(0, 1) and ``y``: a rectangle mask on the images ``positives``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 1)).astype(np.float32)
    mask = np.zeros((n, size, size, 1), np.float32)
    for i in positives:
        top, left = rng.integers(0, size // 2, 2)
        mask[i, top:top + size // 3, left:left + size // 4] = 1.0
    return x, {"mask": mask, "label": mask.max(axis=(1, 2))}


def dataset(x, y, steps: int):
    return tf.data.Dataset.from_tensors((x, y)).repeat(steps)


@pytest.fixture(autouse=True)
def _float32_policy():
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def compiled(net: keras.Model, optimizer, loss_cfg: LossConfig = PLAIN_BCE,
             accumulation_steps: int = 1) -> Trainer:
    trainer = Trainer(net, accumulation_steps=accumulation_steps)
    losses, weights = build_losses(loss_cfg)
    trainer.compile(optimizer=optimizer, loss=losses, loss_weights=weights, jit_compile=False)
    return trainer


def sgd_oracle(w0: list[np.ndarray], x, y, loss_cfg: LossConfig, lr: float,
               from_logits: bool = False) -> list[np.ndarray]:
    """One SGD step on the mean over the batch of the per-image losses (all images positive
    when ``loss_cfg`` is positives-only), computed without Trainer or compile.

    By default on the probabilities: the Trainer's losses take logits, so this checks the
    same maths written apart. ``from_logits`` for inputs that saturate the sigmoids (0..255
    pixels into the tiny net), where float32 probabilities lose the gradient's precision.
    """
    net = tiny_net()
    net.set_weights(w0)
    plain, _ = build_losses(dataclasses.replace(loss_cfg, mask_positives_only=False),
                            from_logits=from_logits)
    mask_fn, label_fn = plain["mask"].call, BCELoss(from_logits=from_logits).call  # (B,)
    suffix = "_logits" if from_logits else ""
    with tf.GradientTape() as tape:
        out = logits_view(net)(x, training=True)
        total = (loss_cfg.mask_weight * tf.reduce_mean(mask_fn(y["mask"], out["mask" + suffix]))
                 + loss_cfg.label_weight * tf.reduce_mean(label_fn(y["label"],
                                                                   out["label" + suffix])))
    grads = tape.gradient(total, net.trainable_variables)
    return [w - lr * g.numpy() for w, g in zip(w0, grads, strict=True)]


def assert_weights_close(got, want, w0, rtol=1e-5):
    """Equal within ``rtol`` of the size of the update (so a no-op step cannot pass)."""
    change = max(float(np.max(np.abs(a - b))) for a, b in zip(want, w0, strict=True))
    assert change > 1e-3, "the reference step did not move the weights"
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * change)


# ----------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize("loss_cfg", [PLAIN_BCE, LossConfig()], ids=["bce", "combo_positives"])
@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_train_step_equals_sgd_oracle(loss_cfg, accumulation_steps):
    keras.utils.set_random_seed(0)
    net = tiny_net()
    w0 = net.get_weights()
    x, y = make_batch(4, positives=range(4))  # all positive: positives-only = plain mean
    trainer = compiled(net, keras.optimizers.SGD(0.5), loss_cfg, accumulation_steps)
    trainer.train_on_batch(x, y)
    assert_weights_close(net.get_weights(), sgd_oracle(w0, x, y, loss_cfg, 0.5), w0)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_device_finished_batches_equal_float_batches(accumulation_steps):
    """uint8 crops + grey-level tables (train_dataset(device_finish=True)) finished inside the
    train step: the step equals the SGD oracle on the float32 batch made here with numpy."""
    from tfpneumo.config import AugmentConfig
    from tfpneumo.data.augment import color_lut, sample_params

    keras.utils.set_random_seed(0)
    net = tiny_net()
    w0 = net.get_weights()
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (4, SIZE, SIZE, 1), dtype=np.uint8)
    _, y = make_batch(4, positives=range(4))
    luts = color_lut(sample_params(tf.constant([3, 4], tf.int64), 4, AugmentConfig(color_p=1.0))).numpy()
    x_float = luts[np.arange(4)[:, None, None, None], images]  # (4, S, S, 1): lut[b, v]
    trainer = compiled(net, keras.optimizers.SGD(0.5), PLAIN_BCE, accumulation_steps)
    x_u8 = {"image": images, "lut": luts}
    y_u8 = {"mask": y["mask"].astype(np.uint8), "label": y["label"]}
    trainer.fit(tf.data.Dataset.from_tensors((x_u8, y_u8)), epochs=1, verbose=0, shuffle=False)
    assert_weights_close(net.get_weights(),
                         sgd_oracle(w0, x_float, y, PLAIN_BCE, 0.5, from_logits=True), w0)


def test_accumulation_with_layerwise_adamw_and_clipping():
    keras.utils.set_random_seed(1)
    w0 = tiny_net().get_weights()
    x, y = make_batch(4, positives=(0, 3))
    results = {}
    for clipnorm in (0.0, 0.05):
        cfg = Config(optimizer=OptimizerConfig(lr=1e-2, weight_decay=1e-2, encoder_lr_mult=0.5,
                                               clipnorm=clipnorm))
        for acc in (1, 2):
            net = tiny_net()
            net.set_weights(w0)
            optimizer = build_optimizer(cfg, 1e-2, encoder_paths_of(net), "float32")
            trainer = compiled(net, optimizer, accumulation_steps=acc)
            trainer.fit(dataset(x, y, 2), epochs=1, verbose=0, shuffle=False)
            assert int(optimizer.iterations.numpy()) == 2
            results[clipnorm, acc] = net.get_weights()
        assert_weights_close(results[clipnorm, 2], results[clipnorm, 1], w0)
    # the clip was active (otherwise the clipped case above proved nothing)
    diff = max(float(np.max(np.abs(a - b)))
               for a, b in zip(results[0.0, 1], results[0.05, 1], strict=True))
    assert diff > 1e-4


def test_accumulation_positives_only_with_uneven_positives():
    """The micro-batches hold 2 and 1 positives: the accumulated step divides by the 3 of the
    whole batch, as the step on the whole batch does."""
    keras.utils.set_random_seed(2)
    w0 = tiny_net().get_weights()
    x, y = make_batch(4, positives=(0, 1, 2))  # micro-batches hold 2 and 1 positives
    results = []
    for acc in (1, 2):
        net = tiny_net()
        net.set_weights(w0)
        compiled(net, keras.optimizers.SGD(0.5), LossConfig(), acc).train_on_batch(x, y)
        results.append(net.get_weights())
    assert_weights_close(results[1], results[0], w0)


def test_iterations_and_schedule_advance_once_per_accumulated_step():
    keras.utils.set_random_seed(0)
    net = tiny_net()
    # cosine with 1 warmup epoch of 4 steps: lr(step) = step / 4 * 1e-2 during warmup
    schedule = build_schedule(OptimizerConfig(lr=1e-2, warmup_epochs=1.0), 4, 3)
    optimizer = build_optimizer(Config(), schedule, encoder_paths_of(net), "float32")
    trainer = compiled(net, optimizer, accumulation_steps=2)
    x, y = make_batch(4, positives=(1,))
    trainer.fit(dataset(x, y, 3), epochs=1, verbose=0, shuffle=False)
    assert int(optimizer.iterations.numpy()) == 3
    assert learning_rate(optimizer) == pytest.approx(0.75e-2, rel=1e-6)


def _numpy_dice(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-image Kaggle Dice of 0/1 masks ``(B, H, W, 1)``; 1 when both are empty."""
    t, p = truth.reshape(len(truth), -1), pred.reshape(len(pred), -1)
    total = t.sum(1) + p.sum(1)
    inter = (t * p).sum(1)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


@pytest.mark.parametrize("head_bias", [6.0, -6.0], ids=["gate_open", "gate_closed"])
def test_gated_dice_follows_the_label_head(head_bias):
    from tfpneumo.training.metrics import KaggleDice

    keras.utils.set_random_seed(0)
    net = tiny_net()
    head = net.get_layer("head")  # label = sigmoid(head_bias) for every image
    head.kernel.assign(np.zeros(head.kernel.shape, np.float32))
    head.bias.assign([head_bias])
    trainer = Trainer(net, gated_thresholds=(0.5,))
    losses, weights = build_losses(LossConfig())
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=losses, loss_weights=weights,
                    metrics={"mask": [KaggleDice(0.5, name="dice@0.5")]})
    x, y = make_batch(6, positives=(0, 2, 3))
    truth = y["mask"] > 0.5
    pred = np.asarray(net(x)["mask"]) > 0.5
    assert 0 < pred.mean() < 1  # masks neither all empty nor full
    mask_dice = _numpy_dice(truth, pred).mean()
    gated = mask_dice if head_bias > 0 else _numpy_dice(truth, np.zeros_like(pred)).mean()
    for _ in range(2):  # the second evaluate must not carry the first one's state
        logs = trainer.evaluate(x, y, batch_size=4, return_dict=True, verbose=0)
        assert logs["mask_dice@0.5"] == pytest.approx(mask_dice, rel=1e-6)
        assert logs["gated_dice@0.5"] == pytest.approx(gated, rel=1e-6)
    assert head_bias > 0 or gated == pytest.approx(0.5)  # 3 of 6 images are empty


# ----------------------------------------------------------------------------- MirroredStrategy

MIRRORED_SCRIPT = r'''
"""Runs the same steps on one device and on MirroredStrategy over 2 logical CPUs."""
import dataclasses
import sys
from pathlib import Path

import numpy as np

from tfpneumo.tfimport import quiet_tensorflow

tf = quiet_tensorflow()
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import keras  # noqa: E402
from test_trainer import PLAIN_BCE, encoder_paths_of, make_batch, tiny_net  # noqa: E402

from tfpneumo.training.callbacks import NaNGuard, RunState  # noqa: E402
from tfpneumo.config import Config, LossConfig, OptimizerConfig, TrainConfig  # noqa: E402
from tfpneumo.training.losses import build_losses  # noqa: E402
from tfpneumo.training.trainer import Trainer, build_optimizer, resolve_runtime  # noqa: E402

# One strategy object each for the whole run: several MirroredStrategy objects in one
# process can mismatch their collective keys.
RUNTIMES = {name: resolve_runtime(TrainConfig(strategy=name, precision="float32",
                                              jit_compile="off"))
            for name in ("one_device", "mirrored")}
keras.utils.set_random_seed(0)
W0 = tiny_net().get_weights()
out = {f"w0_{i}": w for i, w in enumerate(W0)}
out["replicas"] = np.array([RUNTIMES["one_device"].replicas, RUNTIMES["mirrored"].replicas])


def make(runtime, acc, loss_cfg, opt_cfg, precision="float32", init=True):
    with runtime.strategy.scope():
        net = tiny_net()
        if init:
            net.set_weights(W0)
        trainer = Trainer(net, accumulation_steps=acc)
        optimizer = build_optimizer(Config(optimizer=opt_cfg), opt_cfg.lr, encoder_paths_of(net),
                                    precision)
        losses, weights = build_losses(loss_cfg)
        trainer.compile(optimizer=optimizer, loss=losses, loss_weights=weights,
                        jit_compile=False)
        optimizer.build(trainer.trainable_variables)
    return trainer


def train(runtime, x, y, acc, loss_cfg, opt_cfg, steps=2, precision="float32"):
    keras.mixed_precision.set_global_policy(precision)
    trainer = make(runtime, acc, loss_cfg, opt_cfg, precision)
    trainer.fit(tf.data.Dataset.from_tensors((x, y)).repeat(steps), epochs=1, verbose=0,
                shuffle=False)
    keras.mixed_precision.set_global_policy("float32")
    return trainer.net.get_weights(), trainer.optimizer


ADAMW = OptimizerConfig(lr=1e-2, weight_decay=1e-2, encoder_lr_mult=0.5, clipnorm=0.05)
UNEVEN = make_batch(8, positives=(0, 1, 2, 5))  # the replicas' halves hold 3 and 1 positives
ALL_POSITIVE = make_batch(8, positives=range(8), seed=1)
CASES = {  # name: (batch, accumulation steps under mirrored, loss, optimizer)
    "combo_positives": (UNEVEN, 1, LossConfig(), ADAMW),
    "accumulate_plain": (UNEVEN, 2, PLAIN_BCE, ADAMW),
    "accumulate_combo": (ALL_POSITIVE, 2, LossConfig(), ADAMW),
    # 2 replicas x 2 micro-batches of 2: positives 2, 1 | 0, 1 - the whole batch's 4 divide
    "accumulate_combo_uneven": (UNEVEN, 2, LossConfig(), ADAMW),
}
for name, ((x, y), acc, loss_cfg, opt_cfg) in CASES.items():
    for i, w in enumerate(train(RUNTIMES["one_device"], x, y, 1, loss_cfg, opt_cfg)[0]):
        out[f"{name}_one_{i}"] = w
    for i, w in enumerate(train(RUNTIMES["mirrored"], x, y, acc, loss_cfg, opt_cfg)[0]):
        out[f"{name}_mirrored_{i}"] = w
# RunState under the strategy: save the trained state, resume it in a fresh trainer
trained = make(RUNTIMES["mirrored"], 1, LossConfig(), ADAMW)
trained.fit(tf.data.Dataset.from_tensors(UNEVEN).repeat(2), epochs=1, verbose=0, shuffle=False)
state = RunState(Path(sys.argv[2]).parent / "run", (0.5,), 1, trained)
state.set_model(trained)
state.on_epoch_begin(0)
state.on_epoch_end(0, {"loss": 1.0, "val_mask_dice@0.5": 0.5})
keras.utils.set_random_seed(1)
fresh = make(RUNTIMES["mirrored"], 1, LossConfig(), ADAMW, init=False)
RunState(Path(sys.argv[2]).parent / "run", (0.5,), 1, fresh).load()
pairs = [*zip(trained.net.weights, fresh.net.weights, strict=True),
         *zip(trained.optimizer.variables, fresh.optimizer.variables, strict=True)]
out["resume"] = np.array([max(float(np.max(np.abs(np.asarray(a.numpy()) - b.numpy())))
                              for a, b in pairs),
                          float(fresh.optimizer.iterations.numpy()), len(pairs)])
noclip = dataclasses.replace(ADAMW, clipnorm=0.0)
for i, w in enumerate(train(RUNTIMES["one_device"], *UNEVEN, 1, LossConfig(), noclip)[0]):
    out[f"noclip_one_{i}"] = w

# mixed_float16: only the second replica's half gives non-finite gradients (a NaN label
# target: deterministic, where an overflow depends on the weights; the optimizer's check is
# the same isfinite for both)
x, y = make_batch(4, positives=range(4), seed=2)
y["label"][2:] = np.nan
runs = {"first_half": (RUNTIMES["one_device"], x[:2], {k: v[:2] for k, v in y.items()}),
        "one": (RUNTIMES["one_device"], x, y), "mirrored": (RUNTIMES["mirrored"], x, y)}
for name, (runtime, xs, ys) in runs.items():
    weights, opt = train(runtime, xs, ys, 1, PLAIN_BCE, OptimizerConfig(), steps=1,
                         precision="mixed_float16")
    out[f"fp16_{name}"] = np.array([float(all(np.isfinite(w).all() for w in weights)),
                                    float(opt.iterations.numpy()),
                                    float(opt.dynamic_scale.numpy())])

# Upstream behaviour the trainer works around (tfpneumo.compat lists them): plain Keras on the
# same two replicas.
def plain_keras(runtime, x, y, optimizer, precision="float32", steps=1):
    keras.mixed_precision.set_global_policy(precision)
    with runtime.strategy.scope():
        net = tiny_net()
        net.set_weights(W0)
        net.compile(optimizer=optimizer(), loss={"mask": "binary_crossentropy",
                                                 "label": "binary_crossentropy"},
                    jit_compile=False)
    try:
        net.fit(tf.data.Dataset.from_tensors((x, y)).repeat(steps), epochs=1, verbose=0,
                shuffle=False)
        return net.get_weights(), None
    except Exception as e:  # noqa: BLE001 - recorded: the bug is that it fails
        return None, e
    finally:
        keras.mixed_precision.set_global_policy("float32")


def clipping_adamw():
    return keras.optimizers.AdamW(1e-2, global_clipnorm=0.05)


x, y = UNEVEN
one = plain_keras(RUNTIMES["one_device"], x, y, clipping_adamw, steps=2)[0]
two = plain_keras(RUNTIMES["mirrored"], x, y, clipping_adamw, steps=2)[0]
out["upstream_clip_diff"] = np.array(max(float(np.max(np.abs(a - b)))
                                         for a, b in zip(one, two, strict=True)))
_, error = plain_keras(RUNTIMES["mirrored"], x, y,
                       lambda: keras.optimizers.AdamW(1e-3, gradient_accumulation_steps=2),
                       steps=2)
out["upstream_accumulation_failed"] = np.array(error is not None)
x, y = make_batch(4, positives=range(4), seed=2)
y["label"][2:] = np.nan
weights, _ = plain_keras(RUNTIMES["mirrored"], x, y,
                         lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW()),
                         precision="mixed_float16")
out["upstream_loss_scale_finite"] = np.array(weights is not None
                                             and all(np.isfinite(w).all() for w in weights))
np.savez(sys.argv[2], **out)
'''


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("mirrored")
    script = folder / "mirrored_check.py"
    script.write_text(MIRRORED_SCRIPT)
    out = folder / "weights.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "SM_FRAMEWORK": "tf.keras"}
    proc = subprocess.run([sys.executable, str(script), str(TESTS_DIR), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as data:
        return dict(data)


def _weights(results: dict, prefix: str) -> list[np.ndarray]:
    n = sum(1 for k in results if k.startswith("w0_"))
    return [results[f"{prefix}_{i}"] for i in range(n)]


@pytest.mark.parametrize("case", ["combo_positives", "accumulate_plain", "accumulate_combo",
                                  "accumulate_combo_uneven"])
def test_mirrored_two_devices_matches_one_device(mirrored_results, case):
    """2 steps of LayerwiseAdamW (clipnorm, weight decay, encoder lr x0.5) on a global batch
    of 8: the positives-only loss divides by the positives of the global batch, clipping
    sees the summed gradient, and in-step accumulation works under the strategy."""
    assert list(mirrored_results["replicas"]) == [1, 2]
    w0 = _weights(mirrored_results, "w0")
    assert_weights_close(_weights(mirrored_results, f"{case}_mirrored"),
                         _weights(mirrored_results, f"{case}_one"), w0, rtol=1e-4)


def test_mirrored_run_state_resumes_exactly(mirrored_results):
    max_diff, iterations, n_variables = mirrored_results["resume"]
    assert n_variables > 10 and iterations == 2 and max_diff == 0.0


def test_mirrored_clipping_was_active(mirrored_results):
    clipped = _weights(mirrored_results, "combo_positives_one")
    unclipped = _weights(mirrored_results, "noclip_one")
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(clipped, unclipped, strict=True)) > 1e-4


def test_mirrored_loss_scale_skips_step_when_any_replica_is_not_finite(mirrored_results):
    finite, iterations, scale = mirrored_results["fp16_first_half"]
    assert (finite, iterations, scale) == (1.0, 1.0, 2.0**15)  # replica 0's half alone is fine
    for name in ("one", "mirrored"):  # whole batch non-finite: skip the step, halve the scale
        finite, iterations, scale = mirrored_results[f"fp16_{name}"]
        assert (finite, iterations, scale) == (1.0, 0.0, 2.0**14), name


# ----------------------------------------------------------------------------- LayerwiseAdamW

def test_upstream_keras_clips_each_replica_before_the_sum(mirrored_results):
    """Keras' global_clipnorm differs between one device and two replicas on the same batch
    (it clips each replica's part). When this fails, LayerwiseAdamW's _clip_gradients /
    _backend_update_step overrides (tfpneumo.compat.OPTIMIZER_PRIVATE_METHODS) can go."""
    assert float(mirrored_results["upstream_clip_diff"]) > 1e-4


def test_upstream_keras_gradient_accumulation_fails_under_mirrored(mirrored_results):
    """When this fails, Keras' gradient_accumulation_steps could replace the accumulation
    inside Trainer.train_step."""
    assert bool(mirrored_results["upstream_accumulation_failed"])


def test_upstream_loss_scale_lets_another_replicas_nan_through(mirrored_results):
    """LossScaleOptimizer checks the first replica's gradients only: the second replica's NaN
    reaches the weights. When this fails, Trainer._agree_on_finite can go."""
    assert not bool(mirrored_results["upstream_loss_scale_finite"])


def test_layerwise_adamw_encoder_updates_scale_with_mult():
    """Real UNet: with weight decay 0, one Adam step on the encoder variables (found by
    ``encoder_layers``) moves them by ``mult`` x the step with mult 1; the decoder the same."""
    from tfpneumo.models.unet import build_model, encoder_layers

    keras.utils.set_random_seed(0)
    net = build_model(TINY_UNET)
    encoder_paths = {v.path for layer in encoder_layers(net) for v in layer.weights}
    variables = net.trainable_variables
    is_encoder = [v.path in encoder_paths for v in variables]
    assert any(is_encoder) and not all(is_encoder)
    w0 = [v.numpy() for v in variables]
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
    deltas = {}
    for mult in (1.0, 0.5):
        for v, w in zip(variables, w0, strict=True):
            v.assign(w)
        cfg = Config(optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.0, clipnorm=0.0,
                                               encoder_lr_mult=mult))
        optimizer = build_optimizer(cfg, 1e-3, encoder_paths, "float32")
        assert isinstance(optimizer, LayerwiseAdamW)
        optimizer.apply([tf.constant(g) for g in grads], variables)
        assert int(optimizer.iterations.numpy()) == 1
        deltas[mult] = [v.numpy() - w for v, w in zip(variables, w0, strict=True)]
    for enc, w0_i, full, half in zip(is_encoder, w0, deltas[1.0], deltas[0.5], strict=True):
        assert np.max(np.abs(full)) > 1e-4
        # w1 - w0 is exact only to the float32 spacing of w0
        atol = 2 * np.spacing(np.max(np.abs(w0_i)))
        np.testing.assert_allclose(half, 0.5 * full if enc else full, rtol=1e-5, atol=atol)


def test_layerwise_adamw_weight_decay_uses_the_encoder_lr():
    """Zero gradients leave only the decoupled decay: w * (1 - lr * wd * mult)."""
    keras.utils.set_random_seed(0)
    net = tiny_net()
    variables = net.trainable_variables
    w0 = [v.numpy() for v in variables]
    cfg = Config(optimizer=OptimizerConfig(lr=0.1, weight_decay=0.2, clipnorm=0.0,
                                           encoder_lr_mult=0.5))
    optimizer = build_optimizer(cfg, 0.1, encoder_paths_of(net), "float32")
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    for v, w in zip(variables, w0, strict=True):
        factor = 1 - 0.1 * 0.2 * (0.5 if v.path in encoder_paths_of(net) else 1.0)
        np.testing.assert_allclose(v.numpy(), w * factor, rtol=1e-6)


def test_layerwise_adamw_steps_equal_keras_adamw():
    """The fused update (ResourceApplyAdam) against Keras' own AdamW, the oracle: three steps
    of random gradients with weight decay on a real UNet's variables, same lr and epsilon."""
    keras.utils.set_random_seed(0)
    net = tiny_net()
    variables = net.trainable_variables
    w0 = [v.numpy() for v in variables]
    rng = np.random.default_rng(1)
    steps = [[rng.normal(size=v.shape).astype(np.float32) for v in variables] for _ in range(3)]
    finals = {}
    for name in ("ours", "keras"):
        for v, w in zip(variables, w0, strict=True):
            v.assign(w)
        if name == "ours":
            cfg = Config(optimizer=OptimizerConfig(lr=1e-2, weight_decay=0.05, clipnorm=0.0))
            optimizer = build_optimizer(cfg, 1e-2, encoder_paths_of(net), "float32")
            assert isinstance(optimizer, LayerwiseAdamW)
        else:
            optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.05)
        for grads in steps:
            optimizer.apply([tf.constant(g) for g in grads], variables)
        finals[name] = [v.numpy() for v in variables]
    for ours, theirs, w in zip(finals["ours"], finals["keras"], w0, strict=True):
        moved = np.max(np.abs(ours - w))
        assert moved > 1e-3  # the steps moved every weight array
        # equal to float32 rounding of the steps (the kernel's own order of operations:
        # measured up to 7e-6 of the distance moved, on weights that start at 0)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=2e-5 * moved)


def test_layerwise_adamw_config_round_trip():
    optimizer = LayerwiseAdamW(learning_rate=1e-3, weight_decay=1e-4, encoder_lr_mult=0.3)
    clone = LayerwiseAdamW.from_config(optimizer.get_config())
    assert clone.encoder_lr_mult == 0.3
    assert clone.weight_decay == pytest.approx(1e-4)


# ----------------------------------------------------------------------------- runtime

def test_resolve_runtime_auto_on_this_cpu(monkeypatch):
    if tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        pytest.skip("this test describes a CPU-only machine")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    runtime = resolve_runtime(TrainConfig())
    assert (runtime.strategy_name, runtime.precision, runtime.jit_compile, runtime.replicas) == (
        "one_device", "float32", False, 1)
    assert "one_device x1, float32, XLA off" == runtime.describe()
    runtime = resolve_runtime(TrainConfig(precision="mixed_bfloat16", jit_compile="on"))
    assert (runtime.precision, runtime.jit_compile) == ("mixed_bfloat16", True)


TWO_WORKERS = json.dumps({"cluster": {"worker": ["host1:2222", "host2:2222"]},
                          "task": {"type": "worker", "index": 0}})
ONE_WORKER = json.dumps({"cluster": {"worker": ["host1:2222"]},
                         "task": {"type": "worker", "index": 0}})


@pytest.mark.parametrize("strategy, n_gpus, tf_config, expected", [
    ("auto", 0, None, "one_device"),
    ("auto", 1, None, "one_device"),
    ("auto", 2, None, "mirrored"),
    ("auto", 0, TWO_WORKERS, "multi_worker"),
    ("auto", 4, TWO_WORKERS, "multi_worker"),
    ("auto", 0, ONE_WORKER, "one_device"),
    ("auto", 2, ONE_WORKER, "mirrored"),
    ("auto", 0, "", "one_device"),
    ("mirrored", 0, None, "mirrored"),
    ("one_device", 4, TWO_WORKERS, "one_device"),
    ("multi_worker", 0, None, "multi_worker"),
])
def test_choose_strategy_name(strategy, n_gpus, tf_config, expected):
    assert choose_strategy_name(TrainConfig(strategy=strategy), n_gpus, tf_config) == expected


def test_choose_strategy_name_rejects_bad_tf_config():
    with pytest.raises(TfpneumoError, match="TF_CONFIG"):
        choose_strategy_name(TrainConfig(), 0, "{cluster: ")


# ----------------------------------------------------------------------------- mixed precision

def test_mixed_bfloat16_real_unet_outputs_float32_and_trains():
    from tfpneumo.models.unet import build_model

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    net = build_model(TINY_UNET)
    assert net.get_layer("decoder_stage0_conv1").compute_dtype == "bfloat16"
    x, y = make_batch(2, positives=(0,), size=64)
    out = net(x, training=False)
    assert out["mask"].dtype == "float32" and tuple(out["mask"].shape) == (2, 64, 64, 1)
    assert out["label"].dtype == "float32" and tuple(out["label"].shape) == (2, 1)
    # the train step itself on the tiny network (compiling the UNet's step costs ~15 s)
    small = tiny_net()
    optimizer = build_optimizer(Config(), 1e-3, encoder_paths_of(small), "mixed_bfloat16")
    assert isinstance(optimizer, LayerwiseAdamW)
    w0 = small.get_weights()
    logs = compiled(small, optimizer, LossConfig()).train_on_batch(
        *make_batch(4, positives=(0, 2)), return_dict=True)
    assert math.isfinite(logs["loss"]) and logs["loss"] > 0
    assert any(np.any(a != b) for a, b in zip(small.get_weights(), w0, strict=True))


def test_mixed_float16_loss_scale_step():
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    net = tiny_net()
    optimizer = build_optimizer(Config(), 1e-3, encoder_paths_of(net), "mixed_float16")
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    assert isinstance(optimizer.inner_optimizer, LayerwiseAdamW)
    trainer = compiled(net, optimizer, LossConfig())
    w0 = net.get_weights()
    x, y = make_batch(4, positives=(0, 2))
    logs = trainer.train_on_batch(x, y, return_dict=True)
    assert math.isfinite(logs["loss"]) and logs["loss"] > 0
    assert int(optimizer.iterations.numpy()) == 1
    assert any(np.any(a != b) for a, b in zip(net.get_weights(), w0, strict=True))
    # non-finite gradients (as from an overflow): the step is skipped, the weights stay, the
    # scale halves. A NaN target makes them deterministic.
    w1 = net.get_weights()
    trainer.train_on_batch(x, {**y, "label": np.full_like(y["label"], np.nan)})
    assert int(optimizer.iterations.numpy()) == 1
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**14
    for a, b in zip(net.get_weights(), w1, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- RunState

def make_trainer(seed: int, precision: str = "float32") -> Trainer:
    """A compiled tiny Trainer with the project's optimizer (built) and a cosine schedule."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(seed)
    net = tiny_net()
    schedule = build_schedule(OptimizerConfig(lr=1e-2), 2, 3)
    optimizer = build_optimizer(Config(), schedule, encoder_paths_of(net), precision)
    trainer = compiled(net, optimizer, LossConfig())
    optimizer.build(trainer.trainable_variables)
    return trainer


def epoch_logs(score: float, loss: float = 1.0) -> dict:
    return {"loss": loss, "val_loss": loss, "val_mask_dice@0.3": score - 0.05,
            "val_mask_dice@0.5": score}


def run_epoch(state: RunState, epoch: int, logs: dict) -> None:
    state.on_epoch_begin(epoch)
    state.on_epoch_end(epoch, logs)


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_run_state_round_trip_restores_weights_and_optimizer(tmp_path, precision):
    x, y = make_batch(4, positives=(0, 1))
    first = make_trainer(0, precision)
    first.fit(dataset(x, y, 2), epochs=1, verbose=0, shuffle=False)
    state = RunState(tmp_path, (0.3, 0.5), 2, first)
    state.set_model(first)
    run_epoch(state, 0, epoch_logs(0.4))

    second = make_trainer(1, precision)  # other initial weights, fresh optimizer
    restored = RunState(tmp_path, (0.3, 0.5), 2, second)
    assert restored.load()
    assert restored.completed_epochs == 1 and restored.history == state.history
    assert restored.top == state.top
    for a, b in zip(second.net.get_weights(), first.net.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(second.optimizer.variables) == len(first.optimizer.variables)
    for a, b in zip(second.optimizer.variables, first.optimizer.variables, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(second.optimizer.iterations.numpy()) == 2
    assert learning_rate(second.optimizer) == learning_rate(first.optimizer)
    # and training goes on identically
    for trainer in (first, second):
        trainer.fit(dataset(x, y, 1), epochs=1, verbose=0, shuffle=False)
    for a, b in zip(second.net.get_weights(), first.net.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_run_state_load_without_state(tmp_path):
    assert not RunState(tmp_path, (0.5,), 1, make_trainer(0)).load()


def test_run_state_keeps_top_k(tmp_path):
    trainer = make_trainer(0)
    state = RunState(tmp_path, (0.3, 0.5), 2, trainer)
    state.set_model(trainer)
    shapes = [w.shape for w in trainer.net.get_weights()]
    scores = [0.5, 0.7, 0.6, 0.4, 0.8]
    expected_top = [[1], [2, 1], [2, 3], [2, 3], [5, 2]]
    for epoch, (score, top) in enumerate(zip(scores, expected_top, strict=True)):
        # weights that say which epoch they are from
        trainer.net.set_weights([np.full(s, epoch + 1, np.float32) for s in shapes])
        run_epoch(state, epoch, epoch_logs(score))
        assert [e["epoch"] for e in state.top] == top
        assert [e["score"] for e in state.top] == [scores[t - 1] for t in top]
        files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
        assert files == sorted(e["path"] for e in state.top)
        best = tiny_net()
        best.load_weights(tmp_path / "best.weights.h5")
        assert all(np.all(w == top[0]) for w in best.get_weights())
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["epoch-0005.npz",
                                                                      "state.json"]
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["val_dice"]) for r in rows] == scores


def test_run_state_nan_batch_stops_without_saving(tmp_path):
    trainer = make_trainer(0)
    guard = NaNGuard()
    state = RunState(tmp_path, (0.5,), 2, trainer, guard=guard)
    for callback in (guard, state):
        callback.set_model(trainer)
    run_epoch(state, 0, epoch_logs(0.5))
    saved = json.loads((tmp_path / "state" / "state.json").read_text())

    guard.on_epoch_begin(1)
    guard.on_train_batch_end(0, {"loss": 0.8})
    assert not trainer.stop_training and guard.nan_at is None
    guard.on_train_batch_end(3, {"loss": float("nan")})
    assert trainer.stop_training and guard.nan_at == (1, 3)
    guard.on_epoch_end(1, epoch_logs(0.9, loss=float("nan")))
    state.on_epoch_end(1, epoch_logs(0.9, loss=float("nan")))
    assert guard.nan_at == (1, 3)  # the first bad batch is kept
    assert json.loads((tmp_path / "state" / "state.json").read_text()) == saved
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["epoch-0001.npz",
                                                                      "state.json"]
    assert state.completed_epochs == 1 and len(state.history) == 1
    assert [e["epoch"] for e in state.top] == [1]


def test_run_state_nan_in_epoch_logs_only(tmp_path):
    trainer = make_trainer(0)
    guard = NaNGuard()
    state = RunState(tmp_path, (0.5,), 2, trainer, guard=guard)
    for callback in (guard, state):
        callback.set_model(trainer)
        callback.on_epoch_begin(0)
    logs = {**epoch_logs(0.5), "val_loss": float("inf")}
    guard.on_epoch_end(0, logs)
    state.on_epoch_end(0, logs)
    assert guard.nan_at == (0, -1) and trainer.stop_training
    assert not (tmp_path / "state" / "state.json").exists()


def test_run_state_stops_the_training_loop_at_the_nan_batch(tmp_path):
    """Through the training loop (tfpneumo.training.loop.fit): the batch whose loss is NaN
    stops the epoch; nothing is saved."""
    from tfpneumo import compat
    from tfpneumo.training import loop

    trainer = make_trainer(0)
    guard = NaNGuard()
    state = RunState(tmp_path, (0.5,), 2, trainer, guard=guard)
    x, y = make_batch(4, positives=(0,))
    labels = np.stack([y["label"]] * 4)
    labels[1, 0] = np.nan  # batch 1's label loss is NaN
    ds = tf.data.Dataset.from_tensor_slices((np.stack([x] * 4),
                                             {"mask": np.stack([y["mask"]] * 4), "label": labels}))
    compat.symbolic_build(trainer, (x, y))
    loop.fit(trainer, tf.distribute.get_strategy(), lambda _: ds, epochs=2, initial_epoch=0,
             steps_per_epoch=4, callbacks=[guard, state], verbose=0)
    assert guard.nan_at == (0, 1)
    assert state.completed_epochs == 0 and not (tmp_path / "state").exists()


def test_run_state_rejects_state_of_another_optimizer(tmp_path):
    trainer = make_trainer(0)
    state = RunState(tmp_path, (0.5,), 1, trainer)
    state.set_model(trainer)
    run_epoch(state, 0, epoch_logs(0.5))
    other = make_trainer(0, "mixed_float16")  # the loss-scale optimizer has 2 more variables
    with pytest.raises(TfpneumoError, match="optimizer state does not match"):
        RunState(tmp_path, (0.5,), 1, other).load()


def test_configs_built_here_are_valid():
    # dataclasses built directly skip load_config's validation
    for cfg in (PLAIN_BCE, LossConfig(), TINY_UNET, TrainConfig(),
                OptimizerConfig(lr=1e-2, weight_decay=1e-2, encoder_lr_mult=0.5, clipnorm=0.05)):
        cfg.validate("")
