"""Draws the 128 x 128 icons of the extension, the module and the effect (run from the repository root).

    python tools/make_icons.py
"""
from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw

SIZE = 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {
    "extension": os.path.join(ROOT, "MedSAMSlicer.png"),
    "module": os.path.join(ROOT, "MedSAMSlicer", "Resources", "Icons", "MedSAMSlicer.png"),
    "effect": os.path.join(ROOT, "MedSAMSegmentEffect", "Resources", "Icons", "MedSAMSegmentEffect.png"),
}


def blob(cx, cy, r, wobble=0.18, lobes=5, n=72):
    return [
        (cx + r * (1 + wobble * math.sin(lobes * t)) * math.cos(t), cy + r * (1 + wobble * math.sin(lobes * t)) * math.sin(t))
        for t in (2 * math.pi * i / n for i in range(n))
    ]


def draw(kind: str) -> Image.Image:
    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    if kind != "effect":
        d.rounded_rectangle((4, 4, SIZE - 5, SIZE - 5), radius=22, fill=(28, 44, 72, 255))
        for y in range(18, SIZE - 18, 14):  # faint slice lines
            d.line((14, y, SIZE - 15, y), fill=(60, 84, 120, 255), width=1)
    d.polygon(blob(64, 66, 30), fill=(231, 76, 60, 235))
    box = (24, 26, 104, 104) if kind != "effect" else (14, 16, 114, 114)
    d.rectangle(box, outline=(255, 214, 0, 255), width=5)
    for x, y in ((box[0], box[1]), (box[2], box[3])):  # corner handles
        d.rectangle((x - 7, y - 7, x + 7, y + 7), fill=(255, 214, 0, 255))
    return img


def main():
    for kind, path in TARGETS.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        draw(kind).save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main()
