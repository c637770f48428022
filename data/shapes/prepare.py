"""
The shapes world: a procedurally generated image + text dataset, byte-identical for a given seed.

    python data/shapes/prepare.py                      # the default world in data/shapes/world
    python data/shapes/prepare.py n_train=2000 data_dir=data/shapes/small
    python data/shapes/prepare.py --help               # the settings

From Python:  prepare(**settings) -> data_dir,  ensure_world(data_dir, **settings) -> data_dir,
              parse_caption(text) -> [(size, colour, shape), ...]   (for caption object F1)

The default world (21k images) takes about a minute on 2 cores and ~160 MB (~330 MB on disk in 4 KB
blocks). Each image draws from its own random generator seeded with (seed, split, index), so the
splits are independent (changing n_train leaves val and test alone), the worker count does not
matter, and two runs with the same settings write byte-identical files.

A sample is a small RGB picture with 1..6 flat-coloured shapes (circle, square, triangle, diamond,
star, hexagon; 8 colours; 2 sizes) on a plain, gradient or lightly textured background. Every pixel
belongs to exactly one object or to the background (no anti-aliasing), so the instance map is exact,
and every piece of text (captions, questions, answers, referring expressions, edit instructions) is
computed from the same scene description, so it is exactly right.

The on-disk format (real-data converters write the same thing)
---------------------------------------------------------------
Everything lives under data_dir; every path stored in a file is relative to data_dir.

  meta.json                 {"format": "nanosetok-world", "format_version": 1,
                             "settings": {seed, image_size, n_train, n_val, n_test, min_objects,
                                          max_objects, vocab_size},
                             "splits": {"train": {"images": N, "instruct": M}, ...},
                             "tasks": {task: count over all splits},
                             "vocab": {"model": "tokenizer.model", "vocab": "tokenizer.vocab",
                                       "size": actual number of pieces, "requested": vocab_size,
                                       "unk": 0, "bos": 1, "eos": 2, "pad": 3,
                                       "special": {"[Img]": 4, "[/Img]": 5, "[SEG]": 6,
                                                   "[USER]": 7, "[ASSISTANT]": 8}},
                             "world": {"shapes": [...], "colors": {name: [r, g, b]},
                                       "sizes": {"small": px, "large": px},
                                       "positions": [...], "gap": 2, "move": px, "margin": px}}
                            meta.json is written last: a world without it is unfinished.
  tokenizer.model           sentencepiece BPE model trained on all the world's text (sorted, so the
                            input order is fixed; one thread): unk 0, bos 1, eos 2, pad 3, then the
                            user-defined [Img] [/Img] [SEG] [USER] [ASSISTANT] = 4..8; digits are
                            split, one piece each; vocab_size is capped by what the text supports
  tokenizer.vocab           its pieces, "piece<TAB>score" per line, id = line number
  {split}.jsonl             one line per image, split in {train, val, test}:
                              {"id": "train_000000",
                               "image": "images/train/train_000000.png",
                               "instances": "instances/train/train_000000.png",
                               "width": 64, "height": 64,
                               "caption": "a large red circle at the top left and a small ...",
                               "concepts": ["large red circle", ...],          # one per object
                               "objects": [{"shape": "circle", "color": "red", "size": "large",
                                            "bbox": [x0, y0, x1, y1],         # inclusive pixels
                                            "center": [cx, cy],               # bbox centre
                                            "position": "top left",           # 3x3 grid cell
                                            "concept": "large red circle"}, ...],
                               "background": {"kind": "plain", "color": [r, g, b]}
                                           | {"kind": "gradient", "color0": rgb, "color1": rgb,
                                              "angle": degrees}
                                           | {"kind": "texture", "pattern": "stripes"|"plaid",
                                              "color": rgb, "amplitude": <= 0.06, "period": px,
                                              "angle": degrees, "phase": [p0, p1]}}
                            (render_background(params, image_size) re-renders it exactly)
                            The objects are in caption order (3x3 grid row top to bottom, then
                            centre x left to right); object i (1-based) is value i in the instance map.
  {split}_instruct.jsonl    LLaVA-style single-turn conversations, in image order, ids
                            "{image id}_{task}{k}" (e.g. "train_000000_vqa2"):
                              {"id", "task", "image_id", "image": path or null,
                               "conversations": [{"from": "human", "value": ...},
                                                 {"from": "gpt", "value": ...}], ...task fields}
                            "<image>" inside a human value stands for the input image ("image");
                            "<image>" as the whole gpt value is an image the model must write
                            ("target_image"). Tasks and their extra fields:
                              caption  "<image>\\nDescribe the image." -> the caption
                              vqa      "kind": count|attribute|existence|relation, "answer"
                                       ("<image>\\nHow many red objects are there?" -> "2";
                                        "What colour is the square?" -> "red";
                                        "Is there a red triangle?" -> "no";
                                        "Is the red circle left of the blue square?" -> "yes")
                              refer    "<image>\\nSegment the X." -> "[SEG]";
                                       "instances": path, "mask_id": 1-based id, "expression"
                                       ("the small green triangle", "the leftmost circle", ...)
                              t2i      "Generate an image: <caption>" -> "<image>"; "image": null,
                                       "target_image": the image's own path
                              edit     "<image>\\n<instruction>" -> "<image>"; "target_image",
                                       "target_caption", "edit": {"op": "recolor"|"remove"|"move",
                                       "object": i, "color" | "direction" and "offset": [dx, dy]}
                                       ("Make the red circle blue." / "Remove the square." /
                                        "Move the star to the right.")
  images/{split}/{id}.png   RGB
  instances/{split}/{id}.png  8-bit greyscale: 0 = background, i = the i-th object
  edits/{split}/{id}.png    the target of the image's edit record

Geometry conventions: pixel (x, y) is column x, row y; bbox corners and centres are in pixel
indices; the 3x3 position of an object is the grid cell that holds its centre pixel.
"""
import functools
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections import Counter

