"""``tfpneumo train``: one fold (or all) through every stage of the config, resumable.

Run folder ``runs/<experiment>/fold_<k>/``::

    config.yaml            resolved config
    history.csv            one row per epoch (epoch, losses, val Dice per threshold, AUC, lr)
    state/                 last completed epoch: weights + optimizer + SWA (resume)
    checkpoints/           top-k weights by validation Dice
    best.weights.h5        best checkpoint
    tensorboard/           scalars and image panels
    final.keras best.keras [swa.keras] [topk.keras]   saved networks (safe_mode loadable)
    oof.npz                out-of-fold statistics of the selected model (see inference.py)
    result.json            summary; written last (a fold with it is complete)

With several ``train.stages`` each stage trains in ``stages/<name>/`` from the previous
stage's final weights, and the last stage's artefacts are also written to the fold folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from tfpneumo import TfpneumoError
from tfpneumo.config import Config, dump_config, read_yaml, to_dict
from tfpneumo.tfimport import quiet_tensorflow

tf = quiet_tensorflow()
import keras  # noqa: E402

from tfpneumo.training.callbacks import (  # noqa: E402
    ImagePanels,
    LearningRateLogger,
    NaNLossError,
    RunState,
    atomic_write_text,
)
from tfpneumo.training.trainer import Runtime, Trainer, build_optimizer, resolve_runtime  # noqa: E402


def fold_dir(cfg: Config, fold: int, workdir: Path = Path(".")) -> Path:
    return Path(workdir) / "runs" / cfg.experiment / f"fold_{fold}"


def cache_folds(cache: Path) -> int:
    """The number of folds of a prepared cache (its manifest), or a one-line error."""
    manifest = Path(cache) / "manifest.json"
    if not manifest.exists():
        raise TfpneumoError(f"{cache}: no prepared cache here (manifest.json missing); "
                            "run `tfpneumo prepare` or set data.cache")
    return int(json.loads(manifest.read_text())["folds"])


def cache_size(cache: Path) -> int:
    """The image side of a prepared cache."""
    return int(json.loads((Path(cache) / "manifest.json").read_text())["size"])


def train(cfg: Config, fold: str, workdir: Path = Path(".")) -> str:
    """Trains ``fold`` ("all" or an index). Returns a summary, one line per fold."""
    n_folds = cache_folds(Path(cfg.data.cache))
    if fold == "all":
        folds = list(range(n_folds))
    else:
        try:
            folds = [int(fold)]
        except ValueError:
            raise TfpneumoError(f"--fold {fold!r}: expected a fold index or 'all'") from None
        if not 0 <= folds[0] < n_folds:
            raise TfpneumoError(f"--fold {fold}: the cache {cfg.data.cache} has folds 0..{n_folds - 1}")
    from tfpneumo.data.service import input_service

    lines = []
    augments = [stage_cfg.augment for _, stage_cfg in cfg.stage_configs()]
    with input_service(cfg.data.service, augments) as service:
        if service:
            print(f"input: tf.data service {service} ({cfg.data.service})", file=sys.stderr)
        for k in folds:
            result = train_fold(cfg, k, workdir, service=service)
            lines.append(f"fold {k}: best val Dice {result['best_val_dice']:.4f} "
                         f"(all-empty baseline {result['empty_baseline']:.4f}) -> {result['run_dir']}")
    return "\n".join(lines)


def train_fold(cfg: Config, fold: int, workdir: Path = Path("."), service: str | None = None) -> dict:
    """Trains one fold through every stage; ``service``: a tf.data service dispatcher address
    (from :func:`tfpneumo.data.service.input_service`) that makes the training batches."""
    run_dir = fold_dir(cfg, fold, workdir)
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    _check_same_config(cfg, run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    runtime = resolve_runtime(cfg.train)
    if runtime.strategy_name == "multi_worker":
        # Keras 3.15's fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585,
        # #20329); the strategy and our train step work (tests/test_scaleout.py runs them with
        # a custom loop), fit does not yet.
        raise TfpneumoError("train.strategy multi_worker: Keras 3.15 model.fit does not run under "
                            "MultiWorkerMirroredStrategy (keras-team/keras#20585); train on one "
                            "machine (mirrored over its GPUs) for now")
    print(f"fold {fold}: {runtime.describe()}", file=sys.stderr)
    stages = cfg.stage_configs()
    previous: Path | None = None
    result: dict = {}
    for i, (name, stage_cfg) in enumerate(stages):
        stage_dir = run_dir if len(stages) == 1 else run_dir / "stages" / name
        result = train_stage(stage_cfg, fold, stage_dir, runtime, init_weights=previous, service=service)
        previous = stage_dir / "final.weights.h5"
        if len(stages) > 1 and i == len(stages) - 1:
            for artefact in ("final.keras", "best.keras", "swa.keras", "topk.keras", "oof.npz",
                             "history.csv", "best.weights.h5"):
                if (stage_dir / artefact).exists():
                    shutil.copy2(stage_dir / artefact, run_dir / artefact)
    result = {**result, "run_dir": str(run_dir), "stages": [n for n, _ in stages]}
    atomic_write_text(result_path, json.dumps(result, indent=1))
    return result


def _check_same_config(cfg: Config, run_dir: Path) -> None:
    saved = run_dir / "config.yaml"
    if saved.exists() and read_yaml(saved) != to_dict(cfg):
        raise TfpneumoError(f"{run_dir} was trained with another config ({saved}); "
                            "resume with the same config, or pick a new experiment name")


def train_stage(cfg: Config, fold: int, stage_dir: Path, runtime: Runtime,
                init_weights: Path | None = None, service: str | None = None) -> dict:
    """Trains one stage in ``stage_dir``, resuming from its last completed epoch."""
    from tfpneumo.data.pipeline import eval_dataset, train_dataset
    from tfpneumo.models.unet import build_model, encoder_layers, set_encoder_trainable
    from tfpneumo.training.losses import build_losses
    from tfpneumo.training.metrics import KaggleDice
    from tfpneumo.training.schedules import build_schedule
    from tfpneumo.training.swa import SWA

    done = stage_dir / "stage.json"
    if done.exists():
        return json.loads(done.read_text())
    stage_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, stage_dir / "config.yaml")
    keras.utils.set_random_seed(cfg.seed + fold)
    keras.mixed_precision.set_global_policy(runtime.precision)
    tcfg, cache = cfg.train, Path(cfg.data.cache)
    epochs = tcfg.epochs
    per_replica = cfg.data.batch_size // runtime.replicas
    if cfg.data.batch_size % runtime.replicas or per_replica % cfg.optimizer.accumulation_steps:
        raise TfpneumoError(
            f"config key data.batch_size: {cfg.data.batch_size} must split evenly over "
            f"{runtime.replicas} replicas and {cfg.optimizer.accumulation_steps} accumulation steps")

    resuming = (stage_dir / "state" / "state.json").exists()
    model_cfg = cfg.model
    if resuming or init_weights is not None:
        from dataclasses import replace as dc_replace

        model_cfg = dc_replace(model_cfg, encoder_weights="none")  # weights come from a file

    _, steps = train_dataset(cache, fold, cfg, epochs=epochs,
                             steps_per_epoch=tcfg.steps_per_epoch or None, seed=cfg.seed + fold)
    val_ds = eval_dataset(cache, fold, cfg, split="val")
    size, val_side = cfg.data.image_size, cache_size(cache)
    if cfg.data.crop == "resize" and size != val_side:
        val_side = size
        # Trained on whole images resized to image_size: validate at that scale too (with
        # random_crop the scale is the cache's, and validation runs at full cached size).
        val_ds = val_ds.map(lambda b: {
            **b, "image": tf.image.resize(b["image"], [size, size], antialias=True),
            "mask": tf.image.resize(b["mask"], [size, size], method="nearest")})
    # Masks under min_area pixels count as empty (as the competition's top solutions did):
    # a false positive on an empty image costs a whole point.
    min_area = int(round(tcfg.val_min_area * val_side ** 2))
    val_xy = val_ds.map(lambda b: (b["image"], {"mask": b["mask"], "label": b["label"]}))

    with runtime.strategy.scope():
        net = build_model(model_cfg)
        if init_weights is not None:
            net.load_weights(init_weights)
        trainer = Trainer(net, accumulation_steps=cfg.optimizer.accumulation_steps,
                          gated_thresholds=tcfg.val_thresholds)
        schedule = build_schedule(cfg.optimizer, steps, epochs)
        encoder_paths = {v.path for layer in encoder_layers(net) for v in layer.weights}
        optimizer = build_optimizer(cfg, schedule, encoder_paths, runtime.precision)
        losses, loss_weights = build_losses(cfg.loss)

        def compile_trainer() -> None:
            trainer.compile(
                optimizer=optimizer, loss=losses, loss_weights=loss_weights,
                metrics={"mask": [KaggleDice(threshold=t, min_area=min_area, name=f"dice@{t:g}")
                                  for t in tcfg.val_thresholds],
                         "label": [keras.metrics.AUC(name="auc")]},
                jit_compile=runtime.jit_compile)

        compile_trainer()
        optimizer.build(trainer.trainable_variables)  # every variable, frozen or not

    swa = SWA(start_epoch=epochs - tcfg.swa_epochs) if tcfg.swa_epochs else None
    state = RunState(stage_dir, tcfg.val_thresholds, tcfg.top_k, trainer, swa=swa)
    state.load()
    start = state.completed_epochs
    if start:
        print(f"resuming {stage_dir} after epoch {start}", file=sys.stderr)

    callbacks = [LearningRateLogger()]
    if swa is not None:
        callbacks.append(swa)
    callbacks.append(state)
    callbacks.append(keras.callbacks.TensorBoard(str(stage_dir / "tensorboard"), write_graph=False,
                                                 update_freq="epoch", profile_batch=0))
    if tcfg.tensorboard_images:
        images, masks = _panel_examples(val_ds, tcfg.tensorboard_images)
        callbacks.append(ImagePanels(stage_dir / "tensorboard" / "images", images, masks))

    freeze = tcfg.freeze_encoder_epochs
    phases = [(s, e, frozen) for s, e, frozen in ((start, min(freeze, epochs), True),
                                                  (max(start, freeze), epochs, False)) if s < e]
    verbose = 1 if sys.stdout.isatty() else 2
    t0 = time.time()
    for phase_start, phase_end, frozen in phases:
        set_encoder_trainable(net, not frozen)
        with runtime.strategy.scope():
            compile_trainer()
        train_ds, _ = train_dataset(cache, fold, cfg, epochs=epochs,
                                    steps_per_epoch=tcfg.steps_per_epoch or None,
                                    seed=cfg.seed + fold, initial_epoch=phase_start, service=service,
                                    device_finish=True)
        try:
            trainer.fit(train_ds, epochs=phase_end, initial_epoch=phase_start, steps_per_epoch=steps,
                        validation_data=val_xy, callbacks=callbacks, verbose=verbose)
        except tf.errors.OpError as e:
            if service and "tfpneumo_heavy_" in str(e):  # token of augment.register_heavy
                raise TfpneumoError(
                    f"data.service {cfg.data.service}: its workers were started for other augment "
                    "settings than this config's (elastic/grid/optical/CLAHE); start `tfpneumo "
                    "data-worker` with the same --config and --set") from None
            raise
        if state.nan_at is not None:
            epoch, batch = state.nan_at
            good = (f"last good state: epoch {state.completed_epochs} in {stage_dir / 'state'}"
                    if state.completed_epochs else "no completed epoch to keep")
            raise NaNLossError(f"loss became NaN/inf in epoch {epoch + 1}"
                               f"{f' batch {batch + 1}' if batch >= 0 else ''}; training stopped "
                               f"({good}); lower optimizer.lr or use float32")
    set_encoder_trainable(net, True)
    return _finish_stage(cfg, fold, stage_dir, net, state, swa, val_ds, train_secs=time.time() - t0)


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
    """Saves final/best/SWA/top-k networks and the out-of-fold statistics of the chosen one."""
    from tfpneumo.data.pipeline import train_dataset
    from tfpneumo.inference.ensemble import dice_from_histograms, out_of_fold_statistics
    from tfpneumo.training.swa import apply_swa, average_checkpoints

    tcfg = cfg.train
    net.save_weights(stage_dir / "final.weights.h5")
    net.save(stage_dir / "final.keras")
    selected = "final"
    if state.top:
        net.load_weights(stage_dir / "best.weights.h5")
        net.save(stage_dir / "best.keras")
        selected = "best"
    if swa is not None and swa.n > 0:
        bn_ds, _ = train_dataset(Path(cfg.data.cache), fold, cfg, epochs=tcfg.epochs,
                                 seed=cfg.seed + fold)
        apply_swa(net, swa.averaged_weights(), bn_ds, tcfg.swa_bn_steps)
        net.save(stage_dir / "swa.keras")
        selected = "swa"
    elif len(state.top) > 1:
        average_checkpoints(net, [stage_dir / "checkpoints" / e["path"] for e in state.top])
        net.save(stage_dir / "topk.keras")
    if selected != "swa":  # the OOF statistics describe the model evaluate/submit will use
        net.load_weights(stage_dir / f"{'best' if selected == 'best' else 'final'}.weights.h5")
    oof = out_of_fold_statistics(net, val_ds)
    tmp = stage_dir / "oof.tmp.npz"
    np.savez(tmp, **oof, fold=fold, model=selected)
    tmp.replace(stage_dir / "oof.npz")
    empty = float(np.mean(oof["has_mask"] == 0))
    oof_dice = {f"{t:g}": dice_from_histograms(oof, t) for t in tcfg.val_thresholds}
    oof_dice.update({f"gated@{t:g}": dice_from_histograms(oof, t, 0.5)
                     for t in tcfg.val_thresholds})
    result = {
        "fold": fold,
        "epochs": state.completed_epochs,
        "best_val_dice": max(e["score"] for e in state.top) if state.top else float("nan"),
        "empty_baseline": empty,
        "oof_model": selected,
        "oof_dice_by_threshold": oof_dice,
        "train_seconds": round(train_secs, 1),
    }
    atomic_write_text(stage_dir / "stage.json", json.dumps(result, indent=1))
    return result
