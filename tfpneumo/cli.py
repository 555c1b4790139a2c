"""The ``tfpneumo`` command line: each command parses, loads the config, calls one function."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from tfpneumo import grammar
from tfpneumo.config import load_config, replace
from tfpneumo.errors import TfpneumoError
from tfpneumo.tfimport import quiet_tensorflow

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SIIM-ACR pneumothorax segmentation on Keras 3 / TensorFlow.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML file of overrides.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override one key, e.g. --set data.batch_size=4 (repeatable).")]
# The names of tfpneumo.data.synth.looks.LOOKS, spelled out so that the CLI does not import
# OpenCV to print its help (tests/data/test_synth.py checks that the two agree).
SYNTH_LOOKS = ("standard", "faint", "noisy", "sharp")


def one_line_errors(func):
    """Turns the project's own errors into one line on stderr and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TfpneumoError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@one_line_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the SIIM-layout dataset into.")],
    n_train: Annotated[int, typer.Option(help="Labelled training images.")] = 200,
    n_test: Annotated[int, typer.Option(help="Unlabelled test images.")] = 50,
    size: Annotated[int, typer.Option(help="Image side in pixels (SIIM: 1024).")] = 1024,
    positive_rate: Annotated[float, typer.Option(help="Share of images with a pneumothorax.")] = 0.22,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same files.")] = 0,
    masks_from: Annotated[Path | None, typer.Option(
        help="SIIM label CSV whose real mask shapes the pathology is drawn in.")] = None,
    look: Annotated[str, typer.Option(
        help=f"How the images look: {', '.join(SYNTH_LOOKS)} (standard: the default data).")
    ] = "standard",
) -> None:
    """Write a synthetic dataset in the exact SIIM layout (DICOMs + RLE labels)."""
    from tfpneumo.data.synth import synthesize

    summary = synthesize(out, n_train=n_train, n_test=n_test, size=size,
                         positive_rate=positive_rate, seed=seed, masks_from=masks_from,
                         look=look)
    typer.echo(summary)