import numpy as np
import sentencepiece as spm
from PIL import Image
from tqdm import tqdm

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from common import configure, die  # noqa: E402
from data.text import SPECIAL  # noqa: E402  the special tokens' spellings: [Img] [/Img] [SEG] [USER] [ASSISTANT]

# -----------------------------------------------------------------------------
# settings (override on the command line with key=value, or config=NAME)
seed = 1337
image_size = 64
n_train = 20000
n_val = 500
n_test = 500
min_objects = 1
max_objects = 6
vocab_size = 256    # requested sentencepiece size; capped by what the world's text supports
data_dir = 'data/shapes/world'   # relative paths are resolved against the repo root
workers = 2         # processes for generation; the world is the same for any value (not in meta.json)
# -----------------------------------------------------------------------------

SETTINGS = ('seed', 'image_size', 'n_train', 'n_val', 'n_test', 'min_objects', 'max_objects',
            'vocab_size', 'data_dir')
FORMAT_VERSION = 1
SPLITS = ('train', 'val', 'test')   # each split has its own seed stream: seed, split index, image index

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'hexagon')
# flat object colours, well apart from each other (min pairwise RGB distance is checked below)
COLORS = {
    'red': (225, 30, 30),
    'green': (30, 185, 50),
    'blue': (40, 80, 235),
    'yellow': (245, 230, 40),
    'purple': (150, 50, 210),
    'orange': (255, 135, 0),
    'cyan': (30, 215, 225),
    'pink': (255, 125, 195),
}
SIZES = {'small': 0.22, 'large': 0.36}   # object width as a fraction of image_size
POSITIONS = ('top left', 'top', 'top right', 'left', 'center', 'right',
             'bottom left', 'bottom', 'bottom right')   # 3x3 grid, row-major
WHERE = {'top left': 'at the top left', 'top': 'at the top', 'top right': 'at the top right',
         'left': 'on the left', 'center': 'in the center', 'right': 'on the right',
         'bottom left': 'at the bottom left', 'bottom': 'at the bottom',
         'bottom right': 'at the bottom right'}
_GAP = 2               # at least this many background pixels between any two objects
_BG_MIN_DIST = 110.0   # minimum RGB distance between any background pixel and any object colour
ATTRS = ('size', 'color', 'shape')
DIRECTIONS = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}
MOVE_TEXT = {'left': 'to the left', 'right': 'to the right', 'up': 'up', 'down': 'down'}
SUPERLATIVES = {'leftmost': (0, -1), 'rightmost': (0, 1), 'topmost': (1, -1), 'bottommost': (1, 1)}
RELATIONS = {'left of': (0, -1), 'right of': (0, 1), 'above': (1, -1), 'below': (1, 1)}

_COLOR_ARR = np.array(list(COLORS.values()), dtype=np.float64)
assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(_COLOR_ARR, 2)) > 80


def move_step(size):
    return max(1, round(size / 4))      # how far a "move" edit shifts an object


def margin(size):
    return max(2, round(size / 8))      # min centre difference for relations / superlatives


# -----------------------------------------------------------------------------
# shapes: boolean masks, tightly cropped, one per (shape, size, image_size), cached

def _polygon_mask(verts, n):
    """Even-odd point-in-polygon test at the pixel centres of an n x n patch."""
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    inside = np.zeros((n, n), dtype=bool)
    vx, vy = np.array([v[0] for v in verts]), np.array([v[1] for v in verts])
    for i in range(len(verts)):
        x1, y1, x2, y2 = vx[i - 1], vy[i - 1], vx[i], vy[i]
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        xcross = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < xcross)
    return inside


_MASKS = {}


def shape_mask(shape, size, image_size):
    """The mask of a shape, cropped to its bounding box (so its bbox is the whole patch)."""
    key = (shape, size, image_size)
    if key in _MASKS:
        return _MASKS[key]
    d = max(5, round(SIZES[size] * image_size))   # nominal width in pixels
    n = d + 2 + 2 * (math.ceil(0.05 * d) + 1)    # patch with room for the points of star/diamond
    c, r = n / 2, d / 2                          # patch centre and nominal radius
    if shape == 'circle':
        ys, xs = np.mgrid[0:n, 0:n] + 0.5
        m = (xs - c) ** 2 + (ys - c) ** 2 <= r * r
    elif shape == 'square':
        h = r * 0.86                             # a bit smaller than the circle: similar area
        m = _polygon_mask([(c - h, c - h), (c + h, c - h), (c + h, c + h), (c - h, c + h)], n)
    elif shape == 'triangle':                    # equilateral, pointing up, full width
        h = d * math.sqrt(3) / 2
        top, bot = c - h / 2, c + h / 2
        m = _polygon_mask([(c, top), (c + r, bot), (c - r, bot)], n)
    elif shape == 'diamond':                     # a square on its corner, slightly tall
        m = _polygon_mask([(c, c - r * 1.05), (c + r * 0.85, c), (c, c + r * 1.05), (c - r * 0.85, c)], n)
    elif shape == 'star':                        # five points, fat enough to survive small sizes
        R, ri = r * 1.05, r * 0.47
        verts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = R if k % 2 == 0 else ri
            verts.append((c + rad * math.cos(a), c + 0.06 * r + rad * math.sin(a)))
        m = _polygon_mask(verts, n)
    elif shape == 'hexagon':                     # pointy left/right, flat top/bottom: not a circle
        verts = [(c + r * math.cos(k * math.pi / 3), c + r * 0.92 * math.sin(k * math.pi / 3))
                 for k in range(6)]
        m = _polygon_mask(verts, n)
    else:
        raise ValueError(shape)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    m = m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy()
    m.setflags(write=False)
    _MASKS[key] = m
    return m


