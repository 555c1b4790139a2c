"""Losses: hand-worked values, independent numpy references, precision, graph/XLA, composition,
serialization."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tfpneumo.tfimport import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from tfpneumo.config import LossConfig  # noqa: E402
from tfpneumo.training import losses as L  # noqa: E402

EPS = 1e-7
REPO = Path(__file__).resolve().parents[2]


def as4d(values, shape=(2, 2)) -> np.ndarray:
    """Flat pixel values -> one image ``(1, H, W, 1) float32``."""
    return np.asarray(values, np.float32).reshape(1, *shape, 1)


def f(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x), np.float64)


# ----------------------------------------------------------------------------- numpy references
# Written from the definitions, per image with plain loops, in float64.

def np_bce(t, p):
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    out = []
    for ti, pi in zip(t.reshape(len(t), -1), p.reshape(len(p), -1), strict=True):
        out.append(np.mean([-math.log(q) if y == 1 else -math.log(1 - q)
                            for y, q in zip(ti, pi, strict=True)]))
    return np.array(out)


def np_dice_loss(t, p, s=1.0):
    out = []
    for ti, pi in zip(t.reshape(len(t), -1), p.reshape(len(p), -1).astype(np.float64),
                      strict=True):
        out.append(1 - (2 * np.dot(ti, pi) + s) / (ti.sum() + pi.sum() + s))
    return np.array(out)


def np_log_dice(t, p, gamma=0.3, s=1.0):
    return (-np.log(1 - np_dice_loss(t, p, s))) ** gamma


def np_focal(t, p, gamma=2.0, alpha=0.25):
    # p_t / alpha_t formulation (RetinaNet paper), independent of the library's form.
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS).reshape(len(p), -1)
    t = t.reshape(len(t), -1)
    pt = np.where(t == 1, p, 1 - p)
    at = np.where(t == 1, alpha, 1 - alpha)
    return np.mean(-at * (1 - pt) ** gamma * np.log(pt), axis=1)


def np_lovasz_grad(gt_sorted):
    gts = gt_sorted.sum()
    intersection = gts - np.cumsum(gt_sorted)
    union = gts + np.cumsum(1 - gt_sorted)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].copy()
    return jaccard


def np_lovasz(t, logits):
    out = []
    for ti, zi in zip(t.reshape(len(t), -1).astype(np.float64),
                      logits.reshape(len(logits), -1).astype(np.float64), strict=True):
        errors = 1.0 - zi * (2 * ti - 1)
        perm = np.argsort(-errors, kind="stable")
        out.append(np.dot(np.maximum(errors[perm], 0), np_lovasz_grad(ti[perm])))
    return np.array(out)


def np_logit(p):
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def np_ohem(t, p, ratio):
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS).reshape(len(p), -1)
    t = t.reshape(len(t), -1)
    pix = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    k = int(np.ceil(ratio * pix.shape[1]))
    return np.array([np.sort(row)[::-1][:k].mean() for row in pix])


def np_combo(t, p, b=3.0, d=1.0, fo=4.0, lo=0.0):
    return (b * np_bce(t, p) + d * np_dice_loss(t, p) + fo * np_focal(t, p)
            + lo * np_lovasz(t, np_logit(p)))


def random_batch(seed=0, batch=4, size=16):
    """Truth: blobs, image 1 empty; probabilities in (0.01, 0.99), float32."""
    rng = np.random.default_rng(seed)
    t = np.zeros((batch, size, size, 1), np.float32)
    for i in range(batch):
        if i == 1:
            continue
        y, x = rng.integers(0, size - 5, 2)
        h, w = rng.integers(2, 6, 2)
        t[i, y:y + h, x:x + w] = 1
    p = rng.uniform(0.01, 0.99, t.shape).astype(np.float32)
    return t, p


def mask_loss(kind: str, **loss_config) -> keras.losses.Loss:
    """The mask loss of ``LossConfig(mask=kind, **loss_config)`` as build_losses makes it, on
    probabilities (the numpy oracles below take probabilities)."""
    losses, _ = L.build_losses(LossConfig(mask=kind, **loss_config), from_logits=False)
    return losses["mask"]


# ----------------------------------------------------------------------------- hand-worked values
T1 = as4d([1, 0, 0, 0])
P1 = as4d([0.8, 0.2, 0.1, 0.3])
BCE1 = -(math.log(0.8) + math.log(0.8) + math.log(0.9) + math.log(0.7)) / 4
DICE1 = 1 - (2 * 0.8 + 1) / (1 + 1.4 + 1)              # = 0.8 / 3.4
FOCAL1 = (0.25 * 0.2 ** 2 * -math.log(0.8) + 0.75 * 0.2 ** 2 * -math.log(0.8)
          + 0.75 * 0.1 ** 2 * -math.log(0.9) + 0.75 * 0.3 ** 2 * -math.log(0.7)) / 4


def test_hand_worked_values():
    assert f(L.BCELoss()(T1, P1)) == pytest.approx(BCE1, rel=1e-6)
    assert f(L.DiceLoss()(T1, P1)) == pytest.approx(0.8 / 3.4, rel=1e-6)
    assert f(L.LogDiceLoss(gamma=0.3)(T1, P1)) == pytest.approx(math.log(3.4 / 2.6) ** 0.3,
                                                                rel=1e-6)
    assert f(L.FocalLoss(gamma=2.0, alpha=0.25)(T1, P1)) == pytest.approx(FOCAL1, rel=1e-6)
    # OHEM with ratio 0.5 keeps the 2 hardest of 4 pixels: -log 0.7 and -log 0.8.
    assert f(L.OHEMBCELoss(ratio=0.5)(T1, P1)) == pytest.approx(
        -(math.log(0.7) + math.log(0.8)) / 2, rel=1e-6)
    combo = 3 * L.BCELoss() + L.DiceLoss() + 4 * L.FocalLoss()
    assert f(combo(T1, P1)) == pytest.approx(3 * BCE1 + DICE1 + 4 * FOCAL1, rel=1e-6)


LOVASZ_LOGITS = L.LovaszHingeLoss(from_logits=True)


def test_lovasz_hand_worked():
    # errors = 1 - z*sign = [-1, 0.5, 1.5, -2]; sorted truths [0, 0, 1, 0];
    # jaccard [1/2, 2/3, 1, 1] -> grad [1/2, 1/6, 1/3, 0]; loss = 1.5/2 + 0.5/6 = 5/6.
    assert f(LOVASZ_LOGITS(T1, as4d([2.0, -0.5, 0.5, -3.0]))) == pytest.approx(5 / 6, rel=1e-6)
    # Empty truth: jaccard is 1 from the first sorted pixel on -> relu(1 + max logit).
    empty = np.zeros_like(T1)
    assert f(LOVASZ_LOGITS(empty, as4d([-2.0, -1.0, 0.5, -3.0]))) == pytest.approx(1.5)
    assert f(LOVASZ_LOGITS(empty, as4d([-2.0, -1.5, -1.0, -3.0]))) == 0.0
    # Mean over images.
    both = LOVASZ_LOGITS(np.concatenate([T1, empty]),
                         np.concatenate([as4d([2.0, -0.5, 0.5, -3.0]),
                                         as4d([-2.0, -1.0, 0.5, -3.0])]))
    assert f(both) == pytest.approx((5 / 6 + 1.5) / 2, rel=1e-6)


def test_perfect_prediction():
    t = as4d([1, 1, 0, 0])
    assert f(L.DiceLoss()(t, t)) == 0.0
    assert f(L.LogDiceLoss()(t, t)) == 0.0
    assert f(LOVASZ_LOGITS(t, 3.0 * (2 * t - 1))) == 0.0
    assert f(LOVASZ_LOGITS(t, 1.0 * (2 * t - 1))) == 0.0  # |logit| = 1 is the hinge's edge
    for fn in (L.BCELoss(), L.FocalLoss(), L.OHEMBCELoss()):
        assert f(fn(t, t)) == pytest.approx(0.0, abs=2e-7)
    # log-dice at dice == 1: zero gradient rather than the inf of x^0.3 at 0.
    p = tf.Variable(t)
    with tf.GradientTape() as tape:
        loss = L.LogDiceLoss()(t, p)
    assert np.all(np.isfinite(tape.gradient(loss, p).numpy()))


def test_disjoint_prediction():
    t, p = as4d([1, 1, 0, 0]), as4d([0, 0, 1, 1])
    assert f(L.DiceLoss()(t, p)) == pytest.approx(1 - 1 / 5, rel=1e-6)
    assert f(L.LogDiceLoss(gamma=0.3)(t, p)) == pytest.approx(math.log(5) ** 0.3, rel=1e-6)
    # All errors tie at 3 and the Jaccard loss of "everything wrong" is 1 -> 3.
    assert f(LOVASZ_LOGITS(t, 2.0 * (2 * p - 1))) == pytest.approx(3.0, rel=1e-6)


# ----------------------------------------------------------------------------- random vs numpy

@pytest.mark.parametrize("seed", [0, 1])
def test_against_numpy_references(seed):
    t, p = random_batch(seed)
    z = np.random.default_rng(seed + 10).normal(0, 2, t.shape).astype(np.float32)
    tol = dict(rtol=1e-5, atol=1e-7)
    # .call() is the per-image vector (B,)
    np.testing.assert_allclose(f(L.BCELoss().call(t, p)), np_bce(t, p), **tol)
    np.testing.assert_allclose(f(L.DiceLoss().call(t, p)), np_dice_loss(t, p), **tol)
    np.testing.assert_allclose(f(L.LogDiceLoss(0.3).call(t, p)), np_log_dice(t, p), **tol)
    np.testing.assert_allclose(f(L.FocalLoss(2.0, 0.25).call(t, p)), np_focal(t, p), **tol)
    np.testing.assert_allclose(f(LOVASZ_LOGITS.call(t, z)), np_lovasz(t, z), **tol)
    np.testing.assert_allclose(f(L.LovaszHingeLoss().call(t, p)),
                               np_lovasz(t, np_logit(p)), **tol)
    np.testing.assert_allclose(f(L.OHEMBCELoss(0.25).call(t, p)), np_ohem(t, p, 0.25), **tol)
    combo = 3 * L.BCELoss() + L.DiceLoss() + 4 * L.FocalLoss() + 0.5 * L.LovaszHingeLoss()
    np.testing.assert_allclose(f(combo.call(t, p)), np_combo(t, p, 3, 1, 4, 0.5), **tol)
    assert f(LOVASZ_LOGITS(t, z)) == pytest.approx(np_lovasz(t, z).mean(), rel=1e-5)


def test_ohem_k():
    assert L.ohem_k(30, 0.1) == 3            # 0.1 * 30 = 3.0000000000000004 in floats
    assert L.ohem_k(4, 0.1) == 1
    assert L.ohem_k(10, 0.25) == 3
    assert L.ohem_k(7, 1.0) == 7


def test_loss_classes_reduce_to_mean_over_images():
    t, p = random_batch(3)
    cases = [
        (L.BCELoss(), np_bce(t, p)),
        (L.DiceLoss(), np_dice_loss(t, p)),
        (L.LogDiceLoss(gamma=0.5), np_log_dice(t, p, 0.5)),
        (L.FocalLoss(gamma=1.5, alpha=0.4), np_focal(t, p, 1.5, 0.4)),
        (L.LovaszHingeLoss(), np_lovasz(t, np_logit(p))),
        (L.OHEMBCELoss(ratio=0.5), np_ohem(t, p, 0.5)),
        (L.BCELoss() + 2 * L.DiceLoss() + 3 * L.FocalLoss() + 4 * L.LovaszHingeLoss(),
         np_combo(t, p, 1, 2, 3, 4)),
        (mask_loss("dice", mask_positives_only=False), np_dice_loss(t, p)),
    ]
    for loss, expected in cases:
        assert f(loss(t, p)) == pytest.approx(expected.mean(), rel=1e-5), loss.name
    # Keras' sum_over_batch_size with per-image weights: sum(w_i l_i) / B.
    w = np.array([1.0, 0.0, 2.0, 0.0], np.float32)
    assert f(L.BCELoss()(t, p, sample_weight=w)) == pytest.approx(
        (np_bce(t, p) * w).sum() / 4, rel=1e-5)


def test_label_loss_shape():
    y = np.array([[1.0], [0.0], [1.0]], np.float32)
    q = np.array([[0.9], [0.2], [0.4]], np.float32)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3
    assert f(L.BCELoss()(y, q)) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- gradients

def test_lovasz_gradient_finite_with_ties_and_empty_images():
    t, _ = random_batch(4)
    z = tf.Variable(np.round(np.random.default_rng(4).normal(0, 1, t.shape)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = LOVASZ_LOGITS(t, z)
    g = tape.gradient(loss, z).numpy()
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


@pytest.mark.parametrize("kind", L.MASK_KINDS)
def test_mask_loss_gradients_finite(kind):
    t, p = random_batch(5)
    p[0, :4] = 1.0  # saturated sigmoid outputs
    p[2, :4] = 0.0
    var = tf.Variable(p)
    with tf.GradientTape() as tape:
        loss = mask_loss(kind, combo_lovasz=1.0)(t, var)
    g = tape.gradient(loss, var).numpy()
    assert np.isfinite(f(loss)) and np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- positives only

@pytest.mark.parametrize("kind", L.MASK_KINDS)
def test_positives_only_ignores_empty_images(kind):
    t, p = random_batch(6, batch=4)
    positive = t.reshape(4, -1).max(axis=1) > 0
    assert positive.tolist() == [True, False, True, True]
    loss = mask_loss(kind, mask_positives_only=True)
    assert isinstance(loss, L.PositivesOnly)
    pos_only = f(loss(t[positive], p[positive]))
    fn = loss.loss.call  # the wrapped loss, per image
    assert pos_only == pytest.approx(f(fn(t[positive], p[positive])).mean(), rel=1e-6)
    # Adding empty-truth images (anywhere in the batch) changes nothing.
    rng = np.random.default_rng(0)
    t_big = np.concatenate([np.zeros_like(t[:3]), t, np.zeros_like(t[:2])])
    p_big = np.concatenate([rng.uniform(size=t[:3].shape), p,
                            rng.uniform(size=t[:2].shape)]).astype(np.float32)
    assert f(loss(t_big, p_big)) == pytest.approx(pos_only, rel=1e-6)
    # ...and their predictions get no gradient.
    var = tf.Variable(p_big)
    with tf.GradientTape() as tape:
        value = loss(t_big, var)
    g = tape.gradient(value, var).numpy()
    empty = t_big.reshape(len(t_big), -1).max(axis=1) == 0
    assert np.all(g[empty] == 0) and np.abs(g[~empty]).sum() > 0


def test_all_empty_batch_gives_zero():
    t = np.zeros((3, 8, 8, 1), np.float32)
    p = tf.Variable(np.random.default_rng(0).uniform(size=t.shape).astype(np.float32))
    for kind in L.MASK_KINDS:
        with tf.GradientTape() as tape:
            value = mask_loss(kind)(t, p)
        g = tape.gradient(value, p)
        assert f(value) == 0.0
        assert g is None or np.all(g.numpy() == 0)
    # Without positives_only the same batch has a positive loss.
    assert f(mask_loss("combo", mask_positives_only=False)(t, p)) > 0


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("dtype,rtol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_1024_maps_do_not_overflow(dtype, rtol):
    rng = np.random.default_rng(7)
    t = np.zeros((1, 1024, 1024, 1), np.float32)
    t[0, 300:700, 200:500] = 1  # 120k pixels: a float16 sum would overflow at 65504
    p = np.clip(t * 0.9 + rng.uniform(0, 0.1, t.shape), 0, 1).astype(np.float32)
    t_half = tf.cast(t, dtype)
    p_half = tf.cast(p, dtype)
    for kind in L.MASK_KINDS:
        fn = mask_loss(kind, mask_positives_only=False).call
        half = f(fn(t_half, p_half))
        full = f(fn(t, p))
        assert np.all(np.isfinite(half)), kind
        np.testing.assert_allclose(half, full, rtol=rtol, atol=1e-3, err_msg=kind)
    value = f(mask_loss("combo")(t_half, p_half))
    assert np.isfinite(value) and value == pytest.approx(f(mask_loss("combo")(t, p)), rel=rtol)


# ----------------------------------------------------------------------------- graph / XLA

def test_graph_xla_and_dynamic_shapes():
    t, p = random_batch(8)
    z = np_logit(p).astype(np.float32)
    loss = mask_loss("combo", combo_lovasz=1.0)
    ohem = L.OHEMBCELoss(0.1)
    eager = (f(LOVASZ_LOGITS(t, z)), f(ohem(t, p)), f(loss(t, p)))

    def all_three(tt, pp, zz):
        return LOVASZ_LOGITS(tt, zz), ohem(tt, pp), loss(tt, pp)

    xla = tf.function(all_three, jit_compile=True)(t, p, z)
    spec = tf.TensorSpec((None, None, None, 1), tf.float32)
    dynamic = tf.function(all_three, input_signature=[spec, spec, spec])(t, p, z)
    for got in (xla, dynamic):
        np.testing.assert_allclose([f(v) for v in got], eager, rtol=1e-5)


# ----------------------------------------------------------------- build / serialization

def test_build_losses_from_config():
    cfg = LossConfig(mask="focal", focal_gamma=1.0, focal_alpha=0.5, mask_weight=2.0,
                     label_weight=0.25, mask_positives_only=False)
    losses, weights = L.build_losses(cfg)
    assert weights == {"mask": 2.0, "label": 0.25}
    assert isinstance(losses["mask"], L.FocalLoss) and isinstance(losses["label"], L.BCELoss)
    assert losses["mask"].from_logits and losses["label"].from_logits  # what Trainer gives
    t, p = random_batch(9)
    assert f(losses["mask"](t, np_logit(p))) == pytest.approx(np_focal(t, p, 1.0, 0.5).mean(),
                                                              rel=1e-5)
    # The default: the 1st place combo, spelled as the recipe, on positive images only.
    default, _ = L.build_losses(LossConfig())
    assert isinstance(default["mask"], L.PositivesOnly) and default["mask"].from_logits
    z = {"from_logits": True}
    recipe = 3 * L.BCELoss(**z) + L.DiceLoss(**z) + 4 * L.FocalLoss(**z)
    assert default["mask"].loss.get_config() == recipe.get_config()
    # Zero-weight terms are left out (not computed at weight 0).
    lovasz_only, _ = L.build_losses(LossConfig(combo_bce=0, combo_dice=0, combo_focal=0,
                                               combo_lovasz=2, mask_positives_only=False))
    assert [(w, type(loss)) for w, loss in lovasz_only["mask"].terms] == [
        (2.0, L.LovaszHingeLoss)]
    for kind in L.MASK_KINDS:  # every kind the config accepts is built
        assert isinstance(mask_loss(kind, mask_positives_only=False), keras.losses.Loss)


def test_invalid_parameters_raise():
    with pytest.raises(L.LossError, match="not one of"):
        mask_loss("jaccard")
    with pytest.raises(L.LossError, match="every weight is 0"):
        mask_loss("combo", combo_bce=0, combo_dice=0, combo_focal=0, combo_lovasz=0)
    with pytest.raises(L.LossError, match="ratio"):
        L.OHEMBCELoss(ratio=0.0)
    with pytest.raises(L.LossError, match="weights"):
        -1 * L.DiceLoss()
    with pytest.raises(L.LossError, match="weights"):
        math.nan * L.DiceLoss()
    with pytest.raises(L.LossError, match="no terms"):
        L.WeightedSum([])
    with pytest.raises(L.LossError, match="already"):
        L.PositivesOnly(L.BCELoss() + L.PositivesOnly(L.DiceLoss()))
    # Keras built-ins return per-pixel values from call(): they do not compose with these.
    with pytest.raises(TypeError):
        L.DiceLoss() + keras.losses.BinaryCrossentropy()
    with pytest.raises(L.LossError, match="per-image"):
        L.PositivesOnly(keras.losses.BinaryCrossentropy())
    with pytest.raises(TypeError):
        "3" * L.DiceLoss()


# ----------------------------------------------------------------------------- composition

def test_composed_combo_equals_hand_weighted_sum():
    t, p = random_batch(12)
    bce, dice, focal = L.BCELoss(), L.DiceLoss(), L.FocalLoss()
    combo = 3 * bce + dice + 4 * focal
    assert isinstance(combo, L.WeightedSum)
    assert [(w, loss) for w, loss in combo.terms] == [(3.0, bce), (1.0, dice), (4.0, focal)]
    by_hand = 3 * f(bce.call(t, p)) + f(dice.call(t, p)) + 4 * f(focal.call(t, p))
    np.testing.assert_allclose(f(combo.call(t, p)), by_hand, rtol=1e-6)
    assert f(combo(t, p)) == pytest.approx(by_hand.mean(), rel=1e-6)
    # Brackets, order of the factor, numpy weights and sum() give the same flat terms.
    others = [3 * bce + (dice + focal * 4), bce * 3 + dice + 2 * (2 * focal),
              np.float32(3) * bce + dice + np.float64(4) * focal, sum([3 * bce, dice, 4 * focal])]
    for other in others:
        assert isinstance(other, L.WeightedSum)
        assert other.get_config() == combo.get_config()
    # Per-image sample weights still reduce as sum(w_i l_i) / B.
    w = np.array([0.5, 1.0, 0.0, 2.0], np.float32)
    assert f(combo(t, p, sample_weight=w)) == pytest.approx((by_hand * w).sum() / 4, rel=1e-6)


def test_composed_combo_serialization_and_compiled_model_round_trip(tmp_path):
    combo = L.PositivesOnly(3 * L.BCELoss() + L.DiceLoss() + 4 * L.FocalLoss(gamma=1.5)
                            + 0.5 * L.LovaszHingeLoss(), name="mask_loss")
    config = combo.get_config()
    assert L.PositivesOnly.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(combo), safe_mode=True)
    assert isinstance(restored, L.PositivesOnly) and restored.get_config() == config
    assert [(w, type(loss)) for w, loss in restored.loss.terms] == [
        (3.0, L.BCELoss), (1.0, L.DiceLoss), (4.0, L.FocalLoss), (0.5, L.LovaszHingeLoss)]
    assert restored.loss.terms[2][1].gamma == 1.5
    t, p = random_batch(13)
    assert f(restored(t, p)) == pytest.approx(f(combo(t, p)), rel=1e-6)

    # In a compiled model saved to .keras: the loaded model's compiled loss is the same sum.
    model = tiny_model()
    model.compile(optimizer="sgd", loss={"mask": combo, "label": L.BCELoss(name="label_loss")})
    path = tmp_path / "combo.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.loss["mask"].get_config() == config
    x, y = tiny_data()
    before = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    after = loaded.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    assert after["mask_loss"] == pytest.approx(before["mask_loss"], rel=1e-6)


ALL_LOSSES = [
    L.BCELoss(epsilon=1e-6, name="b"),
    L.DiceLoss(smooth=0.5),
    L.DiceLoss(smooth=1e-6, per_image=False, name="batch_dice"),
    L.FocalLoss(alpha=None, name="focal_no_alpha"),
    L.LogDiceLoss(gamma=0.7, smooth=2.0),
    L.FocalLoss(gamma=1.0, alpha=0.6),
    L.LovaszHingeLoss(epsilon=1e-5),
    L.OHEMBCELoss(ratio=0.3),
    L.LovaszHingeLoss(from_logits=True, name="lovasz_logits"),
    L.BCELoss() + 2.0 * L.DiceLoss() + L.LovaszHingeLoss(),
    L.PositivesOnly(L.LogDiceLoss(gamma=0.5)),
    mask_loss("combo", combo_lovasz=0.5),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda x: x.name)
def test_loss_serialization_round_trip(loss):
    t, p = random_batch(11)
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(loss)
    restored = keras.saving.deserialize_keras_object(serialized, safe_mode=True)
    assert type(restored) is type(loss) and restored.get_config() == config
    assert f(restored(t, p)) == pytest.approx(f(loss(t, p)), rel=1e-6)


def tiny_model(size: int = 32) -> keras.Model:
    inputs = keras.Input((size, size, 3), name="image")
    mask = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="mask")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(mask)
    label = keras.layers.Dense(1, activation="sigmoid", name="label")(pooled)
    return keras.Model(inputs, {"mask": mask, "label": label})


def tiny_data(n: int = 4, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
    masks = np.zeros((n, size, size, 1), np.float32)
    masks[0, 4:12, 5:20] = 1
    masks[2, 10:30, 3:9] = 1
    labels = (masks.reshape(n, -1).max(axis=1, keepdims=True) > 0).astype(np.float32)
    return x, {"mask": masks, "label": labels}


def test_compile_fit_save_load(tmp_path):
    from tfpneumo.training.metrics import dice_metrics

    keras.utils.set_random_seed(0)
    model = tiny_model()
    losses, weights = L.build_losses(LossConfig(combo_lovasz=0.5))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights,
                  metrics={"mask": dice_metrics((0.3, 0.5))})
    x, y = tiny_data()
    history = model.fit(x, y, batch_size=2, epochs=1, validation_data=(x, y), verbose=0)
    logs = history.history
    assert {"mask_loss", "label_loss", "mask_dice@0.3", "val_mask_dice@0.5"} <= set(logs)
    assert all(np.isfinite(v[0]) for v in logs.values())
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    before = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    after = loaded.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    assert set(before) == set(after)
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-5), key


# ----------------------------------------------------------------------------- tf.distribute

MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np
    from tfpneumo.tfimport import quiet_tensorflow
    tf = quiet_tensorflow()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras
    from tfpneumo.training import losses as L

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, 16, 16, 3)).astype(np.float32)
    masks = np.zeros((4, 16, 16, 1), np.float32)
    # Replica 0 gets images 0-1 (two positives), replica 1 gets 2-3 (one positive): a
    # per-replica mean would weigh image 2 twice as much as images 0 and 1.
    masks[0, 2:8, 2:9] = 1
    masks[1, 5:14, 6:10] = 1
    masks[2, 1:4, 1:12] = 1
    labels = (masks.reshape(4, -1).max(axis=1, keepdims=True) > 0).astype(np.float32)
    y = {"mask": masks, "label": labels}

    def step(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            inputs = keras.Input((16, 16, 3))
            mask = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid",
                                       name="mask")(inputs)
            label = keras.layers.Dense(1, activation="sigmoid", name="label")(
                keras.layers.GlobalAveragePooling2D()(mask))
            model = keras.Model(inputs, {"mask": mask, "label": label})
            start = [w.copy() for w in model.get_weights()]
            model.compile(optimizer=keras.optimizers.SGD(1.0),
                          loss={"mask": L.PositivesOnly(3 * L.BCELoss() + L.DiceLoss()
                                                        + 4 * L.FocalLoss()
                                                        + L.LovaszHingeLoss()),
                                "label": L.BCELoss()},
                          loss_weights={"mask": 1.0, "label": 0.5})
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return [w - s for w, s in zip(model.get_weights(), start)]

    single = step(tf.distribute.get_strategy())
    mirrored = step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    for a, b in zip(single, mirrored):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    print("OK", max(float(np.abs(a).max()) for a in single))
""")


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True,
                            text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "OK" in result.stdout


