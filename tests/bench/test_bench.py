"""tfpneumo.bench: sections at tiny sizes, the report's JSON and table, failing sections.

The full benchmark is never run here (it takes minutes); each section function is run with
tiny parameters, and the report machinery with cheap sections. Clocks are faked in the module
whose code reads them (``threshold.time``, ``pipeline.time``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tfpneumo import bench
from tfpneumo.bench import (
    harness,
    inference,
    limit,
    peer,
    pipeline,
    prepare,
    report,
    service,
    synthetic,
    threshold,
    train,
)


def positive_finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_spread(s: dict) -> None:
    assert set(s) == {"median", "min", "max", "n"}
    assert all(positive_finite(s[k]) for k in ("median", "min", "max"))
    assert s["min"] <= s["median"] <= s["max"]


class FakeClock:
    """Stands in for the ``time`` module of a bench module: each perf_counter call advances by the next
    of ``walls`` (cycled), each process_time call by ``cpu``."""

    def __init__(self, walls: list[float], cpu: float) -> None:
        self.walls, self.cpu, self.k, self.t, self.c = walls, cpu, 0, 100.0, 50.0

    def perf_counter(self) -> float:
        self.t += self.walls[self.k % len(self.walls)]
        self.k += 1
        return self.t

    def process_time(self) -> float:
        self.c += self.cpu
        return self.c


def test_helpers():
    assert harness.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert harness.rate(10, 4.0) == 2.5 and harness.rate(10, 0.0) is None
    tf_like = RuntimeError("Graph execution error:\n\nDetected at node x defined at:\nFile \"a.py\"\n"
                           "UNIMPLEMENTED: bf16 dot not supported\n\t [[{{node y}}]]")
    assert harness.error_line(tf_like) == "RuntimeError: UNIMPLEMENTED: bf16 dot not supported"
    assert harness.error_line(ValueError("bad value\nsecond line")) == "ValueError: bad value"
    assert harness.error_line(KeyError()) == "KeyError"
    assert train.resolve_precision("mixed", gpu=False) == "mixed_bfloat16"
    assert train.resolve_precision("mixed", gpu=True) == "mixed_float16"
    assert train.resolve_precision("float32", gpu=True) == "float32"
    info = harness.machine_info()
    assert info["cores"] >= 1 and info["cpu"] and info["tensorflow"] and info["keras"]


def test_resolve_siim_mini(monkeypatch, tmp_path):
    monkeypatch.delenv("TFPNEUMO_SIIM", raising=False)
    beside = Path(harness.__file__).resolve().parents[3] / "shared" / "siim" / "siim-mini"
    expected = beside if beside.is_dir() else Path("../shared/siim/siim-mini")
    assert harness.resolve_siim_mini(None) == expected
    monkeypatch.setenv("TFPNEUMO_SIIM", str(tmp_path))
    assert harness.resolve_siim_mini(None) == tmp_path / "siim-mini"
    assert harness.resolve_siim_mini(tmp_path / "x") == tmp_path / "x"


def test_threshold_figures_come_from_the_clock(monkeypatch):
    # search calls perf_counter twice per repeat: durations 2, 1, 4 s -> median 2, min 1, max 4
    monkeypatch.setattr(threshold, "time", FakeClock([0.0, 2.0, 0.0, 1.0, 0.0, 4.0], cpu=0.0))
    ctx = harness.Context(quick=True)
    result = threshold.bench_threshold(ctx, images=300, repeats=3, end_to_end=False)
    assert result["search_s"] == {"median": 2.0, "min": 1.0, "max": 4.0, "n": 3}
    assert result["images"] == 300 and result["triplets"] > 0
    rows = threshold.rows_threshold(result)
    assert rows[0].figure == "2.000 s [1.000-4.000]" and "target < 5 s: met" in rows[0].note


def test_threshold_default_grid_has_enough_triplets():
    result = threshold.bench_threshold(harness.Context(quick=True), images=200, repeats=1,
                                       end_to_end=True)
    assert result["triplets"] >= 1000  # the issue: >= 1,000 triplets
    check_spread(result["search_s"])
    check_spread(result["evaluate_s"])


def test_evaluate_figures_come_from_the_clock(monkeypatch):
    # after an untimed call each: search 2 and 1 s, then evaluate end to end 3 and 5 s
    clock = FakeClock([0.0, 2.0, 0.0, 1.0, 0.0, 3.0, 0.0, 5.0], cpu=0.0)
    monkeypatch.setattr(threshold, "time", clock)
    result = threshold.bench_threshold(harness.Context(quick=True), images=200, repeats=2,
                                       end_to_end=True)
    assert result["search_s"] == {"median": 1.5, "min": 1.0, "max": 2.0, "n": 2}
    assert result["evaluate_s"] == {"median": 4.0, "min": 3.0, "max": 5.0, "n": 2}
    assert clock.k == 8 and result["folds"] == 5
    rows = threshold.rows_threshold(result)
    assert (rows[1].setting, rows[1].figure) == ("evaluate end to end, 5 folds", "4.00 s [3.00-5.00]")


def test_fake_run_is_what_evaluate_reads(tmp_path):
    """The fake fold folders give back the statistics exactly through the run layout's reader."""
    from tfpneumo import runs
    from tfpneumo.evaluation.oof import load_run_oof

    stats = threshold.random_oof_stats(50, 64, folds=3)
    assert threshold.write_fake_run(stats, tmp_path, "x") == [0, 1, 2]
    assert runs.trained_folds("x", tmp_path) == [0, 1, 2]
    back, models = load_run_oof("x", [0, 1, 2], tmp_path)
    assert models == {0: "best", 1: "best", 2: "best"}
    by_fold = stats.subset(np.argsort(stats.fold, kind="stable"))
    for name in stats.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(back, name), getattr(by_fold, name), err_msg=name)


