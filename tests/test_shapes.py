"""
Tests of the shapes world (data/shapes/prepare.py) and its reader (data/world.py).

The ground truth is checked independently of the generator's bookkeeping wherever possible: object
attributes, boxes, gaps and positions are recomputed from the written PNGs, and every answer,
referring expression and edit is re-derived here from the manifest with this file's own parsers.
Run: python -m pytest tests/test_shapes.py -q
"""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data import world as loader  # noqa: E402
from data.shapes import prepare as P  # noqa: E402

TINY = dict(n_train=12, n_val=4, n_test=4)
SIZES = ('small', 'large')
COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'cyan', 'pink')
SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'hexagon')
GRID = ('top left', 'top', 'top right', 'left', 'center', 'right', 'bottom left', 'bottom', 'bottom right')


# -----------------------------------------------------------------------------
# helpers written here, not taken from the generator

def make(tmp, name, **kw):
    return P.prepare(data_dir=str(tmp / name), workers=kw.pop('workers', 1), **kw)


def hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, 'rb').read()).hexdigest()
    return out


def png(root, rel):
    return np.asarray(Image.open(os.path.join(root, rel)))


def jsonl(path):
    return [json.loads(line) for line in open(path, encoding='utf-8')]


def dilate(m, r):
    """Chebyshev dilation by r, by brute-force shifting."""
    out = np.zeros_like(m)
    H, W = m.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            src = m[max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)]
            out[max(0, dy):H - max(0, -dy), max(0, dx):W - max(0, -dx)] |= src
    return out


def shift(m, dx, dy):
    out = np.zeros_like(m)
    H, W = m.shape
    out[max(0, dy):H - max(0, -dy), max(0, dx):W - max(0, -dx)] = m[max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)]
    return out


def classify(mask):
    """Which shape a mask is, from its silhouette alone (thresholds fit to 64 px renders)."""
    ys, xs = np.nonzero(mask)
    m = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = m.shape
    fill, rows = m.mean(), m.sum(1)
    if fill > 0.95:
        return 'square'
    if fill > 0.65:
        return 'hexagon' if w / h > 1.1 else 'circle'
    if rows[-1] >= 0.9 * w and rows[0] < 0.3 * w:
        return 'triangle'
    if fill < 0.46:
        return 'star'
    return 'diamond' if h > w else '?'


def parse_phrase(text):
    """'small red circle' / 'red object' / 'circle' -> {'size': .., 'color': .., 'shape': ..}."""
    words, vals = text.split(), {}
    if words[-1] != 'object':
        assert words[-1] in SHAPES, text
        vals['shape'] = words[-1]
    for w in words[:-1]:
        key = 'size' if w in SIZES else 'color' if w in COLOURS else None
        assert key and key not in vals, text
        vals[key] = w
    assert len(words) - 1 == len(vals) - ('shape' in vals), text
    return vals


def fits(o, vals):
    return all(o[k] == v for k, v in vals.items())


def resolve(objs, expr, margin):
    """The 0-based indices of the objects a referring expression ('the ...') fits."""
    m = re.fullmatch(r'the (leftmost|rightmost|topmost|bottommost) (.+)', expr)
    if not m:
        vals = parse_phrase(expr[len('the '):])
        return [i for i, o in enumerate(objs) if fits(o, vals)]
    word, vals = m.group(1), parse_phrase(m.group(2))
    cand = [i for i, o in enumerate(objs) if fits(o, vals)]
    assert len(cand) >= 2, f"superlative '{expr}' among fewer than 2 candidates"
    axis = 0 if word in ('leftmost', 'rightmost') else 1
    sign = -1 if word in ('leftmost', 'topmost') else 1
    best = sorted(cand, key=lambda i: sign * objs[i]['center'][axis], reverse=True)
    if sign * (objs[best[0]]['center'][axis] - objs[best[1]]['center'][axis]) < margin:
        return best   # not clear: all of them (the caller wants exactly one)
    return best[:1]


def color_dist(a, b):
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float), axis=-1).min())


# -----------------------------------------------------------------------------
# the world checked against its own pixels

