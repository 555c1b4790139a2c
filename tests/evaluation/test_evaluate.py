"""Out-of-fold rule search: grids, the competition metric via histograms, brute-force oracle,
and ``evaluate()`` end to end on fake run folders."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from tfpneumo import TfpneumoError
from tfpneumo.config import Config
from tfpneumo.evaluation.oof import OofStats
from tfpneumo.evaluation.report import _border_notes, evaluate
from tfpneumo.evaluation.rules import Rule
from tfpneumo.evaluation.search import Grids, search, snap
from tfpneumo.grammar import area_grid, parse_folds, parse_grid, parse_merges, probability_grid
from tfpneumo.runs import EVALUATION_JSON, evaluation_names

_, IMAGES_CSV, HEATMAP_PNG = evaluation_names("auto")

BINS = 256


# ----------------------------------------------------------------------------- grids

@pytest.mark.parametrize("text, expected", [
    ("0.3:0.6", [0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]),
    ("0.2:0.5:0.1", [0.2, 0.3, 0.4, 0.5]),
    ("0.1:0.7:0.3", [0.1, 0.4, 0.7]),
    ("0:800:200", [0, 200, 400, 600, 800]),
    ("0.3:0.45:0.1", [0.3, 0.4]),  # stop not on the grid: not included
    ("0.5:0.5", [0.5]),
    ("0.3,0.5", [0.3, 0.5]),
    (" 0.5 , 0.3,0.5 ", [0.3, 0.5]),  # sorted, deduplicated, spaces ignored
    ("0.7", [0.7]),
])
def test_parse_grid(text, expected):
    values = parse_grid(text, "--thresholds")
    assert values.dtype == np.float64
    assert values.tolist() == expected  # exact: float error is rounded away


@pytest.mark.parametrize("text, problem", [
    ("0.6:0.3", "start must be <= stop"),
    ("0.1:0.5:0", "step must be > 0"),
    ("0.1:0.5:-0.1", "step must be > 0"),
    ("a:0.5", "'a' is not a number"),
    ("0.1:", "expected start:stop or start:stop:step"),
    ("1:2:3:4", "expected start:stop or start:stop:step"),
    ("", "empty"),
    ("0.1,,0.2", "empty item"),
    ("0.1:0.5,0.6", "not both"),
    ("nan", "not a finite number"),
    ("0:1:1e-7", "at most"),
])
def test_parse_grid_errors(text, problem):
    with pytest.raises(TfpneumoError) as info:
        parse_grid(text, "--thresholds")
    message = str(info.value)
    assert message.startswith(f"--thresholds {text!r}: ")
    assert problem in message
    assert "\n" not in message


def test_parse_grid_error_message_exact():
    with pytest.raises(TfpneumoError, match=r"^--thresholds '0\.6:0\.3': start must be <= stop$"):
        parse_grid("0.6:0.3", "--thresholds")


def test_snap_to_bin_edges():
    # ceil(256 t): 0.3 -> 76.8 -> 77, 0.5 -> 128 exactly (despite 0.3 + 4 * 0.05 float error)
    assert snap(parse_grid("0.3:0.6", "x"), BINS).tolist() == [77, 90, 103, 116, 128, 141, 154]
    assert snap(np.array([0.0, 1.0, 0.5, 0.501]), BINS).tolist() == [0, 128, 129, 256]
    assert snap(np.array([0.3, 0.3005]), BINS).tolist() == [77]  # both in (76/256, 77/256]


# ----------------------------------------------------------------------------- metric

def numpy_histograms(probs: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) maps -> (N, 256) histograms, bins as in tfpneumo.inference.ensemble (numpy version)."""
    index = np.clip((probs.reshape(len(probs), -1) * BINS).astype(np.int64), 0, BINS - 1)
    hist_all = np.stack([np.bincount(i, minlength=BINS) for i in index])
    hist_true = np.stack([np.bincount(i, weights=t.ravel(), minlength=BINS)
                          for i, t in zip(index, truth > 0.5, strict=True)])
    return hist_all.astype(np.int32), hist_true.astype(np.int32)


