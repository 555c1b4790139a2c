"""``tfpneumo tune``: hyperparameter search on Optuna over any config key.

A search file declares the space and the objective::

    study: demo-search            # Optuna study name (default: <experiment>-tune)
    objective: oof                # oof: the trained folds' best-rule out-of-fold Dice (mean,
                                  # training's coarse grid); rule: the score of the best rule
                                  # `tfpneumo evaluate` finds on the folds together (its full
                                  # grids, what submit applies); val_dice: their best
                                  # validation Dice (mean)
    folds: [0]                    # folds each trial trains
    trials: 20                    # trials of the whole study (every process together)
    sampler: tpe                  # tpe | random
    pruner: median                # median | hyperband | none (epoch-level, on validation Dice)
    space:                        # config key -> range or choices
      optimizer.lr: {low: 1.0e-4, high: 3.0e-3, log: true}
      train.epochs: {low: 4, high: 12, step: 2}       # integers when low and high are
      model.attention: {choices: [none, scse]}

Each trial is an ordinary run, ``runs/<study>-<trial number>/``, trained by ``tfpneumo.train``
with the trial's values as ``--set`` overrides of the config. The study lives in
``--storage``: an SQLite file by default; any SQLAlchemy URL (``postgresql://...``) lets every
machine run the same command on one shared study. The best trial is written as
``runs/<study>/best.yaml``: the config file's own keys with the trial's values, a config like
any other (``tfpneumo train --config runs/<study>/best.yaml``).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tfpneumo.config import find_config, load_config, read_yaml
from tfpneumo.errors import TfpneumoError

OBJECTIVES = ("oof", "rule", "val_dice")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
NOT_RUN = "not run: the study had its trials"  # user attr of a reservation past the count


def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise TfpneumoError(f"tfpneumo tune needs optuna ({e}); pip install 'tfpneumo[tune]'"
                            ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass(frozen=True)
class Param:
    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if all(isinstance(v, int) and not isinstance(v, bool)
               for v in (self.low, self.high) if v is not None):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log,
                                   step=None if self.step is None else float(self.step))


@dataclass(frozen=True)
class Search:
    study: str
    objective: str = "oof"
    folds: tuple[int, ...] = (0,)
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    space: tuple[Param, ...] = field(default_factory=tuple)


def read_search(path: Path, experiment: str) -> Search:
    """The search file -> :class:`Search`; a malformed one is one line naming the file and key."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise TfpneumoError(f"{path}: cannot read the search file ({e.__class__.__name__})"
                            ) from None
    if not isinstance(raw, dict):
        raise TfpneumoError(f"{path}: expected a mapping with a 'space' key")

    def bad(key: str, why: str) -> TfpneumoError:
        return TfpneumoError(f"{path}: {key}: {why}")

    known = {"study", "objective", "folds", "trials", "sampler", "pruner", "space"}
    for key in raw:
        if key not in known:
            raise bad(repr(key), f"unknown key (expected {sorted(known)})")
    study = str(raw.get("study") or f"{experiment}-tune")
    if not study.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise bad("study", f"{study!r} must be letters, digits, '-', '_' or '.'")
    choices = {"objective": OBJECTIVES, "sampler": SAMPLERS, "pruner": PRUNERS}
    for key, allowed in choices.items():
        if key in raw and raw[key] not in allowed:
            raise bad(key, f"{raw[key]!r} is not one of {list(allowed)}")
    folds = raw.get("folds", [0])
    if (not isinstance(folds, list) or not folds
            or not all(isinstance(k, int) and k >= 0 for k in folds)):
        raise bad("folds", "a list of fold indices, e.g. [0] or [0, 1]")
    trials = raw.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise bad("trials", "a positive integer")
    space = raw.get("space")
    if not isinstance(space, dict) or not space:
        raise bad("space", "a mapping of config keys to {low, high[, log, step]} or {choices}")
    params = []
    for key, spec in space.items():
        if not isinstance(spec, dict):
            raise bad(f"space.{key}", "expected {low, high[, log, step]} or {choices: [...]}")
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec[
                    "choices"]:
                raise bad(f"space.{key}", "choices: a non-empty list, and nothing else")
            params.append(Param(str(key), choices=tuple(spec["choices"])))
            continue
        extra = set(spec) - {"low", "high", "log", "step"}
        if extra or "low" not in spec or "high" not in spec:
            raise bad(f"space.{key}", "expected low and high (and optionally log, step)")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) for v in (low, high)) or low >= high:
            raise bad(f"space.{key}", "low and high: finite numbers, low < high")
        if spec.get("log") and low <= 0:
            raise bad(f"space.{key}", "log: true needs low > 0")
        params.append(Param(str(key), low, high, bool(spec.get("log", False)), spec.get("step")))
    return Search(study, raw.get("objective", "oof"), tuple(folds), trials,
                  raw.get("sampler", "tpe"), raw.get("pruner", "median"), tuple(params))


