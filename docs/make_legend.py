#!/usr/bin/env python3
"""Draw docs/legend.png: each dataset's classes beside their palette colour (no parsing result shown)."""
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from schp.data.catalog import DATASETS  # noqa: E402
from schp.utils.palette import class_colors  # noqa: E402

ROW, SWATCH, COLUMN, MARGIN = 22, 36, 230, 12


def main(out: Path) -> None:
    order = ["pascal", "lip", "atr"]
    rows = max(DATASETS[name].num_classes for name in order)
    image = Image.new("RGB", (MARGIN + COLUMN * len(order), MARGIN * 2 + ROW * (rows + 1)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for c, name in enumerate(order):
        x = MARGIN + c * COLUMN
        spec = DATASETS[name]
        draw.text((x, MARGIN), f"{name} ({spec.num_classes} classes)", fill="black", font=font)
        for i, (label, rgb) in enumerate(zip(spec.labels, class_colors(spec.num_classes))):
            y = MARGIN + ROW * (i + 1)
            draw.rectangle([x, y + 2, x + SWATCH, y + ROW - 4], fill=rgb, outline=(160, 160, 160))
            draw.text((x + SWATCH + 8, y + 5), f"{i:2d} {label}", fill="black", font=font)
    image.save(out)


if __name__ == "__main__":
    main(Path(__file__).resolve().parent / "legend.png")