def make_stats(probs, truth, label_prob, fold=0, ids=None) -> OofStats:
    hist_all, hist_true = numpy_histograms(probs, truth)
    n = len(probs)
    return OofStats(
        image_id=np.array(ids if ids is not None else [f"img{i}" for i in range(n)]),
        fold=np.full(n, fold, np.int64),
        label_prob=np.asarray(label_prob, np.float32),
        has_mask=(truth.reshape(n, -1).max(axis=1) > 0).astype(np.int8),
        hist_all=hist_all, hist_true=hist_true,
        pixels=hist_all.sum(axis=1).astype(np.int64))


def hand_worked_stats() -> OofStats:
    """Four 4x4 images whose scores are worked out by hand in the test below."""
    probs = np.full((4, 4, 4), 0.1, np.float32)
    truth = np.zeros((4, 4, 4), np.float32)
    probs[1, 3, 3] = 0.9  # B: empty truth, one confident pixel
    truth[2, 0:2, 0:2] = 1  # C: truth 4 px; 2 of them at 0.9, 2 at 0.4; 2 false px at 0.9
    probs[2, 0, 0:2] = 0.9
    probs[2, 1, 0:2] = 0.4
    probs[2, 2, 2:4] = 0.9
    truth[3, 0, 0:2] = 1  # D: truth 2 px, nothing predicted
    return make_stats(probs, truth, label_prob=[0.1, 0.2, 0.9, 0.6])


def test_metric_hand_worked_through_histograms():
    stats = hand_worked_stats()
    # edges 77 (= 0.3008) and 128 (= 0.5); areas 0 and 2
    grids = Grids(bins=BINS, tops=np.array([128]), min_areas=np.array([0, 2]),
                  bottoms=np.array([77]), label_thresholds=np.array([0.5]))
    result = search(stats, grids)
    assert result.empty_score == 0.5  # A and B are empty
    # plain >= 0.3: A 1 (empty/empty), B 0 (1 false px), C 2*4/(6+4) = 0.8, D 0
    # plain >= 0.5: A 1, B 0, C 2*2/(4+4) = 0.5, D 0
    np.testing.assert_allclose(result.plain, [(1 + 0.8) / 4, (1 + 0.5) / 4], atol=1e-12)
    # triplet (top 0.5, area 2): A, B called empty (0 and 1 px >= 0.5) -> 1, 1; C positive
    # (4 px) with bottom 0.3 -> 0.8 or bottom 0.5 -> 0.5; D called empty -> 0
    np.testing.assert_allclose(result.triplet[0, 1], [2.8 / 4, 2.5 / 4], atol=1e-12)
    # area 0: everything positive = the plain rule
    np.testing.assert_allclose(result.triplet[0, 0], result.plain, atol=1e-12)
    # label > 0.5: A, B negative -> 1, 1; C positive -> 0.8 / 0.5; D positive, mask empty -> 0
    np.testing.assert_allclose(result.label[0], [2.8 / 4, 2.5 / 4], atol=1e-12)
    best = result.best_triplet()
    assert (best["top"], best["min_area"], best["bottom"], best["score"]) == pytest.approx(
        (0.5, 2, 77 / 256, 0.7))
    pred, dice = Rule.from_json(best).score_oof(stats)
    assert pred.tolist() == [0, 0, 6, 0]
    np.testing.assert_allclose(dice, [1, 1, 0.8, 0], atol=1e-12)


def test_border_notes_only_when_the_edge_wins_outright():
    stats = hand_worked_stats()
    grids = Grids(bins=BINS, tops=np.array([128]), min_areas=np.array([0, 2]),
                  bottoms=np.array([77]), label_thresholds=np.array([0.3, 0.5]))
    result = search(stats, grids)
    # area 2 (the largest) scores 0.7, area 0 only 0.45: widen the grid
    assert _border_notes(result.best_triplet(), result) == [
        "note: the best min area is the largest searched; consider widening --min-areas"]
    # label > 0.3 and > 0.5 split the images alike (0.1, 0.2 | 0.6, 0.9): a tie, no note;
    # the mask threshold 0.3 (the smallest edge) beats 0.5 (0.7 against 0.625): a note
    best_label = result.best_label()
    assert best_label["label_threshold"] == 0.3 and best_label["score"] == pytest.approx(0.7)
    assert _border_notes(best_label, result) == [
        "note: the best mask threshold is the smallest searched; consider widening --bottoms"]


