"""Training callbacks: resumable state, top-k checkpoints, history, NaN guard, TensorBoard extras."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import keras
import numpy as np

from tfpneumo import compat, runs
from tfpneumo.errors import TfpneumoError
from tfpneumo.files import atomic_path, write_bytes, write_json, write_npz


class NaNLossError(TfpneumoError):
    """Training produced a NaN or infinite loss."""


def score_from_logs(logs: dict, thresholds) -> float:
    """The validation metric that ranks checkpoints: the best mean Dice over the thresholds,
    of the mask alone (small masks count as empty) or gated by the classification head."""
    values = [logs.get(f"val_{kind}_dice@{t:g}") for t in thresholds
              for kind in ("mask", "gated")]
    values = [float(v) for v in values if v is not None]
    if not values:
        raise KeyError("no val_mask_dice@<t> in the epoch logs: validation did not run")
    return max(values)


def write_weights(path: Path, net) -> None:
    """``net.save_weights(path)``, atomically, with the file made in memory first: HDF5
    writing to a full disk crashes the process (:func:`tfpneumo.compat.weights_h5_bytes`).
    Raises OSError naming ``path``."""
    try:
        write_bytes(path, compat.weights_h5_bytes(net))
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


class RunState(keras.callbacks.Callback):
    """Saves everything needed to resume after each completed epoch, atomically.

    ``state/epoch-XXXX.npz`` holds the network weights, the optimizer variables (moments and
    the iteration counter, hence the learning-rate position) and the SWA running mean;
    ``state/state.json`` names it together with the completed epoch, the history rows and the
    top-k checkpoint list, and is replaced last: a kill at any moment leaves the previous
    complete state in place, so at most the running epoch is lost. Also keeps the k best
    checkpoints by validation Dice, ``best.weights.h5``, and ``history.csv``.

    An epoch in which ``guard`` (:class:`NaNGuard`) saw a NaN or infinite loss is not saved.
    """

    def __init__(self, run_dir: Path, thresholds, top_k: int, trainer, swa=None,
                 guard: NaNGuard | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.state_dir = self.run_dir / runs.STATE
        self.ckpt_dir = self.run_dir / runs.CHECKPOINTS
        self.thresholds = tuple(thresholds)
        self.top_k = top_k
        self.trainer = trainer
        self.swa = swa
        self.history: list[dict] = []
        self.top: list[dict] = []  # [{"epoch", "score", "path"}], best first
        self.completed_epochs = 0
        self.resume_step = 0  # steps done in the epoch after the completed ones (preempted)
        self.guard = guard

    # -- persistence ---------------------------------------------------------------------
    def load(self) -> bool:
        """Restores weights, optimizer and bookkeeping from the last complete epoch, if any."""
        meta_path = self.state_dir / "state.json"
        if not meta_path.exists():
            return False
        meta = json.loads(meta_path.read_text())
        with np.load(self.state_dir / meta["arrays"]) as arrays:
            n_net = int(arrays["n_net"])
            n_opt = int(arrays["n_opt"])
            self.trainer.net.set_weights([arrays[f"net_{i}"] for i in range(n_net)])
            optimizer = self.trainer.optimizer
            if not optimizer.built:
                optimizer.build(self.trainer.trainable_variables)
            if len(optimizer.variables) != n_opt:
                raise TfpneumoError(f"{meta_path}: optimizer state does not match this model "
                                    "(was the config changed?); delete the run folder to restart")
            for var, i in zip(optimizer.variables, range(n_opt), strict=True):
                var.assign(arrays[f"opt_{i}"])
        if self.swa is not None and meta.get("swa"):
            self.swa.load_state(self.state_dir / meta["swa"])
        self.completed_epochs = meta["completed_epochs"]
        self.history = meta["history"]
        self.top = meta["top"]
        self.resume_step = int(meta.get("steps_into_epoch", 0))
        return True

    def save_preempted(self, steps: int) -> None:
        """Saves the state ``steps`` steps into the epoch after the completed ones (a SIGTERM
        stopped it there); :meth:`load` then gives ``resume_step``."""
        self._save(self.completed_epochs - 1, steps_into_next=steps)

    def _save(self, epoch: int, steps_into_next: int = 0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        net_w = self.trainer.net.get_weights()
        opt_w = [keras.ops.convert_to_numpy(v) for v in self.trainer.optimizer.variables]
        arrays = {f"net_{i}": w for i, w in enumerate(net_w)}
        arrays.update({f"opt_{i}": w for i, w in enumerate(opt_w)})
        arrays.update(n_net=len(net_w), n_opt=len(opt_w))
        tag = f"{epoch + 1:04d}" + (f"-step-{steps_into_next:06d}" if steps_into_next else "")
        name = f"epoch-{tag}.npz"
        write_npz(self.state_dir / name, **arrays)
        swa_name = None
        if self.swa is not None and self.swa.n > 0:
            swa_name = f"swa-{tag}.npz"
            self.swa.save_state(self.state_dir / swa_name)
        meta = {"completed_epochs": epoch + 1, "arrays": name, "swa": swa_name,
                "history": self.history, "top": self.top}
        if steps_into_next:
            meta["steps_into_epoch"] = steps_into_next
        write_json(self.state_dir / "state.json", meta)
        for old in [*self.state_dir.glob("epoch-*.npz"), *self.state_dir.glob("swa-*.npz")]:
            if old.name not in (name, swa_name):
                old.unlink(missing_ok=True)

    def _write_history(self) -> None:
        if not self.history:
            return
        keys = ["epoch"] + sorted({k for row in self.history for k in row} - {"epoch"})
        with atomic_path(self.run_dir / runs.HISTORY) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)

    # -- keras hooks ---------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if self.guard is not None and self.guard.nan_at is not None:
            return
        score = score_from_logs(logs, self.thresholds)
        row = {"epoch": epoch + 1, "val_dice": score}
        row.update({k: float(v) for k, v in logs.items()})
        self.history = [r for r in self.history if r["epoch"] <= epoch] + [row]
        self._update_top_k(epoch, score)
        self._save(epoch)
        self._write_history()
        self.completed_epochs = epoch + 1

    def _update_top_k(self, epoch: int, score: float) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        entries = self.top + [{"epoch": epoch + 1, "score": score, "path": None}]
        entries.sort(key=lambda e: (-e["score"], e["epoch"]))
        keep = entries[: self.top_k]
        mine = next((e for e in keep if e["epoch"] == epoch + 1), None)
        if mine is not None:
            path = self.ckpt_dir / f"epoch{epoch + 1:03d}-dice{score:.4f}.weights.h5"
            write_weights(path, self.trainer.net)
            mine["path"] = path.name
        for gone in entries[self.top_k:]:
            if gone["path"]:
                (self.ckpt_dir / gone["path"]).unlink(missing_ok=True)
        self.top = keep
        best = self.ckpt_dir / keep[0]["path"]
        write_bytes(self.run_dir / runs.BEST_WEIGHTS, best.read_bytes())


class NaNGuard(keras.callbacks.Callback):
    """Stops training at a NaN or infinite loss (a step's, or an epoch's loss logs).

    Every worker of a multi-worker run has one: the logs are all-reduced, so all of them stop
    at the same step, as the collective ops of the next step would otherwise wait forever.
    ``nan_at``: (epoch, batch) of the first bad loss, batch -1 for an epoch's logs.
    """

    def __init__(self):
        super().__init__()
        self.nan_at: tuple[int, int] | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.nan_at is None:
            self.nan_at = (self._epoch, batch)
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_at is None and not all(
                math.isfinite(float(v)) for k, v in (logs or {}).items() if "loss" in k):
            self.nan_at = (epoch, -1)
            self.model.stop_training = True


class BoundaryRamp(keras.callbacks.Callback):
    """Sets the boundary loss terms' share for each epoch (:func:`losses.boundary_ramp`); on
    every worker, as each computes its own loss."""

    def __init__(self, boundary_losses, ramp_epochs: int):
        super().__init__()
        self.boundary_losses, self.ramp_epochs = list(boundary_losses), ramp_epochs

    def on_epoch_begin(self, epoch, logs=None):
        from tfpneumo.training.losses import boundary_ramp

        for loss in self.boundary_losses:
            loss.ramp.assign(boundary_ramp(epoch, self.ramp_epochs))


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the learning rate at the end of each epoch to the logs (for TensorBoard and CSV)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            from tfpneumo.training.trainer import learning_rate

            logs["lr"] = learning_rate(self.model.optimizer)


class ImagePanels(keras.callbacks.Callback):
    """Writes panels of X-ray | truth | prediction for a few validation images to TensorBoard."""

    def __init__(self, log_dir: Path, images: np.ndarray, masks: np.ndarray):
        super().__init__()
        self.log_dir = str(log_dir)
        self.images = images  # (N, H, W, 1) grey pixels 0..255, what the model takes
        self.masks = masks  # (N, H, W, 1) float32
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        if len(self.images) == 0:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        # The network called directly, not predict(): under a multi-worker strategy only the
        # chief has this callback, and predict's collectives would wait for the others.
        pred = np.concatenate([keras.ops.convert_to_numpy(
            self.model.net(self.images[i:i + 4], training=False)["mask"])
            for i in range(0, len(self.images), 4)])
        xray = np.asarray(self.images, np.float32) / 255.0
        panel = np.concatenate([xray, self.masks, np.asarray(pred, np.float32)], axis=2)
        with self._writer.as_default():
            tf.summary.image("validation/xray_truth_prediction", panel, step=epoch + 1,
                             max_outputs=len(panel))
        self._writer.flush()