@app.command()
@one_line_errors
def prepare(
    data: Annotated[Path, typer.Option(help="SIIM folder: dicom-images-train/, dicom-images-test/, labels.")],
    out: Annotated[Path | None, typer.Option(help="Cache folder to write (default: config data.cache).")] = None,
    size: Annotated[int | None, typer.Option(help="Cached image side in pixels.")] = None,
    folds: Annotated[int | None, typer.Option(help="Number of cross-validation folds.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Label CSV (default: found in --data).")] = None,
    clahe: Annotated[bool | None, typer.Option("--clahe/--no-clahe", help="Apply CLAHE when caching.")] = None,
    group_by_patient: Annotated[bool | None, typer.Option(
        "--group-by-patient/--no-group-by-patient", help="Keep each PatientID within one fold.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (0 = all cores).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Decode every DICOM once into a sharded TFRecord cache with folds."""
    from tfpneumo.data.prepare import prepare_cache

    cfg = load_config(config, set_ or [])
    flags = {"size": size, "folds": folds, "clahe": clahe, "group_by_patient": group_by_patient,
             "workers": workers}
    cfg = replace(cfg, prepare={k: v for k, v in flags.items() if v is not None})
    summary = prepare_cache(data, out if out is not None else Path(cfg.data.cache), cfg,
                            labels=labels)
    typer.echo(summary)


@app.command()
@one_line_errors
def train(
    config: ConfigOpt = None,
    fold: Annotated[str, typer.Option(help="Validation fold: an index, a list 0,2 or all (in turn).")] = "0",
    set_: SetOpt = None,
    workers: Annotated[str | None, typer.Option(
        help="Train on several machines: host:port of every worker, the same list on each "
             "(worker 0 is the chief and writes the run folder). Sets TF_CONFIG.")] = None,
    worker_index: Annotated[int | None, typer.Option(
        help="This machine's place in --workers (0, 1, ...).")] = None,
    parallel: Annotated[int, typer.Option(
        help="Train this many folds side by side, one process each (GPUs split between "
             "them); logs in runs/<experiment>/logs/.")] = 1,
) -> None:
    """Train a fold (resumable) into runs/<experiment>/fold_<k>/."""
    folds = grammar.parse_folds(fold, "--fold")
    cfg = load_config(config, set_ or [])
    if parallel != 1:
        if workers is not None:
            raise TfpneumoError("--parallel trains whole folds per process; with --workers "
                                "every machine trains the same fold: use one or the other")
        if parallel < 1:
            raise TfpneumoError(f"--parallel {parallel}: must be >= 1")
        quiet_tensorflow()
        from tfpneumo.data.manifest import read_cache_info
        from tfpneumo.training.parallel import train_parallel

        cache = read_cache_info(cfg.data.cache)
        folds = list(range(cache.folds)) if folds == "all" else folds
        for k in folds:
            cache.check_fold(k)
        typer.echo(train_parallel(cfg, folds, parallel))
        return
    if workers is not None:
        os.environ["TF_CONFIG"] = grammar.parse_workers(workers, worker_index)
    elif worker_index is not None:
        raise TfpneumoError("--worker-index needs --workers (the list of host:port)")
    quiet_tensorflow()
    from tfpneumo.training.run import train as train_folds

    typer.echo(train_folds(cfg, folds))


@app.command()
@one_line_errors
def evaluate(
    config: ConfigOpt = None,
    folds: Annotated[str, typer.Option("--fold", "--folds", help="'all' or fold indices, e.g. 0,1.")] = "all",
    thresholds: Annotated[str, typer.Option(help="Top thresholds: start:stop[:step] or a,b,c.")] = "0.3:0.8",
    min_areas: Annotated[str, typer.Option(help="Minimum areas in cached pixels, or 'auto'.")] = "auto",
    bottoms: Annotated[str, typer.Option(help="Bottom (mask) thresholds.")] = "0.2:0.5:0.1",
    label_thresholds: Annotated[str, typer.Option(help="Classification-head thresholds.")] = "0.3:0.8:0.1",
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<experiment>/).")] = None,
    weights: Annotated[str, typer.Option(help="Whose out-of-fold predictions: auto (the averaged "
                                         "network if any) | swa | topk | best | final.")] = "auto",
    merges: Annotated[str, typer.Option(help="Ways of merging the TTA members to compare: 'all' "
                                        "or some of mean,median,geomean,mask_median.")] = "all",
    set_: SetOpt = None,
) -> None:
    """Search thresholds on the out-of-fold predictions (triplet and classifier rules)."""
    grids = {"thresholds": grammar.probability_grid(thresholds, "--thresholds"),
             "min_areas": grammar.area_grid(min_areas, "--min-areas"),
             "bottoms": grammar.probability_grid(bottoms, "--bottoms"),
             "label_thresholds": grammar.probability_grid(label_thresholds, "--label-thresholds")}
    fold_list = grammar.parse_folds(folds)
    from tfpneumo.evaluation.report import evaluate as run_evaluate

    cfg = load_config(config, set_ or [])
    typer.echo(run_evaluate(cfg, folds=fold_list, out=out, weights=weights,
                            merges=grammar.parse_merges(merges), **grids))


# Options shared by submit and predict: which models, which thresholds, which TTA.
FoldsOpt = Annotated[str, typer.Option("--folds", help="'all' trained folds or indices, e.g. 0,2.")]
WeightsOpt = Annotated[str, typer.Option(help="auto (swa, else topk, else best) | swa | topk | best | "
                                          "final; a kind other than auto uses the rule of "
                                          "evaluate --weights <kind>.")]
SizeOpt = Annotated[int, typer.Option(help="Prediction size in pixels; masks are written at the DICOM's size.")]
RuleOpt = Annotated[str | None, typer.Option(help="triplet | label (default: evaluate's best).")]
TopOpt = Annotated[float | None, typer.Option(help="Triplet top threshold.")]
AreaOpt = Annotated[int | None, typer.Option(help="Minimum mask area in pixels at --size.")]
BottomOpt = Annotated[float | None, typer.Option(help="Mask threshold (alone: the plain rule, top = bottom).")]
LabelOpt = Annotated[float | None, typer.Option(help="Classification-head threshold.")]
ScalesOpt = Annotated[str, typer.Option(help="Multi-scale TTA, e.g. 0.75,1,1.25.")]
HflipOpt = Annotated[bool, typer.Option("--hflip/--no-hflip", help="Horizontal-flip TTA.")]
MergeOpt = Annotated[str | None, typer.Option(help="How folds x TTA members become one map: mean | "
                                              "median | geomean | mask_median (default: "
                                              "evaluate's choice).")]
PrecisionOpt = Annotated[str, typer.Option(help="float32 | bfloat16: the networks in "
                                           "mixed_bfloat16, faster on CPUs with AMX or "
                                           "avx512_bf16; masks move at their edges (README).")]


def _rule(kind, top, min_area, bottom, label_threshold, merge) -> dict:
    """The command-line overrides of evaluate's rule for submit and predict (None = keep)."""
    return {"kind": kind, "top": top, "min_area": min_area, "bottom": bottom,
            "label_threshold": label_threshold, "merge": merge}


@app.command()
@one_line_errors
def submit(
    config: ConfigOpt = None,
    out: Annotated[Path, typer.Option(help="Submission CSV to write.")] = Path("submission.csv"),
    rle: Annotated[str, typer.Option(help="relative (competition) | standard.")] = "relative",
    sample_submission: Annotated[Path | None, typer.Option(help="Sample submission CSV (its ids).")] = None,
    data: Annotated[Path | None, typer.Option(help="SIIM folder with dicom-images-test/.")] = None,
    folds: FoldsOpt = "all", weights: WeightsOpt = "auto", size: SizeOpt = 1024,
    rule: RuleOpt = None, top: TopOpt = None, min_area: AreaOpt = None, bottom: BottomOpt = None,
    label_threshold: LabelOpt = None, merge: MergeOpt = None, scales: ScalesOpt = "1.0",
    hflip: HflipOpt = True, precision: PrecisionOpt = "float32",
    set_: SetOpt = None,
) -> None:
    """Predict the test DICOMs with the fold ensemble and write a competition submission."""
    quiet_tensorflow()
    from tfpneumo.inference.submission import submit as run_submit

    cfg = load_config(config, set_ or [])
    typer.echo(run_submit(cfg, out=out, rle=rle, sample_submission=sample_submission, data=data,
                          folds=grammar.parse_folds(folds), weights=weights, size=size, hflip=hflip,
                          scales=grammar.parse_scales(scales), precision=precision,
                          rule=_rule(rule, top, min_area, bottom, label_threshold, merge)))


@app.command()
@one_line_errors
def predict(
    files: Annotated[list[Path], typer.Argument(help="DICOM files.")],
    out: Annotated[Path, typer.Option(help="Folder for the outputs (<id>_mask.png, <id>_seg.dcm, ...).")],
    config: ConfigOpt = None,
    folds: FoldsOpt = "all", weights: WeightsOpt = "auto", size: SizeOpt = 1024,
    rule: RuleOpt = None, top: TopOpt = None, min_area: AreaOpt = None, bottom: BottomOpt = None,
    label_threshold: LabelOpt = None, merge: MergeOpt = None, scales: ScalesOpt = "1.0",
    hflip: HflipOpt = True, precision: PrecisionOpt = "float32",
    fmt: Annotated[str, typer.Option("--format", help="png (probability, mask and overlay PNGs) | "
                                     "dicom-seg (one DICOM Segmentation per image) | "
                                     "png,dicom-seg.")] = "png",
    seg_type: Annotated[str, typer.Option(help="binary (the mask) | fractional (the probability) "
                                          "for --format dicom-seg.")] = "binary",
    save_probs: Annotated[bool, typer.Option("--save-probs", help="Also <id>_prob.npz: the "
                                             "probability map, float16, compressed.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Also <id>_gradcam.png: Grad-CAM of "
                                          "the classification head on the image.")] = False,
    set_: SetOpt = None,
) -> None:
    """Probability, mask and overlay PNGs (or DICOM SEG files) for each DICOM."""
    quiet_tensorflow()
    from tfpneumo.inference.pictures import predict as run_predict

    cfg = load_config(config, set_ or [])
    typer.echo(run_predict(cfg, files, out=out, folds=grammar.parse_folds(folds), weights=weights,
                           size=size, hflip=hflip, scales=grammar.parse_scales(scales),
                           rule=_rule(rule, top, min_area, bottom, label_threshold, merge),
                           formats=fmt.split(","), seg_type=seg_type, save_probs=save_probs,
                           explain=explain, precision=precision))


@app.command()
@one_line_errors
def tune(
    search: Annotated[Path, typer.Option(help="The search file: space, objective, trials, "
                                         "sampler, pruner (README, tfpneumo tune).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    storage: Annotated[str | None, typer.Option(
        help="Optuna storage URL shared by every process of the study (default: SQLite file "
             "runs/<study>/study.db), e.g. postgresql://user@host/db.")] = None,
    report: Annotated[bool, typer.Option(
        "--report", help="Print the trials table and write the plots; train nothing.")] = False,
) -> None:
    """Hyperparameter search (Optuna): trials are ordinary runs; the best as a config file."""
    quiet_tensorflow()
    from tfpneumo import tune as tuning

    if report:
        cfg = load_config(config, set_ or [])
        typer.echo(tuning.report(search, cfg.experiment, storage=storage))
        return
    typer.echo(tuning.tune(config, set_ or [], search, storage=storage))


@app.command()
@one_line_errors
def export(
    out: Annotated[Path, typer.Option(help="New (or empty) folder for the exported model.")],
    config: ConfigOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="saved_model (TensorFlow SavedModel with "
                                     "serving_default and serving_uint16 signatures) | onnx "
                                     "(model.onnx) | litert (model.tflite); onnx and litert "
                                     "need tfpneumo[export].")] = "saved_model",
    folds: FoldsOpt = "all", weights: WeightsOpt = "auto",
    size: Annotated[int | None, typer.Option(
        help="Prediction size in pixels inside the graph (default: the training size).")] = None,
    input_size: Annotated[tuple[int, int] | None, typer.Option(
        metavar="H W", help="litert only: the fixed input size, batch 1 (default 1024 1024, "
        "the SIIM DICOMs').")] = None,
    quantize: Annotated[str, typer.Option(
        help="litert only: none (float32) | float16 (float16 weights) | dynamic (int8 "
        "weights).")] = "none",
    rule: RuleOpt = None, top: TopOpt = None, min_area: AreaOpt = None, bottom: BottomOpt = None,
    label_threshold: LabelOpt = None, merge: MergeOpt = None, scales: ScalesOpt = "1.0",
    hflip: HflipOpt = True,
    set_: SetOpt = None,
) -> None:
    """One self-contained model of the fold ensemble, TTA and rule (uint8 or uint16 images in)."""
    quiet_tensorflow()
    from tfpneumo.inference.export import export as run_export

    cfg = load_config(config, set_ or [])
    typer.echo(run_export(cfg, out=out, fmt=fmt, folds=grammar.parse_folds(folds),
                          weights=weights, size=size, hflip=hflip,
                          scales=grammar.parse_scales(scales), input_size=input_size,
                          quantize=quantize,
                          rule=_rule(rule, top, min_area, bottom, label_threshold, merge)))