def test_perfect_and_disjoint_masks():
    probs = np.zeros((2, 8, 8), np.float32)
    truth = np.zeros((2, 8, 8), np.float32)
    truth[:, 2:5, 2:5] = 1
    probs[0, 2:5, 2:5] = 0.95  # perfect
    probs[1, 6:8, 6:8] = 0.95  # disjoint
    stats = make_stats(probs, truth, label_prob=[0.9, 0.9])
    grids = Grids(bins=BINS, tops=np.array([128]), min_areas=np.array([0]),
                  bottoms=np.array([128]), label_thresholds=np.array([0.5]))
    pred, dice = Rule.from_json(search(stats, grids).best_triplet()).score_oof(stats)
    assert pred.tolist() == [9, 4]
    assert dice.tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- brute force

def random_maps(rng: np.random.Generator, n: int = 30, size: int = 32):
    """Probability maps with blobs near their truth, exact bin-edge values and 1.0 pixels."""
    yy, xx = np.mgrid[:size, :size]
    probs = rng.uniform(0, 0.45, (n, size, size)).astype(np.float32)
    truth = np.zeros((n, size, size), np.float32)
    for i in range(n):
        cy, cx, r = rng.uniform(6, size - 6, 2).tolist() + [rng.uniform(1.5, 7)]
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if rng.random() < 0.5:
            truth[i][blob] = 1
        if rng.random() < 0.7:  # a prediction, shifted, for positives and some negatives
            shifted = np.roll(blob, rng.integers(-3, 4, 2), axis=(0, 1))
            probs[i][shifted] = rng.uniform(0.3, 1.0, shifted.sum())
    # pixels exactly on bin edges, and saturated ones: the tie rule must match
    flat = probs.reshape(-1)
    spots = rng.choice(flat.size, 300, replace=False)
    flat[spots[:250]] = rng.integers(0, 256, 250) / 256
    flat[spots[250:]] = 1.0
    return probs, truth, rng.uniform(0, 1, n).astype(np.float32)


def brute_force(probs, truth, label_prob, grids: Grids):
    """Scores from the maps themselves: pixel on iff prob >= edge / 256 (edge 256: never)."""
    def on(k):
        return probs >= k / BINS if k < BINS else np.zeros_like(probs, bool)

    def mean_dice(masks):  # (N, H, W) bool
        inter = (masks & (truth > 0)).sum(axis=(1, 2))
        denom = masks.sum(axis=(1, 2)) + (truth > 0).sum(axis=(1, 2))
        return np.mean([1.0 if d == 0 else 2 * i / d for i, d in zip(inter, denom, strict=True)])

    edges = grids.edges
    triplet = np.full((len(grids.tops), len(grids.min_areas), len(edges)), np.nan)
    for t, top in enumerate(grids.tops):
        for a, area in enumerate(grids.min_areas):
            gate = on(top).sum(axis=(1, 2)) >= area
            for e, bottom in enumerate(edges):
                if bottom <= top and (bottom in grids.bottoms or bottom == top):
                    triplet[t, a, e] = mean_dice(on(bottom) & gate[:, None, None])
    label = np.array([[mean_dice(on(b) & (label_prob > lt)[:, None, None]) for b in edges]
                      for lt in grids.label_thresholds])
    plain = np.array([mean_dice(on(b)) for b in edges])
    return triplet, label, plain


def tf_stats(tf, probs, truth, label_prob) -> OofStats:
    """Histograms exactly as training writes them (tfpneumo.inference.ensemble)."""
    from tfpneumo.evaluation.oof import probability_histograms

    hist_all, hist_true = probability_histograms(tf.constant(probs[..., None]),
                                                 tf.constant(truth[..., None]))
    hist_all, hist_true = hist_all.numpy(), hist_true.numpy()
    n = len(probs)
    return OofStats(image_id=np.array([f"r{i}" for i in range(n)]), fold=np.zeros(n, np.int64),
                    label_prob=label_prob, has_mask=(truth.max(axis=(1, 2)) > 0).astype(np.int8),
                    hist_all=hist_all, hist_true=hist_true,
                    pixels=hist_all.sum(axis=1).astype(np.int64))


