"""Drawing helpers shared by the pictures tfpneumo writes (evaluation heatmap, overlays)."""

from __future__ import annotations


def font(size: int):
    """Pillow's default font at ``size`` px; the fixed bitmap font without FreeType."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def caption(picture, text: str) -> None:
    """Draws ``text`` in white on a dark box in the top-left corner of the PIL image
    ``picture`` (in place); the font is ~1/32 of the height, at least 12 px."""
    from PIL import ImageDraw

    height = picture.size[1]
    text_font = font(max(12, height // 32))
    draw = ImageDraw.Draw(picture, "RGBA")
    margin = max(4, height // 128)
    left, top, right, bottom = draw.textbbox((2 * margin, 2 * margin), text, font=text_font)
    draw.rectangle([left - margin, top - margin, right + margin, bottom + margin],
                   fill=(0, 0, 0, 170))
    draw.text((2 * margin, 2 * margin), text, fill=(255, 255, 255, 255), font=text_font)
