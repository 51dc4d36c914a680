"""Deterministic attribute checker for shapes images: reads background, shapes, colors, sizes and positions
back from pixels, and scores an image against a prompt.

    analyze(image)                     -> {"background": "blue", "objects": [{"shape", "color", "size", ...}]}
    score(image, "a red star on a blue background")  -> {"shape": True, "color": True, "background": True, ...}

Method (no learned parts):
1. background = the named color nearest to the median of the border pixels;
2. foreground = pixels farther than FOREGROUND_DISTANCE from that median color (RGB), split into 4-connected
   components, tiny ones dropped;
3. per component: color = named color nearest to the median of its core pixels (those farthest from the
   background); its outline = pixels closer to that color than to the background's; position = 3x3 grid cell of its bounding-box
   center; size = larger bounding-box side against SIZE_THRESHOLD; shape = the template (each shape drawn by
   data.py, cropped to its bounding box) closest to the component's mask cropped and resampled the same way,
   or "other" for a bounding box with an aspect ratio above MAX_ASPECT (no drawn shape has one).
"""
from itertools import permutations

import numpy as np
import torch
import torch.nn.functional as F

from .data import COLORS, IMAGE_SIZE, POSITIONS, SHAPES, parse_caption, shape_coverage

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
FOREGROUND_DISTANCE = 40.0  # half the smallest distance between two named colors (orange/yellow, ~82)
MIN_AREA = 40  # pixels; smaller blobs are noise (the smallest drawn star covers ~160)
SIZE_THRESHOLD = 34.0  # pixels of the larger bbox side: small shapes reach 28, large ones start near 38
TEMPLATE_RES = 24
MAX_ASPECT = 1.3  # bounding boxes of drawn shapes stay under ~1.1


def nearest_color(rgb) -> str:
    d = ((_PALETTE - np.asarray(rgb, dtype=np.float32)[None]) ** 2).sum(1)
    return _PALETTE_NAMES[int(d.argmin())]