def test_search_equals_brute_force_on_bin_edges(tf):
    rng = np.random.default_rng(3)
    probs, truth, label_prob = random_maps(rng)
    stats = tf_stats(tf, probs, truth, label_prob)
    # the numpy histogram used elsewhere in this file agrees with the TF one
    np.testing.assert_array_equal(numpy_histograms(probs, truth)[0], stats.hist_all)
    grids = Grids(bins=BINS, tops=np.array([64, 77, 100, 128, 154, 200, 255, 256]),
                  min_areas=np.array([0, 1, 3, 10, 30, 100]),
                  bottoms=np.array([0, 51, 77, 102, 128]),
                  label_thresholds=np.array([0.2, 0.5, 0.8]))
    result = search(stats, grids)
    triplet, label, plain = brute_force(probs, truth, label_prob, grids)
    np.testing.assert_array_equal(np.isnan(result.triplet), np.isnan(triplet))
    np.testing.assert_allclose(result.triplet, triplet, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.label, label, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.plain, plain, rtol=0, atol=1e-9)
    assert result.empty_score == pytest.approx(np.mean(truth.max(axis=(1, 2)) == 0))
    # the rule search must not be trivially flat on this data
    assert np.nanmax(triplet) - np.nanmin(triplet) > 0.1


def test_off_grid_thresholds_score_at_the_snapped_edge(tf):
    rng = np.random.default_rng(7)
    probs, truth, label_prob = random_maps(rng)
    stats = tf_stats(tf, probs, truth, label_prob)
    tops, bottoms = np.array([0.33, 0.47, 0.61]), np.array([0.21, 0.33])
    grids = Grids(bins=BINS, tops=snap(tops, BINS), min_areas=np.array([0, 5, 20]),
                  bottoms=snap(bottoms, BINS), label_thresholds=np.array([0.5]))
    assert grids.tops.tolist() == [85, 121, 157] and grids.bottoms.tolist() == [54, 85]
    result = search(stats, grids)
    triplet, _, plain = brute_force(probs, truth, label_prob, grids)
    np.testing.assert_allclose(result.triplet, triplet, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.plain, plain, rtol=0, atol=1e-9)
    best = result.best_triplet()
    assert best["top"] * 256 in (85, 121, 157) and best["bottom"] * 256 in (54, 85, 121, 157)

    # "prob > t" at the raw thresholds differs from the snapped rule only through pixels in
    # [t, edge): with those pixels moved onto the edge, the raw rule scores the same
    for t in np.concatenate([tops, bottoms]):
        edge = np.ceil(t * BINS) / BINS
        probs[(probs >= t) & (probs < edge)] = edge
    stats = tf_stats(tf, probs, truth, label_prob)
    result = search(stats, grids)
    fg = truth > 0
    checked = 0
    for (t, top), (a, area) in itertools.product(enumerate(tops), enumerate(grids.min_areas)):
        gate = (probs > top).sum(axis=(1, 2)) >= area
        for bottom in bottoms[bottoms <= top]:
            masks = (probs > bottom) & gate[:, None, None]
            inter, denom = (masks & fg).sum(axis=(1, 2)), masks.sum(axis=(1, 2)) + fg.sum(
                axis=(1, 2))
            raw = np.mean(np.where(denom == 0, 1.0, 2 * inter / np.maximum(denom, 1)))
            e = int(np.searchsorted(grids.edges, np.ceil(bottom * BINS)))
            assert result.triplet[t, a, e] == pytest.approx(raw, abs=1e-9)
            checked += 1
    assert checked == 3 * 3 * 2  # tops x areas x bottoms (both bottoms <= every top)


# ----------------------------------------------------------------------------- end to end

def write_fold(root: Path, fold: int, stats: OofStats, *, trained: bool = True,
               model: str = "best", name: str = "oof.npz",
               merged: dict[str, OofStats] | None = None) -> None:
    """One fold's statistics file as training writes it; ``merged``: {merge: its statistics}."""
    folder = root / f"fold_{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    extra = {f"{key}_{merge}": getattr(other, key) for merge, other in (merged or {}).items()
             for key in ("label_prob", "hist_all", "hist_true")}
    np.savez(folder / name, image_id=stats.image_id, label_prob=stats.label_prob,
             has_mask=stats.has_mask, hist_all=stats.hist_all, hist_true=stats.hist_true,
             pixels=stats.pixels, fold=fold, model=model, **extra)
    if trained:
        (folder / "result.json").write_text(json.dumps({"fold": fold}))