# ----------------------------------------------------------------- from logits

def test_every_loss_on_logits_equals_the_same_loss_on_probabilities():
    """Oracle: the numpy probability formulas above, at p = sigmoid(z)."""
    t, p = random_batch(11)
    z = np_logit(p).astype(np.float32)
    q = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    cases = [
        (L.BCELoss(from_logits=True), np_bce(t, q)),
        (L.DiceLoss(from_logits=True), np_dice_loss(t, q)),
        (L.LogDiceLoss(gamma=0.5, from_logits=True), np_log_dice(t, q, 0.5)),
        (L.FocalLoss(gamma=1.5, alpha=0.4, from_logits=True), np_focal(t, q, 1.5, 0.4)),
        (L.LovaszHingeLoss(from_logits=True), np_lovasz(t, z)),
        (L.OHEMBCELoss(ratio=0.5, from_logits=True), np_ohem(t, q, 0.5)),
    ]
    for loss, expected in cases:
        assert f(loss(t, z)) == pytest.approx(expected.mean(), rel=1e-5), loss.name
    with pytest.raises(L.LossError, match="logits"):
        L.BCELoss(from_logits=True) + L.DiceLoss()


def test_a_saturated_pixel_still_gets_its_gradient_from_logits(tf):
    """Why training uses logits: a positive pixel whose logit ran to -30 (p = 9e-14, below the
    1e-7 clip) gets d(BCE)/dz = p - 1 = -1/N from logits, and exactly 0 through clipped
    probabilities; focal (gamma 2, alpha 0.25) gives -0.25/N * ~1 from logits."""
    n = 16
    t = np.zeros((1, 4, 4, 1), np.float32)
    t[0, 0, 0, 0] = 1.0
    z = tf.Variable(np.full((1, 4, 4, 1), -30.0, np.float32))
    for loss, want in ((L.BCELoss, -1.0 / n), (lambda **k: L.FocalLoss(**k), -0.25 / n)):
        with tf.GradientTape(persistent=True) as tape:
            on_logits = loss(from_logits=True)(t, z)
            on_probs = loss()(t, tf.sigmoid(z))
        assert float(tape.gradient(on_logits, z)[0, 0, 0, 0]) == pytest.approx(want, rel=1e-4)
        assert float(tape.gradient(on_probs, z)[0, 0, 0, 0]) == 0.0


