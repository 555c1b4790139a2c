"""Drawing helpers shared by the pictures tfpneumo writes (evaluation heatmap, overlays)."""

from __future__ import annotations


def font(size: int):
    """Pillow's default font at ``size`` px; the fixed bitmap font without FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()