def test_pipeline_section_tiny(tf):
    ctx = harness.Context(quick=True)
    result = pipeline.bench_pipeline(ctx, sizes=[64], settings=[(1, 1), (pipeline.AUTOTUNE, 2)],
                                     images=16, batch=4, batches=2, repeats=2)
    assert [(r["size"], r["npc"]) for r in result["rows"]] == [(64, 1), (64, -1)]
    for r in result["rows"]:
        assert "error" not in r, r.get("error")
        check_spread(r["img_per_s"])
        assert positive_finite(r["img_per_cpu_s"]) and r["images_per_run"] == 8
    assert result["device"]
    rows = pipeline.rows_pipeline(result)
    first = result["rows"][0]["img_per_s"]
    assert len(rows) == 2 and rows[0].figure.endswith(f"img/s [{first['min']:.0f}-{first['max']:.0f}]")


def test_service_section_tiny(tf):
    """In-process and 1 service worker at 64 px; the scaling needs both 1 and 2 workers."""
    result = service.bench_service(harness.Context(quick=True), size=64, workers=(0, 1), images=32,
                                   batch=4, warmup=2, batches=2, repeats=2)
    by_n = {r["workers"]: r for r in result["rows"]}
    assert set(by_n) == {0, 1} and not any("error" in r for r in result["rows"])
    for r in result["rows"]:
        check_spread(r["img_per_s"])
        assert positive_finite(r["reader_cpu_ms_per_img"])
    assert by_n[0]["worker_cpu_ms_per_img"] is None
    assert positive_finite(by_n[1]["worker_cpu_ms_per_img"])  # read from /proc of the worker
    assert result["scaling_1_to_2"] is None
    rows = service.rows_service(result)
    assert "in this process" in rows[0].setting and "1 worker" in rows[1].setting


def test_service_rows_scaling_from_medians():
    def row(n, median):
        return {"workers": n, "img_per_s": {"median": median, "min": median, "max": median, "n": 1},
                "reader_cpu_ms_per_img": 2.0, "worker_cpu_ms_per_img": 15.0 if n else None}

    result = {"size": 512, "rows": [row(0, 40.0), row(1, 60.0), row(2, 105.0)],
              "scaling_1_to_2": 105.0 / 60.0, "target_scaling": service.SERVICE_TARGET_SCALING}
    rows = service.rows_service(result)
    assert "1.75x from 1 to 2 workers" in rows[2].note and "NOT met" in rows[2].note
    result["scaling_1_to_2"] = 1.9
    assert "(target 1.8x: met)" in service.rows_service(result)[2].note


def test_pipeline_rates_are_images_over_measured_seconds(tf, monkeypatch, tmp_path):
    cache = synthetic.synthetic_cache(tmp_path, 64, 8)
    # each timed run: perf_counter at start and end, 0.5 s apart; CPU 2 s per run
    monkeypatch.setattr(pipeline, "time", FakeClock([0.5], cpu=1.0))
    out = pipeline.time_pipeline(cache, 64, 1, 1, batch=2, batches=3, repeats=2)
    assert out["img_per_s"] == {"median": 12.0, "min": 12.0, "max": 12.0, "n": 2}  # 6 / 0.5
    assert out["img_per_cpu_s"] == 6.0  # 6 images per 1 CPU-second (c1 - c0 = 1)


