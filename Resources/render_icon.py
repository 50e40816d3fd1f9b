"""Draw the extension and module icon: a cube cut into 2x2x2 blocks, whose nearest block is
cut again, and again -- the three mask-in-mask levels of MiM.  Hidden blocks are drawn as
dark glass, visible ones in the level's colour.

    python Resources/render_icon.py            # writes Resources/MiMSlicer.png and
                                               # MiMSlicer/Resources/Icons/MiMSlicer.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 128
SUPERSAMPLE = 8

# level colours (top face); side faces are darker shades of it
LEVEL_COLOURS = [(64, 132, 214), (244, 154, 44), (222, 60, 60)]
HIDDEN = (40, 46, 60)


def shade(rgb, f):
    return tuple(max(0, min(255, int(c * f))) for c in rgb)


def project(p, scale, origin):
    """Isometric projection of (x, y, z) seen from the (+1, +1, +1) direction."""
    x, y, z = p
    u = (x - y) * math.cos(math.radians(30))
    v = (x + y) * math.sin(math.radians(30)) - z
    return origin[0] + u * scale, origin[1] + v * scale


def blocks(lo, size, level, hidden_pattern):
    """Yield (lo corner, size, colour, alpha) for the 2x2x2 split of one cube; the block
    nearest the viewer is split again down to the last level."""
    half = size / 2
    for i in range(2):
        for j in range(2):
            for k in range(2):
                corner = (lo[0] + i * half, lo[1] + j * half, lo[2] + k * half)
                nearest = (i, j, k) == (1, 1, 1)
                if nearest and level + 1 < len(LEVEL_COLOURS):
                    yield from blocks(corner, half, level + 1, hidden_pattern)
                    continue
                hidden = (i + j + k + level) % 2 == hidden_pattern and not nearest
                yield corner, half, (HIDDEN if hidden else LEVEL_COLOURS[level]), hidden


def draw_cube(draw, lo, size, rgb, hidden, scale, origin, gap):
    x0, y0, z0 = (c + gap for c in lo)
    x1, y1, z1 = (c + size - gap for c in lo)
    faces = [  # (corners, brightness): top, left (y = y1), right (x = x1)
        ([(x0, y0, z1), (x1, y0, z1), (x1, y1, z1), (x0, y1, z1)], 1.15),
        ([(x0, y1, z0), (x1, y1, z0), (x1, y1, z1), (x0, y1, z1)], 0.80),
        ([(x1, y0, z0), (x1, y1, z0), (x1, y1, z1), (x1, y0, z1)], 0.60),
    ]
    outline = (235, 240, 250, 255) if hidden else (20, 24, 32, 255)
    for corners, f in faces:
        poly = [project(p, scale, origin) for p in corners]
        fill = shade(rgb, f) + ((150,) if hidden else (255,))
        draw.polygon(poly, fill=fill, outline=outline, width=max(1, SUPERSAMPLE // 2))


def render(size: int = SIZE) -> Image.Image:
    big = size * SUPERSAMPLE
    img = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img, "RGBA")
    # the unit cube projects to |u| <= cos 30 and -1 <= v <= 1: centre it with a small margin
    scale = big * 0.47
    origin = (big / 2, big / 2)
    cubes = list(blocks((0.0, 0.0, 0.0), 1.0, 0, hidden_pattern=1))
    # painter's order: far (small x + y + z) first; hidden (glass) before solid at equal depth
    cubes.sort(key=lambda c: (sum(c[0]) + 1.5 * c[1]))
    for lo, s, rgb, hidden in cubes:
        draw_cube(draw, lo, s, rgb, hidden, scale, origin, gap=0.018 * s / 0.5)
    return img.resize((size, size), Image.LANCZOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", nargs="*", type=Path,
                    default=[HERE / "MiMSlicer.png", HERE.parent / "MiMSlicer" / "Resources" / "Icons" / "MiMSlicer.png"])
    args = ap.parse_args()
    img = render()
    for out in args.output:
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, optimize=True)
        print(out)


if __name__ == "__main__":
    main()
