"""The project's error type and the one-line text of any exception.

Every error about user input (a file, a CSV row, a config key) is a :class:`TfpneumoError`
whose message is one line naming the culprit; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

# Lines TensorFlow puts before the cause ("Graph execution error:") or after it (the node).
_TF_NOISE = ("[[", "File ", "Detected at", "Graph execution")


class TfpneumoError(Exception):
    """An error about user input with a one-line message (the CLI prints it, no traceback)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` of an exception in one line of at most ``limit`` characters.

    A first line ending in ``:`` ("Invalid header:") is joined with the next; TensorFlow's
    messages, which start with a generic line and carry the cause last, give the cause.
    """
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if len(lines) > 1 and text.startswith(_TF_NOISE[2:]):
        causes = [line for line in lines if not line.startswith(_TF_NOISE)]
        text = (causes or lines)[-1]
    elif len(lines) > 1 and text.endswith(":"):
        text = f"{text} {lines[1]}"
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(e).__name__}: {text}"
