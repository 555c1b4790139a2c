"""The ``tfpneumo`` command line: each command parses, loads the config, calls one function."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tfpneumo import TfpneumoError
from tfpneumo.config import load_config, replace

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SIIM-ACR pneumothorax segmentation on Keras 3 / TensorFlow.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of overrides.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override one key, e.g. --set data.batch_size=4 (repeatable).")]


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
    masks_from: Annotated[Optional[Path], typer.Option(
        help="SIIM label CSV whose real mask shapes the pathology is drawn in.")] = None,
) -> None:
    """Write a synthetic dataset in the exact SIIM layout (DICOMs + RLE labels)."""
    from tfpneumo.data.synth import synthesize

    summary = synthesize(out, n_train=n_train, n_test=n_test, size=size,
                         positive_rate=positive_rate, seed=seed, masks_from=masks_from)
    typer.echo(summary)


@app.command()
@one_line_errors
def prepare(
    data: Annotated[Path, typer.Option(help="SIIM folder: dicom-images-train/, dicom-images-test/, labels.")],
    out: Annotated[Optional[Path], typer.Option(help="Cache folder to write (default: config data.cache).")] = None,
    size: Annotated[Optional[int], typer.Option(help="Cached image side in pixels.")] = None,
    folds: Annotated[Optional[int], typer.Option(help="Number of cross-validation folds.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Label CSV (default: found in --data).")] = None,
    clahe: Annotated[Optional[bool], typer.Option("--clahe/--no-clahe", help="Apply CLAHE when caching.")] = None,
    group_by_patient: Annotated[Optional[bool], typer.Option(
        "--group-by-patient/--no-group-by-patient", help="Keep each PatientID within one fold.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (0 = all cores).")] = None,
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
    fold: Annotated[str, typer.Option(help="Fold index to validate on, or 'all' (each in turn).")] = "0",
    set_: SetOpt = None,
) -> None:
    """Train a fold (resumable) into runs/<experiment>/fold_<k>/."""
    cfg = load_config(config, set_ or [])
    from tfpneumo.train import train as train_folds

    typer.echo(train_folds(cfg, fold))


def main() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
