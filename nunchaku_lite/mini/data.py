"""Synthetic shapes data for the mini model: 128x128 RGB images of one or two shapes on a plain background,
with a caption built from the same attributes and the attributes kept alongside.

    sample = make_sample(seed=0, index=5)      # Sample(image uint8 [128, 128, 3], caption, attrs)
    images, captions, attrs = make_dataset(1000, seed=0)

Everything is deterministic: sample `index` of `seed` depends on nothing else, so a dataset can be built in
parallel chunks and rebuilt bit for bit. Shapes are drawn with 2x2 supersampling (antialiased edges).

Vocabulary: COLORS x SHAPES x SIZES x POSITIONS (a 3x3 grid). A few (color, shape, background) triples are
held out of training (`HELD_OUT`) so the benchmark in `eval.py` can ask for combinations never seen.
"""
import re
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 128

# Named colors, far apart in RGB so a nearest-color rule reads them back unambiguously.
COLORS = {
    "red": (220, 38, 38),
    "green": (34, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 135, 20),
    "purple": (135, 55, 185),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": (11.0, 14.0), "large": (21.0, 24.0)}  # half of the bounding box's larger side, pixels
# Row-major 3x3 grid; the phrase in captions is "at the {position}".
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
GRID = (27.0, 64.0, 101.0)  # cell centers in pixels (edges of the thirds are at 42.7 and 85.3)
JITTER = 3.0  # max offset of a shape's center from its cell center, pixels

SINGLE_TEMPLATES = (  # (template, weight)
    ("a {color} {shape} on a {bg} background", 0.30),
    ("a {size} {color} {shape} on a {bg} background", 0.15),
    ("a {color} {shape} at the {pos} on a {bg} background", 0.25),
    ("a {size} {color} {shape} at the {pos} on a {bg} background", 0.25),
    ("a {color} {shape}", 0.05),
)
DOUBLE_TEMPLATES = (
    ("a {color} {shape} and a {color2} {shape2} on a {bg} background", 0.35),
    ("a {color} {shape} at the {pos} and a {color2} {shape2} at the {pos2} on a {bg} background", 0.40),
    ("a {size} {color} {shape} at the {pos} and a {size2} {color2} {shape2} at the {pos2} on a {bg} background", 0.25),
)
TWO_SHAPE_FRACTION = 0.3


def _held_out_triples(fraction: float = 0.1, seed: int = 1234) -> frozenset:
    """A fixed ~10% of (color, shape, background) triples, never drawn for training images."""
    triples = [(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(triples), size=int(round(fraction * len(triples))), replace=False)
    return frozenset(triples[i] for i in sorted(pick))


HELD_OUT = _held_out_triples()


@dataclass
class Shape:
    shape: str
    color: str
    size: str
    position: str
    center: tuple[float, float]  # (x, y) of the bounding-box center, pixels
    radius: float  # half of the bounding box's larger side, pixels


@dataclass
class Sample:
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    background: str
    shapes: list[Shape] = field(default_factory=list)

    @property
    def attrs(self) -> dict:
        return {"background": self.background, "caption": self.caption,
                "shapes": [dict(vars(s)) for s in self.shapes]}


# ---------------------------------------------------------------------------------------------- drawing
def _polygon(shape: str) -> np.ndarray | None:
    """Unit polygon (x right, y down) whose bounding box is centered on 0 with larger half-side 1."""
    if shape == "square":
        v = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.9
    elif shape == "triangle":
        v = np.array([[0, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif shape == "star":
        k = np.arange(10)
        rad = np.where(k % 2 == 0, 1.0, 0.45)
        ang = -np.pi / 2 + k * np.pi / 5
        v = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    elif shape == "cross":
        a = 0.34  # half width of an arm
        v = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                      [-1, a], [-1, -a], [-a, -a]], dtype=np.float64)
    elif shape == "circle":
        return None
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    lo, hi = v.min(0), v.max(0)
    v = v - (lo + hi) / 2  # bounding-box center at the origin, so positions mean the same for every shape
    return v / (hi - lo).max() * 2


_UNIT_POLYGONS = {s: _polygon(s) for s in SHAPES}


def _inside_polygon(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x0, y0 = verts[i]
        x1, y1 = verts[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (y0 > y) != (y1 > y)
        x_at = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at)
    return inside


def shape_coverage(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE, supersample: int = 2):
    """Fraction of each pixel covered by the shape, float32 [size, size] in [0, 1]."""
    s = supersample
    coords = (np.arange(size * s, dtype=np.float64) + 0.5) / s  # subpixel centers in pixel units
    x, y = coords[None, :], coords[:, None]
    poly = _UNIT_POLYGONS[shape] if shape in _UNIT_POLYGONS else _polygon(shape)
    if poly is None:
        hit = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    else:
        hit = _inside_polygon(np.broadcast_to(x, (size * s, size * s)), np.broadcast_to(y, (size * s, size * s)),
                              poly * r + (cx, cy))
    return hit.reshape(size, s, size, s).mean((1, 3)).astype(np.float32)


def render(background: str, shapes: list[Shape], size: int = IMAGE_SIZE) -> np.ndarray:
    """Paint the shapes, in order, over a plain background. uint8 [size, size, 3]."""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = COLORS[background]
    for sh in shapes:
        a = shape_coverage(sh.shape, sh.center[0], sh.center[1], sh.radius, size)[..., None]
        img = img * (1 - a) + np.asarray(COLORS[sh.color], dtype=np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- captions
def _phrase_fields(shapes: list[Shape], background: str) -> dict:
    f = {"bg": background}
    for i, sh in enumerate(shapes):
        sfx = "" if i == 0 else str(i + 1)
        f.update({"color" + sfx: sh.color, "shape" + sfx: sh.shape, "size" + sfx: sh.size, "pos" + sfx: sh.position})
    return f


def caption_for(shapes: list[Shape], background: str, template: str) -> str:
    text = template.format(**_phrase_fields(shapes, background))
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange circle"


_OBJECT_RE = re.compile(
    r"an? (?:(?P<size>small|large) )?(?P<color>\w+) (?P<shape>\w+)(?: at the (?P<pos>[a-z ]+?))?(?= and an? | on an? |$)")
_BACKGROUND_RE = re.compile(r" on an? (\w+) background$")


def parse_caption(caption: str) -> dict:
    """Attributes a caption asks for: {"background": str|None, "shapes": [{"shape", "color", "size"|None,
    "position"|None}]}. Raises ValueError for text outside the caption grammar of this module."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    m = _BACKGROUND_RE.search(text)
    background = m.group(1) if m else None
    body = text[: m.start()] if m else text
    shapes = []
    for part in re.split(r" and (?=an? )", body):
        om = _OBJECT_RE.fullmatch(part)
        if om is None:
            raise ValueError(f"caption {caption!r}: cannot read {part!r} as 'a [size] <color> <shape> [at the <pos>]'")
        shapes.append({"shape": om["shape"], "color": om["color"], "size": om["size"], "position": om["pos"]})
    for s in shapes:
        bad = [(k, s[k]) for k, vocab in (("shape", SHAPES), ("color", COLORS), ("position", POSITIONS))
               if s[k] is not None and s[k] not in vocab]
        if bad:
            raise ValueError(f"caption {caption!r}: unknown {bad[0][0]} {bad[0][1]!r}")
    if background is not None and background not in COLORS:
        raise ValueError(f"caption {caption!r}: unknown background color {background!r}")
    return {"background": background, "shapes": shapes}


# -------------------------------------------------------------------------------------------- sampling
def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def _pick_weighted(rng, items):
    weights = np.array([w for _, w in items])
    return items[rng.choice(len(items), p=weights / weights.sum())][0]


def _place(rng, shape, color, size, position) -> Shape:
    row, col = divmod(POSITIONS.index(position), 3)
    lo, hi = SIZES[size]
    cx, cy = GRID[col] + rng.uniform(-JITTER, JITTER), GRID[row] + rng.uniform(-JITTER, JITTER)
    return Shape(shape, color, size, position, (float(cx), float(cy)), float(rng.uniform(lo, hi)))


def random_shapes(rng, n_shapes: int, exclude: frozenset = HELD_OUT) -> tuple[str, list[Shape]]:
    """Draw a background and n_shapes non-overlapping shapes; no (color, shape, background) in `exclude`."""
    names = list(COLORS)
    while True:
        background = names[rng.integers(len(names))]
        shapes = []
        for _ in range(n_shapes):
            for _attempt in range(100):
                color = names[rng.integers(len(names))]
                shape = SHAPES[rng.integers(len(SHAPES))]
                if color == background or (color, shape, background) in exclude:
                    continue
                if any(s.color == color for s in shapes):  # two objects of one color would be ambiguous
                    continue
                sh = _place(rng, shape, color, list(SIZES)[rng.integers(len(SIZES))],
                            POSITIONS[rng.integers(len(POSITIONS))])
                # Keep shapes apart (circumscribed circles plus a margin) so each stays one connected blob.
                if all(sh.position != s.position and np.hypot(sh.center[0] - s.center[0], sh.center[1] - s.center[1])
                       > 1.15 * (sh.radius + s.radius) + 4 for s in shapes):
                    shapes.append(sh)
                    break
            else:
                break
        if len(shapes) == n_shapes:
            return background, shapes


def random_caption(rng, background: str, shapes: list[Shape]) -> str:
    """A caption for the scene in one of the templates for its number of shapes (weighted)."""
    return caption_for(shapes, background, _pick_weighted(rng, DOUBLE_TEMPLATES if len(shapes) == 2 else SINGLE_TEMPLATES))


def make_sample(seed: int, index: int, exclude: frozenset = HELD_OUT) -> Sample:
    """Sample `index` of the stream `seed` (deterministic)."""
    rng = _rng(seed, index)
    n = 2 if rng.random() < TWO_SHAPE_FRACTION else 1
    background, shapes = random_shapes(rng, n, exclude)
    return Sample(render(background, shapes), random_caption(rng, background, shapes), background, shapes)


def extra_captions(seed: int, index: int, sample: Sample, k: int) -> list[str]:
    """k more captions of the same image, in independently drawn templates (deterministic)."""
    rng = np.random.default_rng([int(seed), int(index), 1])
    return [random_caption(rng, sample.background, sample.shapes) for _ in range(k)]


def sample_from_spec(spec: dict, seed: int, index: int = 0) -> Sample:
    """An image satisfying a parsed caption (`parse_caption`); unspecified attributes drawn at random."""
    rng = _rng(seed, index)
    names = [c for c in COLORS if c not in {s["color"] for s in spec["shapes"]}]
    background = spec["background"] or names[rng.integers(len(names))]
    shapes: list[Shape] = []
    while len(shapes) < len(spec["shapes"]):
        shapes = []
        for s in spec["shapes"]:
            size = s["size"] or list(SIZES)[rng.integers(len(SIZES))]
            pos = s["position"] or POSITIONS[rng.integers(len(POSITIONS))]
            sh = _place(rng, s["shape"], s["color"], size, pos)
            if any(sh.position == o.position or np.hypot(sh.center[0] - o.center[0], sh.center[1] - o.center[1])
                   <= 1.15 * (sh.radius + o.radius) + 4 for o in shapes):
                break
            shapes.append(sh)
    return Sample(render(background, shapes), "", background, shapes)


def make_captions(n: int, seed: int = 0, start: int = 0, exclude: frozenset = HELD_OUT) -> list[str]:
    """The captions make_dataset would give, without drawing the images (same random stream)."""
    out = []
    for i in range(start, start + n):
        rng = _rng(seed, i)
        n_shapes = 2 if rng.random() < TWO_SHAPE_FRACTION else 1
        background, shapes = random_shapes(rng, n_shapes, exclude)
        out.append(random_caption(rng, background, shapes))
    return out


def make_dataset(n: int, seed: int = 0, start: int = 0, exclude: frozenset = HELD_OUT):
    """(images uint8 [n, H, W, 3], captions list[str], attrs list[dict]) for indices start..start+n-1."""
    samples = [make_sample(seed, start + i, exclude) for i in range(n)]
    return (np.stack([s.image for s in samples]), [s.caption for s in samples], [s.attrs for s in samples])


def all_captions_vocabulary() -> list[str]:
    """One caption per template and attribute value, covering every word the captions use (tokenizer training)."""
    out = []
    for c in COLORS:
        for s in SHAPES:
            for b in COLORS:
                for z in SIZES:
                    for p in POSITIONS:
                        sh = [Shape(s, c, z, p, (0, 0), 1)]
                        out.extend(caption_for(sh, b, t) for t, _ in SINGLE_TEMPLATES)
    return out
