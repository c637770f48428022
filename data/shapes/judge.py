"""
The judge: reads a shapes-world image and lists its objects (shape, colour, size, 3x3 cell, centre).
It shares no weights with SeTok or SETOKIM: it is a deterministic parser of the world's renders,
so what it says of a written image is what a person would say of it, GenEval-style.

    python data/shapes/judge.py data_dir=data/shapes/world split=test   # its accuracy on the true renders

How it reads an image (batched over images, no loop over pixels or objects):
  1. colour: every pixel takes the nearest of the world's 8 object colours, and counts as an object
     pixel when it lies within `tau` of it (the world keeps every background pixel >= 110 away from
     every object colour, so tau = 75 separates them on true renders and leaves room for blur);
  2. objects: 8-connected components of the pixels of one colour (label propagation: each pixel
     takes the largest label among its same-colour neighbours until nothing changes); components
     smaller than `min_area` pixels are specks, not objects;
  3. shape and size: the component is compared with the 12 templates (6 shapes x 2 sizes, the world's
     own masks: prepare.shape_mask) centred on the component's box, each shifted by up to one pixel;
     the template with the largest IoU names both;
  4. cell and centre: the box centre, with the world's own rule (prepare.cell) for the 3x3 cell.

score_t2i and score_edit compare what the judge reads with what the prompt asked for.
"""
import os
import sys
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from common import configure  # noqa: E402
from data.shapes.prepare import COLORS, POSITIONS, SHAPES, SIZES, cell, shape_mask  # noqa: E402
from data.world import load_png, read_jsonl, resolve_world  # noqa: E402

TAU = 75.0         # RGB distance (0..255 units) under which a pixel has an object colour
EDIT_OPS = ('recolor', 'remove', 'move')
MIN_AREA = 24      # pixels; the smallest object (a small star at 64 px) has about 70
WIN = 32           # the template window (pixels): holds the largest shape at 64 px with room to shift
_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32)          # (8, 3)
_TEMPLATES = {}


def templates(image_size):
    """(12, WIN, WIN) bool: every (size, shape) mask placed so that its box centre (rounded down) sits
    on pixel WIN // 2; the names in the same order."""
    if image_size not in _TEMPLATES:
        names, out = [], torch.zeros(len(SIZES) * len(SHAPES), WIN, WIN, dtype=torch.bool)
        for i, (size, shape) in enumerate((z, s) for z in SIZES for s in SHAPES):
            m = torch.from_numpy(shape_mask(shape, size, image_size).copy())
            h, w = m.shape
            y0, x0 = WIN // 2 - (h - 1) // 2, WIN // 2 - (w - 1) // 2
            out[i, y0:y0 + h, x0:x0 + w] = m
            names.append((size, shape))
        _TEMPLATES[image_size] = (out, names)
    return _TEMPLATES[image_size]


def components(colour, obj):
    """colour (B,H,W) long, obj (B,H,W) bool -> labels (B,H,W) long: one id per 8-connected component
    of same-colour object pixels (0 = not an object pixel)."""
    B, H, W = obj.shape
    lab = torch.where(obj, torch.arange(1, B * H * W + 1).view(B, H, W), 0)
    own = colour[:, None] == torch.arange(len(COLORS))[None, :, None, None]     # (B, 8, H, W) one channel per colour
    while True:
        # a neighbour's label counts only if it has the same colour: pool each colour's channel alone
        per = torch.where(own, lab[:, None], 0)
        grown = F.max_pool2d(per.double(), 3, stride=1, padding=1).long().gather(1, colour[:, None])[:, 0]
        new = torch.where(obj, torch.maximum(lab, grown), 0)
        if torch.equal(new, lab):
            return lab
        lab = new


