"""
RefCOCO / RefCOCO+ / RefCOCOg (as the refer toolkit downloads them) -> a world in the format of
data/shapes/prepare.py, whose referring data trains with the same code as the shapes world's; what
real-data worlds add or leave out is listed in data/world.py.

    python data/refcoco/prepare.py src=refer/data/refcoco coco_images=coco/train2014 data_dir=data/refcoco/world
    python data/refcoco/prepare.py src=refer/data/refcocog split_by=umd coco_images=coco/train2014 \\
        data_dir=data/refcocog/world

src is a dataset folder of github.com/lichengunc/refer (refcoco, refcoco+ or refcocog) holding
  refs(unc).p      a pickle, a list of refs: {"ref_id", "ann_id", "image_id", "split", "category_id",
                   "sentences": [{"sent": "man in red", "raw": "Man in red.", ...}], ...}; RefCOCO
                   and RefCOCO+ have refs(unc).p (RefCOCO also refs(google).p), RefCOCOg refs(umd).p
                   and refs(google).p: split_by picks one when there are several
  instances.json   the COCO annotations of those images: "images" (id, file_name, width, height),
                   "annotations" (id, image_id, category_id, segmentation), "categories" (id, name)
and coco_images is the COCO train2014 image folder. The pickle is read with an unpickler that builds
only lists, dicts, strings and numbers: a file that wants anything else is refused, not run.

Masks are decoded here, in numpy: a polygon by an even-odd scanline fill (pixel (x, y) covers
[x, x+1) x [y, y+1) and is inside when its centre is; the polygons of one object are united), an
RLE from its counts, either the list (uncompressed, iscrowd) or pycocotools' compressed string.
Checked once against pycocotools 2.0.11: RLE decoding agreed on 200 random masks; polygons with
integer corners agree, and on 200 random polygons 5.8 of ~238 pixels differed on average, all on the
outline (pycocotools rasterises the outline its own way).

What is written (splits as the refs name them: train, val, test, testA, testB):
  {split}.jsonl           one record per image with refs: "image" (the COCO file, absolute),
                          "instances" (below), width, height, "objects": [{"ann_id", "category",
                          "bbox": [x0, y0, x1, y1] inclusive, of its pixels in the map, "area"}] and
                          "concepts" (the category names), object i (1-based) being value i in the map.
  instances/{split}/{image_id}.png   8-bit map of every referred object of the image, 0 = background,
                          i = object i. Objects are painted largest first, so where two overlap the
                          smaller one shows (an object covered entirely loses its refs: counted as skipped).
  {split}_instruct.jsonl  one "refer" conversation per sentence, as in the shapes world:
                          "<image>\\nSegment <sentence>." -> "[SEG]", with "instances", "mask_id",
                          "expression", and "ref_id", "ann_id".
"""
import io
import os
import pickle
import sys
from collections import OrderedDict

import numpy as np
from PIL import Image

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from common import configure, die  # noqa: E402
from data.world import Skips  # noqa: E402
from data.writer import WorldWriter, converter_settings, load_json, source_path  # noqa: E402
from data.shapes.prepare import gpt, human  # noqa: E402

# -----------------------------------------------------------------------------
# settings
src = ''                   # the refer toolkit's dataset folder: refs(unc).p (or umd/google) and instances.json
split_by = ''              # which refs(<split_by>).p: '' = the only one in src; else unc | umd | google
coco_images = ''           # the COCO train2014 image folder
data_dir = 'data/refcoco/world'    # the world to write (relative paths: from the repo root)
vocab_size = 8000          # requested sentencepiece size; capped by what the text supports
# -----------------------------------------------------------------------------

SPLIT_ORDER = ('train', 'val', 'test', 'testA', 'testB', 'testC')


# -----------------------------------------------------------------------------
# COCO masks in numpy

def polygon_mask(poly, h, w):
    """One COCO polygon [x0, y0, x1, y1, ...] -> (h, w) bool, by an even-odd scanline fill: along the
    row through pixel centres y + 0.5, a pixel is inside when an odd number of edges cross the row
    left of its centre. All rows and edges at once; the toggles are summed along each row."""
    p = np.asarray(poly, np.float64).reshape(-1, 2)
    if len(p) < 3:
        return np.zeros((h, w), bool)
    x0, y0 = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)                                  # edge i: vertex i -> i+1, (E,)
    yc = np.arange(h)[:, None] + 0.5                                           # (h, 1) the rows
    crosses = (y0 <= yc) != (y1 <= yc)                                         # (h, E); a vertex on a row counts once
    t = np.where(crosses, (yc - y0) / np.where(y1 == y0, 1, y1 - y0), 0)       # (h, E) where along the edge
    xs = x0 + t * (x1 - x0)                                                    # (h, E) the crossing's x
    first = np.clip(np.ceil(xs - 0.5), 0, w).astype(np.int64)                  # first pixel whose centre is right of it
    toggles = np.zeros((h, w + 1), np.int64)
    rows = np.broadcast_to(np.arange(h)[:, None], crosses.shape)
    np.add.at(toggles, (rows[crosses], first[crosses]), 1)
    return np.cumsum(toggles, 1)[:, :w] % 2 == 1