@pytest.fixture()
def fake_run(tmp_path: Path) -> tuple[Path, list[OofStats]]:
    rng = np.random.default_rng(11)
    root = tmp_path / "runs" / "x"
    parts = []
    for fold in range(2):
        probs, truth, label_prob = random_maps(rng, n=20, size=32)
        stats = make_stats(probs, truth, label_prob, fold=fold,
                           ids=[f"f{fold}_{i}" for i in range(20)])
        write_fold(root, fold, stats)
        parts.append(stats)
    write_fold(root, 2, parts[0], trained=False)  # started, never finished: ignored by "all"
    return tmp_path, parts


def test_evaluate_end_to_end(fake_run):
    workdir, parts = fake_run
    table = str(evaluate(Config(experiment="x"), workdir=workdir,
                         min_areas=area_grid("0,5,10,20,40", "--min-areas"),
                         thresholds=parse_grid("0.3:0.6", "--thresholds"),
                         bottoms=parse_grid("0.2:0.5:0.1", "--bottoms")))
    out = workdir / "runs" / "x"
    summary = json.loads((out / EVALUATION_JSON).read_text())
    pooled_stats = OofStats.concat(parts)
    empty = float(np.mean(pooled_stats.hist_true.sum(axis=1) == 0))

    assert summary["folds_used"] == [0, 1] and set(summary["folds"]) == {"0", "1"}
    assert summary["empty_score"] == pytest.approx(empty)
    assert f"{empty:.4f}" in table and "all-empty" in table and "fold 2" not in table
    assert summary["pixels"] == 32 * 32 and summary["image_side"] == 32
    assert summary["grids"]["top"] == [k / 256 for k in (77, 90, 103, 116, 128, 141, 154)]

    # the best rule is the best of the pooled searches, re-scored independently per image
    best, pooled = summary["best"], summary["pooled"]
    assert best["rule"] in ("triplet", "label")
    assert best["score"] == pytest.approx(max(pooled[k]["score"]
                                              for k in ("triplet", "label", "plain")))
    grids = Grids(bins=256, tops=snap(np.array([0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]), 256),
                  min_areas=np.array([0, 5, 10, 20, 40]), bottoms=snap(np.arange(2, 6) / 10, 256),
                  label_thresholds=np.arange(3, 9) / 10)
    triplet, label, _ = brute_force_from_parts(parts, grids)
    assert best["score"] == pytest.approx(max(np.nanmax(triplet), label.max()), abs=1e-9)
    if best["rule"] == "triplet":
        assert best["min_area_fraction"] == pytest.approx(best["min_area"] / 1024)
        assert best["bottom_bin"] <= best["top_bin"]

    with open(out / IMAGES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and rows[0].keys() == {"image_id", "fold", "has_mask", "label_prob",
                                                  "truth_area", "pred_area", "dice"}
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(best["score"], abs=1e-5)
    truth_area = {r["image_id"]: int(r["truth_area"]) for r in rows}
    assert truth_area["f1_3"] == int(parts[1].hist_true[3].sum())
    for k in ("0", "1"):  # the per-fold column of the pooled rule
        fold_rows = [float(r["dice"]) for r in rows if r["fold"] == k]
        assert summary["folds"][k]["best_rule_score"] == pytest.approx(np.mean(fold_rows),
                                                                       abs=1e-5)
        assert summary["folds"][k]["model"] == "best"

    from PIL import Image

    with Image.open(out / HEATMAP_PNG) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert not list(out.glob("*.tmp"))


def brute_force_from_parts(parts, grids):
    """Brute force needs maps; rebuild them from the same seed as ``fake_run``."""
    rng = np.random.default_rng(11)
    maps = [random_maps(rng, n=20, size=32) for _ in parts]
    probs, truth, label_prob = (np.concatenate(x) for x in zip(*maps, strict=True))
    return brute_force(probs, truth, label_prob, grids)


def test_evaluate_one_fold_and_out_dir(fake_run, tmp_path):
    workdir, parts = fake_run
    table = str(evaluate(Config(experiment="x"), folds=[1], workdir=workdir, out=tmp_path / "ev"))
    summary = json.loads((tmp_path / "ev" / EVALUATION_JSON).read_text())
    assert summary["folds_used"] == [1] and summary["n_images"] == 20
    # auto min areas: fractions of the 32x32 image, 0 included
    assert summary["grids"]["min_area"][0] == 0 and max(summary["grids"]["min_area"]) == 5
    assert "folds 1," in table
    assert not (workdir / "runs" / "x" / EVALUATION_JSON).exists()


def test_evaluate_errors(fake_run, tmp_path):
    workdir, _ = fake_run
    cfg = Config(experiment="x")
    with pytest.raises(TfpneumoError, match=r"fold_2/result.json: fold 2 is not trained \(or its "
                                            r"training did not finish\); run tfpneumo train --fold 2"):
        evaluate(cfg, folds=[2], workdir=workdir)
    with pytest.raises(TfpneumoError, match=r"fold 3 is not trained"):
        evaluate(cfg, folds=[0, 3], workdir=workdir)
    # the command line's grammar, parsed at the edge
    with pytest.raises(TfpneumoError, match=r"^--thresholds '0.6:0.3': start must be <= stop$"):
        probability_grid("0.6:0.3", "--thresholds")
    with pytest.raises(TfpneumoError, match=r"^--bottoms '0.2:1.5': values must be in \[0, 1\]$"):
        probability_grid("0.2:1.5", "--bottoms")
    with pytest.raises(TfpneumoError, match=r"^--min-areas '10.5': values must be whole"):
        area_grid("10.5", "--min-areas")
    with pytest.raises(TfpneumoError, match=r"^--folds 'one'"):
        parse_folds("one")
    with pytest.raises(TfpneumoError, match=r"runs/y: no trained fold"):
        evaluate(Config(experiment="y"), workdir=workdir)
    (workdir / "runs" / "x" / "fold_0" / "oof.npz").write_bytes(b"not a zip")
    with pytest.raises(TfpneumoError, match=r"fold_0/oof.npz: cannot read OOF statistics"):
        evaluate(cfg, workdir=workdir)


def _cut(path: Path, how: str) -> None:
    """Damages a whole numpy-written npz: cut short at several places, or one byte flipped."""
    data = bytearray(path.read_bytes())
    if how == "flip":  # inside hist_all's data: the zip member's CRC no longer matches
        at = data.find(b"hist_all.npy") + 400
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[:int(len(data) * float(how))]))