def test_trainer_gives_logits_to_the_losses_and_probabilities_to_the_metrics(tf):
    """A net whose mask logit is -30 everywhere: the compiled BCE on logits is 30 per positive
    pixel (the clipped probability would cap it at -log(1e-7) = 16.1); the Dice metric sees
    probabilities (an empty prediction on a non-empty truth scores 0)."""
    from tfpneumo.training.metrics import KaggleDice
    from tfpneumo.training.trainer import Trainer

    image = keras.Input((4, 4, 1), name="image")
    logits = keras.layers.Conv2D(1, 1, kernel_initializer="zeros",
                                 bias_initializer=keras.initializers.Constant(-30.0))(image)
    mask = keras.layers.Activation("sigmoid", name="mask")(logits)
    label = keras.layers.Activation("sigmoid", name="label")(
        keras.layers.Dense(1, kernel_initializer="zeros")(keras.layers.Flatten()(image)))
    trainer = Trainer(keras.Model(image, {"mask": mask, "label": label}))
    losses, _ = L.build_losses(LossConfig(mask="bce", mask_positives_only=False))
    trainer.compile(loss=losses, loss_weights={"mask": 1.0, "label": 0.0},
                    metrics={"mask": [KaggleDice(name="dice")]})
    y = {"mask": np.ones((1, 4, 4, 1), np.float32), "label": np.ones((1, 1), np.float32)}
    logs = trainer.evaluate(np.zeros((1, 4, 4, 1), np.float32), y, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(30.0, rel=1e-5)
    assert logs["mask_dice"] == 0.0


# ----------------------------------------------------------------- the recipes' loss forms
# References written from the sources' formulas, over the whole batch at once (as the PyTorch
# code computes them), in float64: sneddy/pneumothorax-segmentation unet_pipeline/Losses.py
# (soft_dice_loss per_image=False, eps 1e-6; FocalLoss2d gamma 2: p and t clamped to
# [1e-8, 1 - 1e-8], pt = (1-t)(1-p) + t p, mean of -(1-pt)^2 log pt) and
# amirassov/kaggle-pneumothorax src/losses/dice.py (the same Dice with eps 1e-5).

def np_sneddy_batch_dice_loss(t, p, eps=1e-6):
    t, p = t.astype(np.float64).ravel(), p.astype(np.float64).ravel()
    return 1 - (2 * np.sum(p * t) + eps) / (np.sum(p) + np.sum(t) + eps)


def np_sneddy_focal(t, p, gamma=2.0, eps=1e-8):
    p = np.clip(p.astype(np.float64).ravel(), eps, 1 - eps)
    t = np.clip(t.astype(np.float64).ravel(), eps, 1 - eps)
    pt = (1 - t) * (1 - p) + t * p
    return np.mean(-((1 - pt) ** gamma) * np.log(pt))


def np_stable_bce(t, z):
    """sneddy's StableBCELoss on logits, mean over every element of the batch."""
    z, t = z.astype(np.float64).ravel(), t.astype(np.float64).ravel()
    return np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))


