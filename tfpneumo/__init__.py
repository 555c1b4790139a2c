"""tfpneumo: SIIM-ACR pneumothorax segmentation on Keras 3 / TensorFlow.

The public API, loaded lazily so that ``import tfpneumo`` stays fast (TensorFlow is imported
by the first function that needs it)::

    import tfpneumo

    cfg = tfpneumo.load_config("demo", ["data.cache=cache"])
    tfpneumo.prepare("siim/", "cache", cfg)          # DICOMs + RLE labels -> TFRecord cache
    tfpneumo.train(cfg, folds=[0])                   # runs/<experiment>/fold_0/
    tfpneumo.evaluate(cfg)                           # out-of-fold rule search
    tfpneumo.submit(cfg, data="siim/", out="submission.csv")
    tfpneumo.predict(cfg, ["image.dcm"], out="preds/")
    net = tfpneumo.build_model(cfg.model)            # the bare Keras network
"""

import importlib
import os

# segmentation_models picks its Keras flavour at import time; tf.keras is the one
# that works with Keras 3. Set it here so users never have to.
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
# TensorFlow's C++ start-up chatter drowns the CLI's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfpneumo.errors import TfpneumoError  # noqa: E402

__version__ = "0.2.0"

_API = {
    "load_config": ("tfpneumo.config", "load_config"),
    "build_model": ("tfpneumo.models.unet", "build_model"),
    "prepare": ("tfpneumo.data.prepare", "prepare_cache"),
    "train": ("tfpneumo.training.run", "train"),
    "evaluate": ("tfpneumo.evaluation.report", "evaluate"),
    "submit": ("tfpneumo.inference.submission", "submit"),
    "predict": ("tfpneumo.inference.pictures", "predict"),
}
__all__ = ["TfpneumoError", "__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tfpneumo' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