@app.command()
@one_line_errors
def bench(
    out: Annotated[Path | None, typer.Option(help="Write the report as JSON here.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small settings: under 3 minutes on 2 cores.")] = False,
    siim_mini: Annotated[Path | None, typer.Option(
        help="Real DICOMs for prepare (default: $TFPNEUMO_SIIM/siim-mini, ../shared/siim/siim-mini).")] = None,
    section: Annotated[list[str] | None, typer.Option(
        help="Only this section (repeatable): prepare, pipeline, service, train, inference, threshold.")] = None,
) -> None:
    """Measure this machine (prepare, input, tf.data service, train step, inference, thresholds)."""
    from tfpneumo.bench import run_bench

    run_bench(out, quick, siim_mini, section)


@app.command("data-service")
@one_line_errors
def data_service(
    port: Annotated[int, typer.Option(help="Port of the dispatcher (all interfaces).")] = 5050,
) -> None:
    """Run a tf.data service dispatcher; trainers use --set data.service=grpc://HOST:PORT."""
    from tfpneumo.data.service import EXPOSED, check_port, check_port_free, serve_dispatcher

    check_port(port, "data-service --port", allow_zero=False)
    check_port_free(port, "data-service --port")
    typer.echo(f"warning: the tf.data service dispatcher on port {port} {EXPOSED}", err=True)
    typer.echo(f"tf.data service dispatcher on port {port}; Ctrl-C stops it", err=True)
    serve_dispatcher(port)


