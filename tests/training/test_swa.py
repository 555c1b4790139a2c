"""Weight averaging: average_weights, the SWA callback and its state, BatchNorm
re-estimation, checkpoint averaging. Tiny 8x8 models, a few epochs."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from tfpneumo.training.swa import (  # noqa: E402
    SWA,
    SWAError,
    apply_swa,
    average_checkpoints,
    average_weights,
    recompute_batchnorm,
)


def tiny_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    out = keras.layers.Conv2D(1, 1, activation="sigmoid")(x)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    return model


def tiny_data(n: int = 16, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    y = (rng.random((n, 8, 8, 1)) > 0.7).astype(np.float32)
    return x, y


def capture(model, into: list):
    return keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: into.append((epoch, model.get_weights())))


def manual_mean(lists):
    return [np.mean(np.stack([np.asarray(w, np.float64) for w in ws]), axis=0)
            for ws in zip(*lists, strict=True)]


# ----------------------------------------------------------------------------- average_weights

def test_average_weights_hand_worked():
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.5]], np.float16), np.array(5, np.int64)]
    b = [np.array([3.0, 6.0], np.float32), np.array([[1.5]], np.float16), np.array(7, np.int64)]
    c = [np.array([2.0, 1.0], np.float32), np.array([[2.5]], np.float16), np.array(9, np.int64)]
    out = average_weights([a, b, c])
    np.testing.assert_array_equal(out[0], [2.0, 3.0])
    np.testing.assert_array_equal(out[1], [[1.5]])
    assert out[0].dtype == np.float32 and out[1].dtype == np.float16
    assert out[2] == 9 and out[2].dtype == np.int64  # counters: the last, not the mean
    # float64 accumulation: float32 values whose float32 sum would lose the small parts
    big = [[np.array([1e8 + 2.0], np.float32)], [np.array([1e8 + 4.0], np.float32)]]
    assert average_weights(big)[0][0] == np.float32(1e8 + 3.0)
    with pytest.raises(ValueError):
        average_weights([a, b[:2]])
    with pytest.raises(ValueError):
        average_weights([])


# ----------------------------------------------------------------------------- SWA callback

def test_swa_callback_equals_mean_of_epoch_end_weights():
    model = tiny_model()
    x, y = tiny_data()
    seen: list = []
    swa = SWA(start_epoch=2)
    model.fit(x, y, batch_size=4, epochs=5, verbose=0, shuffle=False,
              callbacks=[swa, capture(model, seen)])
    assert swa.n == 3 and swa.last_epoch == 4
    want = manual_mean([w for epoch, w in seen if epoch >= 2])
    got = swa.averaged_weights()
    for g, wnt, cur in zip(got, want, model.get_weights(), strict=True):
        assert g.dtype == cur.dtype
        np.testing.assert_allclose(g, wnt, rtol=1e-6, atol=1e-7)
    # the average is not the last weights (training moved them)
    assert not np.allclose(got[0], seen[-1][1][0])


def test_swa_averages_nothing_before_start_epoch():
    model = tiny_model()
    x, y = tiny_data(8)
    swa = SWA(start_epoch=3)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[swa])
    assert swa.n == 0
    with pytest.raises(SWAError, match="no epoch"):
        swa.averaged_weights()


def test_swa_state_resume_gives_same_average_as_one_run(tmp_path):
    x, y = tiny_data()
    # one uninterrupted run
    ref_model = tiny_model(seed=3)
    ref = SWA(start_epoch=1)
    ref_model.fit(x, y, batch_size=4, epochs=4, verbose=0, shuffle=False, callbacks=[ref])

    # the same run split in two fits; the second SWA is a new object reading the state file
    state = tmp_path / "swa_state.npz"
    model = tiny_model(seed=3)
    seen: list = []
    first = SWA(start_epoch=1, filepath=state)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False,
              callbacks=[first, capture(model, seen)])
    assert state.exists() and first.n == 1
    assert not list(tmp_path.glob("*.tmp"))
    second = SWA(start_epoch=1, filepath=state)
    model.fit(x, y, batch_size=4, epochs=4, initial_epoch=2, verbose=0, shuffle=False,
              callbacks=[second, capture(model, seen)])
    assert second.n == 3 and [e for e, _ in seen] == [0, 1, 2, 3]

    want = manual_mean([w for epoch, w in seen if epoch >= 1])
    for g, wnt, r in zip(second.averaged_weights(), want, ref.averaged_weights(), strict=True):
        np.testing.assert_allclose(g, wnt, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)  # CPU runs are deterministic

    # save_state / load_state directly round-trip n, epoch and the float64 mean
    other = SWA(start_epoch=1)
    other.load_state(state)
    assert (other.n, other.last_epoch) == (3, 3)
    for a, b in zip(other.averaged_weights(), second.averaged_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_swa_does_not_count_an_epoch_twice():
    swa = SWA(start_epoch=0)
    w1 = [np.array([1.0, 1.0], np.float32)]
    w2 = [np.array([3.0, 5.0], np.float32)]
    swa.update(w1, epoch=0)
    swa.update(w2, epoch=1)
    swa.set_model(type("M", (), {"get_weights": lambda self: [np.array([99.0, 99.0])]})())
    swa.on_epoch_end(1)  # a re-run of epoch 1 after a resume: already in the mean
    swa.on_epoch_end(0)
    np.testing.assert_array_equal(swa.averaged_weights()[0], [2.0, 3.0])
    assert swa.n == 2


def test_swa_state_mismatch_and_bad_file(tmp_path):
    swa = SWA(start_epoch=0)
    swa.update([np.zeros((2, 2), np.float32)], epoch=0)
    path = tmp_path / "s.npz"
    swa.save_state(path)
    model = tiny_model()
    cb = SWA(start_epoch=0)
    cb.set_model(model)
    with pytest.raises(SWAError, match="does not fit"):
        cb.load_state(path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SWAError, match="bad.npz"):
        SWA(0).load_state(bad)


# ----------------------------------------------------------------------------- BatchNorm

def bn_batches(steps: int, batch: int = 8, seed: int = 2) -> list[np.ndarray]:
    """Batches with different per-channel means and scales, so averages are informative."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(batch, 4, 4, 3)) * rng.uniform(0.5, 3.0, 3)
             + rng.normal(0, 2, 3)).astype(np.float32) for _ in range(steps)]