def check_world(root, shapes_by_silhouette=True):
    meta = json.load(open(os.path.join(root, 'meta.json')))
    S = meta['settings']['image_size']
    rgb = {k: tuple(v) for k, v in meta['world']['colors'].items()}
    assert sorted(rgb) == sorted(COLOURS) and len(set(rgb.values())) == 8
    margin = S / 8 - 0.5
    yes_no = {'existence': [], 'relation': []}
    kinds, tasks = set(), set()
    for split in ('train', 'val', 'test'):
        recs = jsonl(os.path.join(root, f'{split}.jsonl'))
        assert len(recs) == meta['settings'][f'n_{split}']
        by_id = {}
        for r in recs:
            by_id[r['id']] = r
            img, inst = png(root, r['image']), png(root, r['instances'])
            assert img.shape == (S, S, 3) and img.dtype == np.uint8 and inst.shape == (S, S)
            objs = r['objects']
            n = len(objs)
            assert meta['settings']['min_objects'] <= n <= meta['settings']['max_objects']
            assert set(np.unique(inst)) == set(range(n + 1)), "instance ids must be 0..n"
            bg = P.render_background(r['background'], S)
            assert (img[inst == 0] == bg[inst == 0]).all(), "background re-rendered from its parameters"
            assert color_dist(bg.reshape(-1, 3)[:, None], np.array(list(rgb.values()))[None]) > 90
            rows = []
            for i, o in enumerate(objs):
                mask = inst == i + 1
                assert (img[mask] == rgb[o['color']]).all(), "object pixels are exactly the named colour"
                ys, xs = np.nonzero(mask)
                bbox = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
                assert o['bbox'] == bbox
                assert o['center'] == [(bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2]
                col, row = [min(2, int((c + 0.5) * 3 / S)) for c in o['center']]
                assert o['position'] == GRID[3 * row + col]
                rows.append((row, o['center'][0]))
                width = bbox[2] - bbox[0] + 1
                nominal = {'small': 0.22, 'large': 0.36}[o['size']] * S
                assert 0.7 * nominal - 1 <= width <= 1.1 * nominal + 1, (o, width)
                if shapes_by_silhouette:
                    assert classify(mask) == o['shape'], (r['id'], i, o['shape'], classify(mask))
                others = (inst > 0) & ~mask
                assert not (dilate(mask, 2) & others).any(), "objects keep a 2 px gap"
                assert o['concept'] == f"{o['size']} {o['color']} {o['shape']}"
            assert rows == sorted(rows), "objects are in caption order"
            assert r['concepts'] == [o['concept'] for o in objs]
            assert P.parse_caption(r['caption']) == [(o['size'], o['color'], o['shape']) for o in objs]
            spoken = re.findall(r'an? (\w+ \w+ \w+) (?:at the|on the|in the) '
                                r'(top left|top right|bottom left|bottom right|top|bottom|left|right|center)',
                                r['caption'])
            assert spoken == [(o['concept'], o['position']) for o in objs]
            if any(o['position'] == 'center' for o in objs):
                assert 'in the center' in r['caption']

        for c in jsonl(os.path.join(root, f'{split}_instruct.jsonl')):
            r = by_id[c['image_id']]
            objs, n = r['objects'], len(r['objects'])
            tasks.add(c['task'])
            hv, gv = c['conversations'][0]['value'], c['conversations'][1]['value']
            assert [t['from'] for t in c['conversations']] == ['human', 'gpt']
            if c['task'] != 't2i':
                assert c['image'] == r['image'] and hv.startswith('<image>\n')
            if c['task'] == 'caption':
                assert gv == r['caption']
            elif c['task'] == 'vqa':
                q = hv[len('<image>\n'):]
                assert gv == c['answer']
                kinds.add(c['kind'])
                if c['kind'] == 'count':
                    if q == 'How many objects are there?':
                        want = n
                    elif (m := re.fullmatch(r'How many (\w+) objects are there\?', q)):
                        want = sum(o['color'] == m.group(1) for o in objs)
                    else:
                        m = re.fullmatch(r'How many (\w+)s are there\?', q)
                        assert m and m.group(1) in SHAPES, q
                        want = sum(o['shape'] == m.group(1) for o in objs)
                    assert gv == str(want), (q, gv, want)
                elif c['kind'] == 'attribute':
                    m = re.fullmatch(r'What (colour|shape|size) is the (.+)\?', q)
                    asked = {'colour': 'color', 'shape': 'shape', 'size': 'size'}[m.group(1)]
                    vals = parse_phrase(m.group(2))
                    assert asked not in vals
                    hit = [o for o in objs if fits(o, vals)]
                    assert len(hit) == 1 and gv == hit[0][asked], (q, gv)
                elif c['kind'] == 'existence':
                    m = re.fullmatch(r'Is there (a|an) (.+)\?', q)
                    assert m.group(1) == ('an' if m.group(2)[0] in 'aeiou' else 'a')
                    vals = parse_phrase(m.group(2))
                    assert gv == ('yes' if any(fits(o, vals) for o in objs) else 'no'), q
                    yes_no['existence'].append(gv)
                elif c['kind'] == 'relation':
                    m = re.fullmatch(r'Is the (.+?) (left of|right of|above|below) the (.+)\?', q)
                    a = [o for o in objs if fits(o, parse_phrase(m.group(1)))]
                    b = [o for o in objs if fits(o, parse_phrase(m.group(3)))]
                    assert len(a) == 1 and len(b) == 1 and a[0] is not b[0], q
                    axis = 0 if m.group(2) in ('left of', 'right of') else 1
                    d = a[0]['center'][axis] - b[0]['center'][axis]
                    assert abs(d) >= margin, (q, d)
                    truth = d < 0 if m.group(2) in ('left of', 'above') else d > 0
                    assert gv == ('yes' if truth else 'no'), q
                    yes_no['relation'].append(gv)
                else:
                    raise AssertionError(c['kind'])
            elif c['task'] == 'refer':
                m = re.fullmatch(r'<image>\nSegment (the .+)\.', hv)
                assert gv == '[SEG]' and c['instances'] == r['instances']
                assert resolve(objs, m.group(1), margin) == [c['mask_id'] - 1], hv
                assert (png(root, c['instances']) == c['mask_id']).any()
            elif c['task'] == 't2i':
                assert c['image'] is None and gv == '<image>' and c['target_image'] == r['image']
                assert hv == f"Generate an image: {r['caption']}"
            elif c['task'] == 'edit':
                check_edit(root, r, c, S, rgb, margin)
            else:
                raise AssertionError(c['task'])
    assert tasks == {'caption', 'vqa', 'refer', 't2i', 'edit'}
    assert kinds == {'count', 'attribute', 'existence', 'relation'}
    for k, answers in yes_no.items():
        assert 0.25 <= answers.count('yes') / len(answers) <= 0.75, (k, answers.count('yes'), len(answers))
    return meta


def check_edit(root, r, c, S, rgb, margin):
    objs = r['objects']
    hv = c['conversations'][0]['value'][len('<image>\n'):]
    assert c['conversations'][1]['value'] == '<image>'
    e = c['edit']
    i = e['object'] - 1
    src, tgt, inst = png(root, r['image']), png(root, c['target_image']), png(root, r['instances'])
    bg = P.render_background(r['background'], S)
    old = inst == e['object']
    diff = (src != tgt).any(-1)
    after = [dict(o) for o in objs]
    if e['op'] == 'recolor':
        m = re.fullmatch(r'Make (the .+) (\w+)\.', hv)
        assert m.group(2) == e['color'] != objs[i]['color']
        assert (diff == old).all() and (tgt[old] == rgb[e['color']]).all()
        after[i]['color'] = e['color']
    elif e['op'] == 'remove':
        m = re.fullmatch(r'Remove (the .+)\.', hv)
        assert len(objs) > 1
        assert (diff == old).all() and (tgt[old] == bg[old]).all()
        del after[i]
    else:
        m = re.fullmatch(r'Move (the .+) (to the left|to the right|up|down)\.', hv)
        d = {'to the left': 'left', 'to the right': 'right', 'up': 'up', 'down': 'down'}[m.group(2)]
        assert e['direction'] == d
        dx, dy = e['offset']
        step = abs(dx) + abs(dy)
        assert abs(step - S / 4) <= 1 and (dx, dy) == {'left': (-step, 0), 'right': (step, 0),
                                                      'up': (0, -step), 'down': (0, step)}[d]
        new = shift(old, dx, dy)
        assert new.sum() == old.sum(), "the moved object stays inside the image"
        assert (diff == (old ^ new)).all()
        assert (tgt[new] == rgb[objs[i]['color']]).all() and (tgt[old & ~new] == bg[old & ~new]).all()
        assert not (dilate(new, 2) & (inst > 0) & ~old).any(), "the moved object keeps the gap"
        after[i]['center'] = [objs[i]['center'][0] + dx, objs[i]['center'][1] + dy]
    assert resolve(objs, m.group(1), margin) == [i], hv
    got = sorted(P.parse_caption(c['target_caption']))
    assert got == sorted((o['size'], o['color'], o['shape']) for o in after)


# -----------------------------------------------------------------------------
# tests

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return make(tmp_path_factory.mktemp('worlds'), 'main', seed=5, n_train=28, n_val=6, n_test=6)


def test_ground_truth(world):
    meta = check_world(world)
    assert meta['settings'] == {'seed': 5, 'image_size': 64, 'n_train': 28, 'n_val': 6, 'n_test': 6,
                                'min_objects': 1, 'max_objects': 6, 'vocab_size': P.vocab_size}
    assert meta['world']['colors'] == {k: list(v) for k, v in P.COLORS.items()}


def test_ground_truth_other_size(tmp_path):
    """Everything scales with image_size (the silhouette classifier is tuned for 64 px only)."""
    root = make(tmp_path, 'w32', seed=3, image_size=32, n_train=20, n_val=2, n_test=2, min_objects=2, max_objects=4)
    check_world(root, shapes_by_silhouette=False)
    for r in jsonl(os.path.join(root, 'train.jsonl')):
        assert 2 <= len(r['objects']) <= 4


def test_determinism(tmp_path, monkeypatch):
    a = make(tmp_path, 'a', seed=11, **TINY)
    monkeypatch.setattr(P, '_CHUNK', 4)       # so the process pool really runs on a tiny world
    b = make(tmp_path, 'b', seed=11, workers=2, **TINY)
    ha, hb = hashes(a), hashes(b)
    assert len(ha) == 3 * 20 + 9 and ha == hb, "same seed (and any worker count) -> identical bytes"
    c = make(tmp_path, 'c', seed=12, **TINY)
    hc = hashes(c)
    imgs = [k for k in ha if k.startswith('images/')]
    assert sum(ha[k] != hc[k] for k in imgs) == len(imgs), "another seed -> other images"
    # the splits have their own seeds: a different n_train leaves val and test alone
    d = make(tmp_path, 'd', seed=11, n_train=5, n_val=4, n_test=4)
    hd = hashes(d)
    for k in ha:
        if k.startswith(('val', 'test')) or '/val/' in k or '/test/' in k:
            assert hd[k] == ha[k], k
    assert hd['images/train/train_000004.png'] == ha['images/train/train_000004.png']
    # preparing a smaller world over a bigger one leaves nothing of the old one behind
    assert hashes(make(tmp_path, 'a', seed=11, n_train=5, n_val=4, n_test=4)) == hd


def test_parse_caption():
    objs = [{'size': 'large', 'color': 'red', 'shape': 'circle', 'xy': (2, 2)},
            {'size': 'small', 'color': 'orange', 'shape': 'star', 'xy': (44, 2)},
            {'size': 'small', 'color': 'blue', 'shape': 'square', 'xy': (25, 25)},
            {'size': 'small', 'color': 'pink', 'shape': 'hexagon', 'xy': (48, 48)}]
    cap = P.make_caption(objs, 64)
    assert cap == ('a large red circle at the top left, a small orange star at the top right, '
                   'a small blue square in the center and a small pink hexagon at the bottom right')
    assert P.parse_caption(cap) == [(o['size'], o['color'], o['shape']) for o in objs]
    assert P.parse_caption('Two small red circles and a LARGE blue star.') == [
        ('small', 'red', 'circle'), ('large', 'blue', 'star')]
    assert P.parse_caption('nothing here, just a red thing') == []


def test_caption_guess_hedges_over_the_cell_the_caption_names(world):
    """t2i's caption-only baseline: each object averaged over its 3x3 cell, on the mean background."""
    S, grey = 64, np.full((64, 64, 3), 0.25)
    obj = {'shape': 'square', 'size': 'large', 'color': 'red', 'position': 'center'}
    g = P.caption_guess([obj], grey, S)
    red = np.array(P.COLORS['red']) / 255
    f = (g - 0.25) / (red - 0.25)                           # (S, S, 3) the share of renders covering a pixel
    assert np.allclose(f, f[..., :1]) and f.min() >= -1e-9 and f.max() <= 1 + 1e-9
    f = f[..., 0]
    assert np.isclose(f.sum(), P.shape_mask('square', 'large', S).sum()), "each render paints the whole square"
    assert np.allclose(f[:8], 0) and np.allclose(f[:, :8], 0), "nothing outside the cell's reach"
    assert f[32, 32] > 0.5 and 0 < f[32, 22] < f[32, 32], "a blur centred on the cell"
    assert np.array_equal(g, P.caption_guess([obj], grey, S)), "deterministic for a given seed"
    # on real images the hedge beats both the background alone and every object at its cell's centre
    recs = jsonl(os.path.join(world, 'train.jsonl'))
    bg = P.mean_background(recs, S)
    psnr = lambda a, b: -10 * np.log10(((a - b) ** 2).mean())
    truth = [png(world, r['image']).astype(np.float64) / 255 for r in recs]
    hedge = np.mean([psnr(P.caption_guess(r['objects'], bg, S), t) for r, t in zip(recs, truth)])
    blank = np.mean([psnr(bg, t) for t in truth])
    assert hedge > blank + 0.5, (hedge, blank)


def test_tokenizer(world):
    import sentencepiece as spm
    meta = json.load(open(os.path.join(world, 'meta.json')))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(world, 'tokenizer.model'))
    assert sp.get_piece_size() == meta['vocab']['size']
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    for k, s in enumerate(['[Img]', '[/Img]', '[SEG]', '[USER]', '[ASSISTANT]']):
        assert sp.piece_to_id(s) == 4 + k and meta['vocab']['special'][s] == 4 + k
    assert '[SEG]' in sp.encode('Segment it. [SEG]', out_type=str)
    vocab = [line.split('\t')[0] for line in open(os.path.join(world, 'tokenizer.vocab'), encoding='utf-8')]
    assert vocab == [sp.id_to_piece(k) for k in range(sp.get_piece_size())]
    for d in '0123456789':
        assert sp.piece_to_id(d) != sp.unk_id()
        assert d in sp.encode(d, out_type=str)
    assert [p for p in sp.encode('305', out_type=str) if p != '▁'] == ['3', '0', '5']
    for r in jsonl(os.path.join(world, 'train.jsonl'))[:10]:
        assert sp.decode(sp.encode(r['caption'])) == r['caption']
        assert sp.unk_id() not in sp.encode(r['caption'])


