"""The benchmark report: every section in its own process, the starvation summary, one table,
the JSON file."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tfpneumo.bench.harness import (
    SECTION_TIMEOUT_S,
    SECTIONS,
    BenchError,
    Context,
    Row,
    cores,
    error_line,
    machine_info,
    progress,
    resolve_siim_mini,
    run_child,
    run_section,
)
from tfpneumo.bench.pipeline import npc_name

# ----------------------------------------------------------------------------- summary


def starvation(sections: dict) -> list[dict]:
    """Input-pipeline rate / training-step rate at each image size both sections measured.

    The pipeline's best wall rate (over its settings) against the fastest train setting at
    that size. ``cpu_share``: the share of this machine's cores the pipeline needs to feed
    that train rate (train img/s / pipeline img per CPU-second / cores); both run on the
    same cores, so a ratio above 1 with a large share still slows training down.
    """
    pipe = [r for r in _ok_rows(sections, "pipeline") if r.get("img_per_cpu_s")]
    train = _ok_rows(sections, "train")
    n_cores = cores()
    out = []
    for size in sorted({r["size"] for r in pipe} & {r["size"] for r in train}):
        p = max((r for r in pipe if r["size"] == size), key=lambda r: r["img_per_s"]["median"])
        t = max((r for r in train if r["size"] == size), key=lambda r: r["img_per_s"]["median"])
        p_rate, t_rate = p["img_per_s"]["median"], t["img_per_s"]["median"]
        share = t_rate / p["img_per_cpu_s"] / n_cores
        out.append({"size": size, "pipeline_img_per_s": p_rate, "pipeline_npc": p["npc"],
                    "train_img_per_s": t_rate,
                    "train_setting": f"{t['size']}x{t['batch']} {t['precision']} "
                                     f"XLA {'on' if t['xla'] else 'off'}",
                    "ratio": p_rate / t_rate, "cpu_share": share,
                    "starved": p_rate < t_rate or share > 0.5})
    return out


def peer_comparison(sections: dict) -> list[dict]:
    """Ours / the peer's images/s at each setting both measured in this run.

    Train: first the head-to-head ratio (the reference layout and the peer in alternating
    windows, :mod:`tfpneumo.bench.paired`: the ratio of record), then each peer row
    (float32) against our rows at its size and batch (the reference layout, then the base
    layout, float32 and mixed), measured minutes apart; inference: against our row of the
    same size, batch and TTA.
    """
    entry = sections.get("peer", {})
    if entry.get("status") != "ok":
        return []
    out = []
    h = entry["result"].get("head_to_head")
    if h and "error" not in h:
        out.append({"kind": "train", "size": h["size"], "batch": h["batch"],
                    "ours_setting": "reference layout, float32, alternating windows",
                    "ours": h["img_per_s"]["ours"]["median"],
                    "peer": h["img_per_s"]["peer"]["median"],
                    "peer_setting": f"float32, {h['peer_format']}",
                    "ratio": h["ratio"], "rounds": h["rounds"]})
    for p in entry["result"].get("train", []):
        if "error" in p:
            continue
        ours = [r for r in _ok_rows(sections, "train")
                if (r["size"], r["batch"]) == (p["size"], p["batch"]) and not r["xla"]]
        ours.sort(key=lambda r: (r.get("layout", "base") != "reference", r["precision"] != "float32"))
        for r in ours:
            out.append({"kind": "train", "size": p["size"], "batch": p["batch"],
                        "ours_setting": f"{r.get('layout', 'base')} layout, {r['precision']}",
                        "ours": r["img_per_s"]["median"], "peer": p["img_per_s"]["median"],
                        "peer_setting": f"float32, {p['best']}",
                        "ratio": r["img_per_s"]["median"] / p["img_per_s"]["median"]})
    for p in entry["result"].get("inference", []):
        if "error" in p:
            continue
        for r in _ok_rows(sections, "inference"):
            if (r["size"], r["batch"], r["hflip"]) == (p["size"], p["batch"], p["hflip"]):
                out.append({"kind": "inference", "size": p["size"], "batch": p["batch"],
                            "ours_setting": "hflip TTA" if p["hflip"] else "no TTA",
                            "ours": r["img_per_s"]["median"], "peer": p["img_per_s"]["median"],
                            "peer_setting": f"float32, {p['best']}",
                            "ratio": r["img_per_s"]["median"] / p["img_per_s"]["median"]})
    return out


def rows_peer_comparison(items: list[dict]) -> list[Row]:
    return [Row(f"{c['kind']} {c['size']} px x{c['batch']}, ours {c['ours_setting']}",
                f"{c['ratio']:.2f}x",
                f"ours {c['ours']:.2f} img/s / peer {c['peer']:.2f} img/s ({c['peer_setting']}), "
                + (f"median of the ratios of {c['rounds']} rounds" if "rounds" in c else
                   "both from this run, minutes apart")) for c in items]


def limit_shares(sections: dict) -> list[dict]:
    """Achieved FLOP/s (images/s x FLOPs per image) of the train and inference rows of this
    run (ours, and the peer's counted with our network's FLOPs) as a share of the peak
    of their precision (bfloat16 for mixed_bfloat16, else float32)."""
    entry = sections.get("limit", {})
    if entry.get("status") != "ok":
        return []
    lim = entry["result"]
    peaks = {k: v for k, v in lim["peak_flop_s"].items() if not isinstance(v, dict)}
    train_f, infer_f = lim["train_flops_per_image"], lim["infer_flops_per_image"]
    peer = sections.get("peer", {})
    peer_rows = peer.get("result", {}) if peer.get("status") == "ok" else {}
    out = []

    def add(kind: str, who: str, setting: str, img_s: float, flops: float | None, dtype: str):
        if flops is None or dtype not in peaks:
            return
        out.append({"kind": kind, "who": who, "setting": setting, "img_per_s": img_s,
                    "flop_s": img_s * flops, "peak_dtype": dtype,
                    "share": img_s * flops / peaks[dtype]})

    for r in _ok_rows(sections, "train"):
        layout = r.get("layout", "base")
        add("train", "ours", f"{r['size']}x{r['batch']} {layout} {r['precision']} "
            f"XLA {'on' if r['xla'] else 'off'}", r["img_per_s"]["median"],
            train_f.get(f"{layout}/{r['size']}"),
            "bfloat16" if "bfloat16" in r["precision"] else "float32")
    for r in _ok_rows(sections, "inference"):
        f = infer_f.get(str(r["size"]))
        add("inference", "ours", f"{r['size']}x{r['batch']} {'hflip' if r['hflip'] else 'no TTA'}",
            r["img_per_s"]["median"], f and f * (2 if r["hflip"] else 1), "float32")
    for r in peer_rows.get("train", []):
        if "error" not in r:
            add("train", "peer", f"{r['size']}x{r['batch']} float32 {r['best']}",
                r["img_per_s"]["median"], train_f.get(f"reference/{r['size']}"), "float32")
    for r in peer_rows.get("inference", []):
        f = infer_f.get(str(r["size"]))
        if "error" not in r:
            add("inference", "peer", f"{r['size']}x{r['batch']} "
                f"{'hflip' if r['hflip'] else 'no TTA'} {r['best']}",
                r["img_per_s"]["median"], f and f * (2 if r["hflip"] else 1), "float32")
    return out


def rows_limit_shares(items: list[dict]) -> list[Row]:
    return [Row(f"{s['kind']} {s['who']} {s['setting']}", f"{100 * s['share']:.1f}%",
                f"{s['flop_s'] / 1e9:.1f} GFLOP/s of the {s['peak_dtype']} peak "
                f"({s['img_per_s']:.2f} img/s)") for s in items]


def _ok_rows(sections: dict, name: str) -> list[dict]:
    entry = sections.get(name, {})
    if entry.get("status") != "ok":
        return []
    return [r for r in entry["result"].get("rows", []) if "error" not in r]


def rows_starvation(items: list[dict], sections: dict) -> list[Row]:
    if not items:
        have = [n for n in ("pipeline", "train") if _ok_rows(sections, n)]
        why = ("no image size measured by both" if len(have) == 2
               else "needs the pipeline and train sections")
        return [Row("pipeline / train step", "n/a", why)]
    return [Row(f"pipeline / train step at {s['size']} px",
                f"{s['ratio']:.1f}x",
                f"pipeline {s['pipeline_img_per_s']:.1f} img/s (npc {npc_name(s['pipeline_npc'])}) "
                f"vs train {s['train_img_per_s']:.2f} img/s ({s['train_setting']}); feeding it "
                f"takes ~{100 * s['cpu_share']:.1f}% of the cores: "
                f"{'INPUT-BOUND' if s['starved'] else 'not starved'}") for s in items]


# ----------------------------------------------------------------------------- table

def render_table(report: dict) -> str:
    """The one table of a report (as :func:`run_bench` returns it)."""
    m = report["machine"]
    load = m.get("load_avg_start")
    header = (f"tfpneumo bench ({'quick' if report['quick'] else 'full'}), {report['wall_s']:.0f} s | "
              f"{m['cpu']}, {m['cores']} cores (affinity; {m['cpu_count']} online), "
              f"avx512_bf16={m['avx512_bf16']} | TF {m['tensorflow']}, Keras {m['keras']} | "
              f"device {m.get('device') or 'n/a'}"
              + (f" | load {load[0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end"
                 if load and m.get("load_avg_end") else ""))
    lines: list[tuple[str, str, str, str, str]] = []
    for name, entry in report["sections"].items():
        section = SECTIONS.get(name)
        label = f"{name} {entry.get('seconds', 0):.0f}s"
        rss = entry.get("peak_rss_mb")
        child = entry.get("children_peak_rss_mb") or 0.0
        rss_text = (f"{rss:.0f}" + (f" (+{child:.0f})" if child >= 1 and name != "train" else "")
                    if rss else "")
        if entry["status"] == "error":
            rows = [Row("", "failed", entry["error"])]
        elif entry["status"] == "skipped":
            rows = [Row("", "skipped", entry["reason"])]
        else:
            try:
                rows = section.rows(entry["result"]) if section else []
            except Exception as e:  # a bad result must not hide the rest of the table
                rows = [Row("", "failed", f"table: {error_line(e)}")]
        for i, row in enumerate(rows):
            own = f"{row.rss_mb:.0f}" if row.rss_mb else ""
            lines.append((label if i == 0 else "", row.setting, row.figure,
                          own or (rss_text if i == 0 else ""), row.note))
    compared = {"pipeline", "train"} <= set(report["sections"])
    for i, row in enumerate(rows_starvation(report.get("starvation", []), report["sections"])
                            if compared else []):
        lines.append(("starved?" if i == 0 else "", row.setting, row.figure, "", row.note))
    for label, rows in (("ours/peer", rows_peer_comparison(report.get("peer_comparison", []))),
                        ("of peak", rows_limit_shares(report.get("limit_shares", [])))):
        for i, row in enumerate(rows):
            lines.append((label if i == 0 else "", row.setting, row.figure, "", row.note))
    titles = ("section", "setting", "result", "peak MB", "notes")
    widths = [max(len(t), *(len(line[k]) for line in lines)) if lines else len(t)
              for k, t in enumerate(titles[:4])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:2]) + "  " + "  ".join(
        f"{{:>{w}}}" for w in widths[2:]) + "  {}"
    out = [header, fmt.format(*titles), fmt.format(*("-" * w for w in widths), "-----")]
    out += [fmt.format(*line).rstrip() for line in lines]
    out.append("peak MB: peak resident memory of the section's process (+ its largest worker "
               "process); train: each setting's own process")
    return "\n".join(out)


def _machine_device(sections: dict) -> str | None:
    for entry in sections.values():
        device = entry.get("result", {}).get("device")
        if device:
            return device
    return None


# ----------------------------------------------------------------------------- the run

def run_bench(out: Path | None, quick: bool, siim_mini: Path | None = None,
              sections: list[str] | None = None, *, params: dict[str, dict] | None = None,
              isolate: bool = True) -> dict:
    """Runs the benchmark sections, prints the table and returns (and writes) the report.

    Args:
        out: JSON file to write (None: do not write).
        quick: small settings (~2.5 min on 2 cores) instead of the full grid (~25-30 min).
        siim_mini: folder of real DICOMs for ``prepare`` (default: :func:`resolve_siim_mini`);
            when absent that section is reported as skipped.
        sections: names from :data:`SECTIONS` (default: all, in registry order).
        params: keyword arguments per section, e.g. ``{"pipeline": {"sizes": [512]}}``.
        isolate: each section in its own process (default; peak memory is then per section).

    Returns:
        ``{"machine", "quick", "wall_s", "sections": {name: {"status", "result" | "error" |
        "reason", "seconds", "peak_rss_mb", "children_peak_rss_mb", ...}}, "starvation",
        "peer_comparison", "limit_shares", "table"}``; memory in MB (VmHWM of the section's
        process and of its largest child).
    """
    names = list(sections or SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise BenchError(f"unknown section(s) {', '.join(unknown)}; expected some of "
                         f"{', '.join(SECTIONS)}")
    params = params or {}
    bad = [n for n in params if n not in SECTIONS]
    if bad:
        raise BenchError(f"params for unknown section(s) {', '.join(bad)}")
    mini = resolve_siim_mini(siim_mini)
    ctx = Context(quick=quick, siim_mini=mini)
    start = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(), "quick": quick,
                              "siim_mini": str(mini), "sections": {}}
    for name in names:
        progress(f"section {name} ...")
        t0 = time.perf_counter()
        if isolate:
            args = ["--section", name, "--siim-mini", str(mini), "--params",
                    json.dumps(params.get(name, {}))] + (["--quick"] if quick else [])
            entry = run_child(args, SECTION_TIMEOUT_S[quick])
        else:
            entry = run_section(name, ctx, params.get(name))
        entry["seconds"] = time.perf_counter() - t0
        report["sections"][name] = entry
        progress(f"section {name}: {entry['status']} in {entry['seconds']:.0f} s")
    report["wall_s"] = time.perf_counter() - start
    report["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["machine"]["device"] = _machine_device(report["sections"])
    report["starvation"] = starvation(report["sections"])
    report["peer_comparison"] = peer_comparison(report["sections"])
    report["limit_shares"] = limit_shares(report["sections"])
    report["table"] = render_table(report)
    print(report["table"], flush=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return report