def test_recompute_batchnorm_equals_mean_of_batch_statistics(tf):
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 4, 3))
    bn = keras.layers.BatchNormalization(momentum=0.9, name="bn_top")
    # a nested sub-model holding a second BN right after the first one's input path
    nested = keras.Sequential([keras.Input((4, 4, 3)),
                               keras.layers.BatchNormalization(momentum=0.8, name="bn_nested")])
    frozen = keras.layers.BatchNormalization(name="bn_frozen")
    a = bn(inp)
    b = nested(inp)
    c = frozen(inp)
    out = keras.layers.Concatenate()([a, b, c])
    model = keras.Model(inp, keras.layers.Conv2D(1, 1)(keras.layers.Dropout(0.5)(out)))
    frozen.trainable = False
    frozen.moving_mean.assign(np.full(3, 7.0, np.float32))
    bn.moving_mean.assign(np.full(3, 5.0, np.float32))  # stale stats, to be replaced

    xs = bn_batches(6)
    ys = [np.zeros((8, 4, 4, 1), np.float32)] * 6
    ds = tf.data.Dataset.from_tensor_slices((np.concatenate(xs), np.concatenate(ys))).batch(8)
    used = recompute_batchnorm(model, ds, steps=4)
    assert used == 4

    # oracle: plain mean over the first 4 batches of each batch's mean and biased variance
    # (Keras BN updates with ops.moments, i.e. np.var with ddof=0)
    want_mean = np.mean([x.mean(axis=(0, 1, 2)) for x in xs[:4]], axis=0)
    want_var = np.mean([x.var(axis=(0, 1, 2)) for x in xs[:4]], axis=0)
    inner = nested.get_layer("bn_nested")
    for layer in (bn, inner):
        np.testing.assert_allclose(layer.moving_mean.numpy(), want_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.moving_variance.numpy(), want_var, rtol=1e-5)
    assert bn.momentum == 0.9 and inner.momentum == 0.8  # restored
    # a frozen BN was not part of training: left untouched and still frozen
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), [7.0, 7.0, 7.0])
    assert frozen.trainable is False and bn.trainable is True

    # include_frozen re-estimates it too, then freezes it again
    recompute_batchnorm(model, [(x, None) for x in xs], steps=None, include_frozen=True)
    want_mean6 = np.mean([x.mean(axis=(0, 1, 2)) for x in xs], axis=0)
    np.testing.assert_allclose(frozen.moving_mean.numpy(), want_mean6, rtol=1e-5, atol=1e-5)
    assert frozen.trainable is False and frozen.momentum == 0.99

    with pytest.raises(SWAError, match="no batch"):
        recompute_batchnorm(model, [], steps=3)
    with pytest.raises(ValueError, match="forever"):
        recompute_batchnorm(model, ds.repeat(), steps=None)

    # the eval pipeline's dict batches: the "image" entry is the input
    recompute_batchnorm(model, [{"image": x, "mask": None} for x in xs[2:5]], steps=None)
    want_mean3 = np.mean([x.mean(axis=(0, 1, 2)) for x in xs[2:5]], axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), want_mean3, rtol=1e-5, atol=1e-5)


def test_apply_swa_loads_weights_then_recomputes_bn():
    model = tiny_model()
    x, _ = tiny_data(16)
    averaged = [w + 1.0 for w in model.get_weights()]
    apply_swa(model, averaged, [x[:8], x[8:]], bn_steps=2)
    bn = next(la for la in model.layers if isinstance(la, keras.layers.BatchNormalization))
    names = [v.path for v in model.weights]
    for v, want, name in zip(model.get_weights(), averaged, names, strict=True):
        if "moving_" not in name:
            np.testing.assert_array_equal(v, want)
    # the BN sees the first conv's output computed with the averaged conv weights
    conv = model.layers[1]
    feats = [np.asarray(conv(xb)) for xb in (x[:8], x[8:])]
    want_mean = np.mean([f.mean(axis=(0, 1, 2)) for f in feats], axis=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), want_mean, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints

def test_average_checkpoints_equals_manual_mean(tmp_path):
    paths, saved = [], []
    for k in range(3):
        m = tiny_model(seed=10 + k)
        rng = np.random.default_rng(k)
        m.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in m.get_weights()])
        p = tmp_path / f"top{k}.weights.h5"
        m.save_weights(p)
        paths.append(str(p))
        saved.append(m.get_weights())
    model = tiny_model(seed=99)
    got = average_checkpoints(model, paths)
    want = manual_mean(saved)
    for g, wnt, cur in zip(got, want, model.get_weights(), strict=True):
        np.testing.assert_allclose(g, wnt, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(cur, g)  # left in the model
    with pytest.raises(SWAError, match="missing.weights.h5"):
        average_checkpoints(model, [paths[0], str(tmp_path / "missing.weights.h5")])
    with pytest.raises(SWAError, match="no checkpoint"):
        average_checkpoints(model, [])
