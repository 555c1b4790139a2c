"""Weight averaging: stochastic weight averaging (SWA), BatchNorm re-estimation, and
top-k checkpoint averaging.

Weights are handled as ``model.get_weights()`` lists (host numpy arrays, in the model's
fixed variable order, BatchNorm moving statistics included). Means are accumulated in
float64 and cast back to each weight's dtype; non-float weights (counters) are not
averaged, the last value is kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import keras
import numpy as np

from tfpneumo.errors import TfpneumoError, first_line
from tfpneumo.files import write_npz


class SWAError(TfpneumoError):
    """An SWA state file or checkpoint does not fit the model."""


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def average_weights(weight_lists: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Element-wise mean of several weight lists (e.g. ``model.get_weights()`` of checkpoints).

    Args:
        weight_lists: K lists, each of the same length with arrays of matching shapes.
    Returns:
        One list: float weights averaged in float64 and cast back to the first list's dtype;
        non-float weights taken from the last list.
    """
    if not weight_lists:
        raise ValueError("average_weights needs at least one weight list")
    first = weight_lists[0]
    for k, weights in enumerate(weight_lists):
        if len(weights) != len(first):
            raise ValueError(f"weight list {k} has {len(weights)} arrays, list 0 has {len(first)}")
        for j, (w, w0) in enumerate(zip(weights, first, strict=True)):
            if np.shape(w) != np.shape(w0):
                raise ValueError(f"weight {j} of list {k} has shape {np.shape(w)}, "
                                 f"list 0 has {np.shape(w0)}")
    out = []
    for j, w0 in enumerate(first):
        dtype = np.asarray(w0).dtype
        if not _is_float(dtype):
            out.append(np.array(weight_lists[-1][j], dtype=dtype))
            continue
        total = np.zeros(np.shape(w0), dtype=np.float64)
        for weights in weight_lists:
            total += np.asarray(weights[j], dtype=np.float64)
        out.append((total / len(weight_lists)).astype(dtype))
    return out


class SWA(keras.callbacks.Callback):
    """Stochastic weight averaging (Izmailov et al. 2018) of the weights at epoch ends.

    After every epoch whose 0-based index (Keras' ``epoch`` argument, the same numbering as
    ``fit(initial_epoch=...)``) is ``>= start_epoch``, the running mean
    ``mean += (w - mean) / n`` of ``model.get_weights()`` is updated in float64 on the host.
    The mean is only kept: call :meth:`averaged_weights` then :func:`apply_swa` at the end.

    With ``filepath``, the state (n, mean, last epoch averaged) is written there atomically
    after each averaged epoch and read back at the start of ``fit`` if the file exists, so a
    resumed training continues the average. An epoch already averaged (index <= the last
    one in the state) is not counted twice.
    """

    def __init__(self, start_epoch: int, filepath: str | os.PathLike | None = None):
        super().__init__()
        if start_epoch < 0:
            raise ValueError(f"SWA start_epoch must be >= 0, got {start_epoch}")
        self.start_epoch = int(start_epoch)
        self.filepath = Path(filepath) if filepath is not None else None
        self.n = 0
        self.last_epoch = -1
        self._mean: list[np.ndarray] | None = None
        self._dtypes: list[np.dtype] | None = None

    # -- averaging
    def update(self, weights: Sequence[np.ndarray], epoch: int) -> None:
        """Adds one weight list (``model.get_weights()`` order) to the running mean."""
        if self._mean is None:
            self._dtypes = [np.asarray(w).dtype for w in weights]
            self._mean = [np.zeros(np.shape(w), np.float64 if _is_float(d) else d)
                          for w, d in zip(weights, self._dtypes, strict=True)]
        self._check_fits(weights, "model weights")
        self.n += 1
        for j, w in enumerate(weights):
            if _is_float(self._dtypes[j]):
                self._mean[j] += (np.asarray(w, np.float64) - self._mean[j]) / self.n
            else:
                self._mean[j] = np.array(w, dtype=self._dtypes[j])  # counters: keep the last
        self.last_epoch = int(epoch)

    def averaged_weights(self) -> list[np.ndarray]:
        """The running mean, each array cast to its weight's dtype (``set_weights`` order)."""
        if self._mean is None or self.n == 0:
            raise SWAError(f"SWA has averaged no epoch yet (start_epoch={self.start_epoch}, "
                           "0-based): train past it first")
        return [m.astype(d) for m, d in zip(self._mean, self._dtypes, strict=True)]

    def _check_fits(self, weights: Sequence[np.ndarray], what: str) -> None:
        shapes = [tuple(np.shape(w)) for w in weights]
        mine = [m.shape for m in self._mean]
        if shapes != mine:
            raise SWAError(f"{what} do not fit the SWA average ({len(shapes)} arrays vs "
                           f"{len(mine)}, or different shapes)")

    # -- state
    def save_state(self, path: str | os.PathLike) -> None:
        """Writes n, last epoch, the mean (float64; counters as they are) and the weights'
        dtypes to an ``.npz``, atomically (a temporary file, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "n": np.array(self.n, np.int64),
            "last_epoch": np.array(self.last_epoch, np.int64),
            "start_epoch": np.array(self.start_epoch, np.int64),
        }
        if self._mean is not None:
            arrays["dtypes"] = np.array([d.str for d in self._dtypes])
            arrays.update({f"mean_{j:05d}": m for j, m in enumerate(self._mean)})
        write_npz(path, **arrays)

    def load_state(self, path: str | os.PathLike) -> None:
        """Reads a state written by :meth:`save_state` (replaces the current one)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                n, last = int(z["n"]), int(z["last_epoch"])
                if "dtypes" in z.files:
                    dtypes = [np.dtype(s) for s in z["dtypes"]]
                    mean = [z[f"mean_{j:05d}"] for j in range(len(dtypes))]
                else:
                    dtypes, mean = None, None
        except (OSError, KeyError, ValueError) as e:
            raise SWAError(f"{path}: not a readable SWA state ({first_line(e)})") from e
        if self.model is not None and mean is not None:
            shapes = [tuple(np.shape(w)) for w in self.model.weights]
            if shapes != [m.shape for m in mean]:
                raise SWAError(f"{path}: SWA state of {len(mean)} arrays does not fit the "
                               f"model's {len(shapes)} weights")
        self.n, self.last_epoch, self._mean, self._dtypes = n, last, mean, dtypes

    # -- keras hooks
    def on_train_begin(self, logs=None) -> None:
        if self.filepath is not None and self.filepath.exists():
            self.load_state(self.filepath)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if epoch < self.start_epoch or epoch <= self.last_epoch:
            return
        self.update(self.model.get_weights(), epoch)
        if self.filepath is not None:
            self.save_state(self.filepath)


