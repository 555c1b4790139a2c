"""Shared fixtures. Tests that need the real SIIM files skip when ../shared/siim is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SM_FRAMEWORK", "tf.keras")

REPO = Path(__file__).resolve().parent.parent
SIIM = Path(os.environ.get("TFPNEUMO_SIIM", REPO.parent / "shared" / "siim"))


@pytest.fixture(scope="session")
def siim_dir() -> Path:
    """../shared/siim (real competition files), or skip."""
    if not (SIIM / "stage_2_train.csv.gz").exists():
        pytest.skip(f"real SIIM files not found at {SIIM} (set TFPNEUMO_SIIM)")
    return SIIM


@pytest.fixture(scope="session")
def siim_mini(siim_dir: Path) -> Path:
    """../shared/siim/siim-mini: 48 labelled + 10 test real DICOMs in the Kaggle layout."""
    mini = siim_dir / "siim-mini"
    if not (mini / "train-rle.csv").exists():
        pytest.skip(f"{mini} not found")
    return mini


@pytest.fixture(scope="session")
def tf():
    """TensorFlow, imported quietly."""
    from tfpneumo.tfimport import quiet_tensorflow

    return quiet_tensorflow()


@pytest.fixture(scope="session")
def keras(tf):
    """Keras, imported after TensorFlow was quieted."""
    import keras

    return keras


def pytest_collection_modifyitems(config, items):
    """Files holding a ``slow`` test (the demo, the multi-worker and tune launches) first:
    ``pytest -n 2 --dist loadfile`` (the default, pyproject.toml) hands files out in order,
    so the long ones start at once and the short ones fill the other worker around them."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within kept