T2 = np.concatenate([T1, np.zeros_like(T1)])            # image 2 is empty
P2 = np.concatenate([P1, as4d([0.5, 0.0, 0.0, 0.0])])


def test_batch_dice_hand_worked():
    # Over both images as one volume: intersection 0.8, sum(p) 1.4 + 0.5, sum(t) 1.
    for s in (1e-6, 1e-5, 1.0):
        want = 1 - (2 * 0.8 + s) / (1.9 + 1 + s)
        loss = L.DiceLoss(smooth=s, per_image=False)
        assert f(loss(T2, P2)) == pytest.approx(want, rel=1e-6)
        np.testing.assert_allclose(f(loss.call(T2, P2)), [want, want], rtol=1e-6)
    # Per image it is another number: the empty image's Dice is s / (0.5 + s), ~0.
    per_image = (1 - (1.6 + 1e-6) / (2.4 + 1e-6) + 1 - 1e-6 / (0.5 + 1e-6)) / 2
    assert f(L.DiceLoss(smooth=1e-6)(T2, P2)) == pytest.approx(per_image, rel=1e-6)
    # One image: batch Dice == per-image Dice.
    assert f(L.DiceLoss(smooth=1.0, per_image=False)(T1, P1)) == pytest.approx(DICE1, rel=1e-6)