def test_synthetic_cache_is_made_by_prepare(tf, tmp_path):
    """synth's DICOMs through prepare_cache: a cache with its manifest, as training reads it."""
    from tfpneumo.data.manifest import read_cache_info

    cache = synthetic.synthetic_cache(tmp_path, 64, 8, shard_size=2)
    info = read_cache_info(cache)
    assert (info.size, info.folds, info.clahe) == (64, 2, False)
    assert info.data_dir == (tmp_path / "dicoms").resolve()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["counts"]["train"] == 8 and manifest["counts"]["skipped"] == 0
    assert manifest["counts"]["positive"] >= 2  # 2 folds need 2 of each class
    assert all(s["count"] <= 2 for s in manifest["shards"])


def test_prepare_section_on_real_dicoms(tf, siim_mini):
    result = prepare.bench_prepare(harness.Context(quick=True, siim_mini=siim_mini), size=64,
                                   workers=[1], repeats=1)
    (row,) = result["rows"]
    assert row["images"] == 58  # 48 train + 10 test real DICOMs
    assert row["img_per_s"] == pytest.approx(58 / row["wall_s"]["median"])
    assert positive_finite(row["steady_img_per_s_per_worker"])
    assert "58 DICOMs 1024 -> 64 cache, 1 worker" in prepare.rows_prepare(result)[0].setting


def test_prepare_without_data_is_skipped(tmp_path):
    out = harness.run_section("prepare", harness.Context(True, tmp_path / "nope"))
    assert out["status"] == "skipped" and "nope" in out["reason"]


def test_inference_section_tiny(tf):
    result = inference.bench_inference(harness.Context(quick=True), cases=[(64, 1, True, 1, 2)],
                                       ensemble=[])
    (row,) = result["rows"]
    assert "error" not in row, row.get("error")
    check_spread(row["img_per_s"])
    assert row["images"] == 2 and positive_finite(row["first_call_s"])
    assert inference.rows_inference(result)[0].setting == "64 px x1, hflip TTA"
    assert "ensemble" not in result


def test_inference_before_and_after_issue_13_in_the_same_rounds(tf):
    """The old per-pass path and submit's, timed interleaved, give the same maps. The tiny
    test network as the one fold keeps this fast (the section builds base networks)."""
    import keras
    from factories import tiny_model_file

    net = keras.saving.load_model(tiny_model_file(), safe_mode=True, compile=False)
    e = inference.bench_ensemble(64, 2, 1, 2, ("per-pass", "one forward"), first=net)
    before, after = e["variants"]["per-pass"], e["variants"]["one forward"]
    for v in (before, after):
        check_spread(v["img_per_s"])
        assert v["img_per_s"]["n"] == 2 and positive_finite(v["first_call_s"])
    assert before["speedup"] == 1.0
    assert after["speedup"] == pytest.approx(after["img_per_s"]["median"]
                                             / before["img_per_s"]["median"])
    assert after["pixels_differ"] == 0 and after["max_abs_diff"] < 1e-5
    assert after["pixels"] == 2 * 64 * 64
    rows = inference.rows_inference({"rows": [], "ensemble": e})
    assert [r.setting for r in rows] == ["64 px x2, 1 fold, hflip: per-pass (before issue 13)",
                                         "  image + mirror in one forward per fold (submit)"]
    assert rows[1].figure.endswith(f": {after['speedup']:.2f}x")
    assert inference.rows_inference({"rows": [], "ensemble": {"error": "E: x"}})[0].figure == "failed"
    with pytest.raises(ValueError, match="need per-pass"):
        inference.bench_ensemble(64, 1, 1, 1, ("one forward",), first=net)


