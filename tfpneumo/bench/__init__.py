"""``tfpneumo bench``: one benchmark report of this machine; every figure measured in one run.

A harness (:mod:`.harness`: context, rows, child processes, peak memory), the report
(:mod:`.report`: run every section, the starvation summary, the table) and one module per
section: :mod:`.prepare`, :mod:`.pipeline`, :mod:`.service`, :mod:`.train`, :mod:`.inference`,
:mod:`.peer`, :mod:`.limit`, :mod:`.threshold`. What each section measures and how to add one: :mod:`.harness`.

    python -m tfpneumo.bench --quick --out bench.json   # ~4 min on 2 cores with the peer extra
    python -m tfpneumo.bench --out bench.json           # full grid, ~25-30 min on 2 cores
    python -m tfpneumo.bench --sections threshold pipeline --params '{"pipeline": {"sizes": [512]}}'
"""

from __future__ import annotations

from tfpneumo.bench import inference, limit, peer, pipeline, prepare, service, threshold, train
from tfpneumo.bench.harness import SECTIONS, BenchError, Context, Row, Section
from tfpneumo.bench.report import render_table, run_bench

SECTIONS.update({
    "prepare": Section("prepare (real DICOMs)", prepare.bench_prepare, prepare.rows_prepare),
    "pipeline": Section("input pipeline", pipeline.bench_pipeline, pipeline.rows_pipeline),
    "service": Section("heavy augmentations via tf.data service", service.bench_service,
                       service.rows_service),
    "train": Section("train step", train.bench_train, train.rows_train),
    "inference": Section("inference", inference.bench_inference, inference.rows_inference),
    "peer": Section("peer: smp Unet(resnet34), PyTorch", peer.bench_peer, peer.rows_peer),
    "limit": Section("distance to the limit", limit.bench_limit, limit.rows_limit),
    "threshold": Section("threshold search", threshold.bench_threshold, threshold.rows_threshold),
})

__all__ = ["SECTIONS", "BenchError", "Context", "Row", "Section", "render_table", "run_bench"]