def dilate(mask, r):
    """Chebyshev dilation by r pixels (a (2r+1)^2 square), same shape as mask."""
    h, w = mask.shape
    p = np.pad(mask, r)
    rows = np.zeros((h + 2 * r, w), dtype=bool)
    for k in range(2 * r + 1):
        rows |= p[:, k:k + w]
    out = np.zeros((h, w), dtype=bool)
    for k in range(2 * r + 1):
        out |= rows[k:k + h]
    return out


_HALOS = {}


def halo(shape, size, image_size):
    """The shape's mask dilated by _GAP, a patch _GAP pixels bigger on every side (cached)."""
    key = (shape, size, image_size)
    if key not in _HALOS:
        h = dilate(np.pad(shape_mask(shape, size, image_size), _GAP), _GAP)
        h.setflags(write=False)
        _HALOS[key] = h
    return _HALOS[key]


# Placement works on a "forbid" map padded by _GAP on every side: pixel (x, y) of the image is
# forbid[y + _GAP, x + _GAP]; each placed object ORs its halo into it.

def new_forbid(image_size):
    return np.zeros((image_size + 2 * _GAP, image_size + 2 * _GAP), dtype=bool)


def add_to_forbid(forbid, o, image_size):
    hm = halo(o['shape'], o['size'], image_size)
    x0, y0 = o['xy']
    forbid[y0:y0 + hm.shape[0], x0:x0 + hm.shape[1]] |= hm


def forbidden(objs, image_size):
    """Where a new object may not go: every object of objs dilated by the gap."""
    f = new_forbid(image_size)
    for o in objs:
        add_to_forbid(f, o, image_size)
    return f


def fits(pm, x0, y0, forbid):
    """Does mask pm at top-left (x0, y0) lie inside the image and off the forbidden pixels?"""
    h, w = pm.shape
    S = forbid.shape[0] - 2 * _GAP
    if x0 < 0 or y0 < 0 or x0 + w > S or y0 + h > S:
        return False
    return not (forbid[y0 + _GAP:y0 + _GAP + h, x0 + _GAP:x0 + _GAP + w] & pm).any()


# -----------------------------------------------------------------------------
# backgrounds: a few numbers each, so they can be re-rendered exactly from the manifest

def _min_dist_to_objects(c0, c1=None):
    """Smallest RGB distance from the colour c0 (or the segment c0..c1) to any object colour."""
    c0 = np.asarray(c0, dtype=np.float64)
    if c1 is None:
        return float(np.linalg.norm(_COLOR_ARR - c0, axis=1).min())
    d = np.asarray(c1, dtype=np.float64) - c0
    t = np.clip(((_COLOR_ARR - c0) @ d) / max(1e-9, d @ d), 0, 1)
    return float(np.linalg.norm(_COLOR_ARR - (c0 + t[:, None] * d), axis=1).min())


def _muted_color(rng, slack=0.0):
    """A dark or greyish colour (low saturation) far enough from every object colour."""
    for _ in range(100):
        v = rng.uniform(0.08, 0.55)       # brightness
        s = rng.uniform(0.0, 0.4)         # saturation
        hue = rng.uniform(0, 6)
        k = np.array([5.0, 3.0, 1.0])     # HSV -> RGB, the branch-free formula
        kk = (k + hue) % 6
        rgb = v - v * s * np.clip(np.minimum(kk, 4 - kk), 0, 1)
        col = [int(round(255 * x)) for x in rgb]
        if _min_dist_to_objects(col) >= _BG_MIN_DIST + slack:
            return col
    return [60, 60, 60]


def sample_background(rng, image_size):
    kind = ('plain', 'gradient', 'texture')[rng.integers(3)]
    if kind == 'plain':
        return {'kind': 'plain', 'color': _muted_color(rng)}
    if kind == 'gradient':
        for _ in range(100):
            c0, c1 = _muted_color(rng), _muted_color(rng)
            if _min_dist_to_objects(c0, c1) >= _BG_MIN_DIST:
                break
        else:
            c1 = c0
        return {'kind': 'gradient', 'color0': c0, 'color1': c1, 'angle': int(rng.integers(360))}
    amp = round(float(rng.uniform(0.03, 0.06)), 3)
    return {'kind': 'texture', 'pattern': ('stripes', 'plaid')[rng.integers(2)],
            'color': _muted_color(rng, slack=amp * 255 * math.sqrt(3)),
            'amplitude': amp,
            'period': round(float(rng.uniform(image_size / 8, image_size / 3)), 2),
            'angle': int(rng.integers(180)),
            'phase': [round(float(rng.uniform(0, 2 * math.pi)), 3) for _ in range(2)]}