def rle_counts(counts):
    """COCO RLE counts -> (n,) int64 run lengths. A list is taken as it is; a string is pycocotools'
    compressed form (maskApi.c, rleToString): each count after the first three is stored as the
    difference to the count two before, in 5-bit chunks, least significant first, as characters
    48 + chunk, with 0x20 set on every chunk but a number's last, whose 0x10 bit is the sign."""
    if isinstance(counts, (list, tuple)):
        return np.asarray(counts, np.int64)
    if isinstance(counts, str):
        counts = counts.encode('ascii')
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48                 # (chars,)
    if len(c) == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63 or c[-1] & 0x20:
        raise ValueError("not a compressed COCO RLE string")
    ends = np.flatnonzero((c & 0x20) == 0)                                     # the last chunk of each number
    starts = np.concatenate([[0], ends[:-1] + 1])
    nchunks = ends - starts + 1
    k = np.arange(len(c)) - np.repeat(starts, nchunks)                         # chunk position in its number
    x = np.add.reduceat((c & 0x1f) << (5 * k), starts)                         # (n,) the numbers, unsigned
    x = np.where(c[ends] & 0x10, x - (1 << (5 * nchunks)), x)                  # sign-extend the negative ones
    out = x.copy()
    out[1::2] = np.cumsum(x[1::2])                                             # count i = x_i + count i-2 (i > 2):
    out[2::2] = np.cumsum(x[2::2])                                             # running sums of odd and even x
    return out


def rle_mask(counts, h, w):
    """COCO RLE -> (h, w) bool: alternating runs of 0s and 1s (0s first) down the columns."""
    n = rle_counts(counts)
    if (n < 0).any() or n.sum() != h * w:
        raise ValueError(f"the RLE covers {int(n.sum())} pixels, not {h}x{w}")
    return np.repeat(np.arange(len(n)) % 2 == 1, n).reshape(w, h).T


def ann_mask(seg, h, w):
    """A COCO "segmentation" (polygons, or an RLE dict) -> (h, w) bool."""
    if isinstance(seg, list):
        m = np.zeros((h, w), bool)
        for poly in seg:
            m |= polygon_mask(poly, h, w)
        return m
    if isinstance(seg, dict) and 'counts' in seg:
        if list(seg.get('size', [h, w])) != [h, w]:
            raise ValueError(f"its RLE is {seg.get('size')}, the image {h}x{w}")
        return rle_mask(seg['counts'], h, w)
    raise ValueError("its segmentation is neither polygons nor an RLE")


# -----------------------------------------------------------------------------
# the inputs