def test_loader(world, tmp_path):
    s = loader.load_split(world, 'val')
    assert s['images'].shape == (6, 64, 64, 3) and s['images'].dtype == np.uint8
    assert s['instances'].shape == (6, 64, 64) and s['instances'].dtype == np.uint8
    assert [r['id'] for r in s['records']] == [f'val_{k:06d}' for k in range(6)]
    assert (s['images'][2] == png(world, s['records'][2]['image'])).all()
    conv = loader.load_instruct(world, 'val')
    assert conv == jsonl(os.path.join(world, 'val_instruct.jsonl'))
    with pytest.raises(SystemExit) as e:
        loader.load_split(str(tmp_path / 'nowhere'), 'train')
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        loader.load_split(world, 'dev')


def test_loader_missing_image(tmp_path, capsys):
    root = make(tmp_path, 'w', seed=1, n_train=3, n_val=1, n_test=1)
    os.remove(os.path.join(root, 'images', 'train', 'train_000001.png'))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        loader.load_split(root, 'train')
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'train_000001.png' in err
    os.remove(os.path.join(root, 'test_instruct.jsonl'))
    with pytest.raises(SystemExit):
        loader.load_instruct(root, 'test')


def test_ensure_world(tmp_path, capsys):
    out = str(tmp_path / 'w')
    kw = dict(seed=2, n_train=3, n_val=1, n_test=1)
    assert P.ensure_world(out, workers=1, **kw) == out
    meta = os.path.join(out, 'meta.json')
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in hashes(out)}
    assert P.ensure_world(out, **kw) == out        # already there: nothing is rewritten
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in hashes(out)} == before
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        P.ensure_world(out, **{**kw, 'n_train': 4})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'n_train' in err and 'delete' in err
    with pytest.raises(SystemExit) as e:
        P.ensure_world(out, bogus=1, **kw)
    assert e.value.code == 2
    os.remove(meta)                                 # unfinished world: prepared again
    assert P.ensure_world(out, workers=1, **kw) == out and os.path.exists(meta)


def test_cli_unknown_setting():
    p = subprocess.run([sys.executable, 'data/shapes/prepare.py', 'nonsense=1'], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'nonsense' in lines[0]


