"""Upstream behaviour that tfpneumo.compat works around or relies on.

Each test fails once upstream changes: a bug test fails when the bug is fixed (then remove
the workaround named in its message); a private-API test fails when the API is gone.
The two-replica cases are ``test_upstream_*`` in tests/training/test_trainer.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import tfpneumo  # noqa: F401  (sets SM_FRAMEWORK before segmentation_models is imported)


def test_upstream_bilinear_upsampling_still_fails_on_symbolic_sizes(tf):
    """keras-team/keras PR #22079. When this fails, use keras.layers.UpSampling2D(2,
    interpolation="bilinear") in models/unet.py and drop compat.BilinearUpSampling2D (keep it
    registered for old .keras files)."""
    import keras

    layer = keras.layers.UpSampling2D(2, interpolation="bilinear")

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
    def upsample(x):
        return layer(x)

    with pytest.raises(Exception):  # noqa: B017 - any error: the bug is that it cannot trace
        upsample(tf.zeros([1, 4, 4, 3]))


def test_bilinear_upsampling_matches_keras_on_known_sizes(tf):
    """The workaround computes what Keras computes where Keras works."""
    import keras

    from tfpneumo.compat import BilinearUpSampling2D

    x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
    ours = BilinearUpSampling2D(2)(x)
    theirs = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)


def test_private_apis_are_still_there(tf):
    import keras
    import segmentation_models as sm

    from tfpneumo import compat

    for name in compat.OPTIMIZER_PRIVATE_METHODS:
        assert callable(getattr(keras.optimizers.Optimizer, name, None)) or callable(
            getattr(keras.optimizers.AdamW, name, None)), name
    assert callable(tf.__internal__.distribute.interim.maybe_merge_call)
    assert float(compat.unscale_loss_for_distribution(tf.constant(2.0))) == 2.0  # no strategy
    assert compat.keras_home().name  # a folder, ~/.keras unless KERAS_HOME says otherwise
    assert set(compat.sm_keras_modules(sm)) == {"backend", "layers", "models", "utils"}
    assert callable(getattr(keras.Model, "_symbolic_build", None))


def test_symbolic_build_makes_the_compiled_metric_variables(tf):
    """What the training loop needs before strategy.run: the loss and metric state built."""
    import keras
    import numpy as np

    from tfpneumo import compat

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs))
    model.compile(optimizer="sgd", loss="mse", metrics=[keras.metrics.MeanAbsoluteError()])
    assert [v.name for v in model.metrics_variables] == ["total", "count"]  # the loss tracker's
    compat.symbolic_build(model, (np.zeros((2, 4), np.float32), np.zeros((2, 1), np.float32)))
    assert [v.name for v in model.metrics_variables].count("total") == 2  # + the metric's


def _two_output_net(keras):
    """Zero weights: both outputs are 0.5 everywhere, whatever the image."""
    x = keras.Input((4, 4, 1), name="image")
    mask = keras.layers.Conv2D(1, 1, kernel_initializer="zeros")(x)
    label = keras.layers.Dense(1, kernel_initializer="zeros")(
        keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(x, {"mask": keras.layers.Activation("sigmoid", name="mask")(mask),
                           "label": keras.layers.Activation("sigmoid", name="label")(label)})


def _batches_of_one_then_three(tf):
    """Image 0 with targets 0.5 (squared error 0 against 0.5), images 1-3 with targets 1
    (0.25 each): 0.1875 a image, but 0.125 averaged over the two batches."""
    x = np.zeros((4, 4, 4, 1), np.float32)
    mask = np.concatenate([np.full((1, 4, 4, 1), 0.5), np.ones((3, 4, 4, 1))]).astype(np.float32)
    label = np.array([[0.5], [1.0], [1.0], [1.0]], np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, {"mask": mask, "label": label}))
    return ds.take(1).batch(1).concatenate(ds.skip(1).batch(3))


def test_upstream_output_loss_figures_average_batches_not_images(tf, keras):
    """Keras' CompileLoss weights each output's loss figure by the static batch size. When
    this fails (0.1875), drop compat.loss_figures_per_image and its use in Trainer.compute_loss."""
    model = _two_output_net(keras)
    model.compile(optimizer="sgd", loss={"mask": "mse", "label": "mse"})
    got = model.evaluate(_batches_of_one_then_three(tf), return_dict=True, verbose=0)
    assert got["mask_loss"] == pytest.approx(0.125) and got["label_loss"] == pytest.approx(0.125)
    assert got["loss"] == pytest.approx(2 * 0.1875)  # the total's tracker weights by images


def test_loss_figures_per_image_in_the_trainer(tf, keras):
    from tfpneumo.training.trainer import Trainer

    trainer = Trainer(_two_output_net(keras))
    trainer.compile(optimizer="sgd", loss={"mask": "mse", "label": "mse"})
    got = trainer.evaluate(_batches_of_one_then_three(tf), return_dict=True, verbose=0)
    assert got["mask_loss"] == pytest.approx(0.1875) and got["label_loss"] == pytest.approx(0.1875)
    assert got["loss"] == pytest.approx(2 * 0.1875)


def test_register_py_func_makes_a_stable_token_callable(tf):
    from tfpneumo import compat

    def double(x):
        return 2 * x

    compat.register_py_func("tfpneumo_test_double", double)
    out = tf.raw_ops.PyFuncStateless(input=[tf.constant([1, 2])], token="tfpneumo_test_double",
                                     Tout=[tf.int32])
    assert out[0].numpy().tolist() == [2, 4]


def test_service_worker_count_of_a_dispatcher(tf):
    from tfpneumo import compat

    dispatcher = tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(port=0))
    try:
        assert compat.service_worker_count(dispatcher) == 0
    finally:
        dispatcher._stop()


def test_weights_h5_bytes_is_the_file_save_weights_writes(tf, tmp_path):
    """Same HDF5 datasets with the same values as ``save_weights``, and ``load_weights``
    reads it back (private saving_lib API: H5IOStore on a BytesIO, _save_state)."""
    import h5py
    import keras
    import numpy as np

    from tfpneumo import compat

    def tiny():
        inp = keras.Input((8, 8, 1))
        x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(inp))
        return keras.Model(inp, keras.layers.Dense(2)(x))

    keras.utils.set_random_seed(1)
    net = tiny()
    (tmp_path / "mem.weights.h5").write_bytes(compat.weights_h5_bytes(net))
    net.save_weights(tmp_path / "disk.weights.h5")

    def datasets(path):
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.update(
                {name: obj[()]} if isinstance(obj, h5py.Dataset) else {}))
        return found

    mem, disk = datasets(tmp_path / "mem.weights.h5"), datasets(tmp_path / "disk.weights.h5")
    assert sorted(mem) == sorted(disk) and len(mem) == len(net.weights)
    assert all(np.array_equal(mem[k], disk[k]) for k in mem)
    other = tiny()
    other.load_weights(tmp_path / "mem.weights.h5")
    assert all(np.array_equal(a, b) for a, b in zip(other.get_weights(), net.get_weights(), strict=True))


def _two_signatures_of_a_dense_layer(tf):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    net = keras.Model(inputs, keras.layers.Dense(4)(inputs))

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def first(x):
        return {"y": net(x, training=False)}

    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def second(x):
        return {"y": net(x + 1.0, training=False)}

    return net, first, second


def _first_in_litert(tf, functions, trackable):
    from ai_edge_litert.interpreter import Interpreter

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [f.get_concrete_function() for f in functions], trackable)
    runner = Interpreter(model_content=converter.convert()).get_signature_runner("first")
    return runner(x=np.ones((1, 4), np.float32))["y"]


@pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                    reason="ai-edge-litert not installed")
def test_upstream_litert_leaves_keras_variables_of_two_signatures_unset(tf):
    """TensorFlow 2.21's converter, ai-edge-litert 2.3. When this fails (LiteRT computes the
    layer), tfpneumo.inference.export can convert serving[...] as they are and drop
    compat.with_constants."""
    net, first, second = _two_signatures_of_a_dense_layer(tf)
    expected = first(np.ones((1, 4), np.float32))["y"].numpy()
    holder = tf.Module()
    holder.net = net  # tracked, so that the converter can save the functions
    got = _first_in_litert(tf, [first, second], holder)
    assert not np.allclose(got, expected, atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                    reason="ai-edge-litert not installed")
def test_with_constants_gives_litert_the_weights(tf):
    from tfpneumo.compat import with_constants

    net, first, second = _two_signatures_of_a_dense_layer(tf)
    expected = first(np.ones((1, 4), np.float32))["y"].numpy()
    frozen = [with_constants(first), with_constants(second)]
    assert [f.__name__ for f in frozen] == ["first", "second"]
    np.testing.assert_allclose(_first_in_litert(tf, frozen, tf.Module()), expected, atol=1e-6)
