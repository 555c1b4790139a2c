"""The run folder: what ``train`` writes and ``evaluate``, ``submit`` and ``predict`` read.

``<workdir>/runs/<experiment>/``::

    fold_<k>/
        config.yaml            resolved config
        history.csv            one row per epoch (losses, val Dice per threshold, AUC, lr)
        state/                 last completed epoch: weights + optimizer + SWA (resume)
        checkpoints/           top-k weights by validation Dice
        best.weights.h5        best checkpoint; final.weights.h5 the last epoch's weights
        tensorboard/           scalars and image panels
        final.keras best.keras [swa.keras] [topk.keras]   saved networks (safe_mode loadable)
        oof_<kind>.npz         out-of-fold statistics of each saved network (kind: final, ...)
        oof.npz                those of the network "auto" picks (the averaged one if any)
        result.json            summary; written last: a fold with it is trained
        stages/<name>/         one such folder per stage when the config has several
        .lock                  while a ``train`` of this fold runs (:func:`locked`)
    evaluation.json evaluation_images.csv evaluation_heatmap.png      (tfpneumo evaluate)
    evaluation_<kind>.json ...   (tfpneumo evaluate --weights <kind>: that network's rule)

This module is the only place that knows these names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from tfpneumo.errors import TfpneumoError

CONFIG = "config.yaml"
HISTORY = "history.csv"
STATE = "state"
CHECKPOINTS = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
FINAL_WEIGHTS = "final.weights.h5"
TENSORBOARD = "tensorboard"
OOF = "oof.npz"
RESULT = "result.json"  # a fold's; written last
STAGE_RESULT = "stage.json"  # a stage's; written last
STAGES = "stages"
LOCK = ".lock"  # a fold folder's, while train runs; <output>.lock for submit
EVALUATION_JSON = "evaluation.json"  # of --weights auto; evaluation_names() for the others

# Saved networks by kind; "auto" takes the first that exists in this order: an averaged
# network (SWA, then the top-k checkpoint average) is the model when training made one.
NETWORKS = {"swa": "swa.keras", "best": "best.keras", "final": "final.keras", "topk": "topk.keras"}
WEIGHTS = ("auto", *NETWORKS)
AUTO_ORDER = ("swa", "topk", "best", "final")


def _suffix(weights: str) -> str:
    if weights not in WEIGHTS:
        raise TfpneumoError(f"--weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    return "" if weights == "auto" else f"_{weights}"


def oof_name(weights: str = "auto") -> str:
    """``oof.npz`` (the network auto picks) or ``oof_<kind>.npz``."""
    return f"oof{_suffix(weights)}.npz"


def evaluation_names(weights: str = "auto") -> tuple[str, str, str]:
    """evaluate's JSON, per-image CSV and heatmap for the networks of ``weights``."""
    s = _suffix(weights)
    return f"evaluation{s}.json", f"evaluation{s}_images.csv", f"evaluation{s}_heatmap.png"


# What a multi-stage run copies from its last stage into the fold folder.
FOLD_ARTEFACTS = (*NETWORKS.values(), OOF, *(oof_name(k) for k in NETWORKS), HISTORY,
                  BEST_WEIGHTS)

FoldSpec = Literal["all"] | Sequence[int]
_FOLD_DIR = re.compile(r"fold_(\d+)")


def run_root(experiment: str, workdir: str | Path = ".") -> Path:
    """``<workdir>/runs/<experiment>``."""
    return Path(workdir) / "runs" / experiment


def fold_dir(experiment: str, fold: int, workdir: str | Path = ".") -> Path:
    return run_root(experiment, workdir) / f"fold_{fold}"


def fold_of(folder: Path) -> int:
    """The fold index of a ``fold_<k>`` folder (or of a file inside one)."""
    for part in (folder.name, folder.parent.name):
        if m := _FOLD_DIR.fullmatch(part):
            return int(m.group(1))
    raise ValueError(f"{folder}: not inside a fold_<k> folder")


def trained_folds(experiment: str, workdir: str | Path = ".") -> list[int]:
    """Indices k whose ``fold_<k>/result.json`` exists (training finished), sorted."""
    root = run_root(experiment, workdir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := _FOLD_DIR.fullmatch(p.name)) and (p / RESULT).is_file())


def resolve_trained_folds(experiment: str, folds: FoldSpec, workdir: str | Path = ".") -> list[int]:
    """``"all"`` -> every trained fold; indices -> those, each of which must be trained."""
    root = run_root(experiment, workdir)
    if isinstance(folds, str):
        if folds != "all":
            raise TfpneumoError(f"folds {folds!r}: expected 'all' or fold indices")
        found = trained_folds(experiment, workdir)
        if not found:
            raise TfpneumoError(f"{root}: no trained fold (no fold_<k>/{RESULT}); "
                                "run tfpneumo train first")
        return found
    wanted = sorted(set(int(k) for k in folds))
    if not wanted or wanted[0] < 0:
        raise TfpneumoError(f"folds {list(folds)}: expected 'all' or fold indices >= 0")
    for k in wanted:
        if not (fold_dir(experiment, k, workdir) / RESULT).is_file():
            raise TfpneumoError(f"{fold_dir(experiment, k, workdir) / RESULT}: fold {k} is not "
                                f"trained (or its training did not finish); run tfpneumo train "
                                f"--fold {k} or choose other folds")
    return wanted


