"""The ``peer`` section: segmentation_models.pytorch's ``Unet("resnet34")`` timed beside ours.

Needs the ``peer`` extra (``pip install -e ".[peer]"``: torch and segmentation-models-pytorch);
without it the section is skipped with the import error. The peer is the PyTorch reference
layout of the ``train`` section's ``reference`` rows: random weights, one grey input channel,
a classification head through ``aux_params``, BCE (with logits) on the mask and on the label,
AdamW. It trains and predicts at the same sizes and batches as our ``train`` and ``inference``
rows, in NCHW and channels_last memory format (each timed, the best kept), with the same clock
conventions as ours: a first call apart, then windows of steps, their median, min and max.
The report puts our figure, the peer's and the ratio side by side
(:func:`tfpneumo.bench.report.peer_comparison`); nothing here is a constant.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from tfpneumo.bench import paired
from tfpneumo.bench.harness import (
    INFERENCE_CASES,
    TRAIN_CASES,
    Context,
    Row,
    cores,
    error_line,
    progress,
    rate,
    span,
    spread,
)
from tfpneumo.bench.synthetic import random_batch

FORMATS = ("nchw", "channels_last")


def _torch():
    import segmentation_models_pytorch as smp
    import torch

    torch.set_num_threads(cores())
    return torch, smp


def build_peer(seed: int = 0):
    torch, smp = _torch()
    torch.manual_seed(seed)
    return smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=1,
                    aux_params={"classes": 1})


def _batch(size: int, batch: int, fmt: str, seed: int = 0):
    """Our train section's batch (grey pixels in [0, 255], rectangles), as NCHW tensors."""
    torch, _ = _torch()
    x, y = random_batch(size, batch, seed)
    as_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    x, mask, label = as_t(x) / 255.0, as_t(y["mask"]), torch.from_numpy(y["label"])
    if fmt == "channels_last":
        x, mask = (t.contiguous(memory_format=torch.channels_last) for t in (x, mask))
    return x, mask, label


def peer_train_step(size: int, batch: int, fmt: str, seed: int = 0):
    """The peer's train step (AdamW, BCE on both heads) in memory format ``fmt``, on one
    batch: a function returning the loss."""
    torch, _ = _torch()
    net = build_peer(seed)
    if fmt == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    bce = torch.nn.BCEWithLogitsLoss()
    x, mask, label = _batch(size, batch, fmt, seed)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        mask_logits, label_logits = net(x)
        loss = bce(mask_logits, mask) + bce(label_logits, label)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def peer_train(size: int, batch: int, fmt: str, seconds: float, windows: int = 3,
               steps: int | None = None, seed: int = 0) -> dict:
    """Images/s of the peer's train step (AdamW, BCE on both heads) in memory format ``fmt``.
    First step apart (``first_step_s``), a second sizes the windows, then ``windows`` windows."""
    step = peer_train_step(size, batch, fmt, seed)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    n = steps or max(1, round(seconds / (time.perf_counter() - t0)))
    walls, cpus = [], []
    for _ in range(windows):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            loss = step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if loss != loss:  # NaN
        raise FloatingPointError(f"loss {loss}")
    return {"first_step_s": first, "steps": n, "windows": windows,
            "img_per_s": spread([n * batch / w for w in walls]),
            "img_per_cpu_s": rate(n * batch, statistics.median(cpus))}


def peer_infer(size: int, batch: int, hflip: bool, fmt: str, per_window: int,
               windows: int, seed: int = 0) -> dict:
    """Images/s of the peer's prediction (sigmoid mask and label; with ``hflip`` an image and
    its mirror in one forward, the mirrored mask flipped back and averaged)."""
    torch, _ = _torch()
    net = build_peer(seed).eval()
    if fmt == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    x, _, _ = _batch(size, batch, fmt, seed)

    def call() -> None:
        with torch.inference_mode():
            inp = torch.cat([x, torch.flip(x, dims=[3])]) if hflip else x
            m, lab = net(inp)
            m, lab = torch.sigmoid(m), torch.sigmoid(lab)
            if hflip:
                m = (m[:batch] + torch.flip(m[batch:], dims=[3])) / 2
                lab = (lab[:batch] + lab[batch:]) / 2
            m.numpy(), lab.numpy()

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(windows):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(per_window):
            call()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    n = per_window * batch
    return {"first_call_s": first, "images": n * windows,
            "img_per_s": spread([n / w for w in walls]),
            "img_per_cpu_s": rate(n, statistics.median(cpus))}


def _best(results: dict) -> str | None:
    ok = {f: r for f, r in results.items() if "error" not in r}
    return max(ok, key=lambda f: ok[f]["img_per_s"]["median"]) if ok else None


