"""Image grids with captions, drawn with PIL alone (used by examples/generate.py and the eval reports).

    grid = image_grid([[img16, img4], ...], column_titles=["16-bit", "W4A4"], row_titles=prompts)
    grid.save("grid.png")
"""
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(image) -> Image.Image:
    """PIL image from a PIL image, uint8 HWC array, or float tensor [3, H, W] / [H, W, 3] in [-1, 1]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] == 3:
            t = t.permute(1, 2, 0)
        image = (127.5 * (t.clamp(-1, 1) + 1)).to(torch.uint8).numpy()
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def image_grid(rows, column_titles=None, row_titles=None, pad: int = 4, title_width: int = 220) -> Image.Image:
    """rows: list of lists of images (all the same size). Optional titles above columns and left of rows
    (wrapped to the title column's width)."""
    rows = [[to_pil(im) for im in row] for row in rows]
    if not rows or not rows[0]:
        raise ValueError("image_grid: no images")
    w, h = rows[0][0].size
    n_cols = max(len(r) for r in rows)
    font = ImageFont.load_default()
    left = title_width if row_titles else 0
    top = 18 if column_titles else 0
    W = left + n_cols * (w + pad) + pad
    H = top + len(rows) * (h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(column_titles or []):
        draw.text((left + pad + j * (w + pad), 3), str(title), fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_titles:
            lines = textwrap.wrap(str(row_titles[i]), width=max(8, title_width // 7))
            draw.multiline_text((pad, y + 2), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
        for j, im in enumerate(row):
            canvas.paste(im, (left + pad + j * (w + pad), y))
    return canvas
