"""Pictures of images and of retrieval answers: what a person looks at.

* :func:`display_image` — a 2D view of an image, or of a volume (its middle axial slice or an axial montage).
* :func:`fit_picture` — that view scaled into ``size x size`` (nearest-neighbour when enlarging).
* :func:`draw_gallery` — rows of tiles (a query, then its top-k, each with a caption) as one picture: the
  one gallery renderer of ``cbmir search --gallery`` (one row) and of the report's query galleries (the best
  and worst queries of a collection, one row each).

Pictures are uint8 ``(H, W)`` or ``(H, W, 3)``; volumes uint8 ``(D, H, W)``. Drawn with Pillow (fast: a
gallery of 36 tiles takes tens of milliseconds), captions in DejaVu Sans (matplotlib's bundled font, which
has the ✓ and ✗ marks).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cbmir.core.errors import CbmirError

__all__ = ["MIN_SIZE", "MAX_SIZE", "DEFAULT_SIZE", "VIEWS", "MONTAGE_SLICES", "display_image", "check_size",
           "fit_picture", "Tile", "query_tile", "hit_tile", "draw_gallery", "tile_box", "png_bytes", "CORRECT",
           "WRONG", "NEUTRAL"]

#: bounds and default of the side of a rendered image, in pixels
MIN_SIZE, MAX_SIZE, DEFAULT_SIZE = 16, 1024, 256
#: views of a volume
VIEWS = ("middle", "montage")
#: most slices in a montage
MONTAGE_SLICES = 16
#: caption colours (RGB): a relevant hit (same label as the query), an irrelevant one, anything else
CORRECT, WRONG, NEUTRAL = (0, 128, 0), (200, 0, 0), (0, 0, 0)


def display_image(pixels: np.ndarray, is_3d: bool, view: str = "middle") -> np.ndarray:
    """A 2D uint8 picture of ``pixels``: ``(H, W, 3)`` as is; a volume ``(D, H, W)`` as its middle slice
    (``view="middle"``: slice ``D // 2``) or a montage of up to :data:`MONTAGE_SLICES` evenly spaced axial
    slices in a near-square grid, row by row from the first slice (``view="montage"``).

    Raises:
        CbmirError: an unknown view; ``montage`` for a 2D image.
    """
    if view not in VIEWS:
        raise CbmirError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")
    if not is_3d:
        if view != "middle":
            raise CbmirError("view 'montage' applies to 3D collections; this one holds 2D images: use view=middle")
        return pixels
    d = pixels.shape[0]
    if view == "middle":
        return pixels[d // 2]
    n = min(d, MONTAGE_SLICES)
    picks = np.unique(np.linspace(0, d - 1, n).round().astype(int))
    cols = math.ceil(math.sqrt(len(picks)))
    rows = math.ceil(len(picks) / cols)
    h, w = pixels.shape[1:]
    out = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for i, z in enumerate(picks):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[z]
    return out


def check_size(size) -> int:
    """``size`` as an int in :data:`MIN_SIZE`..:data:`MAX_SIZE`, else CbmirError naming the range."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise CbmirError(f"image size {size!r} is out of range; give an integer from {MIN_SIZE} to {MAX_SIZE}")
    return int(size)


def fit_picture(img: np.ndarray, size: int) -> "object":
    """A PIL image of uint8 ``img`` (``(H, W)`` or ``(H, W, 3)``) scaled so that its longer side is
    ``size`` (aspect ratio kept): nearest-neighbour when enlarging (each stored pixel stays a visible
    square), Lanczos when shrinking."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(img))
    h, w = img.shape[:2]
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != (w, h):
        im = im.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)
    return im


@dataclass(frozen=True)
class Tile:
    """One picture of a gallery row and its caption.

    Attributes:
        picture: uint8 ``(H, W)`` or ``(H, W, 3)`` (a 2D view: :func:`display_image`), or None for a tile
            that shows ``blank`` instead (a vector query has no image).
        caption: lines under the picture, ``\\n``-separated (a line wider than the tile is cut with ``…``).
        colour: RGB of the caption (:data:`CORRECT`, :data:`WRONG`, :data:`NEUTRAL`).
        blank: text of a tile without picture.
    """

    picture: np.ndarray | None
    caption: str
    colour: tuple[int, int, int] = NEUTRAL
    blank: str = ""


def query_tile(picture: np.ndarray | None, *, what: str, label: int | None, class_name: str | None,
               heading: str = "") -> Tile:
    """The tile of a query: ``heading`` (optional first line), ``query: <what>``, then its class name and label
    (``label unknown`` for None or -1); a None picture shows ``vector query (no image)``."""
    known = label is not None and label >= 0
    lines = ([heading] if heading else []) + [f"query: {what}",
                                              f"{class_name} (label {label})" if known else "label unknown"]
    return Tile(picture, "\n".join(lines), NEUTRAL, blank="vector query\n(no image)")


def hit_tile(picture: np.ndarray, *, rank: int, split: str, index: int, label: int, class_name: str | None,
             score: float, query_label: int | None) -> Tile:
    """The tile of a hit: ``#rank split row index`` with ✓ (same label as the query, green) or ✗ (red) when the
    query's label is known (not None, not -1), its class name (``unlabelled``) and its score (4 decimals)."""
    known = query_label is not None and query_label >= 0
    mark = (" ✓" if label == query_label else " ✗") if known else ""
    colour = (CORRECT if label == query_label else WRONG) if known else NEUTRAL
    return Tile(picture, f"#{rank} {split} row {index}{mark}\n{class_name or 'unlabelled'}\nscore {score:.4f}",
                colour)


#: gap between tiles and around the gallery, pixels
_GAP = 6


def _font(px: int):
    """DejaVu Sans at ``px`` pixels (matplotlib's copy), else Pillow's default font."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), px)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _fit_text(draw, text: str, font, width: int) -> str:
    """``text`` cut with ``…`` so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def draw_gallery(rows: Sequence[Sequence[Tile]], title: str = "", *, tile: int = 160):
    """Rows of tiles as one RGB PIL image: each picture fitted into ``tile x tile`` (:func:`fit_picture`,
    centred; :func:`tile_box` gives where), its caption under it; ``title`` on top.

    Raises:
        CbmirError: ``tile`` out of range (:func:`check_size`); no row.
    """
    from PIL import Image, ImageDraw

    tile = check_size(tile)
    if not rows:
        raise CbmirError("a gallery needs at least one row of tiles")
    font_px, line_h, top, row_h = _layout(rows, tile, bool(title))
    font = _font(font_px)
    cols = max(len(row) for row in rows)
    canvas = Image.new("RGB", (_GAP + cols * (tile + _GAP), top + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_GAP, _GAP), _fit_text(draw, title, font, canvas.width - 2 * _GAP), fill=NEUTRAL, font=font)
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            x, y = _GAP + c * (tile + _GAP), top + r * row_h
            if t.picture is not None:
                pic = fit_picture(t.picture, tile).convert("RGB")
                canvas.paste(pic, (x + (tile - pic.width) // 2, y + (tile - pic.height) // 2))
            else:
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=(160, 160, 160))
                draw.multiline_text((x + tile // 2, y + tile // 2), t.blank, fill=NEUTRAL, font=font, anchor="mm",
                                    align="center")
            for i, line in enumerate(t.caption.split("\n")):
                draw.text((x, y + tile + 2 + i * line_h), _fit_text(draw, line, font, tile), fill=t.colour, font=font)
    return canvas


def _layout(rows: Sequence[Sequence[Tile]], tile: int, titled: bool) -> tuple[int, int, int, int]:
    """``(font px, caption line height, top of the first row, row height)`` of :func:`draw_gallery`."""
    font_px = max(9, tile // 14)
    line_h = font_px + 3
    n_lines = max(t.caption.count("\n") + 1 for row in rows for t in row)
    top = _GAP + (line_h + _GAP if titled else 0)
    return font_px, line_h, top, tile + 2 + n_lines * line_h + _GAP


def tile_box(rows: Sequence[Sequence[Tile]], r: int, c: int, *, tile: int = 160, titled: bool = True
             ) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the picture of row ``r``, column ``c`` in :func:`draw_gallery`'s
    image of ``rows`` (for checks of what was drawn)."""
    pic = rows[r][c].picture
    h, w = pic.shape[:2]
    scale = tile / max(h, w)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    _, _, top, row_h = _layout(rows, tile, titled)
    x, y = _GAP + c * (tile + _GAP) + (tile - pw) // 2, top + r * row_h + (tile - ph) // 2
    return x, y, x + pw, y + ph


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
