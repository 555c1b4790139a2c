"""Every workaround for an upstream bug and every use of a private API, in one place.

Each entry names the upstream behaviour and has a test in ``tests/test_compat.py`` (or, for
those that need two replicas, ``tests/training/test_trainer.py::test_upstream_*``) that
*fails once upstream changes*: for a bug, the test reproduces it and fails when it is fixed
(remove the workaround then); for a private API, the test checks it is still there.

Pinned to TensorFlow 2.21, Keras 3.15, segmentation-models 1.0.1.

====================================  =========================================================
entry                                 why
====================================  =========================================================
:class:`BilinearUpSampling2D`         Keras 3.15 ``UpSampling2D(interpolation="bilinear")``
                                      fails on symbolic H, W (keras-team/keras PR #22079)
:func:`merge_call`                    private ``tf.__internal__`` merge call: Keras applies
                                      updates through it; our optimizer clips after the
                                      cross-replica sum (Keras clips each replica's part)
:data:`OPTIMIZER_PRIVATE_METHODS`     ``LayerwiseAdamW`` overrides these private methods
:func:`unscale_loss_for_distribution` private ``keras.src.losses.loss`` helper the train
                                      step needs to log the loss like Keras does
:func:`keras_home`                    Keras has no public accessor for its cache folder
:func:`sm_keras_modules`              segmentation-models keeps its Keras modules private
:func:`register_py_func`              TensorFlow names ``tf.numpy_function`` callbacks with a
                                      per-process counter; tf.data service workers need a
                                      stable key
:func:`service_worker_count`          ``DispatchServer`` has no public worker count
:func:`weights_h5_bytes`              ``save_weights`` writes through HDF5, which crashes
                                      (SIGSEGV) closing a file it could not write (full
                                      disk); private ``saving_lib`` makes the bytes in memory
:func:`symbolic_build`                private ``Trainer._symbolic_build``: makes the compiled
                                      loss and metric variables before ``strategy.run`` (our
                                      loop replaces ``fit``, which fails under
                                      MultiWorkerMirroredStrategy, keras-team/keras#20585)
:func:`loss_figures_per_image`        Keras weights each output's loss figure
                                      (``mask_loss``) by the batch's *static* size, None in
                                      a traced step: every batch counts once, whatever its
                                      size (private ``Model._compile_loss``)
:func:`with_constants`                ``TFLiteConverter.from_concrete_functions`` with two or
                                      more signatures leaves Keras 3 variables as resource
                                      variables that LiteRT never sets (garbage or NaN out);
                                      private ``convert_variables_to_constants_v2`` freezes
====================================  =========================================================

Two more live in the train step (``tfpneumo.training.trainer.Trainer``) because they are
the step itself; their upstream tests are ``test_upstream_*`` in tests/training/test_trainer.py:
gradient accumulation inside the step (Keras' ``gradient_accumulation_steps`` fails under
MirroredStrategy: merge_call inside a cond) and ``Trainer._agree_on_finite``
(``LossScaleOptimizer`` decides to skip a step from the first replica's gradients only).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import keras

# The Optimizer methods LayerwiseAdamW overrides or calls; tests/test_compat.py checks that
# keras.optimizers.Optimizer still has each of them.
OPTIMIZER_PRIVATE_METHODS = ("_clip_gradients", "_backend_update_step", "_apply_weight_decay",
                             "_use_weight_decay", "_get_variable_index",
                             "_all_reduce_sum_gradients", "_distributed_tf_update_step")


def symbolic_build(trainer, data_batch) -> None:
    """Builds ``trainer``'s compiled loss and metrics (and any unbuilt layer) from one
    ``(x, y)`` batch of arrays, as ``fit`` does before its first step (shapes only)."""
    trainer._symbolic_build(data_batch=data_batch)


def merge_call(fn, strategy, *args, **kwargs):
    """``tf.__internal__.distribute.interim.maybe_merge_call``: runs ``fn(strategy, *args)``
    in the cross-replica context (directly when there is no strategy)."""
    import tensorflow as tf

    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args, **kwargs)


def unscale_loss_for_distribution(loss):
    """Keras' own undoing of its ``1 / num_replicas`` loss scaling, for the loss tracker."""
    from keras.src.losses import loss as loss_module

    return loss_module.unscale_loss_for_distribution(loss)


_BATCH_ROWS = threading.local()  # per thread: MirroredStrategy traces each replica in its own