def render_background(bg, image_size):
    """(S, S, 3) uint8 from the background parameters stored in the manifest."""
    S = image_size
    ys, xs = np.mgrid[0:S, 0:S] + 0.5 - S / 2     # pixel centres around the image centre
    if bg['kind'] == 'plain':
        rgb = np.broadcast_to(np.array(bg['color'], dtype=np.float64), (S, S, 3))
    elif bg['kind'] == 'gradient':
        a = math.radians(bg['angle'])
        ca, sa = math.cos(a), math.sin(a)
        t = 0.5 + (xs * ca + ys * sa) / (S * (abs(ca) + abs(sa)))   # 0..1 corner to corner
        c0, c1 = np.array(bg['color0'], float), np.array(bg['color1'], float)
        rgb = c0 + t[..., None] * (c1 - c0)
    elif bg['kind'] == 'texture':
        a = math.radians(bg['angle'])
        u = xs * math.cos(a) + ys * math.sin(a)
        v = -xs * math.sin(a) + ys * math.cos(a)
        w = 2 * math.pi / bg['period']
        p0, p1 = bg['phase']
        wave = np.sin(w * u + p0)
        if bg['pattern'] == 'plaid':
            wave = 0.5 * (wave + np.sin(w * v + p1))
        rgb = np.array(bg['color'], float) + 255 * bg['amplitude'] * wave[..., None]
    else:
        raise ValueError(f"unknown background kind {bg['kind']!r}")
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def render(background, objs, image_size):
    """The RGB image and the instance map (object i of objs -> value i+1). `background` is the
    parameter dict or an already rendered (S, S, 3) array."""
    if isinstance(background, dict):
        background = render_background(background, image_size)
    img = background.copy()
    inst = np.zeros((image_size, image_size), dtype=np.uint8)
    for i, o in enumerate(objs):
        pm = shape_mask(o['shape'], o['size'], image_size)
        x0, y0 = o['xy']
        h, w = pm.shape
        img[y0:y0 + h, x0:x0 + w][pm] = COLORS[o['color']]
        inst[y0:y0 + h, x0:x0 + w][pm] = i + 1
    return img, inst


# -----------------------------------------------------------------------------
# scenes

def geometry(o, image_size):
    """bbox (inclusive), centre (bbox centre) and 3x3 position of a placed object."""
    bbox, center, pos = _geometry(o['shape'], o['size'], o['xy'], image_size)
    return list(bbox), list(center), pos


@functools.lru_cache(maxsize=65536)
def _geometry(shape, size, xy, image_size):
    h, w = shape_mask(shape, size, image_size).shape
    x0, y0 = xy
    bbox = (x0, y0, x0 + w - 1, y0 + h - 1)
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return bbox, (cx, cy), cell(cx, cy, image_size)


def cell(cx, cy, image_size):
    """The 3x3 position (POSITIONS) of the pixel that holds the centre (cx, cy)."""
    col, row = min(2, int((cx + 0.5) * 3 / image_size)), min(2, int((cy + 0.5) * 3 / image_size))
    return POSITIONS[3 * row + col]


