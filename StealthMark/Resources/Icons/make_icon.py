"""Draw StealthMark.png (128 x 128): a brain slice with a QR-code fragment emerging from it.

Run from anywhere with Pillow installed: ``python make_icon.py``; it writes StealthMark.png beside itself.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SCALE = 4  # drawn at 4x and downsampled, for smooth edges
BRAIN = (214, 196, 190, 255)
BRAIN_DARK = (150, 126, 124, 255)
SKULL = (70, 84, 104, 255)
QR_DARK = (12, 96, 110, 255)
QR_LIGHT = (236, 248, 248, 255)

# a 7 x 7 finder pattern plus a few data modules: the corner of a QR symbol
QR_FRAGMENT = [
    "1111111 01",
    "1000001 10",
    "1011101 01",
    "1011101 11",
    "1011101 00",
    "1000001 10",
    "1111111 01",
    "          ",
    "0110101 10",
    "1011010 01",
]


def brain_outline(cx: float, cy: float, rx: float, ry: float, n: int = 720) -> list[tuple[float, float]]:
    """An axial brain silhouette: an ellipse with gyri-like ripples and a midline notch at the front."""
    pts = []
    for t in range(n):
        a = 2 * math.pi * t / n
        ripple = 1.0 + 0.035 * math.sin(14 * a) + 0.02 * math.sin(23 * a + 0.7)
        notch = 1.0 - 0.10 * math.exp(-((a - 1.5 * math.pi) ** 2) / 0.01)  # frontal midline
        r = ripple * notch
        pts.append((cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)))
    return pts


def draw(size: int = SIZE) -> Image.Image:
    s = size * SCALE
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    cx, cy = 0.44 * s, 0.47 * s
    rx, ry = 0.36 * s, 0.40 * s
    # skull ring, brain, then sulci as darker curves
    d.ellipse([cx - rx * 1.12, cy - ry * 1.1, cx + rx * 1.12, cy + ry * 1.1], fill=SKULL)
    d.polygon(brain_outline(cx, cy, rx, ry), fill=BRAIN)
    w = max(2, s // 90)
    d.line([(cx, cy - ry * 0.85), (cx, cy + ry * 0.9)], fill=BRAIN_DARK, width=w)  # interhemispheric fissure
    for side in (-1, 1):
        for k, (oy, amp) in enumerate([(-0.55, 0.5), (-0.2, 0.62), (0.15, 0.6), (0.5, 0.48)]):
            pts = []
            for t in range(40):
                u = t / 39
                x = cx + side * rx * (0.12 + amp * u)
                y = cy + ry * (oy + 0.07 * math.sin(6 * u + k))
                pts.append((x, y))
            d.line(pts, fill=BRAIN_DARK, width=w, joint="curve")
    # ventricles
    for side in (-1, 1):
        d.ellipse([cx + side * 0.05 * s - 0.035 * s, cy - 0.08 * s, cx + side * 0.05 * s + 0.035 * s, cy + 0.1 * s],
                  fill=BRAIN_DARK)
    # QR fragment on a light tile, lower right, overlapping the slice
    m = int(0.052 * s)
    rows, cols = len(QR_FRAGMENT), len(QR_FRAGMENT[0])
    x0 = s - cols * m - int(0.045 * s)
    y0 = s - rows * m - int(0.045 * s)
    pad = m // 2
    shadow = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    ImageDraw.Draw(shadow).rounded_rectangle(
        [x0 - pad + m // 3, y0 - pad + m // 3, x0 + cols * m + pad + m // 3, y0 + rows * m + pad + m // 3],
        radius=m, fill=(0, 0, 0, 110))
    img = Image.alpha_composite(img, shadow.filter(ImageFilter.GaussianBlur(m / 2)))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([x0 - pad, y0 - pad, x0 + cols * m + pad, y0 + rows * m + pad], radius=m, fill=QR_LIGHT)
    for r, row in enumerate(QR_FRAGMENT):
        for c, ch in enumerate(row):
            if ch == "1":
                d.rectangle([x0 + c * m, y0 + r * m, x0 + (c + 1) * m - 1, y0 + (r + 1) * m - 1], fill=QR_DARK)
    return img.resize((size, size), Image.LANCZOS)


def main() -> Path:
    out = Path(__file__).resolve().with_name("StealthMark.png")
    draw().save(out, optimize=True)
    return out


if __name__ == "__main__":
    print(main())
