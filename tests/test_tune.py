"""``tfpneumo tune``: the search file, the study's bookkeeping (exact trial count across
processes, pruned trials, the best config written), and the report.

Trials here are trained by a stand-in whose score is a known function of the trial's values
(peak at lr 1e-3, 8 epochs), reported epoch by epoch through the tuner's own pruning callback,
except in the PostgreSQL test: two `tfpneumo tune` processes training real trials on a tiny
cache, and the best config trained again."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from tfpneumo import TfpneumoError
from tfpneumo.config import load_config

THIS = Path(__file__).resolve()
sys.path.insert(0, str(THIS.parent))  # system.test_scaleout's free_ports

SEARCH = {
    "study": "s",
    "trials": 8,
    "sampler": "tpe",
    "pruner": "median",
    "space": {"optimizer.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
              "train.epochs": {"low": 2, "high": 12, "step": 2},
              "model.attention": {"choices": ["none", "scse"]}},
}


def score(cfg) -> float:
    """The stand-in's final score: 0.9 at lr 1e-3 and 8 epochs, lower away from them."""
    return (0.9 - 0.1 * math.log10(cfg.optimizer.lr / 1e-3) ** 2
            - 0.005 * (cfg.train.epochs - 8) ** 2 - 0.02 * (cfg.model.attention == "none"))


def stand_in(cfg, folds, callbacks, workdir):
    """Reports 4 epochs of validation Dice rising to ``score(cfg)``; stops when pruned."""
    (pruning,) = callbacks
    model = types.SimpleNamespace(stop_training=False)
    pruning.set_model(model)
    pruning.on_train_begin()
    for epoch in range(4):
        pruning.on_epoch_end(epoch, {"val_mask_dice@0.5": score(cfg) * (epoch + 1) / 4})
        if model.stop_training:
            break
    return [{"fold": k, "best_oof_dice": score(cfg), "best_val_dice": score(cfg)} for k in folds]


def write_search(folder: Path, **changes) -> Path:
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump({**SEARCH, **changes}))
    return path


def write_config(folder: Path) -> Path:
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump({"experiment": "base", "data": {"batch_size": 4}}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"space": {"optimizer.lr": {"low": 0.0, "high": 1.0, "log": True}}}, "log: true needs low > 0"),
    ({"space": {"optimizer.lr": {"low": 1.0, "high": 0.5}}}, "low < high"),
    ({"space": {"optimizer.lr": {"choices": []}}}, "choices: a non-empty list"),
    ({"trials": 0}, "trials: a positive integer"),
    ({"sampler": "grid"}, "sampler: 'grid' is not one of"),
    ({"extra": 1}, "'extra': unknown key"),
])
def test_a_malformed_search_file_is_one_line_naming_the_key(tmp_path, changes, message):
    from tfpneumo.tune import read_search

    path = write_search(tmp_path, **changes)
    with pytest.raises(TfpneumoError, match=re.escape(message)) as error:
        read_search(path, "base")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_key_that_is_not_in_the_config_fails_before_any_trial(tmp_path):
    from tfpneumo.tune import tune

    path = write_search(tmp_path, space={"optimizer.learning_rate": {"low": 0.1, "high": 0.2}})
    with pytest.raises(TfpneumoError, match="search space optimizer.learning_rate"):
        tune(None, [], path, workdir=tmp_path, trainer=stand_in)
    assert not (tmp_path / "runs").exists()  # no study, no trial