def test_focal_without_alpha_hand_worked():
    # -(1 - p_t)^2 log p_t per pixel, no class weight: p_t = 0.8, 0.8, 0.9, 0.7.
    want = (0.2 ** 2 * -math.log(0.8) * 2 + 0.1 ** 2 * -math.log(0.9)
            + 0.3 ** 2 * -math.log(0.7)) / 4
    assert f(L.FocalLoss(gamma=2.0, alpha=None)(T1, P1)) == pytest.approx(want, rel=1e-6)
    # alpha 0.5 weighs both classes by 0.5: exactly half of no alpha.
    assert f(L.FocalLoss(alpha=0.5)(T1, P1)) == pytest.approx(want / 2, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recipe_loss_forms_against_the_sources_formulas(seed):
    t, p = random_batch(seed)
    z = np_logit(p).astype(np.float32)
    q = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    for eps in (1e-6, 1e-5):
        for loss, probs in ((L.DiceLoss(smooth=eps, per_image=False), p),
                            (L.DiceLoss(smooth=eps, per_image=False, from_logits=True), z)):
            assert f(loss(t, probs)) == pytest.approx(np_sneddy_batch_dice_loss(t, q), rel=1e-5)
    focal = np_sneddy_focal(t, q)
    assert f(L.FocalLoss(alpha=None)(t, p)) == pytest.approx(focal, rel=1e-5)
    assert f(L.FocalLoss(alpha=None, from_logits=True)(t, z)) == pytest.approx(focal, rel=1e-5)


def test_first_place_combo_equals_sneddy_combo_loss():
    """ComboLoss({bce: 3, dice: 1, focal: 4}) of sneddy's Losses.py, on logits, over a batch
    with an empty image, against the mask loss built from siim_1st_place's loss keys."""
    t, p = random_batch(21)
    z = np_logit(p).astype(np.float32)
    q = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    want = (3 * np_stable_bce(t, z) + np_sneddy_batch_dice_loss(t, q)
            + 4 * np_sneddy_focal(t, q))
    cfg = LossConfig(mask="combo", combo_bce=3, combo_dice=1, combo_focal=4, focal_alpha=None,
                     dice_smooth=1e-6, dice_per_image=False, mask_positives_only=False)
    losses, _ = L.build_losses(cfg)  # from_logits, as the trainer uses it
    assert not isinstance(losses["mask"], L.PositivesOnly)
    assert f(losses["mask"](t, z)) == pytest.approx(want, rel=1e-5)


def test_fourth_place_supervision_loss_equals_amirassov_combo():
    """ComboSuperVisionLoss(weights {bce: 3, dice: 1}, sv_weight 0.1) of amirassov's
    src/losses/combo.py: 0.1 * BCE(empty logit, non_empty) + 0.9 * (3 BCE + Dice_batch)."""
    t, p = random_batch(22)
    z = np_logit(p).astype(np.float32)
    q = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    y = (t.reshape(len(t), -1).max(axis=1, keepdims=True) > 0).astype(np.float32)
    head = np.array([[1.5], [-0.3], [0.2], [2.0]], np.float32)
    want = 0.1 * np_stable_bce(y, head) + 0.9 * (
        3 * np_stable_bce(t, z) + np_sneddy_batch_dice_loss(t, q, eps=1e-5))
    cfg = LossConfig(mask="combo", combo_bce=3, combo_dice=1, combo_focal=0, dice_smooth=1e-5,
                     dice_per_image=False, mask_positives_only=False, mask_weight=0.9,
                     label_weight=0.1)
    losses, weights = L.build_losses(cfg)
    total = (weights["mask"] * f(losses["mask"](t, z))
             + weights["label"] * f(losses["label"](y, head)))
    assert total == pytest.approx(want, rel=1e-5)


def test_batch_dice_gradient_is_the_batch_dice_gradient():
    """d/dp of the batch Dice: -(2 t (S + s) - (2 I + s)) / (S + s)^2 for every pixel."""
    t, p = random_batch(23)
    s = 1e-6
    var = tf.Variable(p)
    with tf.GradientTape() as tape:
        loss = L.DiceLoss(smooth=s, per_image=False)(t, var)
    g = tape.gradient(loss, var).numpy().astype(np.float64)
    inter, total = float(np.sum(p * t)), float(np.sum(p) + np.sum(t))
    want = -(2 * t * (total + s) - (2 * inter + s)) / (total + s) ** 2
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-9)