@contextlib.contextmanager
def loss_figures_per_image(model, y_true, y_pred, rows):
    """While inside, the compiled loss of ``model`` weights its per-output loss figures
    (``mask_loss``, ``label_loss``) by ``rows``, the batch's images (a tensor), so that they
    are means over images. Keras' ``CompileLoss.call`` passes ``y_pred.shape[0]``, which is
    None when the step was traced for any batch size: then each batch counts once, and a
    partial last validation batch as much as a full one. Builds the compiled loss first
    (from ``y_true`` and ``y_pred``) if it is not built."""
    compiled = model._compile_loss
    if compiled is None:
        yield
        return
    if not compiled.built:
        compiled.build(y_true, y_pred)
    for metric in compiled.metrics:
        if "update_state" not in vars(metric):  # once per metric, for good
            metric.update_state = _weighted_by_batch_rows(metric)
    _BATCH_ROWS.value = rows
    try:
        yield
    finally:
        _BATCH_ROWS.value = None


def _weighted_by_batch_rows(metric):
    def update_state(values, sample_weight=None):
        rows = getattr(_BATCH_ROWS, "value", None)
        return type(metric).update_state(
            metric, values, sample_weight=sample_weight if rows is None else rows)
    return update_state


def keras_home() -> Path:
    """Where ``keras.utils.get_file`` caches downloads: ``$KERAS_HOME`` or ``~/.keras``."""
    from keras.src.backend.config import keras_home as private_keras_home

    return Path(private_keras_home()).expanduser()


def sm_keras_modules(sm) -> dict:
    """The Keras submodules segmentation-models' backbone factory needs passed in."""
    return {"backend": sm._KERAS_BACKEND, "layers": sm._KERAS_LAYERS,
            "models": sm._KERAS_MODELS, "utils": sm._KERAS_UTILS}


def register_py_func(token: str, fn) -> None:
    """Registers ``fn`` as the Python callback of graph ops named ``token``
    (``tf.raw_ops.PyFuncStateless(token=token)``). TensorFlow's registry holds weak references;
    the caller keeps ``fn`` alive."""
    from tensorflow.python.ops import script_ops

    script_ops._py_funcs._funcs[token] = fn


def weights_h5_bytes(model) -> bytes:
    """The ``.weights.h5`` file ``model.save_weights`` writes, made in memory.

    ``keras.src.saving.saving_lib.save_weights_only`` with an ``io.BytesIO`` store: on a full
    disk the plain write of these bytes fails with a clean OSError, where HDF5 writing the file
    itself raises, prints tracebacks from h5py's deallocators, then crashes.
    """
    import io

    from keras.src.saving import saving_lib

    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    try:
        saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="",
                               visited_saveables=set())
    finally:
        store.close()
    return buffer.getvalue()


def with_constants(function):
    """``function`` (a ``tf.function`` with an input signature) with every variable it reads
    made a constant (``tensorflow.python.framework.convert_to_constants``), its outputs
    structured as before and its name kept (``from_concrete_functions`` names a .tflite
    signature after its function)."""
    import functools

    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = function.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete)  # returns flat outputs

    @functools.wraps(function.python_function)  # same name, same argument names
    def call(*args):
        return tf.nest.pack_sequence_as(concrete.structured_outputs, frozen(*args))

    return tf.function(call, input_signature=function.input_signature)


def service_worker_count(dispatcher) -> int:
    """Workers registered with a ``tf.data.experimental.service.DispatchServer``."""
    return dispatcher._num_workers()


@keras.saving.register_keras_serializable(package="tfpneumo")
class BilinearUpSampling2D(keras.layers.Layer):
    """Bilinear upsampling by an integer factor that also works on unknown H and W.

    ``(B, H, W, C) -> (B, size * H, size * W, C)``, same dtype as the input. Same values as
    ``keras.layers.UpSampling2D(size, interpolation="bilinear")`` (``tf.image.resize``,
    half-pixel centres, no antialiasing), which in Keras 3.15 fails when H or W is symbolic
    (a ``predict`` retraced for a second input size, an export with a ``(None, None)``
    signature): ``ops.image.resize`` tests ``size[0] <= 0`` in Python
    (keras-team/keras PR #22079).
    """

    def __init__(self, size: int = 2, **kwargs):
        super().__init__(**kwargs)
        if int(size) != size or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = int(size)

    def call(self, inputs):
        import tensorflow as tf  # the TensorFlow backend is the only one tfpneumo supports

        shape = tf.shape(inputs)
        # Resize in float32: its gradient under XLA rejects a half-precision input mixed with
        # its float32 output ("Seen floating point types of different precisions").
        out = tf.image.resize(tf.cast(inputs, tf.float32),
                              (shape[1] * self.size, shape[2] * self.size), method="bilinear")
        return tf.cast(out, inputs.dtype)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        return (b, None if h is None else h * self.size, None if w is None else w * self.size, c)

    def get_config(self) -> dict:
        return {**super().get_config(), "size": self.size}
