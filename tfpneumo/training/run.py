"""Training folds: every stage of the config, resumable, into the run folder.

The folder layout is :mod:`tfpneumo.runs`. With several ``train.stages`` each stage trains in
``stages/<name>/`` from the previous stage's final weights, and the last stage's artefacts
are also copied to the fold folder.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfpneumo import compat, runs
from tfpneumo.config import Config, dump_config, load_config, to_dict
from tfpneumo.data.manifest import read_cache_info
from tfpneumo.errors import TfpneumoError
from tfpneumo.files import atomic_path, write_json, write_npz
from tfpneumo.tfimport import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from tfpneumo.training.callbacks import (  # noqa: E402
    BoundaryRamp,
    ImagePanels,
    LearningRateLogger,
    NaNGuard,
    NaNLossError,
    RunState,
    write_weights,
)
from tfpneumo.training.trainer import Runtime, Trainer, build_optimizer, resolve_runtime  # noqa: E402

# A run "learned" when its network beats predicting every image empty by this much (Dice).
LEARNED_MARGIN = 0.01


def learning_verdict(best_oof_dice: float, empty: float) -> str | None:
    """None when the run learned, else the plain sentence a user needs (and what to try)."""
    if best_oof_dice >= empty + LEARNED_MARGIN:
        return None
    return (f"did not learn: the best out-of-fold Dice {best_oof_dice:.4f} does not beat "
            f"predicting every image empty ({empty:.4f}) by {LEARNED_MARGIN}; try more steps "
            "(train.epochs, train.steps_per_epoch), a lower optimizer.lr or a longer "
            "optimizer.warmup_epochs, and look at the validation panels in TensorBoard")


@dataclass(frozen=True)
class TrainResult:
    """The ``result.json`` of each trained fold, in fold order; ``as_worker``: the folds this
    process trained as a worker other than the chief (the chief reports them)."""

    folds: list[dict]
    as_worker: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fold {r['fold']}: trained as worker {r['worker']}; the chief (worker 0) "
                 f"wrote {r['run_dir']}" for r in self.as_worker]
        for r in self.folds:
            lines.append(f"fold {r['fold']}: best val Dice {r['best_val_dice']:.4f}, out-of-fold "
                         f"{r.get('best_oof_dice', float('nan')):.4f} ({r.get('oof_model', '?')}; "
                         f"all-empty {r['empty_baseline']:.4f}) -> {r['run_dir']}")
            if r.get("learning_note"):
                lines.append(f"warning: fold {r['fold']} {r['learning_note']}")
        return "\n".join(lines)


def train(cfg: Config, folds: runs.FoldSpec = "all", workdir: Path = Path("."),
          callbacks=()) -> TrainResult:
    """Trains ``folds`` ("all" folds of the cache, or indices) one after another;
    ``callbacks``: Keras callbacks added to every stage's (e.g. a tuner's pruning)."""
    cache = read_cache_info(cfg.data.cache)
    if isinstance(folds, str):
        if folds != "all":
            raise TfpneumoError(f"folds {folds!r}: expected 'all' or fold indices")
        folds = list(range(cache.folds))
    for k in folds:
        cache.check_fold(k)
    from tfpneumo.data.service import input_service

    results = []
    augments = [stage_cfg.augment for _, stage_cfg in cfg.stage_configs()]
    # Once per process: a MultiWorkerMirroredStrategy cannot be made twice.
    runtime = resolve_runtime(cfg.train)
    with input_service(cfg.data.service, augments) as service:
        if service:
            print(f"input: tf.data service {service} ({cfg.data.service})", file=sys.stderr)
        for k in folds:
            results.append(train_fold(cfg, k, workdir, service=service, runtime=runtime,
                                      callbacks=callbacks))
    return TrainResult([r for r in results if "best_val_dice" in r],
                       [r for r in results if "best_val_dice" not in r])


def train_fold(cfg: Config, fold: int, workdir: Path = Path("."), service: str | None = None,
               runtime: Runtime | None = None, callbacks=()) -> dict:
    """Trains one fold through every stage; ``service``: a tf.data service dispatcher address
    (from :func:`tfpneumo.data.service.input_service`) that makes the training batches.

    Of the processes of a multi-worker run only the chief reads and writes the run folder;
    the others train in a temporary folder of their own, removed at the end, and get what
    the chief read (finished or not, the epoch to resume from, the weights) through
    collectives (:mod:`tfpneumo.training.loop`), so the machines need no shared disk."""
    runtime = runtime or resolve_runtime(cfg.train)
    run_dir = runs.fold_dir(cfg.experiment, fold, workdir)
    if not runtime.is_chief:
        return _train_fold_worker(cfg, fold, run_dir, service, runtime, callbacks)
    result_path = run_dir / runs.RESULT
    if _chief_says(runtime, result_path.exists()):
        return json.loads(result_path.read_text())
    # Two runs of one fold would both train and leave a folder mixed from both.
    with runs.locked_folder(run_dir, f"train fold {fold}"):
        if _chief_says(runtime, result_path.exists()):  # the other run finished meanwhile
            return json.loads(result_path.read_text())
        try:
            result = _train_fold_locked(cfg, fold, run_dir, service, runtime, callbacks)
            _chief_says(runtime, True)  # the others wait: a worker leaving early alarms the chief
            return result
        except OSError as e:
            if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            # Each artefact is written through a temporary file: the previous epoch's state
            # and checkpoints are whole, and a rerun resumes from them once there is room.
            raise TfpneumoError(f"{e.filename or run_dir}: cannot write ({os.strerror(e.errno)}); "
                                f"free space and rerun to resume") from None


def _chief_says(runtime: Runtime, fact: bool | int) -> int:
    """The chief's ``fact`` on every worker (a collective; as given with one worker)."""
    from tfpneumo.training.loop import chief_values

    return int(chief_values(runtime.strategy, runtime.workers, [float(fact)])[0])