def test_batch_dice_and_positives_only_do_not_mix():
    with pytest.raises(L.LossError, match="batch"):
        L.build_losses(LossConfig(dice_per_image=False, mask_positives_only=True))
    from tfpneumo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.dice_per_image"):
        load_config(None, ["loss.dice_per_image=false", "loss.mask_positives_only=true"])
    cfg = load_config(None, ["loss.focal_alpha=null", "loss.dice_per_image=false",
                             "loss.mask_positives_only=false", "loss.dice_smooth=1e-6"])
    assert cfg.loss.focal_alpha is None and cfg.loss.dice_smooth == 1e-6
    with pytest.raises(ConfigError, match="loss.dice_smooth"):
        load_config(None, ["loss.dice_smooth=0"])


def test_recipe_loss_forms_trace_under_xla_and_dynamic_shapes():
    t, p = random_batch(24)
    z = np_logit(p).astype(np.float32)
    loss = L.build_losses(LossConfig(focal_alpha=None, dice_smooth=1e-6, dice_per_image=False,
                                     mask_positives_only=False))[0]["mask"]
    eager = f(loss(t, z))
    spec = tf.TensorSpec((None, None, None, 1), tf.float32)
    xla = tf.function(lambda a, b: loss(a, b), jit_compile=True)(t, z)
    dynamic = tf.function(lambda a, b: loss(a, b), input_signature=[spec, spec])(t, z)
    for got in (xla, dynamic):
        assert f(got) == pytest.approx(eager, rel=1e-5)


# ----------------------------------------------------------------- variants (issue 15)
# Boundary loss: Kervadec et al.'s signed distance (their one_hot2dist: edt(neg) * neg -
# (edt(pos) - 1) * pos), here from scipy's exact EDT, an implementation independent of ours.

def np_signed_distance(t):
    from scipy.ndimage import distance_transform_edt

    out = []
    for image in t.reshape(t.shape[:3]).astype(bool):
        if image.any() and not image.all():
            pos, neg = image, ~image
            out.append(distance_transform_edt(neg) * neg - (distance_transform_edt(pos) - 1) * pos)
        else:  # no boundary
            out.append(np.zeros(image.shape))
    return np.array(out)


