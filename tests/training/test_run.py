"""What a finished training run says about itself."""

from __future__ import annotations

from tfpneumo.training.run import LEARNED_MARGIN, TrainResult, learning_verdict


def test_a_run_that_does_not_beat_all_empty_says_so_and_what_to_try():
    assert learning_verdict(0.90, 0.84) is None
    assert learning_verdict(0.84 + LEARNED_MARGIN, 0.84) is None
    note = learning_verdict(0.845, 0.8438)
    assert note.startswith("did not learn") and "0.8450" in note and "0.8438" in note
    assert "train.epochs" in note and "optimizer.lr" in note
    result = {"fold": 0, "best_val_dice": 0.85, "best_oof_dice": 0.845, "oof_model": "swa",
              "empty_baseline": 0.8438, "run_dir": "runs/demo/fold_0", "learning_note": note}
    lines = str(TrainResult([result])).splitlines()
    assert lines[1] == f"warning: fold 0 {note}"
    assert len(str(TrainResult([{**result, "learning_note": None}])).splitlines()) == 1