@pytest.mark.parametrize("name", ["oof.npz", "oof_topk.npz"])
@pytest.mark.parametrize("how", ["0", "0.002", "0.5", "0.99", "flip"])
def test_truncated_or_corrupt_oof_is_one_line(fake_run, name, how):
    """A cut-off oof.npz gave zipfile.BadZipFile / EOFError tracebacks: now one line naming the
    file and how to make it again (train, then evaluate)."""
    workdir, parts = fake_run
    root = workdir / "runs" / "x"
    for fold in range(2):
        write_fold(root, fold, parts[fold], model="topk", name=name)
    _cut(root / "fold_1" / name, how)
    weights = "topk" if name != "oof.npz" else "auto"
    with pytest.raises(TfpneumoError) as e:
        evaluate(Config(experiment="x"), folds=[0, 1], workdir=workdir, weights=weights)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(root / "fold_1" / name)), message
    assert "truncated or corrupt" in message or "not an OOF statistics file" in message, message
    assert "rerun `tfpneumo train --fold 1`, then `tfpneumo evaluate`" in message, message


def test_each_weights_kind_is_evaluated_on_its_own_statistics(fake_run):
    """--weights topk reads each fold's oof_topk.npz (here: other statistics than oof.npz) and
    writes evaluation_topk.*; a kind without statistics is a one-line error."""
    workdir, parts = fake_run
    rng = np.random.default_rng(12)
    root = workdir / "runs" / "x"
    other = []
    for fold in range(2):
        probs, truth, label_prob = random_maps(rng, n=20, size=32)
        stats = make_stats(probs, truth, label_prob, fold=fold, ids=[f"f{fold}_{i}" for i in range(20)])
        write_fold(root, fold, stats, model="topk", name="oof_topk.npz")
        other.append(stats)
    grids = {"min_areas": area_grid("0,5,10", "--min-areas"),
             "thresholds": parse_grid("0.3:0.6", "--thresholds")}
    auto = evaluate(Config(experiment="x"), workdir=workdir, **grids).summary
    topk = evaluate(Config(experiment="x"), workdir=workdir, weights="topk", **grids).summary
    json_name, images_name, heatmap_name = evaluation_names("topk")
    assert json.loads((root / json_name).read_text()) == json.loads(json.dumps(topk))
    assert (root / images_name).exists() and (root / heatmap_name).exists()
    assert topk["weights"] == "topk" and auto["weights"] == "auto"
    assert {f["model"] for f in topk["folds"].values()} == {"topk"}
    # the oracle: each search's empty score and pooled image count come from its own files
    for summary, source in ((auto, parts), (topk, other)):
        pooled = OofStats.concat(source)
        assert summary["empty_score"] == pytest.approx(
            float(np.mean(pooled.hist_true.sum(axis=1) == 0)))
    assert auto["best"] != topk["best"]
    with pytest.raises(TfpneumoError, match=r"fold_0/oof_swa\.npz: no out-of-fold statistics for "
                                            r"--weights swa") as info:
        evaluate(Config(experiment="x"), workdir=workdir, weights="swa", **grids)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- merges

