"""End to end through the real CLI: the demo (synth -> prepare -> train -> evaluate -> submit ->
predict), learning over the untrained model and the run folder. (kill -9 and SIGTERM during
training, and the resumed run: tests/system/test_multi_worker.py, through the same loop.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tfpneumo.cli", *args], cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory) -> Path:
    """The README's main command, once: synth, prepare, train fold 0, evaluate, submit, predict."""
    work = tmp_path_factory.mktemp("demo")
    r = run_cli("demo", "--workdir", "tfpneumo-demo", cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    (work / "demo.out").write_text(r.stdout)
    return work / "tfpneumo-demo"


@pytest.fixture(scope="module")
def trained_demo(demo_workdir: Path) -> Path:
    return demo_workdir / "runs" / "demo" / "fold_0"


@pytest.mark.slow
def test_demo_ends_with_submission_table_and_overlay(demo_workdir: Path):
    out = (demo_workdir.parent / "demo.out").read_text()
    assert "all-empty" in out and "best rule (pooled)" in out  # the evaluation table
    assert "all-empty baseline" in out
    ids = (demo_workdir / "demo-data" / "sample_submission.csv").read_text().splitlines()[1:]
    rows = (demo_workdir / "submission.csv").read_text().splitlines()
    assert rows[0] == "ImageId,EncodedPixels"
    assert [r.split(",")[0] for r in rows[1:]] == [i.split(",")[0] for i in ids]
    assert len(list((demo_workdir / "predictions").glob("*_overlay.png"))) == 1
    assert (demo_workdir / "runs" / "demo" / "evaluation_heatmap.png").exists()


@pytest.mark.slow
def test_evaluate_and_submit_run_from_the_command_line_on_the_demo_run(demo_workdir: Path):
    r = run_cli("evaluate", "--config", str(DEMO), "--thresholds", "0.3:0.6", cwd=demo_workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "all-empty" in r.stdout
    # training recorded every merge of the flip members: evaluate compares the four
    merges = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ")
              and "  triplet " in line]
    assert merges == ["mean", "median", "geomean", "mask_median"], r.stdout
    r = run_cli("submit", "--config", str(DEMO), "--out", "again.csv", "--size", "128",
                "--merge", "mask_median", cwd=demo_workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "merge=mask_median" in r.stdout
    from tfpneumo.data.rle import decode

    for row in (demo_workdir / "again.csv").read_text().splitlines()[1:]:
        image_id, rle = row.split(",")
        assert decode(rle, shape=(256, 256)).shape == (256, 256)  # the demo's DICOMs are 256 px
    r = run_cli("evaluate", "--config", str(DEMO), "--thresholds", "0.6:0.3", cwd=demo_workdir)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "start must be <= stop" in r.stderr


def test_bfloat16_submission_moves_only_edge_pixels_of_the_trained_demo(demo_workdir: Path):
    """``submit --precision bfloat16`` on the trained demo network: the same images get a
    mask, and the masks differ from float32's in a few edge pixels (measured 5 of 3,102 and
    7 of 2,960 on two days)."""
    from tfpneumo.data.rle import decode

    masks = {}
    for precision in ("float32", "bfloat16"):
        r = run_cli("submit", "--config", str(DEMO), "--out", f"{precision}.csv", "--size", "128",
                    "--precision", precision, cwd=demo_workdir)
        assert r.returncode == 0, r.stderr[-2000:]
        assert ("bfloat16" in r.stdout) == (precision == "bfloat16")
        rows = (demo_workdir / f"{precision}.csv").read_text().splitlines()[1:]
        masks[precision] = {row.split(",")[0]: decode(row.split(",")[1], shape=(256, 256))
                            for row in rows}
    assert masks["float32"].keys() == masks["bfloat16"].keys()
    # An image whose label probability sits at the threshold may change its decision (none
    # did when measured); the masks of the others differ at their edges only.
    same = [k for k in masks["float32"]
            if masks["float32"][k].any() == masks["bfloat16"][k].any()]
    assert len(same) >= len(masks["float32"]) - 1
    full = sum(int(masks["float32"][k].sum()) for k in same)
    assert full > 0
    differ = sum(int((masks["float32"][k] != masks["bfloat16"][k]).sum()) for k in same)
    print(f"bfloat16: {differ} of {full} mask pixels differ")
    assert differ <= 0.02 * full
    r = run_cli("submit", "--config", str(DEMO), "--out", "half.csv", "--precision", "half",
                cwd=demo_workdir)
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: --precision half: must be one of float32, bfloat16")
    assert not (demo_workdir / "half.csv").exists()


@pytest.mark.slow
def test_run_folder_has_every_artefact(trained_demo: Path):
    for name in ("config.yaml", "history.csv", "best.weights.h5", "final.keras", "best.keras",
                 "swa.keras", "topk.keras", "oof.npz", "result.json", "state/state.json",
                 *(f"oof_{kind}.npz" for kind in ("final", "best", "topk", "swa"))):
        assert (trained_demo / name).exists(), name
    # the averaged network is the model: oof.npz describes SWA's predictions, not best's
    with np.load(trained_demo / "oof.npz") as auto, np.load(trained_demo / "oof_swa.npz") as swa, \
            np.load(trained_demo / "oof_best.npz") as best:
        assert str(auto["model"]) == "swa"
        np.testing.assert_array_equal(auto["hist_all"], swa["hist_all"])
        assert not np.array_equal(auto["hist_all"], best["hist_all"])
    result = json.loads((trained_demo / "result.json").read_text())
    assert result["oof_model"] == "swa" and result["learned"] and result["learning_note"] is None
    assert list((trained_demo / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(list((trained_demo / "checkpoints").glob("*.weights.h5"))) == 2  # top_k: 2
    header, *rows = (trained_demo / "history.csv").read_text().splitlines()
    assert header.split(",")[0] == "epoch"
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 9))
    assert {"lr", "val_dice", "val_label_auc", "val_mask_dice@0.5"} <= set(header.split(","))


@pytest.mark.slow
def test_training_beats_untrained_model_and_empty_baseline(trained_demo: Path, demo_workdir: Path):
    import keras

    from tfpneumo.config import load_config
    from tfpneumo.data.pipeline import eval_dataset
    from tfpneumo.evaluation.oof import dice_from_histograms, out_of_fold_statistics
    from tfpneumo.models.unet import build_model

    cfg = load_config(trained_demo / "config.yaml")
    keras.utils.set_random_seed(cfg.seed)  # the trained run started from this initialisation
    untrained = build_model(cfg.model)
    val = eval_dataset(cfg.data.cache, 0, cfg, split="val")
    before = out_of_fold_statistics(untrained, val)
    with np.load(trained_demo / "oof.npz") as oof:
        after = {k: oof[k] for k in oof.files}
    assert list(after["image_id"]) == list(before["image_id"])
    def best(stats):  # the validation rules: mask alone, or gated by the classification head
        return max(dice_from_histograms(stats, t, gate) for t in cfg.train.val_thresholds
                   for gate in (None, 0.5))

    score_before, score_after = best(before), best(after)
    assert score_after > score_before + 0.1, (score_before, score_after)
    result = json.loads((trained_demo / "result.json").read_text())
    assert result["best_val_dice"] > result["empty_baseline"], result


@pytest.mark.slow
def test_weights_other_than_auto_use_their_own_rule(demo_workdir: Path):
    data = demo_workdir / "demo-data"
    common = ["--config", str(DEMO), "--data", str(data), "--size", "128", "--out"]
    r = run_cli("submit", *common, "topk.csv", "--weights", "topk", cwd=demo_workdir)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr[-2000:]
    assert "evaluate --weights topk" in r.stderr and not (demo_workdir / "topk.csv").exists()
    r = run_cli("evaluate", "--config", str(DEMO), "--weights", "topk", cwd=demo_workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((demo_workdir / "runs" / "demo" / "evaluation_topk.json").read_text())
    assert summary["weights"] == "topk" and summary["folds"]["0"]["model"] == "topk"
    r = run_cli("submit", *common, "topk.csv", "--weights", "topk", cwd=demo_workdir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "evaluation_topk.json" in r.stdout and "topk.keras" in r.stdout