def caption_order(objs, image_size):
    """Rows of the 3x3 grid top to bottom, then left to right by centre x."""
    def key(o):
        _, (cx, cy), pos = geometry(o, image_size)
        return (POSITIONS.index(pos) // 3, cx, cy)
    return sorted(objs, key=key)


def sample_scene(rng, image_size, min_objects, max_objects):
    """A list of placed objects {shape, color, size, xy=(x0, y0)}; never fails (see below)."""
    n = int(rng.integers(min_objects, max_objects + 1))
    while True:
        for _attempt in range(20):
            objs, forbid, ok = [], new_forbid(image_size), True
            for _ in range(n):
                o = {'shape': SHAPES[rng.integers(len(SHAPES))],
                     'color': list(COLORS)[rng.integers(len(COLORS))],
                     'size': list(SIZES)[rng.integers(len(SIZES))]}
                placed = False
                for tries in range(80):
                    if tries == 40:               # crowded: try the small version instead
                        o['size'] = 'small'
                    pm = shape_mask(o['shape'], o['size'], image_size)
                    x0 = int(rng.integers(0, image_size - pm.shape[1] + 1))
                    y0 = int(rng.integers(0, image_size - pm.shape[0] + 1))
                    if fits(pm, x0, y0, forbid):
                        o['xy'] = (x0, y0)
                        add_to_forbid(forbid, o, image_size)
                        objs.append(o)
                        placed = True
                        break
                if not placed:
                    ok = False
                    break
            if ok:
                return caption_order(objs, image_size)
        n -= 1   # this many objects would not fit after 20 fresh scenes: one fewer (>= 1 always fits)
        if n < 1:
            raise RuntimeError(f"image_size={image_size} is too small for even one object")


# -----------------------------------------------------------------------------
# language

def concept(o):
    return f"{o['size']} {o['color']} {o['shape']}"


def make_caption(objs, image_size):
    parts = [f"a {concept(o)} {WHERE[geometry(o, image_size)[2]]}" for o in objs]
    if len(parts) == 1:
        return parts[0]
    return ', '.join(parts[:-1]) + ' and ' + parts[-1]


def mean_background(records, image_size):
    """(S, S, 3) float in [0, 1]: the mean of the backgrounds of `records` (re-rendered from their
    parameters, objects left out)."""
    return np.mean([render_background(r['background'], image_size) for r in records], 0) / 255


def caption_guess(objects, background, image_size, n=16, seed=0):
    """Text-to-image's caption-only baseline, the image analogue of VQA's text-only prior: the best
    guess of an image from what its caption says. A caption names every object's size, colour, shape
    and 3x3 cell, but not where in its cell the object sits nor the background, so the guess is the
    mean of n renders that put each object's centre uniformly at random in its cell, on `background`
    ((S, S, 3) float: mean_background of the train split). Under squared error this hedge beats any
    one sharp render. -> (S, S, 3) float in [0, 1]."""
    S, rng = image_size, np.random.default_rng(seed)
    out = np.zeros((S, S, 3))
    for _ in range(n):
        placed = []
        for o in objects:
            h, w = shape_mask(o['shape'], o['size'], S).shape
            row, col = divmod(POSITIONS.index(o['position']), 3)
            cx, cy = (col + rng.random()) * S / 3, (row + rng.random()) * S / 3     # a centre in its cell
            placed.append({**o, 'xy': tuple(int(np.clip(round(c - (e - 1) / 2), 0, S - e)) for c, e in ((cx, w), (cy, h)))})
        out += render(255 * np.asarray(background, dtype=np.float64), placed, S)[0] / (255 * n)
    return out


_CAPTION_RE = re.compile(r'\b(small|large)\s+(' + '|'.join(COLORS) + r')\s+(' + '|'.join(SHAPES) + r')s?\b')


def parse_caption(text):
    """The (size, colour, shape) of every '<size> <colour> <shape>' in text, in order."""
    return [tuple(m) for m in _CAPTION_RE.findall(text.lower())]


def phrase(values):
    """{'size': 'small', 'color': 'red'} -> 'small red object'; with a shape: 'small red star'."""
    words = [values[a] for a in ('size', 'color') if a in values]
    return ' '.join(words + [values.get('shape', 'object')])


def with_article(p):
    return ('an ' if p[0] in 'aeiou' else 'a ') + p


def matches(o, values):
    return all(o[a] == v for a, v in values.items())


_SUBSETS = [c for k in (1, 2, 3) for c in itertools.combinations(ATTRS, k)]


def unique_phrases(objs):
    """For each object, every attribute subset (as a dict) of it that no other object shares."""
    keys = [[tuple(o[a] for a in sub) for sub in _SUBSETS] for o in objs]
    counts = Counter((k, key) for ks in keys for k, key in enumerate(ks))
    return [[dict(zip(sub, key)) for k, (sub, key) in enumerate(zip(_SUBSETS, ks)) if counts[(k, key)] == 1]
            for ks in keys]


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def human(text):
    return {'from': 'human', 'value': text}


def gpt(text):
    return {'from': 'gpt', 'value': text}


def vqa_count(rng, objs):
    r = rng.integers(3)
    if r == 0:
        return 'How many objects are there?', str(len(objs))
    if r == 1:   # half the time a shape that is there, else any shape (0 is a fine answer)
        s = pick(rng, [o['shape'] for o in objs]) if rng.random() < 0.5 else pick(rng, SHAPES)
        return f'How many {s}s are there?', str(sum(o['shape'] == s for o in objs))
    c = pick(rng, [o['color'] for o in objs]) if rng.random() < 0.5 else pick(rng, list(COLORS))
    return f'How many {c} objects are there?', str(sum(o['color'] == c for o in objs))


def vqa_attribute(rng, objs, uniq):
    options = []
    for i in range(len(objs)):
        for asked in ATTRS:
            for vals in uniq[i]:
                if asked not in vals:
                    options.append((i, asked, vals))
    if not options:
        return None
    i, asked, vals = pick(rng, options)
    word = {'color': 'colour', 'shape': 'shape', 'size': 'size'}[asked]
    return f'What {word} is the {phrase(vals)}?', objs[i][asked]


def vqa_existence(rng, objs):
    if rng.random() < 0.5:   # yes: a phrase that fits a random object
        o = pick(rng, objs)
        sub = pick(rng, _SUBSETS)
        return f'Is there {with_article(phrase({a: o[a] for a in sub}))}?', 'yes'
    for _ in range(50):      # no: a phrase that fits nothing
        sub = pick(rng, _SUBSETS)
        vals = {a: pick(rng, {'size': list(SIZES), 'color': list(COLORS), 'shape': SHAPES}[a]) for a in sub}
        if not any(matches(o, vals) for o in objs):
            return f'Is there {with_article(phrase(vals))}?', 'no'
    return None


def vqa_relation(rng, objs, uniq, image_size):
    m = margin(image_size)
    cen = [geometry(o, image_size)[1] for o in objs]
    names = uniq
    cands = {'yes': [], 'no': []}
    for i, j in itertools.permutations(range(len(objs)), 2):
        if not names[i] or not names[j]:
            continue
        for rel, (axis, sign) in RELATIONS.items():
            d = cen[i][axis] - cen[j][axis]
            if abs(d) >= m:
                cands['yes' if d * sign > 0 else 'no'].append((i, j, rel))
    want = 'yes' if rng.random() < 0.5 else 'no'
    if not cands[want]:
        want = 'no' if want == 'yes' else 'yes'
    if not cands[want]:
        return None
    i, j, rel = pick(rng, cands[want])
    return f'Is the {phrase(pick(rng, names[i]))} {rel} the {phrase(pick(rng, names[j]))}?', want


def refer_expressions(objs, uniq, image_size):
    """All (expression, object index) that pick out exactly one object."""
    out = []
    for i in range(len(objs)):                      # attribute combinations
        out += [(f'the {phrase(v)}', i) for v in uniq[i]]
    m = margin(image_size)
    cen = [geometry(o, image_size)[1] for o in objs]
    for sub in [()] + _SUBSETS:                     # spatial superlatives within a category
        cats = {}
        for k, o in enumerate(objs):
            cats.setdefault(tuple((a, o[a]) for a in sub), []).append(k)
        for cat, idx in sorted(cats.items()):
            vals = dict(cat)
            if len(idx) < 2:
                continue
            for word, (axis, sign) in SUPERLATIVES.items():
                order = sorted(idx, key=lambda k: sign * cen[k][axis], reverse=True)
                if sign * (cen[order[0]][axis] - cen[order[1]][axis]) >= m:
                    out.append((f'the {word} {phrase(vals)}', order[0]))
    return out


def edit_options(objs, image_size, allowed=None):
    """Every feasible edit: (op, object index, new colour or direction); objects in `allowed` only."""
    out = []
    step = move_step(image_size)
    for i, o in enumerate(objs):
        if allowed is not None and i not in allowed:
            continue
        out += [('recolor', i, c) for c in COLORS if c != o['color']]
        if len(objs) > 1:
            out.append(('remove', i, None))
        others = forbidden(objs[:i] + objs[i + 1:], image_size)
        pm = shape_mask(o['shape'], o['size'], image_size)
        for dname, (dx, dy) in DIRECTIONS.items():
            if fits(pm, o['xy'][0] + dx * step, o['xy'][1] + dy * step, others):
                out.append(('move', i, dname))
    return out


def apply_edit(objs, op, i, arg, image_size):
    new = [dict(o) for o in objs]
    if op == 'recolor':
        new[i]['color'] = arg
    elif op == 'remove':
        del new[i]
    else:
        dx, dy = DIRECTIONS[arg]
        step = move_step(image_size)
        new[i]['xy'] = (new[i]['xy'][0] + dx * step, new[i]['xy'][1] + dy * step)
    return new


# -----------------------------------------------------------------------------
# one image and its records (everything random comes from this image's own generator)

def make_sample(split, index, cfg):
    S = cfg['image_size']
    rng = np.random.default_rng([cfg['seed'], SPLITS.index(split), index])
    bg = sample_background(rng, S)
    objs = sample_scene(rng, S, cfg['min_objects'], cfg['max_objects'])
    bg_img = render_background(bg, S)
    img, inst = render(bg_img, objs, S)
    uniq = unique_phrases(objs)
    iid = f'{split}_{index:06d}'
    paths = {'image': f'images/{split}/{iid}.png', 'instances': f'instances/{split}/{iid}.png',
             'edit': f'edits/{split}/{iid}.png'}
    caption = make_caption(objs, S)
    objects = []
    for o in objs:
        bbox, center, pos = geometry(o, S)
        objects.append({'shape': o['shape'], 'color': o['color'], 'size': o['size'], 'bbox': bbox,
                        'center': center, 'position': pos, 'concept': concept(o)})
    record = {'id': iid, 'image': paths['image'], 'instances': paths['instances'], 'width': S,
              'height': S, 'caption': caption, 'concepts': [concept(o) for o in objs],
              'objects': objects, 'background': bg}

    base = lambda task, k: {'id': f'{iid}_{task}{k}', 'task': task, 'image_id': iid, 'image': paths['image']}
    conv = []
    conv.append({**base('caption', 0), 'conversations': [human('<image>\nDescribe the image.'), gpt(caption)]})
    # vqa: one of each kind when possible, topped up to 4 with count / existence questions
    qas, seen = [], set()
    makers = {'count': lambda: vqa_count(rng, objs), 'attribute': lambda: vqa_attribute(rng, objs, uniq),
              'existence': lambda: vqa_existence(rng, objs),
              'relation': lambda: vqa_relation(rng, objs, uniq, S)}
    for kind in ('count', 'attribute', 'existence', 'relation'):
        qa = makers[kind]()
        if qa is not None and qa[0] not in seen:
            qas.append((kind, *qa))
            seen.add(qa[0])
    for _ in range(10):
        if len(qas) >= 4:
            break
        kind = ('count', 'existence')[rng.integers(2)]
        qa = makers[kind]()
        if qa is not None and qa[0] not in seen:
            qas.append((kind, *qa))
            seen.add(qa[0])
    for k, (kind, q, a) in enumerate(qas):
        conv.append({**base('vqa', k), 'conversations': [human(f'<image>\n{q}'), gpt(a)],
                     'kind': kind, 'answer': a})
    # refer: 1 or 2 expressions, for different objects
    exprs = refer_expressions(objs, uniq, S)
    n_ref = 1 + int(rng.integers(2)) if len(objs) > 1 else 1
    used = set()
    for k in range(n_ref):
        pool = [e for e in exprs if e[1] not in used]
        if not pool:
            break
        expr, i = pick(rng, pool)
        used.add(i)
        conv.append({**base('refer', k), 'conversations': [human(f'<image>\nSegment {expr}.'), gpt('[SEG]')],
                     'instances': paths['instances'], 'mask_id': i + 1, 'expression': expr})
    # text to image
    conv.append({**base('t2i', 0), 'image': None,
                 'conversations': [human(f'Generate an image: {caption}'), gpt('<image>')],
                 'target_image': paths['image']})
    # edit: pick an op first (so remove/move are not swamped by the many recolour options), then
    # an object that can be named unambiguously (any referring expression, spatial ones included)
    names = {}
    for expr, i in exprs:
        names.setdefault(i, []).append(expr)
    opts = edit_options(objs, S, allowed=names)
    if opts:
        ops = sorted({o[0] for o in opts}, key=['recolor', 'remove', 'move'].index)
        op = pick(rng, ops)
        _, i, arg = pick(rng, [o for o in opts if o[0] == op])
        ref = pick(rng, names[i])
        edited = apply_edit(objs, op, i, arg, S)
        arrays_edit, _ = render(bg_img, edited, S)
        edit = {'op': op, 'object': i + 1}
        if op == 'recolor':
            text = f'Make {ref} {arg}.'
            edit['color'] = arg
        elif op == 'remove':
            text = f'Remove {ref}.'
        else:
            text = f'Move {ref} {MOVE_TEXT[arg]}.'
            step = move_step(S)
            edit['direction'] = arg
            edit['offset'] = [DIRECTIONS[arg][0] * step, DIRECTIONS[arg][1] * step]
        conv.append({**base('edit', 0), 'conversations': [human(f'<image>\n{text}'), gpt('<image>')],
                     'target_image': paths['edit'],
                     'target_caption': make_caption(caption_order(edited, S), S), 'edit': edit})
    else:   # nothing can be named or changed (never happens at sane sizes): the source stands in
        arrays_edit = img
    return record, conv, {'image': img, 'instances': inst, 'edit': arrays_edit}, paths


def world_text(record, conv):
    """The sentences of one image that the tokenizer trains on (placeholders taken out)."""
    out = [record['caption']] + record['concepts']
    for c in conv:
        for turn in c['conversations']:
            v = turn['value'].replace('<image>', ' ').strip()
            if v:
                out.append(v)
        if 'target_caption' in c:
            out.append(c['target_caption'])
    return out


# -----------------------------------------------------------------------------
# tokenizer

def train_tokenizer(sentences, data_dir, requested):
    """Deterministic sentencepiece model on `sentences` (sorted here, so input order is fixed)."""
    sentences = sorted(sentences)
    size = requested
    for _ in range(5):
        buf = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=buf, model_type='bpe',
                vocab_size=size, hard_vocab_limit=False, character_coverage=1.0,
                num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=list(SPECIAL),
                split_digits=True, required_chars='0123456789', byte_fallback=False,
                minloglevel=2)
            break
        except RuntimeError as e:   # "Vocabulary size is too high (N). Please set it to a value <= M."
            m = re.search(r'<= (\d+)', str(e))
            if not m:
                raise
            size = int(m.group(1))
    else:
        die(f"could not train the tokenizer with vocab_size={requested}")
    model = buf.getvalue()
    with open(os.path.join(data_dir, 'tokenizer.model'), 'wb') as f:
        f.write(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    with open(os.path.join(data_dir, 'tokenizer.vocab'), 'w', encoding='utf-8') as f:
        for k in range(sp.get_piece_size()):
            f.write(f'{sp.id_to_piece(k)}\t{sp.get_score(k):g}\n')
    return sp


def vocab_meta(sp, requested):
    """The "vocab" entry of meta.json for a tokenizer written by train_tokenizer."""
    return {'model': 'tokenizer.model', 'vocab': 'tokenizer.vocab', 'size': sp.get_piece_size(),
            'requested': requested, 'unk': sp.unk_id(), 'bos': sp.bos_id(), 'eos': sp.eos_id(), 'pad': sp.pad_id(),
            'special': {s: sp.piece_to_id(s) for s in SPECIAL}}


# -----------------------------------------------------------------------------
# the whole world

def resolve(path):
    return path if os.path.isabs(path) else os.path.join(_REPO, path)


def _settings(overrides):
    g = globals()
    cfg = {k: g[k] for k in SETTINGS}
    for k, v in overrides.items():
        if k not in cfg:
            die(f"unknown setting '{k}' for data/shapes/prepare.py; valid settings: {', '.join(SETTINGS)}")
        cfg[k] = v
    for k in SETTINGS:
        if k == 'data_dir':
            if not isinstance(cfg[k], str) or not cfg[k]:
                die(f"data_dir={cfg[k]!r}: expected a folder path")
        elif type(cfg[k]) is not int:
            die(f"{k}={cfg[k]!r}: expected an int")
    if cfg['image_size'] < 16:
        die(f"image_size={cfg['image_size']} is too small; use 16 or more")
    if not 1 <= cfg['min_objects'] <= cfg['max_objects'] <= 255:
        die(f"need 1 <= min_objects <= max_objects <= 255, got {cfg['min_objects']}..{cfg['max_objects']}")
    if min(cfg['n_train'], cfg['n_val'], cfg['n_test']) < 0 or cfg['n_train'] + cfg['n_val'] + cfg['n_test'] < 1:
        die("n_train, n_val and n_test must be >= 0 and not all 0")
    if cfg['vocab_size'] < 32:
        die(f"vocab_size={cfg['vocab_size']} is too small; use 32 or more")
    return cfg


def meta_settings(cfg):
    return {k: cfg[k] for k in SETTINGS if k != 'data_dir'}


def _save_png(arr, path):
    Image.fromarray(arr).save(path, format='PNG', optimize=False, compress_level=1)


_CHUNK = 64   # images per work unit when workers > 1


def _write_sample(split, cfg, out, index):
    """Make one sample, write its three PNGs, return its manifest and instruct lines and its text."""
    record, conv, arrays, paths = make_sample(split, index, cfg)
    for key in ('image', 'instances', 'edit'):
        _save_png(arrays[key], os.path.join(out, paths[key]))
    return (json.dumps(record) + '\n', ''.join(json.dumps(c) + '\n' for c in conv),
            [c['task'] for c in conv], world_text(record, conv))


def _remove_stale(out, split, n):
    """Remove images of an earlier, bigger world in the same folder (only files named like ours)."""
    pat = re.compile(rf'{split}_(\d+)\.png')
    for sub in ('images', 'instances', 'edits'):
        folder = os.path.join(out, sub, split)
        for f in os.listdir(folder):
            m = pat.fullmatch(f)
            if m and int(m.group(1)) >= n:
                os.remove(os.path.join(folder, f))


def prepare(workers=None, **settings):
    """Generate the world described by `settings` (defaults: this module's values); returns data_dir.
    workers: processes to use (default: the module's `workers`); it does not change the output."""
    workers = globals()['workers'] if workers is None else workers
    if type(workers) is not int or workers < 1:
        die(f"workers={workers!r}: expected an int >= 1")
    cfg = _settings(settings)
    out = resolve(cfg['data_dir'])
    S = cfg['image_size']
    meta_path = os.path.join(out, 'meta.json')
    if os.path.exists(meta_path):
        os.remove(meta_path)            # unfinished until meta.json is written again
    for sub in ('images', 'instances', 'edits'):
        for split in SPLITS:
            os.makedirs(os.path.join(out, sub, split), exist_ok=True)
    counts = {'train': cfg['n_train'], 'val': cfg['n_val'], 'test': cfg['n_test']}
    text, tasks, splits = [], Counter(), {}
    # Every image draws from its own generator (seed, split, index), so the world does not depend
    # on how the work is shared: workers > 1 hands fixed chunks to a process pool, and imap gives
    # the results back in order.
    t0, pool = time.time(), None
    if workers > 1 and sum(counts.values()) > 2 * _CHUNK and 'fork' in multiprocessing.get_all_start_methods():
        pool = multiprocessing.get_context('fork').Pool(workers)
    try:
        for split in SPLITS:
            n_conv = 0
            job = functools.partial(_write_sample, split, cfg, out)
            results = pool.imap(job, range(counts[split]), chunksize=_CHUNK) if pool and counts[split] > _CHUNK \
                else map(job, range(counts[split]))
            with open(os.path.join(out, f'{split}.jsonl'), 'w', encoding='utf-8') as fm, \
                    open(os.path.join(out, f'{split}_instruct.jsonl'), 'w', encoding='utf-8') as fi:
                for line, conv_lines, conv_tasks, sentences in tqdm(
                        results, total=counts[split], desc=f'shapes {split}', unit='img',
                        dynamic_ncols=True, mininterval=0.5):
                    fm.write(line)
                    fi.write(conv_lines)
                    tasks.update(conv_tasks)
                    n_conv += len(conv_tasks)
                    text += sentences
            splits[split] = {'images': counts[split], 'instruct': n_conv}
            _remove_stale(out, split, counts[split])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    print(f"training the tokenizer on {len(text)} sentences ...")
    sp = train_tokenizer(text, out, cfg['vocab_size'])
    meta = {
        'format': 'nanosetok-world', 'format_version': FORMAT_VERSION,
        'settings': meta_settings(cfg),
        'splits': splits,
        'tasks': dict(sorted(tasks.items())),
        'vocab': vocab_meta(sp, cfg['vocab_size']),
        'world': {'shapes': list(SHAPES), 'colors': {k: list(v) for k, v in COLORS.items()},
                  'sizes': {s: int(shape_mask('circle', s, S).shape[1]) for s in SIZES},
                  'positions': list(POSITIONS), 'gap': _GAP, 'move': move_step(S), 'margin': margin(S)},
    }
    tmp = meta_path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=2)
        f.write('\n')
    os.replace(tmp, meta_path)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote the shapes world to {out} ({total / 1e6:.1f} MB) in {time.time() - t0:.0f} s:")
    for split in SPLITS:
        print(f"  {split}: {splits[split]['images']} images in images/{split}, instances/{split}, "
              f"edits/{split}; {split}.jsonl; {splits[split]['instruct']} conversations in {split}_instruct.jsonl")
    print(f"  tasks: {', '.join(f'{k} {v}' for k, v in meta['tasks'].items())}")
    print(f"  tokenizer.model / tokenizer.vocab: {sp.get_piece_size()} pieces; meta.json")
    return out


def ensure_world(data_dir, workers=None, **settings):
    """Prepare the world in data_dir unless it is already there (meta.json); returns data_dir
    (absolute). A world written with other settings is an error, never silently reused or rebuilt."""
    cfg = _settings({**settings, 'data_dir': data_dir})
    out = resolve(cfg['data_dir'])
    meta_path = os.path.join(out, 'meta.json')
    if not os.path.exists(meta_path):
        return prepare(workers=workers, **cfg)
    try:
        with open(meta_path, encoding='utf-8') as f:
            have = json.load(f).get('settings', {})
    except (OSError, ValueError):
        die(f"{meta_path} is unreadable; delete {out} and run again")
    want = meta_settings(cfg)
    if have != want:
        diff = ', '.join(f"{k}={have.get(k)!r} (wanted {v!r})" for k, v in want.items() if have.get(k) != v)
        die(f"the world in {out} was made with other settings: {diff}; delete that folder or pick another data_dir")
    return out


if __name__ == '__main__':
    cfg = configure(globals(), script='data/shapes/prepare.py')
    prepare(**cfg)