def _sets(params: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in params.items()]


def _check_space(config, sets: list[str], search: Search) -> None:
    """Every key of the space is a config key and both ends of each range are valid values
    of it: a typo fails here, not after hours of trials."""
    for p in search.space:
        for value in (p.choices or (p.low, p.high)):
            try:
                load_config(config, [*sets, *_sets({p.key: value})])
            except TfpneumoError as e:
                raise TfpneumoError(f"search space {p.key}: {e}") from None


def _pruner(optuna, name: str):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def default_storage(workdir: Path, study: str) -> str:
    return f"sqlite:///{(workdir / 'runs' / study / 'study.db').resolve()}"


def open_study(search: Search, storage: str, seed: int):
    """Creates or joins the study. Processes starting at once race to create the database's
    tables and the study row: the loser retries and joins."""
    optuna = _optuna()
    sampler = (optuna.samplers.TPESampler(seed=seed) if search.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    # SQLite: wait for another process's write lock instead of failing after 5 s
    engine = {"connect_args": {"timeout": 120}} if storage.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            rdb = optuna.storages.RDBStorage(storage, engine_kwargs=engine)
            return optuna.create_study(study_name=search.study, storage=rdb,
                                       direction="maximize", sampler=sampler,
                                       pruner=_pruner(optuna, search.pruner),
                                       load_if_exists=True)
        except Exception as e:  # sqlalchemy's errors of the race; the last one is raised
            if attempt == 4:
                first = str(e).splitlines()[0][:200] if str(e) else ""
                raise TfpneumoError(f"--storage {storage}: cannot open the study "
                                    f"({type(e).__name__}: {first})") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _counted(trial) -> bool:
    """Every trial counts toward the study's number but a reservation made past it."""
    return trial.user_attrs.get("note") != NOT_RUN


def _done(study) -> int:
    return sum(_counted(t) for t in study.get_trials(deepcopy=False))


def pruning_callback(trial, thresholds):
    """A Keras callback reporting each epoch's validation Dice to ``trial`` and stopping a
    trial the pruner gives up on (its run folder is then an ordinary, shorter run)."""
    import keras

    from tfpneumo.training.callbacks import score_from_logs

    class Pruning(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step, self.pruned = 0, False

        def on_train_begin(self, logs=None):
            if self.pruned:  # a later stage of a pruned trial stops after its first step
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if self.pruned:
                return
            trial.report(score_from_logs(logs or {}, thresholds), self.step)
            self.step += 1  # over stages too: the pruner compares the same training time
            if trial.should_prune():
                self.pruned = True
                self.model.stop_training = True

    return Pruning()


def train_trial(cfg, folds: tuple[int, ...], callbacks, workdir: Path) -> list[dict]:
    """The folds' result.json of one trial, trained as ``tfpneumo train`` trains them; what
    training prints (epoch lines, its summary) goes to stderr with the trial lines, so that
    stdout holds tune's own summary alone."""
    from tfpneumo.training.run import train

    with contextlib.redirect_stdout(sys.stderr):
        return train(cfg, list(folds), workdir, callbacks=callbacks).folds


def objective_value(objective: str, results: list[dict], cfg, folds: tuple[int, ...],
                    workdir: Path) -> float:
    """A trained trial's value: the mean of its folds' result.json figure (``oof``,
    ``val_dice``), or for ``rule`` the score of the best rule ``tfpneumo evaluate`` finds on
    the folds' pooled out-of-fold statistics (its default grids; it writes the trial's
    evaluation.json, which ``submit`` then reads)."""
    if objective == "rule":
        from tfpneumo.evaluation.report import evaluate

        return float(evaluate(cfg, folds=list(folds), workdir=workdir).summary["best"]["score"])
    key = "best_oof_dice" if objective == "oof" else "best_val_dice"
    return float(sum(r[key] for r in results) / len(results))


def tune(config: str | Path | None, sets: list[str], search_file: Path, *,
         storage: str | None = None, workdir: Path = Path("."), trainer=train_trial) -> str:
    """Runs trials until the study holds ``search.trials`` (with every other process on the
    same storage); writes ``runs/<study>/best.yaml``; returns the summary."""
    optuna = _optuna()
    base = load_config(config, sets)
    search = read_search(search_file, base.experiment)
    _check_space(config, sets, search)
    study_dir = workdir / "runs" / search.study
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or default_storage(workdir, search.study)
    study = open_study(search, storage, base.seed)

    while _done(study) < search.trials:
        trial = study.ask()
        # Processes sharing the study may ask at once; trial numbers are unique and ordered,
        # so the first `trials` numbers run and a later one is marked and not counted.
        ahead = sum(_counted(t) for t in study.get_trials(deepcopy=False)
                    if t.number < trial.number)
        if ahead >= search.trials:
            trial.set_user_attr("note", NOT_RUN)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        params = {p.key: p.suggest(trial) for p in search.space}
        experiment = f"{search.study}-{trial.number:04d}"
        trial.set_user_attr("experiment", experiment)
        cfg = load_config(config, [*sets, *_sets(params), f"experiment={experiment}"])
        pruning = pruning_callback(trial, cfg.train.val_thresholds)
        t0 = time.time()
        try:
            results = trainer(cfg, search.folds, [pruning], workdir)
        except Exception as e:
            trial.set_user_attr("error", str(e).splitlines()[0][:500] if str(e) else repr(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"trial {trial.number}: failed: {trial.user_attrs['error']}", file=sys.stderr)
            continue
        value = objective_value(search.objective, results, cfg, search.folds, workdir)
        trial.set_user_attr("seconds", round(time.time() - t0, 1))
        if pruning.pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            print(f"trial {trial.number}: pruned ({search.objective} {value:.4f})",
                  file=sys.stderr)
        else:
            study.tell(trial, value)
            print(f"trial {trial.number}: {search.objective} {value:.4f} {params}",
                  file=sys.stderr)
    best = write_best(config, sets, study, study_dir / "best.yaml")
    return (f"study {search.study}: {_done(study)} trials in {storage}; best trial "
            f"{best.number}: {search.objective} {best.value:.4f} {best.params} -> "
            f"{study_dir / 'best.yaml'}")


def write_best(config, sets: list[str], study, path: Path):
    """The best trial as a config file: the config file's own keys, the --set values and the
    trial's values (not every key: defaults stay defaults)."""
    from tfpneumo.config import _merge, _parse_set  # the loader's own merge of --set values
    from tfpneumo.files import write_text

    try:
        best = study.best_trial
    except ValueError:
        raise TfpneumoError(f"study {study.study_name}: no completed trial yet") from None
    raw = read_yaml(find_config(config)) if config else {}
    for item in [*sets, *_sets(best.params), f"experiment={study.study_name}-best"]:
        raw = _merge(raw, _parse_set(item))
    header = (f"# tfpneumo tune: best trial {best.number} of study {study.study_name}, "
              f"value {best.value:.6f}\n")
    write_text(path, header + yaml.safe_dump(raw, sort_keys=False))
    return best


def report(search_file: Path, experiment: str, storage: str | None = None,
           workdir: Path = Path(".")) -> str:
    """The trials table; writes optimization_history.png and param_importances.png."""
    optuna = _optuna()
    search = read_search(search_file, experiment)
    storage = storage or default_storage(workdir, search.study)
    try:
        study = optuna.load_study(study_name=search.study, storage=storage)
    except KeyError:
        raise TfpneumoError(f"study {search.study}: not found in {storage}") from None
    rows = [f"{'trial':>5}  {'state':8}  {'value':>7}  {'seconds':>7}  params"]
    for t in study.get_trials(deepcopy=False):
        value = f"{t.value:.4f}" if t.value is not None else (
            f"{max(t.intermediate_values.values()):.4f}" if t.intermediate_values else "-")
        rows.append(f"{t.number:>5}  {t.state.name.lower():8}  {value:>7}  "
                    f"{t.user_attrs.get('seconds', '-')!s:>7}  {t.params}")
    out = Path(workdir) / "runs" / search.study
    out.mkdir(parents=True, exist_ok=True)
    rows.append(_plots(optuna, study, out))
    return "\n".join(rows)


def _plots(optuna, study, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    written = []
    if complete:
        vis.plot_optimization_history(study)
        plt.gcf().set_size_inches(8, 5)
        plt.savefig(out / "optimization_history.png", dpi=100, bbox_inches="tight")
        plt.close("all")
        written.append("optimization_history.png")
    if len(complete) >= 2 and len({tuple(sorted(t.params.items())) for t in complete}) >= 2:
        vis.plot_param_importances(study)
        plt.gcf().set_size_inches(8, 5)
        plt.savefig(out / "param_importances.png", dpi=100, bbox_inches="tight")
        plt.close("all")
        written.append("param_importances.png")
    return (f"wrote {', '.join(written)} to {out}" if written
            else "no completed trial yet: no plots")