def _train_fold_worker(cfg: Config, fold: int, run_dir: Path, service: str | None,
                       runtime: Runtime, callbacks=()) -> dict:
    """A worker other than the chief: the same collectives as the chief, in a temporary folder."""
    import tempfile

    if _chief_says(runtime, False) or _chief_says(runtime, False):  # the chief's two checks
        return {"fold": fold, "worker": runtime.worker_index, "run_dir": str(run_dir)}
    with tempfile.TemporaryDirectory(prefix=f"tfpneumo-worker{runtime.worker_index}-") as tmp:
        print(f"fold {fold}: worker {runtime.worker_index} of {runtime.workers}; the chief "
              f"writes {run_dir}, this worker only {tmp} (removed at the end)", file=sys.stderr)
        _train_fold_locked(cfg, fold, Path(tmp), service, runtime, callbacks)
        _chief_says(runtime, True)  # until the chief has written the fold's results
    return {"fold": fold, "worker": runtime.worker_index, "run_dir": str(run_dir)}


def _train_fold_locked(cfg: Config, fold: int, run_dir: Path, service: str | None,
                       runtime: Runtime, callbacks=()) -> dict:
    result_path = run_dir / runs.RESULT
    if runtime.is_chief:
        _check_same_config(cfg, run_dir)
    stages = cfg.stage_configs()
    first_dir = run_dir if len(stages) == 1 else run_dir / runs.STAGES / stages[0][0]
    fresh = not (first_dir / runs.STATE / "state.json").exists() and not (
        first_dir / runs.STAGE_RESULT).exists()
    for i, (_, stage_cfg) in enumerate(stages):
        # Only a fresh first stage loads model.encoder_weights (later ones and a resumed one
        # start from a weights file of the run).
        check_inputs(stage_cfg, runtime, encoder=i == 0 and fresh and runtime.is_chief)
    print(f"fold {fold}: {runtime.describe()}", file=sys.stderr)
    previous: Path | None = None
    result: dict = {}
    for i, (name, stage_cfg) in enumerate(stages):
        stage_dir = run_dir if len(stages) == 1 else run_dir / runs.STAGES / name
        result = train_stage(stage_cfg, fold, stage_dir, runtime, init_weights=previous,
                             service=service, callbacks=callbacks,
                             on_start=lambda: dump_config(cfg, run_dir / runs.CONFIG))
        previous = stage_dir / runs.FINAL_WEIGHTS
        if len(stages) > 1 and i == len(stages) - 1:
            for artefact in runs.FOLD_ARTEFACTS:
                if (stage_dir / artefact).exists():
                    shutil.copy2(stage_dir / artefact, run_dir / artefact)
    if not runtime.is_chief:
        return result
    result = {**result, "run_dir": str(run_dir), "stages": [n for n, _ in stages]}
    write_json(result_path, result)
    return result


