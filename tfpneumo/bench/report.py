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
        "table"}``; memory in MB (VmHWM of the section's process and of its largest child).
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
    report["table"] = render_table(report)
    print(report["table"], flush=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return report