def _resample(mask: np.ndarray) -> np.ndarray:
    """Crop-free resample of a [h, w] mask to TEMPLATE_RES^2 by area averaging (upsample small ones first)."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    h, w = mask.shape
    if min(h, w) < TEMPLATE_RES:
        rep = -(-TEMPLATE_RES // min(h, w))
        t = t.repeat_interleave(rep, 2).repeat_interleave(rep, 3)
    return F.adaptive_avg_pool2d(t, TEMPLATE_RES)[0, 0].numpy()


def _crop_to_bbox(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def _make_templates() -> dict:
    out = {}
    for s in SHAPES:
        cov = shape_coverage(s, 48.0, 48.0, 44.0, size=96, supersample=2) >= 0.5
        out[s] = _resample(_crop_to_bbox(cov))
    return out


_TEMPLATES = _make_templates()


def classify_shape(mask: np.ndarray) -> str:
    """Shape name whose template best matches the mask cropped to its bounding box (mean abs difference), or
    "other" when the bounding box is far from square: every shape is drawn with a square-ish box (aspect at
    most ~1.1 after rasterisation), so an oval is not a circle and a bar is not a square."""
    box = _crop_to_bbox(mask)
    h, w = box.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "other"
    m = _resample(box)
    errs = {s: float(np.abs(m - t).mean()) for s, t in _TEMPLATES.items()}
    return min(errs, key=errs.get)


def connected_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = background, 1..n), by iterated max-label propagation."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        grown = np.maximum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(h, w)  # 0 stays 0 since it is the smallest label when background exists


def _as_uint8_hwc(image) -> np.ndarray:
    """Accept a uint8 [H, W, 3] array, a float [H, W, 3] array in [0, 1] (the pipeline's output_type="np"),
    a PIL image, or a float tensor [3, H, W] / [H, W, 3] in [-1, 1]."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] == 3:
            t = t.permute(1, 2, 0)
        return (127.5 * (t.clamp(-1, 1) + 1)).to(torch.uint8).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or not (arr.dtype == np.uint8 or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"image must be [H, W, 3] uint8 or float in [0, 1], a PIL image or a tensor; "
                         f"got {arr.dtype} {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return arr


def analyze(image) -> dict:
    """Background color name and detected objects (largest first)."""
    img = _as_uint8_hwc(image)
    h, w, _ = img.shape
    f = img.astype(np.float32)
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    bg_rgb = np.median(border, 0)
    fg = np.sqrt(((f - bg_rgb) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    labels = connected_components(fg)
    objects = []
    for k in range(1, labels.max() + 1):
        comp = labels == k
        if comp.sum() < MIN_AREA:
            continue
        # Color from the core (the half of the pixels farthest from the background), so blurred edges that
        # mix the two colors do not pull the median; then the shape's outline is where a pixel is closer to
        # the object's color than to the background's (the 50% contour, whatever the blur).
        dist = np.sqrt(((f[comp] - bg_rgb) ** 2).sum(-1))
        obj_rgb = np.median(f[comp][dist >= np.median(dist)], 0)
        comp = comp & (((f - obj_rgb) ** 2).sum(-1) < ((f - bg_rgb) ** 2).sum(-1))
        if comp.sum() < MIN_AREA:
            continue
        ys, xs = np.nonzero(comp)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        cx, cy = (x0 + x1) / 2 * IMAGE_SIZE / w, (y0 + y1) / 2 * IMAGE_SIZE / h
        col, row = min(int(cx * 3 / IMAGE_SIZE), 2), min(int(cy * 3 / IMAGE_SIZE), 2)
        extent = max(x1 - x0, y1 - y0) * IMAGE_SIZE / max(h, w)
        objects.append({
            "shape": classify_shape(comp), "color": nearest_color(obj_rgb),
            "size": "large" if extent > SIZE_THRESHOLD else "small", "position": POSITIONS[row * 3 + col],
            "area": int(comp.sum()), "bbox": (int(x0), int(y0), int(x1), int(y1)),
        })
    objects.sort(key=lambda o: -o["area"])
    return {"background": nearest_color(bg_rgb), "objects": objects}


def _spec(prompt_or_attrs) -> dict:
    if isinstance(prompt_or_attrs, str):
        return parse_caption(prompt_or_attrs)
    if isinstance(prompt_or_attrs, dict) and "shapes" in prompt_or_attrs:
        keys = ("shape", "color", "size", "position")
        return {"background": prompt_or_attrs.get("background"),
                "shapes": [{k: s.get(k) for k in keys} for s in prompt_or_attrs["shapes"]]}
    raise ValueError("score() needs a caption string or an attributes dict with 'shapes' "
                     f"(as data.Sample.attrs / parse_caption give), got {type(prompt_or_attrs).__name__}")


def score(image, prompt_or_attrs) -> dict:
    """Does the image show what the prompt asks? Keys: shape, color, color_shape (both), count (exactly the
    requested number of objects found), and background / size / position only where the prompt names them.
    With two objects, the detected ones are paired with the requested ones in the order that agrees best."""
    spec, found = _spec(prompt_or_attrs), analyze(image)
    want = spec["shapes"]
    got = found["objects"][: len(want)] + [None] * max(0, len(want) - len(found["objects"]))
    keys = [k for k in ("shape", "color", "size", "position") if any(w[k] is not None for w in want)]

    def agree(w, g):
        return {k: g is not None and g[k] == w[k] for k in keys if w[k] is not None}

    best = max(permutations(got), key=lambda order: sum(sum(agree(w, g).values()) for w, g in zip(want, order)))
    out = {k: all(agree(w, g).get(k, True) for w, g in zip(want, best)) for k in keys}
    out["color_shape"] = out["color"] and out["shape"]
    out["count"] = len(found["objects"]) == len(want)
    if spec["background"] is not None:
        out["background"] = found["background"] == spec["background"]
    return out


def self_accuracy(n: int = 400, seed: int = 9001) -> dict:
    """Checker accuracy on freshly generated images (held-out seed) against their full ground-truth attributes:
    fraction correct per attribute, split into one-shape and two-shape images."""
    from .data import make_sample

    tallies: dict = {}
    for i in range(n):
        s = make_sample(seed, i, exclude=frozenset())
        r = score(s.image, s.attrs)
        group = "one" if len(s.shapes) == 1 else "two"
        for k, v in r.items():
            tallies.setdefault(f"{group}.{k}", []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(tallies.items())}
