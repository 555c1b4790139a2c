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


def test_a_failed_start_writes_nothing_so_the_corrected_rerun_is_not_refused(tmp_path, monkeypatch):
    # Issue 11: train wrote config.yaml before checking its inputs, so after a one-line error
    # (a bad model.encoder_weights) the rerun with the fix was "trained with another config".
    from typer.testing import CliRunner

    from tfpneumo.cli import app
    from tfpneumo.data.manifest import write_manifest

    cache = tmp_path / "cache"
    cache.mkdir()
    write_manifest(cache, size=64, folds=2, clahe=False)  # a manifest, no shards
    monkeypatch.chdir(tmp_path)
    base = ["train", "--fold", "0", "--set", "experiment=x", "--set", f"data.cache={cache}",
            "--set", "data.image_size=64", "--set", "data.batch_size=2"]
    cases = [
        (["--set", f"model.encoder_weights={tmp_path / 'missing.weights.h5'}"],
         "model.encoder_weights: ", "missing.weights.h5 not found"),
        (["--set", f"model.encoder_weights={cache / 'manifest.json'}"],
         "model.encoder_weights: ", "is not a .weights.h5 or .h5"),
        # the inputs are fine but the cache has no shards: found while building the input
        (["--set", "model.encoder_weights=none"], str(cache)),
    ]
    for extra, *needles in cases:
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        assert all(n in errors[0] for n in needles), errors[0]
        assert not (tmp_path / "runs").exists(), sorted(map(str, (tmp_path / "runs").rglob("*")))


def test_a_run_saved_before_a_key_existed_resumes_unless_the_key_is_changed(tmp_path):
    # A config.yaml written by an older tfpneumo lacks keys added since; they take their
    # defaults when the run is resumed. Another value for them is still another config.
    import pytest
    import yaml

    from tfpneumo.config import load_config, to_dict
    from tfpneumo.errors import TfpneumoError
    from tfpneumo.training.run import _check_same_config

    cfg = load_config(None, ["experiment=old"])
    older = to_dict(cfg)
    del older["data"]["max_dicom_mib"], older["loss"]["dice_smooth"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    _check_same_config(cfg, tmp_path)
    with pytest.raises(TfpneumoError, match="trained with another config"):
        _check_same_config(load_config(None, ["experiment=old", "loss.dice_smooth=2"]), tmp_path)
    with pytest.raises(TfpneumoError, match="trained with another config"):
        _check_same_config(load_config(None, ["experiment=old", "optimizer.lr=0.5"]), tmp_path)