def bench_peer(ctx: Context, *, train_cases: Sequence[Sequence[int]] | None = None,
               infer_cases: Sequence[Sequence] | None = None, seconds: float | None = None,
               windows: int | None = None, steps: int | None = None,
               formats: Sequence[str] | None = None, seed: int = 0) -> dict:
    """The peer's train rows (float32) at our train section's sizes and batches, and its
    inference rows at our inference section's; each memory format timed, the best kept.
    Quick: channels_last only (the faster on every run here so far, 5-12 %)."""
    try:
        torch, smp = _torch()
    except ImportError as e:
        return {"skipped": f"peer extra not installed (pip install -e \".[peer]\"): "
                           f"{error_line(e)}"}
    formats = tuple(formats or (("channels_last",) if ctx.quick else FORMATS))
    train_cases = [tuple(c) for c in (train_cases or TRAIN_CASES[ctx.quick])]
    infer_cases = [tuple(c) for c in (infer_cases or INFERENCE_CASES[ctx.quick])]
    seconds = seconds or (2.0 if ctx.quick else 10.0)
    windows = windows or (3 if ctx.quick else 5)
    train_rows, infer_rows = [], []
    for size, batch in train_cases:
        by_fmt = {}
        for fmt in formats:
            try:
                by_fmt[fmt] = peer_train(size, batch, fmt, seconds, windows, steps, seed)
            except Exception as e:
                by_fmt[fmt] = {"error": error_line(e)}
        row: dict[str, Any] = {"size": size, "batch": batch, "precision": "float32",
                               "formats": by_fmt, "best": _best(by_fmt)}
        if row["best"]:
            row.update(by_fmt[row["best"]])
            progress(f"peer train {size}x{batch}: {row['img_per_s']['median']:.2f} img/s "
                     f"({row['best']})")
        else:
            row["error"] = next(iter(by_fmt.values()))["error"]
        train_rows.append(row)
    # The ratio of record: ours and the peer in alternating windows (tfpneumo.bench.paired)
    head = train_rows[0] if train_rows else None
    head_to_head = None
    if head is not None and head.get("best"):
        head_to_head = paired.head_to_head(head["size"], head["batch"], head["best"],
                                           rounds=4 if ctx.quick else 8, seconds=seconds + 1.0)
        if "error" not in head_to_head:
            progress(f"head to head {head['size']}x{head['batch']} float32: ours / peer "
                     f"{head_to_head['ratio']:.2f}x over {head_to_head['rounds']} rounds")
    chosen = None
    for size, batch, hflip, per_window, n_windows in sorted(infer_cases, key=lambda c: c[0]):
        fmts = [chosen] if (ctx.quick and chosen) else list(formats)
        by_fmt = {}
        for fmt in fmts:
            try:
                by_fmt[fmt] = peer_infer(size, batch, bool(hflip), fmt, per_window, n_windows, seed)
            except Exception as e:
                by_fmt[fmt] = {"error": error_line(e)}
        row = {"size": size, "batch": batch, "hflip": bool(hflip), "formats": by_fmt,
               "best": _best(by_fmt)}
        if row["best"]:
            chosen = chosen or row["best"]
            row.update(by_fmt[row["best"]])
            progress(f"peer inference {size} px x{batch} hflip={bool(hflip)}: "
                     f"{row['img_per_s']['median']:.2f} img/s ({row['best']})")
        else:
            row["error"] = next(iter(by_fmt.values()))["error"]
        infer_rows.append(row)
    return {"train": train_rows, "inference": infer_rows, "head_to_head": head_to_head,
            "torch": torch.__version__,
            "smp": smp.__version__, "threads": torch.get_num_threads()}


def _formats_note(r: dict) -> str:
    parts = []
    for fmt, x in r["formats"].items():
        parts.append(f"{fmt} failed" if "error" in x else
                     f"{fmt} {x['img_per_s']['median']:.2f}")
    return "; ".join(parts)


def rows_peer(result: dict) -> list[Row]:
    head = f"smp {result['smp']} Unet(resnet34), torch {result['torch']}, {result['threads']} threads"
    out = []
    for r in result["train"]:
        setting = f"peer train {r['size']} px x{r['batch']}, float32"
        if "error" in r:
            out.append(Row(setting, "failed", r["error"]))
            continue
        s = r["img_per_s"]
        out.append(Row(setting, f"{s['median']:.2f} img/s{span(s, '.2f')}",
                       f"best of {_formats_note(r)}; first step {r['first_step_s']:.1f} s; {head}"))
    h = result.get("head_to_head")
    if h:
        setting = f"head to head: train {h['size']} px x{h['batch']}, float32, reference layout"
        if "error" in h:
            out.append(Row(setting, "failed", h["error"]))
        else:
            o, p = h["img_per_s"]["ours"], h["img_per_s"]["peer"]
            out.append(Row(setting, f"ours/peer {h['ratio']:.2f}x [{min(h['ratios']):.2f}-"
                           f"{max(h['ratios']):.2f}]",
                           f"median of {h['rounds']} rounds of alternating windows (ABBA); "
                           f"ours {o['median']:.2f} img/s, peer {p['median']:.2f} img/s "
                           f"({h['peer_format']})"))
    for r in result["inference"]:
        setting = (f"peer inference {r['size']} px x{r['batch']}, "
                   f"{'hflip TTA' if r['hflip'] else 'no TTA'}")
        if "error" in r:
            out.append(Row(setting, "failed", r["error"]))
            continue
        s = r["img_per_s"]
        out.append(Row(setting, f"{s['median']:.2f} img/s{span(s, '.2f')}",
                       f"best of {_formats_note(r)}; first call {r['first_call_s']:.1f} s"))
    return out