def np_boundary(t, p):
    return np.mean((p.reshape(t.shape[:3]).astype(np.float64) * np_signed_distance(t))
                   .reshape(len(t), -1), axis=1)


R2 = math.sqrt(2)
SQUARE = np.zeros((1, 5, 5, 1), np.float32)
SQUARE[0, 1:4, 1:4] = 1
SQUARE_PHI = np.array([[R2, 1, 1, 1, R2],   # outside: distance to the nearest mask pixel
                       [1, 0, 0, 0, 1],     # border pixels of the mask: 1 - 1 = 0
                       [1, 0, -1, 0, 1],    # centre: 1 - (distance 2 to the background)
                       [1, 0, 0, 0, 1],
                       [R2, 1, 1, 1, R2]])


def test_boundary_loss_hand_worked():
    # 1D: truth [0 0 1 1 1 0]; phi = [2, 1, 0, -1, 0, 1] by hand
    t = np.array([0, 0, 1, 1, 1, 0], np.float32).reshape(1, 1, 6, 1)
    p = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.3], np.float32).reshape(1, 1, 6, 1)
    np.testing.assert_allclose(f(L.signed_distance(t))[0, 0], [2, 1, 0, -1, 0, 1], atol=1e-6)
    want = (0.1 * 2 + 0.2 * 1 + 0.9 * 0 - 0.8 * 1 + 0.7 * 0 + 0.3 * 1) / 6   # -0.1 / 6
    assert f(L.BoundaryLoss()(t, p)) == pytest.approx(want, rel=1e-6)
    # 2D: a 3x3 square in a 5x5 image, diagonal corners at sqrt(2)
    np.testing.assert_allclose(f(L.signed_distance(SQUARE))[0], SQUARE_PHI, atol=1e-6)
    q = np.random.default_rng(0).uniform(size=SQUARE.shape).astype(np.float32)
    want = np.mean(q[0, :, :, 0] * SQUARE_PHI)
    assert f(L.BoundaryLoss()(SQUARE, q)) == pytest.approx(want, rel=1e-6)
    z = np_logit(q).astype(np.float32)  # from logits: the same on sigmoid(z)
    assert f(L.BoundaryLoss(from_logits=True)(SQUARE, z)) == pytest.approx(want, rel=1e-5)
    # empty and full truths have no boundary: 0
    for t in (np.zeros_like(SQUARE), np.ones_like(SQUARE)):
        assert f(L.BoundaryLoss()(t, q)) == 0.0


def test_boundary_loss_against_scipy_edt_graph_and_xla():
    rng = np.random.default_rng(3)
    t = np.zeros((4, 13, 17, 1), np.float32)
    t[0, 2:6, 3:12] = 1
    t[0, 9, 15] = 1                                 # two components
    t[2] = rng.uniform(size=(13, 17, 1)) > 0.7      # scattered pixels
    t[3] = 1
    t[3, 0, 0] = 0                                  # one background pixel
    p = rng.uniform(size=t.shape).astype(np.float32)  # image 1 is empty
    np.testing.assert_allclose(f(L.signed_distance(t)), np_signed_distance(t), rtol=1e-6, atol=1e-5)
    want = np_boundary(t, p)
    loss = L.BoundaryLoss()
    np.testing.assert_allclose(f(loss.call(t, p)), want, rtol=1e-5, atol=1e-7)
    spec = tf.TensorSpec((None, None, None, 1), tf.float32)
    for fn in (tf.function(loss.call, jit_compile=True),
               tf.function(loss.call, input_signature=[spec, spec])):
        np.testing.assert_allclose(f(fn(t, p)), want, rtol=1e-5, atol=1e-7)
    # the gradient w.r.t. p is the distance map / pixels (the map is a constant)
    var = tf.Variable(p)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(loss.call(t, var))
    np.testing.assert_allclose(tape.gradient(value, var).numpy()[..., 0],
                               np_signed_distance(t) / (13 * 17), rtol=1e-5, atol=1e-7)


def test_boundary_weight_adds_the_boundary_term():
    t, p = random_batch(31)
    plain = mask_loss("bce", mask_positives_only=False)
    with_boundary = mask_loss("bce", mask_positives_only=False, boundary_weight=0.25)
    assert isinstance(plain, L.BCELoss)  # boundary_weight 0 (default): nothing added
    np.testing.assert_allclose(f(with_boundary.call(t, p)),
                               np_bce(t, p) + 0.25 * np_boundary(t, p), rtol=1e-5, atol=1e-7)
    default = L.build_losses(LossConfig())[0]["mask"].loss
    assert not any(isinstance(term, L.BoundaryLoss) for _, term in default.terms)
    positives = mask_loss("combo", boundary_weight=0.01)  # inside PositivesOnly, serializable
    assert isinstance(positives, L.PositivesOnly)
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(positives), safe_mode=True)
    assert f(restored(t, p)) == pytest.approx(f(positives(t, p)), rel=1e-6)