class _PlainUnpickler(pickle.Unpickler):
    """Builds lists, dicts, strings and numbers only: a pickle that names any class or function
    (the way a pickle runs code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it wants {module}.{name}")


def load_refs(path):
    """The refs pickle (written by Python 2: byte strings are read as UTF-8, else Latin-1)."""
    with open(path, 'rb') as f:
        raw = f.read()
    for enc in ('utf-8', 'latin1'):
        try:
            refs = _PlainUnpickler(io.BytesIO(raw), encoding=enc).load()
            break
        except UnicodeDecodeError:
            continue
        except Exception as e:
            die(f"{path} is not a refs pickle of the refer toolkit ({type(e).__name__}: {e})")
    keys = ('ref_id', 'ann_id', 'image_id', 'split', 'sentences')
    if not isinstance(refs, list) or not all(isinstance(r, dict) and all(k in r for k in keys) for r in refs):
        die(f"{path} is not a refs pickle of the refer toolkit: expected a list of refs with {', '.join(keys)}")
    return refs


def find_refs(folder, split_by):
    names = sorted(f for f in os.listdir(folder) if f.startswith('refs(') and f.endswith(').p'))
    if split_by:
        name = f'refs({split_by}).p'
        if name not in names:
            die(f"{folder} has no {name}; it has: {', '.join(names) or 'no refs(*).p'}")
        return os.path.join(folder, name)
    if len(names) != 1:
        die(f"{folder} has {len(names)} refs pickles ({', '.join(names) or 'none'}); "
            f"{'pick one with split_by=unc|umd|google' if names else 'pass the refer toolkit folder of one dataset'}")
    return os.path.join(folder, names[0])


def expression(sentence):
    text = ' '.join(str(sentence.get('sent') or sentence.get('raw') or '').split()).rstrip('.')
    return text


# -----------------------------------------------------------------------------
# one image: its instance map, record and conversations

def image_items(split, image_id, im, refs, anns, cats, cfg, out, skips):
    """(record, conversations) of one image, its instance map written; None when nothing is usable."""
    path = os.path.abspath(os.path.join(cfg['coco_images'], im['file_name']))
    if not os.path.isfile(path):
        skips.add(f"{path}: no such file ({len(refs)} refs)")
        return None
    h, w = int(im['height']), int(im['width'])
    masks, ann_ids = {}, sorted({r['ann_id'] for r in refs})
    for a in ann_ids:
        try:
            masks[a] = ann_mask(anns[a]['segmentation'], h, w)
        except (KeyError, ValueError, TypeError) as e:
            skips.add(f"annotation {a} of image {image_id}: {e if not isinstance(e, KeyError) else 'not in instances.json'}")
    ids = {a: i + 1 for i, a in enumerate(a for a in ann_ids if a in masks)}   # object i is value i in the map
    if len(ids) > 255:
        die(f"image {image_id} has {len(ids)} referred objects; an 8-bit instance map holds 255")
    inst = np.zeros((h, w), np.uint8)
    for a in sorted(ids, key=lambda a: -int(masks[a].sum())):                  # largest first: small ones stay visible
        inst[masks[a]] = ids[a]
    area = np.bincount(inst.ravel(), minlength=len(ids) + 1)                   # (n + 1,) visible pixels per id
    rel = f'instances/{split}/{image_id}.png'
    iid = f'{split}_{image_id}'
    objects = []
    for a, i in ids.items():
        ys, xs = np.nonzero(inst == i)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())] if len(xs) else None
        objects.append({'ann_id': a, 'category': cats.get(anns[a].get('category_id'), ''), 'bbox': bbox,
                        'area': int(area[i])})
    convs = []
    for r in sorted(refs, key=lambda r: r['ref_id']):
        if r['ann_id'] not in ids or area[ids[r['ann_id']]] == 0:
            if r['ann_id'] in ids:
                skips.add(f"ref {r['ref_id']}: its object is empty or covered by smaller ones in image {image_id}")
            continue
        for s in r['sentences']:
            expr = expression(s) if isinstance(s, dict) else ''
            if expr:
                convs.append({'id': f'{iid}_refer{len(convs)}', 'task': 'refer', 'image_id': iid, 'image': path,
                              'conversations': [human(f'<image>\nSegment {expr}.'), gpt('[SEG]')],
                              'instances': rel, 'mask_id': ids[r['ann_id']], 'expression': expr,
                              'ref_id': r['ref_id'], 'ann_id': r['ann_id']})
    if not convs:
        return None
    os.makedirs(os.path.join(out, 'instances', split), exist_ok=True)
    Image.fromarray(inst).save(os.path.join(out, rel), format='PNG', compress_level=1)
    rec = {'id': iid, 'image': path, 'instances': rel, 'width': w, 'height': h,
           'concepts': [o['category'] for o in objects], 'objects': objects}
    return rec, convs


def prepare(**settings):
    """Convert the refer toolkit folder named in `settings` (defaults: this module's values); returns data_dir."""
    cfg = converter_settings(globals(), settings, 'data/refcoco/prepare.py')
    folder = source_path(cfg['src'], 'refer dataset folder', 'src=FOLDER (with refs(unc).p and instances.json)')
    cfg['coco_images'] = source_path(cfg['coco_images'], 'COCO image folder', 'coco_images=FOLDER (COCO train2014)')
    refs = load_refs(find_refs(folder, cfg['split_by']))
    inst_path = source_path(os.path.join(folder, 'instances.json'), 'COCO annotations', 'a src folder with instances.json')
    inst = load_json(inst_path, 'COCO instances file')
    if not (isinstance(inst, dict) and isinstance(inst.get('images'), list) and isinstance(inst.get('annotations'), list)):
        die(f"{inst_path} is not a COCO instances file: expected 'images' and 'annotations' lists")
    try:
        images = {im['id']: im for im in inst['images']}
        anns = {a['id']: a for a in inst['annotations']}
        cats = {c['id']: c['name'] for c in inst.get('categories', [])}
    except (KeyError, TypeError) as e:
        die(f"{inst_path} is not a COCO instances file: an entry lacks {e}")
    by_split = {}
    for r in refs:
        by_split.setdefault(r['split'], OrderedDict()).setdefault(r['image_id'], []).append(r)
    writer = WorldWriter(cfg['data_dir'], 'refcoco', cfg)
    order = sorted(by_split, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    for split in order:
        skips, ids = Skips(), sorted(by_split[split])
        for i in ids:
            if i not in images:
                skips.add(f"image {i}: not in {inst_path}")

        def items(split=split, skips=skips, ids=ids):
            for i in ids:
                if i in images:
                    got = image_items(split, i, images[i], by_split[split][i], anns, cats, cfg, writer.out, skips)
                    if got is not None:
                        yield got
        writer.write_split(split, items(), skips, total=len(ids))
    return writer.finish(cfg['vocab_size'])


if __name__ == '__main__':
    prepare(**configure(globals(), script='data/refcoco/prepare.py'))