def test_the_study_runs_its_trials_prunes_and_writes_the_best_config(tmp_path):
    import optuna

    from tfpneumo.tune import report, tune

    config, search = write_config(tmp_path), write_search(tmp_path)
    summary = tune(config, ["data.shuffle_buffer=32"], search, workdir=tmp_path,
                   trainer=stand_in)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/runs/s/study.db")
    states = [t.state for t in study.trials]
    assert len(states) == 8  # exactly the requested trials
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1  # the median pruner cut some
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert study.best_trial.number == best.number and f"best trial {best.number}" in summary
    # each trial is a run of its own name
    assert {t.user_attrs["experiment"] for t in study.trials} == {f"s-{i:04d}" for i in range(8)}

    # the best config: the config file's keys, the --set value and the trial's values
    written = load_config(tmp_path / "runs" / "s" / "best.yaml")
    assert written.data.batch_size == 4 and written.data.shuffle_buffer == 32
    assert written.optimizer.lr == pytest.approx(best.params["optimizer.lr"])
    assert written.train.epochs == best.params["train.epochs"]
    assert written.experiment == "s-best"
    assert score(written) == pytest.approx(best.value)  # reproduces the trial's score
    raw = yaml.safe_load((tmp_path / "runs" / "s" / "best.yaml").read_text())
    assert set(raw) <= {"experiment", "data", "optimizer", "train", "model"}  # overrides only

    # a second call finds the study complete and trains nothing
    tune(config, [], search, workdir=tmp_path, trainer=stand_in)
    assert len(optuna.load_study(study_name="s", storage=study._storage).trials) == 8

    table = report(search, "base", workdir=tmp_path)
    assert table.splitlines()[0].split() == ["trial", "state", "value", "seconds", "params"]
    assert sum(" pruned " in line for line in table.splitlines()) == states.count(
        optuna.trial.TrialState.PRUNED)
    for name in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / "runs" / "s" / name).read_bytes()[:4] == b"\x89PNG"