def check_weights(weights: str) -> None:
    _suffix(weights)


def auto_kind(folder: Path) -> str:
    """The kind of network ``--weights auto`` picks in a fold folder (final if none)."""
    return next((k for k in AUTO_ORDER if (folder / NETWORKS[k]).is_file()), "final")


def network_file(folder: Path, weights: str = "auto") -> Path:
    """The saved network of one fold folder: ``weights`` one of :data:`WEIGHTS`."""
    check_weights(weights)
    if weights == "auto":
        path = folder / NETWORKS[auto_kind(folder)]
    else:
        path = folder / NETWORKS[weights]
    if not path.is_file():
        raise TfpneumoError(f"{path}: model file not found (try --weights auto)")
    return path


def ensemble_files(experiment: str, folds: FoldSpec = "all", weights: str = "auto",
                   workdir: str | Path = ".") -> list[Path]:
    """The saved network of each requested trained fold, in fold order."""
    return [network_file(fold_dir(experiment, k, workdir), weights)
            for k in resolve_trained_folds(experiment, folds, workdir)]


# ----------------------------------------------------------------------------- locks

class LockError(TfpneumoError):
    """A lock file could not be taken."""


class Locked(LockError):
    """Another living process holds the lock."""


def _start_marker(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks after boot), to tell a reused pid from
    the lock's holder; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool:
    """False if the lock's holder is known to be gone: same host, and its pid is not running
    (or runs a process that started at another time: the pid was reused)."""
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    marker = _start_marker(pid)
    return marker is None or holder.get("start") in (None, marker)


def _read_lock(path: Path) -> dict | None:
    """The lock's content; None when it vanished; ``{}`` when it is not (yet) readable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def locked(path: str | Path, what: str) -> Iterator[None]:
    """Holds the lock file ``path`` (its folder must exist) for the ``with`` block.

    The file is created atomically (``O_CREAT | O_EXCL``) with this process's pid, start time,
    host and a token, and removed when the block ends, normally or by an exception. A lock
    left by a process killed by -9 is stale: on the same host its pid no longer runs (or a
    later process has the pid) and the next run takes it over.

    Raises:
        LockError: the lock file cannot be written (a full disk, no permission).
        Locked: a living process holds it (the one line names ``what``, the folder, the pid
            and host, and the file to remove if that process is known to be gone).
    """
    path = Path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_marker(os.getpid()),
          "token": secrets.token_hex(8), "what": what}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as e:
            if not isinstance(e, FileExistsError):
                raise LockError(f"{path}: cannot write ({e.strerror or e})") from None
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile
            if not holder:  # being written right now, or garbage left by a crash
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < 10:
                    raise Locked(f"{path.parent}: {what} refused, another process is taking "
                                 f"its lock ({path})") from None
            elif _holder_alive(holder):
                raise Locked(f"{path.parent}: {what} refused, {holder.get('what', 'a run')} "
                             f"of process {holder.get('pid')} on {holder.get('host')} holds it "
                             f"(remove {path} if that process is gone)") from None
            try:
                path.unlink()  # stale: its holder is gone
            except FileNotFoundError:
                pass
            except OSError as e:
                raise Locked(f"{path.parent}: {what} refused, cannot remove the stale lock "
                             f"{path} ({e.strerror or e})") from None
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me) + "\n")
        except OSError as e:  # a full disk
            with contextlib.suppress(OSError):
                path.unlink()
            raise LockError(f"{path}: cannot write ({e.strerror or e})") from None
        break
    else:
        raise Locked(f"{path.parent}: {what} refused, its lock {path} keeps changing hands")
    try:
        yield
    finally:
        held = _read_lock(path)
        if held and held.get("token") == me["token"]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def locked_folder(folder: str | Path, what: str) -> Iterator[None]:
    """Creates ``folder`` when needed and holds its :data:`LOCK` (:func:`locked`) for the
    ``with`` block. The folders this created are removed again when the block leaves them
    empty, so that a run that failed on its inputs leaves nothing behind."""
    folder = Path(folder)
    created = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        created.append(p)  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LockError(f"{folder}: cannot create the folder ({e.strerror or e})") from None
    try:
        with locked(folder / LOCK, what):
            yield
    finally:
        for p in created:
            try:
                p.rmdir()  # only if empty
            except OSError:
                break