def check_inputs(cfg: Config, runtime: Runtime, encoder: bool = True) -> None:
    """The checks of a stage's inputs that are cheap, made before anything is written: a run
    that fails on them leaves no ``config.yaml`` that would refuse the corrected rerun.
    (What only building the network finds, e.g. encoder weights of another encoder, fails
    before the first write too: :func:`train_stage` writes when training starts.)"""
    per_replica = cfg.data.batch_size // runtime.replicas
    if cfg.data.batch_size % runtime.replicas or per_replica % cfg.optimizer.accumulation_steps:
        raise TfpneumoError(
            f"config key data.batch_size: {cfg.data.batch_size} must split evenly over "
            f"{runtime.replicas} replicas and {cfg.optimizer.accumulation_steps} accumulation steps")
    weights = cfg.model.encoder_weights if encoder else "none"
    if weights.lower() == "imagenet":
        from tfpneumo.models.unet import fetch_imagenet_weights

        fetch_imagenet_weights(cfg.model.encoder)
    elif weights.lower() != "none":
        path = Path(weights)
        if not path.is_file():
            raise TfpneumoError(f"model.encoder_weights: {path} not found")
        if not path.name.endswith(".h5") and path.suffix != ".hdf5":
            raise TfpneumoError(f"model.encoder_weights: {path} is not a .weights.h5 or .h5 "
                                "weights file")


def _check_same_config(cfg: Config, run_dir: Path) -> None:
    saved = run_dir / runs.CONFIG
    # Through the loader, so keys added by a later tfpneumo take their defaults: a run saved
    # before a key existed resumes unless the key is set to something else.
    if saved.exists() and to_dict(load_config(saved)) != to_dict(cfg):
        raise TfpneumoError(f"{run_dir} was trained with another config ({saved}); "
                            "resume with the same config, or pick a new experiment name")