def postgres_binaries() -> Path | None:
    """The folder of PostgreSQL's initdb and pg_ctl (Debian keeps them out of PATH)."""
    import shutil

    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of this test's own on 127.0.0.1 (trust authentication), stopped at
    the end; its URL. Skips, saying why, where the server cannot run here."""
    import os
    import shutil
    import tempfile

    from system.test_scaleout import free_ports

    pytest.importorskip("psycopg2", reason="no PostgreSQL driver: pip install -e '.[tune]'")
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; "
                    ".ci/run installs it when apt can run)")
    as_user: list[str] = []
    # initdb refuses to run as root: run the server as Debian's postgres user then
    folder = Path(tempfile.mkdtemp(prefix="tfpneumo-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_ports(1)[0]
    data = folder / "data"

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    run(str(binaries / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"), "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


TINY_RUN = {  # as tests/system/test_multi_worker.py: a thin resnet18 UNet at 64 px
    "experiment": "tiny", "seed": 3,
    "data": {"image_size": 64, "batch_size": 4, "shuffle_buffer": 16},
    "augment": {"hflip": 0.0, "color_p": 0.0, "affine_p": 0.0},
    "model": {"encoder": "resnet18", "encoder_weights": "none",
              "decoder_filters": [16, 8, 8, 8, 8], "skip_dropout": 0.0, "head_dropout": 0.0},
    "optimizer": {"warmup_epochs": 0.0},
    "train": {"epochs": 2, "steps_per_epoch": 2, "swa_epochs": 0, "top_k": 1,
              "tensorboard_images": 0, "val_thresholds": [0.5]},
}


@pytest.mark.slow
def test_two_processes_train_real_trials_on_one_postgres_study(tmp_path, postgres):
    """Two `tfpneumo tune` processes on one PostgreSQL study (the multi-machine setup) train
    real trials on a tiny cache: disjoint trials, exactly the requested count, each trial an
    ordinary run whose history agrees with its state (a pruned one stopped early), and the
    best config, trained again with the same seed, reproduces its trial's score."""
    import json

    import optuna
    from factories import COUNTS, write_shards
    from system.test_scaleout import child_env

    write_shards(tmp_path / "cache", COUNTS)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "data": {**TINY_RUN["data"],
                                                           "cache": str(tmp_path / "cache")}}))
    # one trial a process (the median pruner needs two finished trials before it prunes;
    # tests above check pruning with a stand-in trainer)
    search = write_search(tmp_path, trials=2, pruner="median", sampler="random",
                          space={"optimizer.lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True}})
    # one thread per op: the two processes share the two cores
    env = child_env(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1")
    command = [sys.executable, "-m", "tfpneumo.cli", "tune", "--search", str(search),
               "--config", str(config), "--storage", postgres]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    for out, _ in outs:  # the summary alone: training's lines went to stderr
        assert out.startswith("study s: ") and len(out.strip().splitlines()) == 1, out[-2000:]

    study = optuna.load_study(study_name="s", storage=postgres)
    counted = [t for t in study.trials if t.user_attrs.get("note") is None]
    assert len(counted) == 2  # exactly the requested trials, over both processes
    logged = [int(line.split()[1].rstrip(":")) for _, err in outs for line in err.splitlines()
              if line.startswith("trial ")]
    assert sorted(logged) == sorted(t.number for t in counted)  # each ran once, in one process
    states = optuna.trial.TrialState
    for t in counted:
        assert t.state in (states.COMPLETE, states.PRUNED), t
        run = tmp_path / "runs" / t.user_attrs["experiment"] / "fold_0"
        epochs = len((run / "history.csv").read_text().splitlines()) - 1
        assert epochs == len(t.intermediate_values)  # one report a finished epoch
        if t.state == states.PRUNED:  # marked so: stopped before its last epoch
            assert epochs < TINY_RUN["train"]["epochs"]
        else:
            assert epochs == TINY_RUN["train"]["epochs"]
            result = json.loads((run / "result.json").read_text())
            assert t.value == pytest.approx(result["best_oof_dice"], abs=1e-12)

    # the best config trained again (same seed, same cache) reproduces its trial's score
    best = study.best_trial
    again = subprocess.run([sys.executable, "-m", "tfpneumo.cli", "train", "--config",
                            str(tmp_path / "runs" / "s" / "best.yaml"), "--fold", "0"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    result = json.loads((tmp_path / "runs" / "s-best" / "fold_0" / "result.json").read_text())
    assert result["best_oof_dice"] == pytest.approx(best.value, abs=1e-6)


def test_a_trial_prints_training_to_stderr(monkeypatch, capsys):
    """stdout is tune's summary alone (a script can read it); training's lines go to stderr."""
    import tfpneumo.training.run as run
    from tfpneumo.tune import train_trial

    def train(cfg, folds, workdir, callbacks):
        print("Epoch 1/4 - val_dice 0.5")
        return types.SimpleNamespace(folds=[{"fold": k} for k in folds])

    monkeypatch.setattr(run, "train", train)
    assert train_trial(None, (0, 1), [], Path(".")) == [{"fold": 0}, {"fold": 1}]
    out, err = capsys.readouterr()
    assert out == "" and err == "Epoch 1/4 - val_dice 0.5\n"


def test_the_rule_objective_is_evaluates_best_rule_on_the_trials_folds(tmp_path):
    """objective: rule -> each trial's value is the best rule's score in the evaluation.json
    that `tfpneumo evaluate` writes for its run (both folds pooled), not result.json's."""
    import json

    import numpy as np
    import optuna
    from evaluation.test_evaluate import make_stats, random_maps, write_fold

    from tfpneumo.tune import tune

    def trainer(cfg, folds, callbacks, workdir):
        """Out-of-fold statistics that differ by trial (seeded by the trial's lr)."""
        rng = np.random.default_rng(int(cfg.optimizer.lr * 1e7))
        for k in folds:
            probs, truth, label_prob = random_maps(rng, n=12, size=16)
            write_fold(workdir / "runs" / cfg.experiment, k,
                       make_stats(probs, truth, label_prob, fold=k,
                                  ids=[f"f{k}_{i}" for i in range(12)]))
        return [{"fold": k, "best_oof_dice": -1.0, "best_val_dice": -1.0} for k in folds]

    search = write_search(tmp_path, objective="rule", trials=3, pruner="none", folds=[0, 1])
    tune(write_config(tmp_path), [], search, workdir=tmp_path, trainer=trainer)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/runs/s/study.db")
    values = []
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        run = tmp_path / "runs" / t.user_attrs["experiment"]
        summary = json.loads((run / "evaluation.json").read_text())
        assert summary["folds_used"] == [0, 1] and summary["n_images"] == 24
        assert t.value == summary["best"]["score"]  # not result.json's -1
        values.append(t.value)
    assert len(set(values)) == 3  # three trials, three different statistics
