"""``tfpneumo train --parallel N``: the scheduling of fold processes, their environments, the
summary and failures. The fold processes here are small stand-ins that write what a fold run
writes (run state, result.json) and record when they ran; training itself is the ordinary
``tfpneumo train --fold k`` (tests/system/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tfpneumo import TfpneumoError
from tfpneumo.config import load_config, to_dict
from tfpneumo.training.parallel import slot_environments, train_parallel

STAND_IN = r"""
import json, sys, time
from pathlib import Path
config, fold = sys.argv[1], int(sys.argv[2])
run = Path("runs/par/fold_%d" % fold)
(run / "state").mkdir(parents=True, exist_ok=True)
start = time.time()
time.sleep(0.3)
(run / "state" / "state.json").write_text(json.dumps({"completed_epochs": 1}))
time.sleep(0.3)
Path("times_%d.json" % fold).write_text(json.dumps([start, time.time(), config]))
if fold == 2:
    print("error: fold 2 ran out of luck")
    sys.exit(1)
(run / "result.json").write_text(json.dumps({
    "fold": fold, "best_val_dice": 0.5 + fold / 10, "best_oof_dice": 0.6,
    "empty_baseline": 0.4, "run_dir": str(run)}))
"""


def stand_in(config_file: Path, fold: int) -> list[str]:
    return [sys.executable, "-c", STAND_IN, str(config_file), str(fold)]


def test_slots_split_the_gpus_or_the_cores():
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_environments(2, ["0", "1", "2", "3"], 8)] \
        == ["0,2", "1,3"]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in slot_environments(3, ["0", "1"], 8)] \
        == ["0", "1", "0"]  # more slots than GPUs: they share
    assert slot_environments(2, [], 8) == [{"TF_NUM_INTRAOP_THREADS": "4",
                                            "TF_NUM_INTEROP_THREADS": "4"}] * 2
    assert slot_environments(4, [], 2)[0]["TF_NUM_INTRAOP_THREADS"] == "1"


def test_at_most_n_folds_at_once_one_summary_and_the_failed_fold_named(tmp_path, capsys):
    cfg = load_config(None, ["experiment=par"])
    with pytest.raises(TfpneumoError, match=r"fold\(s\) 2 failed") as error:
        train_parallel(cfg, [0, 1, 2, 3], 2, workdir=tmp_path, command=stand_in)
    assert "\n" not in str(error.value)
    summary = capsys.readouterr().out
    lines = summary.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["fold 0", "fold 1", "fold 2", "fold 3"]
    assert "best val Dice 0.6000" in lines[1] and "all-empty 0.4000" in lines[1]
    assert "failed (exit 1): error: fold 2 ran out of luck" in lines[2]
    assert "logs/fold_2.log" in lines[2]

    times = [json.loads((tmp_path / f"times_{k}.json").read_text()) for k in range(4)]
    for t in sorted(x for start, end, _ in times for x in (start, end)):
        assert sum(start <= t < end for start, end, _ in times) <= 2  # never 3 at once
    assert max(start for start, _, _ in times) > min(end for _, end, _ in times)  # queued
    # every fold read the same resolved config, written once next to the logs
    config_files = {c for _, _, c in times}
    assert config_files == {str(tmp_path / "runs" / "par" / "logs" / "config.yaml")}
    assert to_dict(load_config(config_files.pop())) == to_dict(cfg)


def test_a_failure_free_run_returns_the_summary(tmp_path):
    cfg = load_config(None, ["experiment=par"])
    summary = train_parallel(cfg, [0, 1], 3, workdir=tmp_path, command=stand_in)
    assert summary.splitlines()[0].startswith("fold 0: best val Dice 0.5000")
    assert (tmp_path / "runs" / "par" / "logs" / "fold_1.log").exists()