def judge(images):
    """images: (B, H, W, 3) uint8 or (B, 3, H, W) float in [0, 1] -> for each image, the list of its
    objects as dicts {shape, color, size, position, center [cx, cy], bbox [x0, y0, x1, y1], score}
    (score: the template's IoU), in reading order (3x3 row, then centre x)."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float()
    else:
        x = x.float().clamp(0, 1) * 255
    B, _, S, _ = x.shape
    d = (x[:, None] - _PALETTE[None, :, :, None, None]).norm(dim=2)              # (B, 8, H, W)
    dist, colour = d.min(1)                                                      # (B, H, W)
    lab = components(colour, dist < TAU)
    ids, inv, area = torch.unique(lab.view(-1), return_inverse=True, return_counts=True)
    keep = (ids > 0) & (area >= MIN_AREA)
    if not keep.any():
        return [[] for _ in range(B)]
    # per component: its image, colour, box (scatter min / max over its pixels)
    n = len(ids)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing='ij')
    yy, xx = yy.expand(B, S, S).reshape(-1), xx.expand(B, S, S).reshape(-1)
    big = torch.full((n,), S, dtype=torch.long)
    x0 = big.scatter_reduce(0, inv, xx, 'amin')
    y0 = big.scatter_reduce(0, inv, yy, 'amin')
    x1 = torch.zeros(n, dtype=torch.long).scatter_reduce(0, inv, xx, 'amax')
    y1 = torch.zeros(n, dtype=torch.long).scatter_reduce(0, inv, yy, 'amax')
    img = torch.zeros(n, dtype=torch.long).scatter_reduce(0, inv, torch.arange(B).repeat_interleave(S * S), 'amax')
    col = torch.zeros(n, dtype=torch.long).scatter_reduce(0, inv, colour.view(-1), 'amax')
    sel = keep.nonzero()[:, 0]
    ids, x0, y0, x1, y1, img, col = (t[sel] for t in (ids, x0, y0, x1, y1, img, col))
    # each component's own pixels in a WIN x WIN window whose pixel WIN // 2 is its box centre (rounded down)
    cx0, cy0 = (x0 + x1) // 2, (y0 + y1) // 2                                    # (n,)
    off = torch.arange(WIN) - WIN // 2
    wy = (cy0[:, None] + off).clamp(-1, S)                                       # (n, WIN); -1 / S: outside
    wx = (cx0[:, None] + off).clamp(-1, S)
    padded = F.pad(lab, (1, 1, 1, 1))                                            # (B, S+2, S+2)
    win = padded[img[:, None, None], wy[:, :, None] + 1, wx[:, None, :] + 1] == ids[:, None, None]   # (n, WIN, WIN)
    # IoU with every template, each shifted by -1..1 pixels; the best names shape and size
    tpl, names = templates(S)
    shifted = torch.stack([tpl.roll((dy, dx), (1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], 1)  # (12, 9, W, W)
    w, t = win[:, None, None].float(), shifted[None].float()                     # (n,1,1,W,W), (1,12,9,W,W)
    inter = (w * t).sum((-1, -2))
    iou = inter / (w.sum((-1, -2)) + t.sum((-1, -2)) - inter)                    # (n, 12, 9)
    score, best = iou.amax(2).max(1)                                             # (n,)
    out = [[] for _ in range(B)]
    cname = list(COLORS)
    for k in range(len(ids)):                                                    # listing the found objects
        cx, cy = (x0[k] + x1[k]).item() / 2, (y0[k] + y1[k]).item() / 2
        size, shape = names[best[k]]
        out[img[k]].append({'shape': shape, 'color': cname[col[k]], 'size': size, 'position': cell(cx, cy, S),
                            'center': [cx, cy], 'bbox': [x0[k].item(), y0[k].item(), x1[k].item(), y1[k].item()],
                            'score': round(score[k].item(), 3)})
    return [sorted(o, key=lambda o: (POSITIONS.index(o['position']) // 3, o['center'][0], o['center'][1])) for o in out]


def key(o):
    """What a caption names of an object: (size, colour, shape, 3x3 cell)."""
    return (o['size'], o['color'], o['shape'], o['position'])


def edit_target(objects, edit, image_size):
    """The objects of an edit's target image: the source's with the edit applied; the edited object's
    index in the result (None when removed)."""
    objs = [dict(o) for o in objects]
    i = edit['object'] - 1
    if edit['op'] == 'recolor':
        objs[i]['color'] = edit['color']
    elif edit['op'] == 'remove':
        del objs[i]
        return objs, None
    else:
        dx, dy = edit['offset']
        cx, cy = objs[i]['center'][0] + dx, objs[i]['center'][1] + dy
        objs[i].update(center=[cx, cy], position=cell(cx, cy, image_size))
    return objs, i


def score_t2i(pred, true):
    """One image: the judge's objects `pred` against the caption's objects `true` -> counts that add
    up over images: exact (every object right and no other), matched (multiset intersection of the
    (size, colour, shape, cell) keys), n_pred, n_true, count_ok (as many objects as asked), bound
    (colour-and-shape pairs matched, ignoring size and cell) and placed (objects matched on colour,
    shape and cell, ignoring size)."""
    inter = lambda f: sum((Counter(map(f, pred)) & Counter(map(f, true))).values())
    m = inter(key)
    return {'n': 1, 'exact': int(m == len(true) == len(pred)), 'matched': m, 'n_pred': len(pred), 'n_true': len(true),
            'count_ok': int(len(pred) == len(true)), 'bound': inter(lambda o: (o['color'], o['shape'])),
            'placed': inter(lambda o: (o['color'], o['shape'], o['position']))}


def score_edit(pred, source, edit, image_size):
    """One edit: the judge's objects `pred` of the written image, the source's objects and the edit ->
    success: the edited object is as asked (recoloured; gone; or nearer its new centre than half the
    move, with its size, colour and shape); preserved: every other object is still there, unchanged,
    and nothing else was added (the edited object, old or new, is success's business); and success
    counted apart for the edit's op (recolor_n, recolor_success, ...)."""
    target, i = edit_target(source, edit, image_size)
    have = Counter(map(key, pred))
    others = Counter(key(o) for j, o in enumerate(target) if j != i)
    if edit['op'] == 'remove':
        removed = key(source[edit['object'] - 1])
        ok = have[removed] <= others[removed]                                    # no copy of it beyond the others
    elif edit['op'] == 'move':                                                   # it sits nearer its new place than
        (tx, ty), (dx, dy) = target[i]['center'], edit['offset']                 # half the way back to the old one
        ok = any(all(o[a] == target[i][a] for a in ('size', 'color', 'shape')) and
                 4 * ((o['center'][0] - tx) ** 2 + (o['center'][1] - ty) ** 2) < dx * dx + dy * dy for o in pred)
    else:
        ok = have[key(target[i])] > others[key(target[i])]
    edited = Counter([key(source[edit['object'] - 1])] + ([key(target[i])] if i is not None else []))
    op = edit['op']
    return {'n': 1, 'success': int(ok), 'preserved': int(not others - have and not have - others - edited),
            f'{op}_n': 1, f'{op}_success': int(ok)}


def rates(c):
    """Summed score_t2i or score_edit counts -> the rates eval reports: t2i: exact (share of prompts
    exactly right), recall and precision of objects, count (share with as many objects as asked),
    binding (colour on the right shape) and position (colour, shape and cell); edit: success, preserved,
    and success per op (recolor, remove, move)."""
    n = max(1, c['n'])
    if 'success' in c:
        return {'success': c['success'] / n, 'preserved': c['preserved'] / n,
                **{op: c[f'{op}_success'] / c[f'{op}_n'] for op in EDIT_OPS if c.get(f'{op}_n')}}
    return {'exact': c['exact'] / n, 'recall': c['matched'] / max(1, c['n_true']), 'precision': c['matched'] / max(1, c['n_pred']),
            'count': c['count_ok'] / n, 'binding': c['bound'] / max(1, c['n_true']), 'position': c['placed'] / max(1, c['n_true'])}


def accuracy(pred, true):
    """Objects exactly right (size, colour, shape, cell, and centre within half a pixel) over the true
    objects; images with every object right and nothing else."""
    right = images = 0
    for p, t in zip(pred, true):
        hits = sum(any(key(a) == key(b) and abs(a['center'][0] - b['center'][0]) <= 0.5 and
                       abs(a['center'][1] - b['center'][1]) <= 0.5 for a in p) for b in t)
        right += hits
        images += hits == len(t) == len(p)
    return right / max(1, sum(map(len, true))), images / max(1, len(true))


if __name__ == '__main__':
    data_dir = 'data/shapes/world'
    split = 'test'
    batch = 256
    configure(globals())
    world = resolve_world(data_dir)
    records = read_jsonl(os.path.join(world, f'{split}.jsonl'), 'manifest')
    pred = []
    for i in range(0, len(records), batch):
        imgs = np.stack([load_png(world, r['image'], 'RGB') for r in records[i:i + batch]])
        pred += judge(torch.from_numpy(imgs))
    objs, imgs = accuracy(pred, [r['objects'] for r in records])
    print(f"judge accuracy on the true {split} renders: {objs:.4f} of {sum(len(r['objects']) for r in records)} objects "
          f"exactly right (shape, colour, size, cell, centre); {imgs:.4f} of {len(records)} images with every object "
          f"right and nothing else")