def fake_report() -> dict:
    """A hand-made report: pipeline 100 img/s (50 img/CPU-s) at 256, train 4 and 2 img/s."""
    train_rows = [
        {"size": 256, "batch": 4, "precision": "float32", "xla": False, "compile_s": 20.0,
         "layout": "reference",
         "img_per_s": {"median": 2.0, "min": 1.9, "max": 2.1, "n": 3}, "img_per_cpu_s": 1.5,
         "peak_rss_mb": 1500.0},
        {"size": 256, "batch": 4, "precision": "mixed_bfloat16", "xla": False, "compile_s": 21.0,
         "img_per_s": {"median": 4.0, "min": 3.9, "max": 4.1, "n": 3}, "img_per_cpu_s": 2.5,
         "peak_rss_mb": 1600.0},
        {"size": 256, "batch": 4, "precision": "mixed_bfloat16", "xla": True,
         "error": "InternalError: no bf16 here", "peak_rss_mb": 900.0},
    ]
    pipe_rows = [
        {"size": 256, "npc": 1, "threads": 1, "batch": 8,
         "img_per_s": {"median": 60.0, "min": 60.0, "max": 60.0, "n": 3}, "img_per_cpu_s": 50.0},
        {"size": 256, "npc": -1, "threads": 2, "batch": 8,
         "img_per_s": {"median": 100.0, "min": 90.0, "max": 110.0, "n": 3}, "img_per_cpu_s": 50.0},
    ]
    return {"machine": harness.machine_info(), "quick": True, "wall_s": 12.0, "sections": {
        "pipeline": {"status": "ok", "result": {"rows": pipe_rows}, "seconds": 3.0,
                     "peak_rss_mb": 1000.0, "children_peak_rss_mb": None},
        "train": {"status": "ok", "result": {"rows": train_rows},
                  "seconds": 5.0, "peak_rss_mb": 40.0, "children_peak_rss_mb": 1600.0},
        "threshold": {"status": "error", "error": "ValueError: broken", "seconds": 1.0},
    }}


def test_starvation_ratio_and_table():
    made = fake_report()
    (s,) = report.starvation(made["sections"])
    assert s["size"] == 256 and s["ratio"] == pytest.approx(100.0 / 4.0)  # fastest vs fastest
    assert s["cpu_share"] == pytest.approx(4.0 / 50.0 / harness.cores())
    assert s["train_setting"] == "256x4 mixed_bfloat16 XLA off"
    made["starvation"] = [s]
    table = report.render_table(made)
    assert "25.0x" in table and "pipeline / train step at 256 px" in table
    assert "InternalError: no bf16 here" in table  # a failed setting is a row
    assert "ValueError: broken" in table  # a failed section is a row
    ref_line = next(line for line in table.splitlines() if "float32, XLA off" in line)
    assert "2.00 img/s [1.90-2.10]" in ref_line and "x the ref" not in ref_line
    assert "1500" in ref_line  # the setting's own process peak memory


def test_starvation_needs_a_common_size():
    made = fake_report()
    for r in made["sections"]["pipeline"]["result"]["rows"]:
        r["size"] = 512
    assert report.starvation(made["sections"]) == []
    rows = report.rows_starvation([], made["sections"])
    assert rows[0].figure == "n/a" and "no image size" in rows[0].note


def test_failing_section_does_not_stop_the_rest(monkeypatch, tmp_path, capsys):
    def boom(ctx):
        raise RuntimeError("boom here\nsecond line")

    monkeypatch.setitem(harness.SECTIONS, "boom", harness.Section("boom", boom, lambda r: []))
    made = bench.run_bench(tmp_path / "r.json", True, tmp_path / "none", ["boom", "threshold"],
                           params={"threshold": {"images": 200, "repeats": 1,
                                                 "end_to_end": False}}, isolate=False)
    printed = capsys.readouterr().out
    boom_entry = made["sections"]["boom"]
    assert (boom_entry["status"], boom_entry["error"]) == ("error", "RuntimeError: boom here")
    assert made["sections"]["threshold"]["status"] == "ok"
    assert "RuntimeError: boom here" in printed and "second line" not in printed
    assert "search, 200 images" in printed
    assert json.loads((tmp_path / "r.json").read_text())["table"] == made["table"]


def test_run_bench_in_subprocesses(tmp_path):
    out = tmp_path / "bench.json"
    made = bench.run_bench(out, True, tmp_path / "missing", ["threshold", "prepare"],
                           params={"threshold": {"images": 300, "repeats": 2,
                                                 "end_to_end": False}})
    data = json.loads(out.read_text())
    assert set(data) >= {"machine", "quick", "wall_s", "sections", "starvation", "table"}
    assert data["machine"]["cores"] >= 1 and data["machine"]["tensorflow"]
    thr, prep = data["sections"]["threshold"], data["sections"]["prepare"]
    assert thr["status"] == "ok" and thr["result"]["images"] == 300
    check_spread(thr["result"]["search_s"])
    assert positive_finite(thr["peak_rss_mb"]) and positive_finite(thr["seconds"])
    assert prep["status"] == "skipped" and "missing" in prep["reason"]
    assert "skipped" in made["table"] and "threshold" in made["table"]