def _batchnorm_layers(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization in ``model``, nested models and sub-layers included, once."""
    seen, out = set(), []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization) and id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def _inputs_of(batch):
    """x of a batch: ``(x, y[, w])`` -> x; ``{"image": ..., ...}`` (the eval pipeline's
    layout) -> the image; any other dict or a bare tensor is taken as the model's inputs."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"]
    return batch


def _is_infinite(dataset) -> bool:
    """True for a ``tf.data.Dataset`` known to repeat forever (e.g. the train pipeline)."""
    cardinality = getattr(dataset, "cardinality", None)
    if cardinality is None:
        return False
    try:
        return int(cardinality()) == -1  # tf.data.INFINITE_CARDINALITY
    except (TypeError, ValueError):
        return False


def recompute_batchnorm(model: keras.Model, dataset: Iterable, steps: int | None = None,
                        include_frozen: bool = False) -> int:
    """Re-estimates BatchNorm moving statistics as exact averages over training batches.

    The equivalent of PyTorch's ``torch.optim.swa_utils.update_bn``: moving_mean is reset
    to 0 and moving_variance to 1, then batch ``n`` (0-based) is run through the model
    eagerly in training mode with every BatchNorm's momentum set to ``n / (n + 1)``, so
    Keras' update ``moving = moving * momentum + batch * (1 - momentum)`` leaves the plain
    mean of the per-batch means and (biased) variances. Momentum and trainable flags are
    restored afterwards. Other training-mode layers (Dropout) behave as in training.

    Frozen BatchNorms (``trainable=False``) run in inference mode in Keras and were never
    updated by training, so by default they are left alone; ``include_frozen=True``
    unfreezes them for the pass.

    Args:
        model: the model, already holding the averaged weights.
        dataset: an iterable of batches: ``(x, y[, w])`` tuples (train pipeline), dicts with
            an ``"image"`` key (eval pipeline), dicts of model inputs, or x alone.
        steps: number of batches to use; None = the whole dataset (must be finite).
    Returns:
        The number of batches used.
    """
    if steps is None and _is_infinite(dataset):
        raise ValueError("recompute_batchnorm: the dataset repeats forever, give steps")
    layers = [bn for bn in _batchnorm_layers(model) if include_frozen or bn.trainable]
    if not layers:
        return 0
    saved = [(bn.momentum, bn.trainable) for bn in layers]
    for bn in layers:
        if bn.renorm:
            raise SWAError(f"recompute_batchnorm: layer {bn.name} uses batch renormalization, "
                           "which is not supported")
    for bn in layers:
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape, bn.moving_mean.dtype))
        bn.moving_variance.assign(np.ones(bn.moving_variance.shape, bn.moving_variance.dtype))
        bn.trainable = True
    n = 0
    try:
        for batch in dataset:
            if steps is not None and n >= steps:
                break
            for bn in layers:
                bn.momentum = n / (n + 1.0)
            model(_inputs_of(batch), training=True)  # eager: momentum is read at call time
            n += 1
    finally:
        for bn, (momentum, trainable) in zip(layers, saved, strict=True):
            bn.momentum = momentum
            bn.trainable = trainable
    if n == 0:
        raise SWAError("recompute_batchnorm: the dataset yielded no batch")
    return n


def apply_swa(model: keras.Model, averaged: Sequence[np.ndarray], bn_dataset: Iterable | None,
              bn_steps: int | None) -> None:
    """Loads averaged weights into ``model`` and, given a dataset, re-estimates BatchNorm."""
    model.set_weights(list(averaged))
    if bn_dataset is not None:
        recompute_batchnorm(model, bn_dataset, bn_steps)


def average_checkpoints(model: keras.Model, paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """Top-k checkpoint averaging: loads each ``.weights.h5`` into ``model``, averages them,
    leaves the average in ``model`` and returns it (``get_weights`` order)."""
    if not paths:
        raise SWAError("average_checkpoints: no checkpoint given")
    collected = []
    for path in paths:
        if not Path(path).is_file():
            raise SWAError(f"{path}: checkpoint not found")
        try:
            model.load_weights(str(path))
        except (OSError, ValueError) as e:
            raise SWAError(f"{path}: cannot load into the model ({first_line(e)})") from e
        collected.append(model.get_weights())
    averaged = average_weights(collected)
    model.set_weights(averaged)
    return averaged