def test_oof_statistics_hold_every_merge_of_the_flip_members(tf):
    """Oracle: an asymmetric toy network run by hand on the images and on their mirror, the
    two maps merged with numpy, histogrammed with numpy."""
    import keras

    from tfpneumo.evaluation.oof import out_of_fold_statistics

    rng = np.random.default_rng(21)
    image = keras.Input((None, None, 1))
    logits = keras.layers.Conv2D(1, 3, padding="same")(keras.layers.Rescaling(1 / 64)(image))
    mask = keras.layers.Activation("sigmoid", name="mask")(logits)
    net = keras.Model(image, {"mask": mask, "label": keras.layers.GlobalMaxPooling2D(name="label")(mask)})
    net.layers[2].set_weights([rng.normal(0, 1, (3, 3, 1, 1)).astype(np.float32), np.zeros(1, np.float32)])
    x = rng.uniform(0, 255, (5, 32, 32, 1)).astype(np.float32)
    truth = (rng.random((5, 32, 32, 1)) < 0.3).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(
        {"image": x, "mask": truth, "label": truth.max(axis=(1, 2, 3)),
         "image_id": [f"i{k}" for k in range(5)]}).batch(2)
    stats = out_of_fold_statistics(net, dataset)

    plain, mirrored = net(x), net(x[:, :, ::-1].copy())
    maps = np.stack([plain["mask"].numpy(), mirrored["mask"].numpy()[:, :, ::-1]])[..., 0]
    labels = np.stack([plain["label"].numpy()[:, 0], mirrored["label"].numpy()[:, 0]])
    assert np.abs(maps[0] - maps[1]).max() > 0.1  # the flip really changes the map
    oracle = {"": lambda a: a.mean(0), "_median": lambda a: np.median(a, 0),
              "_geomean": lambda a: np.exp(np.log(a).mean(0)), "_mask_median": lambda a: a.max(0)}
    for suffix, merge in oracle.items():
        hist_all, hist_true = numpy_histograms(merge(maps), truth[..., 0])
        # exp(mean(log)) in numpy and TF may differ in the last bit: a pixel on a bin edge
        assert np.abs(stats[f"hist_all{suffix}"] - hist_all).sum() <= 2, suffix
        assert np.abs(stats[f"hist_true{suffix}"] - hist_true).sum() <= 2, suffix
        np.testing.assert_allclose(stats[f"label_prob{suffix}"], merge(labels), atol=1e-6)
    assert not np.array_equal(stats["hist_all_geomean"], stats["hist_all"])
    # one member (no flip): nothing to merge, the file holds the mean only
    assert not any(k.endswith("median") for k in out_of_fold_statistics(net, dataset, hflip=False))