def test_child_that_dies_is_an_error():
    out = harness.run_child(["--section", "no-such-section"], timeout=60)
    assert out["status"] == "error" and out["error"].startswith("process exited with 2")


def test_bad_section_name():
    with pytest.raises(bench.BenchError, match="unknown section"):
        bench.run_bench(None, True, sections=["nope"])


# ----------------------------------------------------------------------------- peer and limit

def add_peer_and_limit(made: dict, peer_train: float, peer_infer: float) -> dict:
    """``made`` with a peer section (train 256x4 at ``peer_train`` img/s, inference 256x4 no
    TTA at ``peer_infer``), our inference row at 256x4 (8 img/s) and a limit section."""
    def s(m):
        return {"median": m, "min": m, "max": m, "n": 3}

    fmts = {"nchw": {"img_per_s": s(peer_train / 2)}, "channels_last": {"img_per_s": s(peer_train)}}
    made["sections"]["peer"] = {"status": "ok", "result": {
        "train": [{"size": 256, "batch": 4, "precision": "float32", "formats": fmts,
                   "best": "channels_last", "img_per_s": s(peer_train), "first_step_s": 1.0}],
        "inference": [{"size": 256, "batch": 4, "hflip": False, "best": "nchw",
                       "formats": {"nchw": {"img_per_s": s(peer_infer)}},
                       "img_per_s": s(peer_infer), "first_call_s": 1.0}],
        "torch": "x", "smp": "y", "threads": 2}}
    made["sections"]["inference"] = {"status": "ok", "result": {"rows": [
        {"size": 256, "batch": 4, "hflip": False, "img_per_s": s(8.0), "img_per_cpu_s": 4.0,
         "first_call_s": 1.0, "images": 24}]}}
    made["sections"]["limit"] = {"status": "ok", "result": {
        "matmul_n": 64, "peak_flop_s": {"float32": 100e9, "bfloat16": 200e9},
        "train_flops_per_image": {"reference/256": 5e9, "base/256": 6e9},
        "infer_flops_per_image": {"256": 2e9, "1024": 32e9}}}
    return made


def test_peer_ratio_is_ours_over_the_peer_of_the_same_run():
    made = add_peer_and_limit(fake_report(), peer_train=2.5, peer_infer=4.0)
    cmp = report.peer_comparison(made["sections"])
    train_rows = [c for c in cmp if c["kind"] == "train"]
    # the reference layout (what the peer implements) first, then the base layout's rows
    assert train_rows[0]["ours_setting"] == "reference layout, float32"
    assert [c["ratio"] for c in train_rows] == pytest.approx([2.0 / 2.5, 4.0 / 2.5])
    (inf,) = [c for c in cmp if c["kind"] == "inference"]
    assert inf["ratio"] == pytest.approx(8.0 / 4.0)
    # another peer figure, another ratio: nothing is a constant
    again = report.peer_comparison(add_peer_and_limit(fake_report(), 5.0, 16.0)["sections"])
    assert [c["ratio"] for c in again] == pytest.approx([0.4, 0.8, 0.5])
    made["peer_comparison"], made["starvation"] = cmp, []
    table = report.render_table(made)
    assert "0.80x" in table and "ours 2.00 img/s / peer 2.50 img/s (float32, channels_last)" in table


def test_limit_shares_from_the_run():
    made = add_peer_and_limit(fake_report(), peer_train=2.5, peer_infer=4.0)
    shares = {(s["who"], s["setting"]): s for s in report.limit_shares(made["sections"])}
    ref = shares[("ours", "256x4 reference float32 XLA off")]
    assert ref["share"] == pytest.approx(2.0 * 5e9 / 100e9) and ref["peak_dtype"] == "float32"
    bf = shares[("ours", "256x4 base mixed_bfloat16 XLA off")]
    assert bf["share"] == pytest.approx(4.0 * 6e9 / 200e9) and bf["peak_dtype"] == "bfloat16"
    assert shares[("ours", "256x4 no TTA")]["share"] == pytest.approx(8.0 * 2e9 / 100e9)
    assert shares[("peer", "256x4 float32 channels_last")]["share"] == pytest.approx(2.5 * 5e9 / 100e9)
    made["limit_shares"], made["starvation"] = report.limit_shares(made["sections"]), []
    assert "10.0%" in report.render_table(made)  # 2 img/s x 5 GFLOP / 100 GFLOP/s


