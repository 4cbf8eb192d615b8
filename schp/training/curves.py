"""curves.png: loss, learning rate and validation mIoU per epoch, drawn with Pillow.

Pillow is already a dependency (label PNGs); three small line charts need nothing more.
"""
from pathlib import Path
from typing import Dict, List, Sequence

from PIL import Image, ImageDraw

from schp.utils.outputs import atomic_path

PANEL_W, PANEL_H, MARGIN = 420, 260, 48
SERIES = (("loss", "loss (mean per epoch)", (31, 119, 180)), ("lr", "learning rate", (255, 127, 14)),
          ("val_mean_iou", "val mIoU (%)", (44, 160, 44)))


def _panel(draw: ImageDraw.ImageDraw, left: int, title: str, xs: Sequence[float], ys: Sequence[float],
           color) -> None:
    x0, y0, x1, y1 = left + MARGIN, 28, left + PANEL_W - 12, PANEL_H - 30
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text((left + MARGIN, 8), title, fill=(0, 0, 0))
    if not xs:
        draw.text((x0 + 10, (y0 + y1) // 2), "not measured yet", fill=(120, 120, 120))
        return
    lo, hi = min(ys), max(ys)
    if hi == lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    first, last = min(xs), max(xs)
    span = max(last - first, 1)

    def point(x, y):
        return (x0 + (x - first) / span * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0))

    points = [point(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=color, width=2)
    for px, py in points:
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
    draw.text((left + 2, y0 - 4), f"{hi:.3g}", fill=(0, 0, 0))
    draw.text((left + 2, y1 - 8), f"{lo:.3g}", fill=(0, 0, 0))
    draw.text((x0, y1 + 6), f"epoch {first:g}", fill=(0, 0, 0))
    draw.text((x1 - 60, y1 + 6), f"epoch {last:g}", fill=(0, 0, 0))


def draw_curves(rows: List[Dict], path: Path) -> None:
    """One panel per series of `rows` (the metrics.jsonl objects), written atomically as PNG."""
    image = Image.new("RGB", (PANEL_W * len(SERIES), PANEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, (key, title, color) in enumerate(SERIES):
        pairs = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        _panel(draw, i * PANEL_W, title, [p[0] for p in pairs], [p[1] for p in pairs], color)
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
