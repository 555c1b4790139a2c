"""tfpneumo: SIIM-ACR pneumothorax segmentation on Keras 3 / TensorFlow."""

import os

# segmentation_models picks its Keras flavour at import time; tf.keras is the one
# that works with Keras 3. Set it here so users never have to.
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
# TensorFlow's C++ start-up chatter drowns the CLI's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"


class TfpneumoError(Exception):
    """An error about user input (a file, a CSV row, a config key) with a one-line message.

    The CLI prints ``str(error)`` and exits non-zero instead of a traceback.
    """