def test_peer_skipped_without_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_smp(name, *args, **kwargs):
        if name.startswith("segmentation_models_pytorch"):
            raise ImportError("No module named 'segmentation_models_pytorch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_smp)
    out = peer.bench_peer(harness.Context(quick=True))
    assert "peer extra not installed" in out["skipped"]
    assert "segmentation_models_pytorch" in out["skipped"]


def test_peer_section_tiny():
    import importlib.util

    # found, not imported: torch's CUDA build imports triton, which can crash next to
    # TensorFlow in one process (the bench runs the peer in a process of its own, so do we)
    for name in ("torch", "segmentation_models_pytorch"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"the peer extra is not installed (no {name}): pip install -e '.[peer]'")
    # In its own process, as the bench runs it: torch (with triton) next to TensorFlow in one
    # process can crash at import. One step a window, one window: most of the time is torch's
    # one-time warm-up.
    params = {"train_cases": [[32, 2]], "infer_cases": [[32, 2, True, 1, 1]], "steps": 1,
              "windows": 1, "formats": ["nchw", "channels_last"]}
    entry = harness.run_child(["--section", "peer", "--quick", "--params", json.dumps(params)],
                              timeout=120)
    assert entry["status"] == "ok", entry
    result = entry["result"]
    (tr,), (inf,) = result["train"], result["inference"]
    assert set(tr["formats"]) == {"nchw", "channels_last"}
    assert tr["best"] == max(tr["formats"], key=lambda f: tr["formats"][f]["img_per_s"]["median"])
    check_spread(tr["img_per_s"])
    check_spread(inf["img_per_s"])
    assert inf["hflip"] and inf["images"] == 2
    # ours and the peer in alternating windows: each round's ratio from its two windows
    h = result["head_to_head"]
    assert "error" not in h, h
    assert h["rounds"] == 4 and h["peer_format"] == tr["best"] and len(h["ratios"]) == 4
    assert h["ratio"] == pytest.approx(float(np.median(h["ratios"])))
    for side in ("ours", "peer"):
        check_spread(h["img_per_s"][side])
    rows = peer.rows_peer(result)
    assert rows[0].setting == "peer train 32 px x2, float32"
    assert rows[1].setting == "head to head: train 32 px x2, float32, reference layout"
    assert rows[2].setting == "peer inference 32 px x2, hflip TTA"


def test_head_to_head_ratio_comes_first_and_says_how_it_was_measured():
    made = add_peer_and_limit(fake_report(), peer_train=2.5, peer_infer=4.0)
    made["sections"]["peer"]["result"]["head_to_head"] = {
        "size": 256, "batch": 4, "peer_format": "channels_last", "rounds": 3,
        "ratios": [0.9, 1.1, 1.0], "ratio": 1.0,
        "img_per_s": {"ours": {"median": 2.2, "min": 2.0, "max": 2.4, "n": 3},
                      "peer": {"median": 2.2, "min": 2.1, "max": 2.3, "n": 3}}}
    cmp = report.peer_comparison(made["sections"])
    assert cmp[0]["ratio"] == 1.0 and cmp[0]["rounds"] == 3
    assert [c["ratio"] for c in cmp[1:3]] == pytest.approx([2.0 / 2.5, 4.0 / 2.5])
    made["peer_comparison"], made["starvation"] = cmp, []
    table = report.render_table(made)
    assert "median of the ratios of 3 rounds" in table and "minutes apart" in table


def test_flop_count_matches_the_analytic_count(tf):
    import keras

    inp = keras.Input((12, 10, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    x = keras.layers.Conv2D(4, 1, padding="same", use_bias=False)(x)
    x = keras.layers.Conv2D(5, 5, padding="same", use_bias=False)(x)
    net = keras.Model(inp, x)
    batch = 2
    analytic = sum(2 * k * k * cin * cout * 12 * 10 for k, cin, cout in ((3, 3, 8), (1, 8, 4), (5, 4, 5)))
    spec = tf.TensorSpec((batch, 12, 10, 3), tf.float32)
    assert limit.graph_flops(lambda t: net(t, training=False), spec) == batch * analytic


def test_matmul_peak_is_measured(tf):
    assert positive_finite(limit.matmul_peak("float32", n=64, repeats=2))