@pytest.fixture()
def merged_run(tmp_path: Path) -> tuple[Path, dict[str, list[OofStats]]]:
    """Two folds whose files hold all four merges; the geometric mean's maps are the truth's
    blobs, the others those of random_maps: the geometric mean must win."""
    rng = np.random.default_rng(31)
    root = tmp_path / "runs" / "x"
    by_merge: dict[str, list[OofStats]] = {m: [] for m in ("mean", "median", "geomean", "mask_median")}
    for fold in range(2):
        ids = [f"f{fold}_{i}" for i in range(20)]
        probs, truth, label_prob = random_maps(rng, n=20, size=32)
        made = {m: make_stats(np.clip(probs + 0.02 * k, 0, 1), truth, label_prob, fold, ids)
                for k, m in enumerate(("mean", "median", "mask_median"))}
        made["geomean"] = make_stats(np.where(truth > 0, 0.9, 0.1).astype(np.float32), truth,
                                     truth.max(axis=(1, 2)), fold, ids)
        write_fold(root, fold, made["mean"], merged={m: made[m] for m in made if m != "mean"})
        for m in by_merge:
            by_merge[m].append(made[m])
    return tmp_path, by_merge


def test_evaluate_chooses_the_merge_and_submit_applies_it(merged_run):
    from tfpneumo.evaluation.rules import resolve_rule

    workdir, by_merge = merged_run
    grids = {"min_areas": area_grid("0,5", "--min-areas"), "thresholds": parse_grid("0.3:0.6", "--thresholds")}
    result = evaluate(Config(experiment="x"), workdir=workdir, **grids)
    summary = json.loads((workdir / "runs" / "x" / EVALUATION_JSON).read_text())
    assert summary["best"]["merge"] == "geomean" and summary["best"]["score"] == pytest.approx(1.0)
    assert list(summary["merges"]) == ["mean", "median", "geomean", "mask_median"]
    assert summary["pooled"]["plain"]["score"] == pytest.approx(1.0)  # the table is geomean's
    # each merge's own statistics, scored independently: the plain rule on its pooled maps
    for merge, parts in by_merge.items():
        pooled = OofStats.concat(parts)
        assert summary["merges"][merge]["empty_score"] == pytest.approx(
            float(np.mean(pooled.hist_true.sum(axis=1) == 0)))
    assert summary["merges"]["mean"]["plain"]["score"] < 0.99
    text = str(result)
    assert "geomean      triplet 1.0000" in text and "<- chosen" in text
    assert "geomean of the TTA members -> 1.0000" in text
    rule, _ = resolve_rule("x", workdir, None, 32 * 32)
    assert rule.merge == "geomean" and "merge=geomean" in rule.describe()
    assert resolve_rule("x", workdir, {"merge": "median"}, 32 * 32)[0].merge == "median"
    with pytest.raises(TfpneumoError, match=r"^--merge 'max': expected one of mean, median, "
                                            r"geomean, mask_median$"):
        resolve_rule("x", workdir, {"merge": "max"}, 32 * 32)
    # only the mean compared: its best, however worse
    only_mean = evaluate(Config(experiment="x"), workdir=workdir, merges=("mean",), **grids)
    assert only_mean.summary["best"]["merge"] == "mean" and list(only_mean.summary["merges"]) == ["mean"]
    assert "<- chosen" not in str(only_mean)


def test_statistics_without_merges_compare_the_mean_only(fake_run):
    """Files written before merges were recorded (or without flip TTA): the mean, and a note."""
    workdir, _ = fake_run
    result = evaluate(Config(experiment="x"), workdir=workdir, min_areas=area_grid("0", "--min-areas"))
    assert result.summary["best"]["merge"] == "mean" and list(result.summary["merges"]) == ["mean"]
    assert "note: merges compared: mean (statistics written without flip TTA" in str(result)
    with pytest.raises(TfpneumoError, match=r"^--merges 'median,max': expected 'all' or some of "):
        parse_merges("median,max")
    assert parse_merges("mask_median,mean") == ("mean", "mask_median")
    with pytest.raises(TfpneumoError, match=r"^--merges median: the out-of-fold statistics hold only mean$"):
        evaluate(Config(experiment="x"), workdir=workdir, merges=("median",))