def train_stage(cfg: Config, fold: int, stage_dir: Path, runtime: Runtime,
                init_weights: Path | None = None, service: str | None = None,
                on_start=None, callbacks=()) -> dict:
    """Trains one stage in ``stage_dir``, resuming from its last completed epoch.

    Nothing is written before the network is built and the data found (then ``on_start()``
    is called and the stage's ``config.yaml`` written): a stage that cannot start leaves no
    trace that would refuse the corrected rerun. Under a multi-worker strategy every worker
    runs this; the chief alone reads the run state and the weights file, then shares them."""
    from tfpneumo.data.pipeline import eval_dataset, train_dataset
    from tfpneumo.models.unet import build_model, encoder_layers, set_encoder_trainable
    from tfpneumo.training import loop
    from tfpneumo.training.losses import build_losses
    from tfpneumo.training.metrics import KaggleDice
    from tfpneumo.training.schedules import build_schedule
    from tfpneumo.training.swa import SWA

    chief = runtime.is_chief
    done = stage_dir / runs.STAGE_RESULT
    if _chief_says(runtime, done.exists()):
        return json.loads(done.read_text()) if chief else {}
    check_inputs(cfg, runtime, encoder=False)  # build_model loads (and checks) the weights
    keras.utils.set_random_seed(cfg.seed + fold)
    keras.mixed_precision.set_global_policy(runtime.precision)
    tcfg, cache = cfg.train, Path(cfg.data.cache)
    epochs = tcfg.epochs

    resuming = (stage_dir / runs.STATE / "state.json").exists()
    model_cfg = cfg.model
    if resuming or init_weights is not None or not chief:
        from dataclasses import replace as dc_replace

        # weights come from a file of the run (or, on the other workers, from the chief)
        model_cfg = dc_replace(model_cfg, encoder_weights="none")

    _, steps = train_dataset(cache, fold, cfg, epochs=epochs,
                             steps_per_epoch=tcfg.steps_per_epoch or None, seed=cfg.seed + fold)
    val_ds = eval_dataset(cache, fold, cfg, split="val")
    size, val_side = cfg.data.image_size, read_cache_info(cache).size
    resize = cfg.data.crop == "resize" and size != val_side
    if resize:
        # Trained on whole images resized to image_size: validate at that scale too (with
        # random_crop the scale is the cache's, and validation runs at full cached size).
        val_side = size
        val_ds = _resized(val_ds, size)
    # Masks under min_area pixels count as empty (as the competition's top solutions did):
    # a false positive on an empty image costs a whole point.
    min_area = int(round(tcfg.val_min_area * val_side ** 2))
    per_replica = max(1, cfg.data.batch_size // runtime.replicas)

    def val_input(context):
        # Each worker its part of the fold, split over its replicas (see loop.fit).
        ds = eval_dataset(cache, fold, cfg, split="val", batch_size=per_replica,
                          shard=(context.num_input_pipelines, context.input_pipeline_id),
                          replicas=context.num_replicas_in_sync // context.num_input_pipelines)
        ds = _resized(ds, size) if resize else ds
        return ds.map(lambda b: (b["image"], {"mask": b["mask"], "label": b["label"]}))

    with runtime.strategy.scope():
        net = build_model(model_cfg)
        if init_weights is not None and chief:
            net.load_weights(init_weights)
        trainer = Trainer(net, accumulation_steps=cfg.optimizer.accumulation_steps,
                          gated_thresholds=tcfg.val_thresholds)
        schedule = build_schedule(cfg.optimizer, steps, epochs)
        encoder_paths = {v.path for layer in encoder_layers(net) for v in layer.weights}
        optimizer = build_optimizer(cfg, schedule, encoder_paths, runtime.precision)
        losses, loss_weights = build_losses(cfg.loss)
        rows = per_replica // cfg.optimizer.accumulation_steps
        example = (np.zeros((rows, size, size, 1), np.float32),
                   {"mask": np.zeros((rows, size, size, 1), np.float32),
                    "label": np.zeros((rows, 1), np.float32)})

        def compile_trainer() -> None:
            trainer.compile(
                optimizer=optimizer, loss=losses, loss_weights=loss_weights,
                metrics={"mask": [KaggleDice(threshold=t, min_area=min_area, name=f"dice@{t:g}")
                                  for t in tcfg.val_thresholds],
                         "label": [keras.metrics.AUC(name="auc")]},
                jit_compile=runtime.jit_compile)
            # The loss and metric variables, made here in the cross-replica context (fit's
            # own symbolic build; strategy.run cannot create them).
            compat.symbolic_build(trainer, example)

        compile_trainer()
        optimizer.build(trainer.trainable_variables)  # every variable, frozen or not

    swa = SWA(start_epoch=epochs - tcfg.swa_epochs) if tcfg.swa_epochs else None
    guard = NaNGuard()
    state = RunState(stage_dir, tcfg.val_thresholds, tcfg.top_k, trainer, swa=swa, guard=guard)
    if chief:
        state.load()
    start = _chief_says(runtime, state.completed_epochs)
    start_step = _chief_says(runtime, state.resume_step)  # > 0 after a preemption
    loop.share_chief_variables(runtime.strategy, runtime.workers,
                               [*net.weights, *optimizer.variables])
    # The stage starts: from here its folder records the config it trains with.
    stage_dir.mkdir(parents=True, exist_ok=True)
    if on_start is not None and chief:
        on_start()
    dump_config(cfg, stage_dir / runs.CONFIG)
    if start or start_step:
        print(f"resuming {stage_dir} after epoch {start}"
              f"{f' and {start_step} steps of epoch {start + 1}' if start_step else ''}",
              file=sys.stderr)

    # Every worker: what decides when to stop or changes the loss; the chief: what writes.
    extra, callbacks = list(callbacks), [LearningRateLogger(), guard]
    if cfg.loss.boundary_ramp_epochs:
        from tfpneumo.training.losses import boundary_losses

        callbacks.append(BoundaryRamp(boundary_losses(losses["mask"]),
                                      cfg.loss.boundary_ramp_epochs))
    if chief:
        callbacks += [swa] if swa is not None else []
        callbacks.append(state)
        board = stage_dir / runs.TENSORBOARD
        callbacks.append(keras.callbacks.TensorBoard(str(board), write_graph=False,
                                                     update_freq="epoch", profile_batch=0))
        if tcfg.tensorboard_images:
            images, masks = _panel_examples(val_ds, tcfg.tensorboard_images)
            callbacks.append(ImagePanels(board / "images", images, masks))
    callbacks += extra

    freeze = tcfg.freeze_encoder_epochs
    phases = [(s, e, frozen) for s, e, frozen in ((start, min(freeze, epochs), True),
                                                  (max(start, freeze), epochs, False)) if s < e]
    verbose = 0 if not chief else 1 if sys.stdout.isatty() else 2
    t0 = time.time()
    for phase_start, phase_end, frozen in phases:
        set_encoder_trainable(net, not frozen)
        with runtime.strategy.scope():
            compile_trainer()

        skip = start_step if phase_start == start else 0

        def train_input(context, phase_start=phase_start, skip=skip):
            ds = train_dataset(cache, fold, cfg, epochs=epochs,
                               steps_per_epoch=tcfg.steps_per_epoch or None,
                               seed=cfg.seed + fold, initial_epoch=phase_start,
                               service=service, device_finish=True, input_context=context)[0]
            # Resuming inside an epoch: the stream is the epoch's from its start; one element
            # per local replica and step.
            local = context.num_replicas_in_sync // context.num_input_pipelines
            return ds.skip(skip * local) if skip else ds

        try:
            preempted = loop.fit(trainer, runtime.strategy, train_input, val_input,
                                 epochs=phase_end, initial_epoch=phase_start,
                                 initial_step=skip, steps_per_epoch=steps, callbacks=callbacks,
                                 verbose=verbose, jit_compile=runtime.jit_compile)
        except tf.errors.OpError as e:
            if service and "tfpneumo_heavy_" in str(e):  # token of augment.register_heavy
                raise TfpneumoError(
                    f"data.service {cfg.data.service}: its workers were started for other augment "
                    "settings than this config's (elastic/grid/optical/CLAHE); start `tfpneumo "
                    "data-worker` with the same --config and --set") from None
            raise
        if preempted is not None:
            if chief:
                state.save_preempted(preempted.steps)
            raise TfpneumoError(
                f"stopped by SIGTERM in epoch {preempted.epoch + 1} after step "
                f"{preempted.steps}; the run state is saved ({stage_dir / runs.STATE}); rerun "
                "the same command (on every machine) to resume from there")
        if guard.nan_at is not None:
            epoch, batch = guard.nan_at
            good = (f"last good state: epoch {state.completed_epochs} in {stage_dir / runs.STATE}"
                    if state.completed_epochs else "no completed epoch to keep")
            raise NaNLossError(f"loss became NaN/inf in epoch {epoch + 1}"
                               f"{f' batch {batch + 1}' if batch >= 0 else ''}; training stopped "
                               f"({good}); lower optimizer.lr or use float32")
    set_encoder_trainable(net, True)
    if not chief:
        return {}
    if runtime.workers > 1:
        # The chief finishes alone: on a copy outside the strategy, whose collectives would
        # wait for workers that are done.
        net = _plain_copy(net)
    return _finish_stage(cfg, fold, stage_dir, net, state, swa, val_ds, train_secs=time.time() - t0)


def _resized(ds, size: int):
    return ds.map(lambda b: {
        **b, "image": tf.image.resize(b["image"], [size, size], antialias=True),
        "mask": tf.image.resize(b["mask"], [size, size], method="nearest")})


def _plain_copy(net):
    """``net`` rebuilt outside any tf.distribute strategy, with its weights."""
    with tf.distribute.get_strategy().scope():
        plain = keras.models.clone_model(net)
    plain.set_weights(net.get_weights())
    return plain


def _panel_examples(val_ds, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` validation images for TensorBoard panels, positives first."""
    images, masks, labels = [], [], []
    for batch in val_ds.take(8):
        images.append(batch["image"].numpy())
        masks.append(batch["mask"].numpy())
        labels.append(batch["label"].numpy().reshape(-1))
    if not images:
        return np.zeros((0, 1, 1, 3), np.float32), np.zeros((0, 1, 1, 1), np.float32)
    images, masks = np.concatenate(images), np.concatenate(masks)
    order = np.argsort(-np.concatenate(labels), kind="stable")[:n]
    return images[order], masks[order]


def _finish_stage(cfg: Config, fold: int, stage_dir: Path, net, state: RunState, swa, val_ds,
                  train_secs: float) -> dict:
    """Saves the final, best, top-k and SWA networks, each with its own out-of-fold statistics
    (``oof_<kind>.npz``), and ``oof.npz`` of the one ``--weights auto`` picks: the averaged
    network when there is one, so evaluate chooses the rule on the model submit uses."""
    from tfpneumo.data.pipeline import train_dataset
    from tfpneumo.evaluation.oof import dice_from_histograms, out_of_fold_statistics
    from tfpneumo.training.swa import apply_swa, average_checkpoints

    tcfg = cfg.train
    by_kind: dict[str, dict] = {}

    def save(kind: str) -> None:
        # A .keras archive: Keras makes its HDF5 part in memory, then zips it to the file.
        with atomic_path(stage_dir / runs.NETWORKS[kind], keep_suffix=True) as tmp:
            net.save(tmp)
        by_kind[kind] = out_of_fold_statistics(net, val_ds)
        write_npz(stage_dir / runs.oof_name(kind), **by_kind[kind], fold=fold, model=kind)

    write_weights(stage_dir / runs.FINAL_WEIGHTS, net)
    save("final")
    if state.top:
        net.load_weights(stage_dir / runs.BEST_WEIGHTS)
        save("best")
    if len(state.top) > 1:
        average_checkpoints(net, [stage_dir / runs.CHECKPOINTS / e["path"] for e in state.top])
        save("topk")
    if swa is not None and swa.n > 0:
        bn_ds, _ = train_dataset(Path(cfg.data.cache), fold, cfg, epochs=tcfg.epochs,
                                 seed=cfg.seed + fold)
        apply_swa(net, swa.averaged_weights(), bn_ds, tcfg.swa_bn_steps)
        save("swa")
    selected = runs.auto_kind(stage_dir)
    oof = by_kind[selected]
    write_npz(stage_dir / runs.OOF, **oof, fold=fold, model=selected)
    empty = float(np.mean(oof["has_mask"] == 0))
    oof_dice = {f"{t:g}": dice_from_histograms(oof, t) for t in tcfg.val_thresholds}
    oof_dice.update({f"gated@{t:g}": dice_from_histograms(oof, t, 0.5)
                     for t in tcfg.val_thresholds})
    # Whether the run learned: the best plain or head-gated rule on a coarse grid (the
    # validation thresholds alone miss a mask that is only usable behind the head).
    grid = np.round(np.arange(0.3, 0.81, 0.05), 2)
    best_oof = max(dice_from_histograms(oof, t, gate) for t in grid for gate in (None, *grid))
    note = learning_verdict(best_oof, empty)
    if note:
        print(f"warning: fold {fold} {note}", file=sys.stderr)
    result = {
        "fold": fold,
        "epochs": state.completed_epochs,
        "best_val_dice": max(e["score"] for e in state.top) if state.top else float("nan"),
        "empty_baseline": empty,
        "oof_model": selected,
        "oof_dice_by_threshold": oof_dice,
        "best_oof_dice": best_oof,
        "learned": note is None,
        "learning_note": note,
        "train_seconds": round(train_secs, 1),
    }
    write_json(stage_dir / runs.STAGE_RESULT, result)
    return result
