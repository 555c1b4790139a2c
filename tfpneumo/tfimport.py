"""Importing TensorFlow without its start-up chatter on stderr."""

from __future__ import annotations

import os
import sys
import tempfile


def quiet_tensorflow():
    """Imports TensorFlow (and initialises its devices) with the C++ log lines hidden.

    TF 2.21 writes several absl lines (oneDNN, CUDA stubs, cuInit) before its log level is
    read, so ``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them. We point file
    descriptor 2 at a temporary file during the import and replay it only if the import
    fails. Returns the ``tensorflow`` module.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tf
