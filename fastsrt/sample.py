"""A generated sample image for the demo: a small scene with thin structures, diagonal edges
and curves, the details that a ViT's patch grid blurs and SRT recovers."""
from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw

from fastsrt.io import to_rgb_tensor


def sample_image(size: int = 448) -> torch.Tensor:
    """A deterministic (3, size, size) float32 RGB scene in [0, 1]."""
    s = size / 448
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for y in range(size):  # sky gradient
        t = y / size
        draw.line([(0, y), (size, y)], fill=(int(110 + 100 * t), int(160 + 60 * t), 235))
    draw.ellipse([330 * s, 40 * s, 400 * s, 110 * s], fill=(255, 214, 80))  # sun
    hills = [(0, 300), (150, 210), (300, 290), (448, 230), (448, 448), (0, 448)]
    draw.polygon([(x * s, y * s) for x, y in hills], fill=(70, 140, 70))
    draw.rectangle([60 * s, 250 * s, 190 * s, 360 * s], fill=(200, 90, 60))  # house
    draw.polygon([(50 * s, 250 * s), (125 * s, 185 * s), (200 * s, 250 * s)], fill=(120, 50, 40))
    draw.rectangle([110 * s, 300 * s, 140 * s, 360 * s], fill=(80, 50, 30))
    draw.rectangle([75 * s, 270 * s, 100 * s, 292 * s], fill=(170, 210, 240))
    draw.rectangle([262 * s, 250 * s, 276 * s, 370 * s], fill=(100, 70, 40))  # tree
    draw.ellipse([222 * s, 170 * s, 316 * s, 270 * s], fill=(40, 110, 50))
    for i in range(7):  # a fence of thin posts
        x = (300 + 20 * i) * s
        draw.rectangle([x, 330 * s, x + 3 * s, 390 * s], fill=(240, 240, 230))
    draw.line([(300 * s, 345 * s), (430 * s, 345 * s)], fill=(240, 240, 230), width=max(1, round(3 * s)))
    for i in range(24):  # a winding path
        t = i / 23
        x, y = (20 + 400 * t) * s, (420 - 30 * math.sin(6 * t)) * s
        draw.ellipse([x - 7 * s, y - 5 * s, x + 7 * s, y + 5 * s], fill=(190, 170, 130))
    return to_rgb_tensor(image)