@app.command("data-worker")
@one_line_errors
def data_worker(
    dispatcher: Annotated[str, typer.Option(help="The dispatcher, HOST:PORT or grpc://HOST:PORT.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="Name trainers reach this worker by (default: FQDN).")] = None,
    port: Annotated[int, typer.Option(help="Port of this worker (0: any free port).")] = 0,
) -> None:
    """Run a tf.data service worker: training preprocessing for the config's augmentations."""
    from tfpneumo.data.service import (
        EXPOSED,
        check_port,
        check_port_free,
        check_reachable,
        serve_worker,
    )

    check_port(port, "data-worker --port", allow_zero=True)
    if port:
        check_port_free(port, "data-worker --port")
    check_reachable(dispatcher, "data-worker --dispatcher")
    cfg = load_config(config, set_ or [])
    typer.echo(f"warning: the tf.data service worker {EXPOSED}", err=True)
    typer.echo(f"tf.data service worker for {dispatcher}; Ctrl-C stops it", err=True)
    serve_worker(dispatcher, [stage_cfg.augment for _, stage_cfg in cfg.stage_configs()], host=host,
                 port=port)


@app.command()
@one_line_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for data, cache, runs and outputs.")] = Path("tfpneumo-demo"),
) -> None:
    """Everything on generated data: synth, prepare, train, evaluate, submit, predict."""
    quiet_tensorflow()
    from tfpneumo.demo import run_demo

    run_demo(workdir)


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