def test_boundary_ramp_raises_the_boundary_term_epoch_by_epoch():
    from tfpneumo.training.callbacks import BoundaryRamp

    assert [L.boundary_ramp(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert L.boundary_ramp(0, 0) == 1.0  # no ramp: the whole weight from the start
    t, p = random_batch(32)
    loss = mask_loss("bce", boundary_weight=0.5)  # inside PositivesOnly and a weighted sum
    (term,) = L.boundary_losses(loss)
    ramp = BoundaryRamp([term], 4)
    for epoch, share in ((0, 0.25), (2, 0.75), (5, 1.0)):
        ramp.on_epoch_begin(epoch)
        positives = t.reshape(len(t), -1).max(axis=1) > 0
        expected = (np_bce(t, p) + 0.5 * share * np_boundary(t, p))[positives].sum() / max(
            positives.sum(), 1)
        assert f(loss(t, p)) == pytest.approx(expected, rel=1e-5)
    assert L.boundary_losses(L.build_losses(LossConfig())[0]["mask"]) == []


# Per-class OHEM, written from its description: each truth class keeps its
# max(ceil(ratio n_c), min(n_pos, n_neg)) hardest pixels (at most n_c); mean BCE over all kept.

def np_ohem_per_class(t, p, ratio):
    p = np.clip(p.astype(np.float64), EPS, 1 - EPS).reshape(len(p), -1)
    t = t.reshape(len(t), -1)
    pix = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    values, kept_masks = [], []
    for ti, row in zip(t, pix, strict=True):
        n_pos, n_neg = int(ti.sum()), int((1 - ti).sum())
        kept = np.zeros(len(row), bool)
        for cls, n in ((1, n_pos), (0, n_neg)):
            k = min(n, max(math.ceil(ratio * n), min(n_pos, n_neg)))
            idx = np.flatnonzero(ti == cls)
            kept[idx[np.argsort(-row[idx])[:k]]] = True
        values.append(row[kept].mean())
        kept_masks.append(kept)
    return np.array(values), np.array(kept_masks)


def test_ohem_per_class_hand_worked():
    # T1 = [1 0 0 0], ratio 0.5: min_keep = 1; positives keep 1, negatives max(ceil 1.5, 1) = 2
    # of BCE [-log .8, -log .9, -log .7]: the mean of -log .8 (positive), -log .7, -log .8.
    want = -(math.log(0.8) + math.log(0.7) + math.log(0.8)) / 3
    assert f(L.OHEMBCELoss(ratio=0.5, per_class=True)(T1, P1)) == pytest.approx(want, rel=1e-6)
    # ratio 0.1: negatives keep max(ceil 0.3, 1) = 1, the -log .7 one
    want = -(math.log(0.8) + math.log(0.7)) / 2
    assert f(L.OHEMBCELoss(ratio=0.1, per_class=True)(T1, P1)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_ohem_per_class_and_rescaled_against_numpy(ratio):
    t, p = random_batch(32, batch=4, size=12)   # image 1 is empty: plain OHEM there
    t[3, :, :6] = 1                             # image 3: positives are the majority
    want, kept = np_ohem_per_class(t, p, ratio)
    np.testing.assert_allclose(f(L.OHEMBCELoss(ratio, per_class=True).call(t, p)), want, rtol=1e-5)
    np.testing.assert_allclose(want[1], np_ohem(t[1:2], p[1:2], ratio)[0], rtol=1e-12)
    # rescaled: the plain BCE's value; the gradient w.r.t. the logits is (bce / ohem) times
    # OHEM's: (sigmoid(z) - t) / kept on the kept pixels, 0 on the others
    z = tf.Variable(np_logit(p).astype(np.float32))
    for per_class in (True, False):
        loss = L.OHEMBCELoss(ratio, per_class=per_class, rescale=True, from_logits=True)
        with tf.GradientTape() as tape:
            value = loss.call(t, z)
            total = tf.reduce_sum(value)
        np.testing.assert_allclose(f(value), np_bce(t, p), rtol=1e-5)
        if per_class:
            ohem, keep = want, kept
        else:
            ohem = np_ohem(t, p, ratio)
            k = L.ohem_k(t[0].size, ratio)
            pix = -np.log(np.where(t == 1, p, 1 - p).reshape(len(t), -1).astype(np.float64))
            keep = np.zeros_like(pix, bool)
            np.put_along_axis(keep, np.argsort(-pix, axis=1)[:, :k], True, axis=1)
        q = 1 / (1 + np.exp(-np_logit(p).reshape(len(t), -1)))
        grad = np.where(keep, (q - t.reshape(len(t), -1)) / keep.sum(1, keepdims=True), 0.0)
        grad *= (np_bce(t, p) / ohem)[:, None]
        np.testing.assert_allclose(tape.gradient(total, z).numpy().reshape(len(t), -1), grad,
                                   rtol=1e-4, atol=1e-9)
    # from the config keys; a rescaled ohem stays finite on a perfect prediction
    built = mask_loss("ohem_bce", ohem_ratio=ratio, ohem_per_class=True, mask_positives_only=False)
    np.testing.assert_allclose(f(built.call(t, p)), want, rtol=1e-5)
    assert f(L.OHEMBCELoss(rescale=True, per_class=True)(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_ohem_variants_trace_under_xla_and_dynamic_shapes_and_round_trip():
    t, p = random_batch(34, batch=3, size=10)
    spec = tf.TensorSpec((None, None, None, 1), tf.float32)
    for loss in (L.OHEMBCELoss(0.2, per_class=True), L.OHEMBCELoss(0.2, rescale=True),
                 L.OHEMBCELoss(0.2, per_class=True, rescale=True, from_logits=True)):
        probs = np_logit(p).astype(np.float32) if loss.from_logits else p
        eager = f(loss.call(t, probs))
        fns = [tf.function(loss.call, input_signature=[spec, spec])]
        if loss.per_class and loss.rescale:  # XLA once: each compile costs ~1 s here
            fns.append(tf.function(loss.call, jit_compile=True))
        for fn in fns:
            np.testing.assert_allclose(f(fn(t, probs)), eager, rtol=1e-5)
        restored = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(loss), safe_mode=True)
        assert (restored.per_class, restored.rescale) == (loss.per_class, loss.rescale)
        np.testing.assert_allclose(f(restored.call(t, probs)), eager, rtol=1e-6)


def test_reduce_mean_is_the_sum_over_the_number_of_terms():
    t, p = random_batch(33)
    for extra, n in (({}, 3), ({"combo_lovasz": 0.5}, 4), ({"combo_focal": 0.0}, 2)):
        cfg = dict(mask_positives_only=False, **extra)
        total = f(mask_loss("combo", **cfg).call(t, p))
        mean = f(mask_loss("combo", **cfg, reduce="mean").call(t, p))
        np.testing.assert_allclose(mean, total / n, rtol=1e-6)
    np.testing.assert_allclose(f(mask_loss("combo", reduce="mean", mask_positives_only=False)
                                 .call(t, p)), np_combo(t, p) / 3, rtol=1e-5)
    # BCE and Dice only (the seed's case): their plain mean
    cfg = dict(combo_bce=1, combo_dice=1, combo_focal=0, mask_positives_only=False)
    np.testing.assert_allclose(f(mask_loss("combo", **cfg, reduce="mean").call(t, p)),
                               (np_bce(t, p) + np_dice_loss(t, p)) / 2, rtol=1e-5)


@pytest.mark.parametrize("override, key", [
    ("loss.reduce=max", "loss.reduce"),
    ("loss.boundary_weight=-0.1", "loss.boundary_weight"),
    ("loss.boundary_weight=.nan", "loss.boundary_weight"),
    ("loss.ohem_per_class=1", "loss.ohem_per_class"),
    ("loss.ohem_per_class=true", "loss.ohem_per_class"),  # mask is combo: it would do nothing
    ("loss.ohem_rescale=true", "loss.ohem_rescale"),
])
def test_variant_loss_keys_are_validated(override, key):
    from tfpneumo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"^config key {key.replace('.', '[.]')}: ") as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)
    cfg = load_config(None, ["loss.mask=ohem_bce", "loss.ohem_per_class=true",
                             "loss.ohem_rescale=true", "loss.reduce=mean",
                             "loss.boundary_weight=0.01"]).loss
    assert (cfg.ohem_per_class, cfg.ohem_rescale, cfg.reduce, cfg.boundary_weight) == (
        True, True, "mean", 0.01)
