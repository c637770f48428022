"""
The real-data converters (data/captions, data/llava, data/refcoco, data/editing), each on a tiny fixture
that this file writes in the layout the dataset is distributed in: a CC3M TSV, a CC12M TSV, an
img2dataset folder, a COCO captions json, a LLaVA json, a refer-toolkit folder (refs pickle +
instances.json with polygon and RLE masks), an InstructPix2Pix folder and a MagicBrush folder.
Masks are checked against masks drawn here from their geometry, not with the converter's decoder.
Run: python -m pytest tests/test_converters.py -q
"""
import json
import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from conftest import run_script  # noqa: E402
from data.captions import prepare as captions  # noqa: E402
from data.editing import prepare as editing  # noqa: E402
from data.stream import StreamingLoader  # noqa: E402
from data.world import read_jsonl  # noqa: E402
from data.refcoco import prepare as refcoco  # noqa: E402

SPECIAL = ('[Img]', '[/Img]', '[SEG]', '[USER]', '[ASSISTANT]')


def save(path, size, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, colour).save(path)
    return os.path.abspath(path)


def world(d, split):
    return read_jsonl(os.path.join(d, f'{split}.jsonl'), 'manifest'), \
        read_jsonl(os.path.join(d, f'{split}_instruct.jsonl'), 'instructions')


def meta(d):
    return json.load(open(os.path.join(d, 'meta.json')))


def check_world(d):
    """What every converted world must satisfy: records with existing absolute images and their true
    sizes, unique ids, every image a conversation names in the split's manifest, the tokenizer with
    the shapes world's special tokens, and counts in meta.json that match the files."""
    import sentencepiece as spm
    m = meta(d)
    assert m['format'] == 'nanosetok-world' and m['vocab']['special'] == {s: 4 + k for k, s in enumerate(SPECIAL)}
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, 'tokenizer.model'))
    assert [sp.piece_to_id(s) for s in SPECIAL] == [4, 5, 6, 7, 8] and sp.get_piece_size() == m['vocab']['size']
    for split, counts in m['splits'].items():
        recs, convs = world(d, split)
        assert (len(recs), len(convs)) == (counts['images'], counts['instruct'])
        assert len({r['id'] for r in recs}) == len(recs) and len({c['id'] for c in convs}) == len(convs)
        paths = {r['image'] for r in recs}
        for r in recs:
            assert os.path.isabs(r['image']) and Image.open(r['image']).size == (r['width'], r['height'])
        for c in convs:
            assert {c.get('image'), c.get('target_image')} - {None} <= paths, c['id']
            assert (c.get('image') is None) == ('<image>' not in c['conversations'][0]['value']), c['id']
    return m


# -----------------------------------------------------------------------------
# image-caption pairs

def test_captions_tsv_jsonl_coco_and_img2dataset(tmp_path):
    img = tmp_path / 'cc' / 'images'
    dog, wide = save(img / 'dog.jpg', (40, 30)), save(img / 'sub' / 'wide.png', (64, 16))
    cat = save(img / '00000' / '000000000.jpg', (20, 24))                        # downloaded by img2dataset
    (img / '00000' / '000000000.json').write_text(json.dumps({'url': 'http://x.org/cat.jpg', 'key': '000000000'}))
    (img / '00000' / '000000000.txt').write_text('a cat on a mat')
    (tmp_path / 'cc' / 'train.tsv').write_text(                                  # CC3M: caption<TAB>url
        'a dog  on grass\tdog.jpg\na cat\thttp://x.org/cat.jpg\nnever downloaded\thttp://x.org/gone.jpg\n'
        'the dog again\tdog.jpg\na wide picture\tsub/wide.png\n')
    (tmp_path / 'cc' / 'val.tsv').write_text('url\tcaption\nsub/wide.png\twide and flat\n')   # CC12M order, header
    coco = tmp_path / 'coco'
    a, b = save(coco / 'val2014' / 'COCO_val2014_1.jpg', (33, 21)), save(coco / 'val2014' / 'COCO_val2014_2.jpg', (9, 12))
    (coco / 'annotations').mkdir()
    (coco / 'annotations' / 'captions_val2014.json').write_text(json.dumps({
        'images': [{'id': 2, 'file_name': 'COCO_val2014_2.jpg', 'width': 9, 'height': 12},
                   {'id': 1, 'file_name': 'COCO_val2014_1.jpg', 'width': 33, 'height': 21}],
        'annotations': [{'id': 7, 'image_id': 1, 'caption': 'two'}, {'id': 3, 'image_id': 1, 'caption': 'one'},
                        {'id': 9, 'image_id': 2, 'caption': 'small one'}]}))
    out = str(tmp_path / 'w')
    captions.prepare(train=str(tmp_path / 'cc' / 'train.tsv'), val=str(tmp_path / 'cc' / 'val.tsv'),
                     test=str(coco / 'annotations' / 'captions_val2014.json'), images=str(img), data_dir=out,
                     vocab_size=100, workers=1)
    m = check_world(out)
    assert m['skipped'] == {'train': 1, 'val': 0, 'test': 0}                     # the URL never downloaded
    assert m['tasks'] == {'caption': 8, 't2i': 8}
    recs, convs = world(out, 'train')
    assert [(r['image'], r['caption'], r.get('captions')) for r in recs] == [
        (dog, 'a dog on grass', ['a dog on grass', 'the dog again']), (cat, 'a cat', None), (wide, 'a wide picture', None)]
    dog_convs = [c for c in convs if c['image_id'] == recs[0]['id']]
    assert [(c['task'], c['conversations'][1]['value'] if c['task'] == 'caption' else c['conversations'][0]['value'])
            for c in dog_convs] == [('caption', 'a dog on grass'), ('t2i', 'Generate an image: a dog on grass'),
                                    ('caption', 'the dog again'), ('t2i', 'Generate an image: the dog again')]
    assert all(c['target_image'] == dog for c in dog_convs if c['task'] == 't2i')
    assert [r['image'] for r in world(out, 'val')[0]] == [wide]
    test = world(out, 'test')[0]                                                 # COCO: by image id, captions by id
    assert [(r['image'], r['captions'] if 'captions' in r else r['caption']) for r in test] == [
        (a, ['one', 'two']), (b, 'small one')]
    # an img2dataset folder and a JSONL file, and the results stream
    (tmp_path / 'cc' / 'val.jsonl').write_text(json.dumps({'file_name': 'dog.jpg', 'text': 'jsonl dog'}) + '\n\n'
                                               + json.dumps({'url': 'http://x.org/cat.jpg', 'caption': 'jsonl cat'}))
    out2 = str(tmp_path / 'w2')
    captions.prepare(train=str(img / '00000'), val=str(tmp_path / 'cc' / 'val.jsonl'), images=str(img), data_dir=out2,
                     vocab_size=64, workers=1)
    check_world(out2)
    assert [(r['image'], r['caption']) for r in world(out2, 'train')[0]] == [(cat, 'a cat on a mat')]
    assert [(r['image'], r['caption']) for r in world(out2, 'val')[0]] == [(dog, 'jsonl dog'), (cat, 'jsonl cat')]
    b = next(iter(StreamingLoader([out, out2], 'train', image_size=8, batch_size=4, workers=0)))
    assert b['image'].shape == (4, 3, 8, 8) and sorted(b['index'].tolist()) == [0, 1, 2, 3]


def test_captions_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / 'bad.tsv').write_text('a caption\tnot-an-image\nmore\tnope\n')
    (tmp_path / 'bad.json').write_text(json.dumps({'images': []}))
    for kw, says in ((dict(), 'no source given'), (dict(train=str(tmp_path / 'none.tsv')), 'not found'),
                     (dict(train=str(tmp_path / 'bad.tsv')), 'line 2 is not caption<TAB>image'),
                     (dict(train=str(tmp_path / 'bad.json')), 'not a COCO captions file'),
                     (dict(nonsense=1), "unknown setting 'nonsense'")):
        with pytest.raises(SystemExit) as e:
            captions.prepare(data_dir=str(tmp_path / 'w'), **kw)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and says in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / 'w' / 'meta.json')


# -----------------------------------------------------------------------------
# LLaVA

def test_llava(tmp_path):
    a, b = save(tmp_path / 'coco' / 'a.jpg', (30, 20)), save(tmp_path / 'coco' / 'b.jpg', (10, 12))
    turns = [{'from': 'human', 'value': 'What is this?\n<image>'}, {'from': 'gpt', 'value': 'A red square.'},
             {'from': 'human', 'value': 'Why?'}, {'from': 'gpt', 'value': 'Because\nit is.'}]
    entries = [{'id': 'x1', 'image': 'a.jpg', 'conversations': turns},
               {'id': 'x2', 'image': 'missing.jpg', 'conversations': turns[:2]},
               {'id': 'x3', 'conversations': [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Hello'}]},
               {'id': 'x4', 'image': 'b.jpg', 'conversations': [{'from': 'human', 'value': 'Colour?'},
                                                               {'from': 'gpt', 'value': 'red'}]},
               {'id': 'x5', 'image': 'a.jpg', 'conversations': [{'from': 'human', 'value': '<image>\nSize?'},
                                                               {'from': 'gpt', 'value': 'small'}]},
               {'id': 'x6', 'image': 'a.jpg'}]
    (tmp_path / 'llava.json').write_text(json.dumps(entries))
    out = str(tmp_path / 'w')
    r = run_script('data/llava/prepare.py', f'train={tmp_path / "llava.json"}', f'images={tmp_path / "coco"}',
                   f'data_dir={out}', 'vocab_size=64', 'workers=1')
    assert 'skipped 2 train inputs' in r.stderr
    m = check_world(out)
    assert m['skipped'] == {'train': 2} and m['tasks'] == {'chat': 4}
    recs, convs = world(out, 'train')
    assert [r['image'] for r in recs] == [a, b] and 'caption' not in recs[0]
    assert [(c['source_id'], c['image'], c['image_id']) for c in convs] == [
        ('x1', a, recs[0]['id']), ('x5', a, recs[0]['id']), ('x4', b, recs[1]['id']), ('x3', None, None)]
    assert convs[0]['conversations'] == turns                                    # turns exactly as they were
    assert convs[2]['conversations'][0]['value'] == '<image>\nColour?'           # the image put in front


# -----------------------------------------------------------------------------
# RefCOCO: masks drawn here from their geometry, RLE written by this file's own encoder

def runs(mask):
    """COCO's uncompressed RLE of a (h, w) bool mask: run lengths down the columns, 0s first."""
    flat = mask.T.ravel()
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [len(flat)]])
    return ([0] if flat[0] else []) + np.diff(bounds).tolist()


def rle_string(mask):
    """pycocotools' compressed RLE of a (h, w) bool mask, written from the format's description:
    each count after the third as a delta to the count two before, 5-bit chunks + 48,
    0x20 = more chunks follow, 0x10 of the last chunk = negative."""
    counts, out = runs(mask), []
    for i, x in enumerate(counts):
        x = x - counts[i - 2] if i > 2 else x
        more = True
        while more:
            c = x & 0x1f
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + (0x20 if more else 0) + 48))
    return ''.join(out)


def grid(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return x + 0.5, y + 0.5                                                      # pixel centres


def test_rle_decoding_against_hand_computed_string():
    # counts 5, 100, 3, 40: 100 = chunks 4|3 -> 'T3'; 40 is stored as 40 - 100 = -60 = chunks 4|30 with the sign -> 'TN'
    assert refcoco.rle_counts('5T33TN').tolist() == [5, 100, 3, 40]
    assert refcoco.rle_counts([3, 1]).tolist() == [3, 1]
    m = np.zeros((3, 4), bool)
    m[1:, 2] = True
    assert rle_string(m) == '723' and (refcoco.rle_mask('723', 3, 4) == m).all()      # 7 zeros, 2 ones, 3 zeros
    with pytest.raises(ValueError):
        refcoco.rle_mask('72', 3, 4)                                             # covers 9 of 12 pixels


def test_refcoco(tmp_path):
    H, W = 30, 40
    cx, cy = grid(H, W)
    rect = (cx >= 2) & (cx < 12) & (cy >= 3) & (cy < 10)
    tri = (cx >= 20) & (cy >= 2) & (cx + cy < 32.25)                             # vertices (20,2) (30.25,2) (20,12.25)
    disk = (cx - 30) ** 2 + (cy - 22) ** 2 < 36
    square = (cx >= 4) & (cx < 7) & (cy >= 5) & (cy < 8)                         # inside rect: drawn on top of it
    cx2, cy2 = grid(32, 32)
    box = (cx2 >= 3.2) & (cx2 < 20.7) & (cy2 >= 1.6) & (cy2 < 9.3)

    src, imgs = tmp_path / 'refer' / 'refcoco', tmp_path / 'train2014'
    src.mkdir(parents=True)
    p1, p2 = save(imgs / 'COCO_train2014_1.jpg', (W, H)), save(imgs / 'COCO_train2014_2.jpg', (32, 32))
    inst = {'images': [{'id': 1, 'file_name': 'COCO_train2014_1.jpg', 'width': W, 'height': H},
                       {'id': 2, 'file_name': 'COCO_train2014_2.jpg', 'width': 32, 'height': 32},
                       {'id': 3, 'file_name': 'COCO_train2014_3.jpg', 'width': 10, 'height': 10}],
            'annotations': [
                {'id': 10, 'image_id': 1, 'category_id': 1, 'segmentation': [[2, 3, 12, 3, 12, 10, 2, 10],
                                                                              [20, 2, 30.25, 2, 20, 12.25]]},
                {'id': 11, 'image_id': 1, 'category_id': 2, 'segmentation': {'size': [H, W], 'counts': rle_string(disk)}},
                {'id': 12, 'image_id': 1, 'category_id': 2, 'iscrowd': 1, 'segmentation': {'size': [H, W], 'counts': runs(square)}},
                {'id': 13, 'image_id': 1, 'category_id': 2, 'segmentation': {'size': [H, W], 'counts': '72'}},
                {'id': 20, 'image_id': 2, 'category_id': 1, 'segmentation': [[3.2, 1.6, 20.7, 1.6, 20.7, 9.3, 3.2, 9.3]]},
                {'id': 30, 'image_id': 3, 'category_id': 1, 'segmentation': [[0, 0, 5, 0, 5, 5]]}],
            'categories': [{'id': 1, 'name': 'person'}, {'id': 2, 'name': 'ball'}]}
    (src / 'instances.json').write_text(json.dumps(inst))
    sent = lambda *ss: [{'sent': s, 'raw': s.capitalize() + '.', 'tokens': s.split(), 'sent_id': 0} for s in ss]  # noqa: E731
    refs = [{'ref_id': 1, 'ann_id': 10, 'image_id': 1, 'split': 'train', 'category_id': 1,
             'sentences': sent('man left', 'the person')},
            {'ref_id': 2, 'ann_id': 11, 'image_id': 1, 'split': 'train', 'category_id': 2, 'sentences': sent('round ball')},
            {'ref_id': 3, 'ann_id': 12, 'image_id': 1, 'split': 'train', 'category_id': 2, 'sentences': sent('small box')},
            {'ref_id': 4, 'ann_id': 13, 'image_id': 1, 'split': 'train', 'category_id': 2, 'sentences': sent('broken')},
            {'ref_id': 5, 'ann_id': 20, 'image_id': 2, 'split': 'testA', 'category_id': 1, 'sentences': sent('a box')},
            {'ref_id': 6, 'ann_id': 30, 'image_id': 3, 'split': 'train', 'category_id': 1, 'sentences': sent('gone')}]
    with open(src / 'refs(unc).p', 'wb') as f:
        pickle.dump(refs, f, protocol=2)                                         # as the Python 2 originals
    out = str(tmp_path / 'w')
    refcoco.prepare(src=str(src), coco_images=str(imgs), data_dir=out, vocab_size=64)
    m = check_world(out)
    assert list(m['splits']) == ['train', 'testA'] and m['skipped'] == {'train': 2, 'testA': 0}
    (rec,), convs = world(out, 'train')
    assert rec['image'] == p1 and [o['ann_id'] for o in rec['objects']] == [10, 11, 12]
    assert rec['concepts'] == ['person', 'ball', 'ball']
    imap = np.asarray(Image.open(os.path.join(out, rec['instances'])))
    assert imap.shape == (H, W)
    expect = {10: (rect | tri) & ~square, 11: disk, 12: square}                  # the smaller object shows
    got = {c['ann_id']: imap == c['mask_id'] for c in convs}                     # as train_setokim reads it
    assert got.keys() == expect.keys() and all((got[a] == expect[a]).all() for a in expect)
    assert (imap > 0).sum() == sum(e.sum() for e in expect.values())
    assert [(c['conversations'][0]['value'], c['conversations'][1]['value']) for c in convs[:2]] == [
        ('<image>\nSegment man left.', '[SEG]'), ('<image>\nSegment the person.', '[SEG]')]
    assert [c['expression'] for c in convs] == ['man left', 'the person', 'round ball', 'small box']
    assert rec['objects'][2]['bbox'] == [4, 5, 6, 7] and rec['objects'][2]['area'] == 9
    (rec2,), (c2,) = world(out, 'testA')
    assert rec2['image'] == p2 and ((np.asarray(Image.open(os.path.join(out, rec2['instances']))) == c2['mask_id']) == box).all()


def test_refcoco_refuses_a_pickle_that_runs_code(tmp_path, capsys):
    src = tmp_path / 'refcoco'
    src.mkdir()
    (src / 'instances.json').write_text(json.dumps({'images': [], 'annotations': []}))
    with open(src / 'refs(unc).p', 'wb') as f:
        pickle.dump([{'ref_id': 1, 'sentences': os.system}], f)                  # would import os.system
    with pytest.raises(SystemExit) as e:
        refcoco.prepare(src=str(src), coco_images=str(tmp_path), data_dir=str(tmp_path / 'w'))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and 'not a refs pickle' in err and 'system' in err and len(err.splitlines()) == 1, err


# -----------------------------------------------------------------------------
# editing: InstructPix2Pix and MagicBrush

def test_instructpix2pix(tmp_path):
    root, seeds = tmp_path / 'clip-filtered-dataset', []
    for i in range(20):
        name, ss = f'{i:07d}', [100 + i, 200 + i] if i == 0 else [300 + i]
        for s in ss:
            save(root / name / f'{s}_0.jpg', (16, 16), (i, 0, 0))
            if (i, s) != (5, 305):                                               # one target never written
                save(root / name / f'{s}_1.jpg', (16, 16), (0, i, 0))
        (root / name / 'prompt.json').write_text(json.dumps({'input': f'photo {i}', 'edit': f'make it {i}',
                                                             'output': f'painting {i}'}))
        seeds.append([name, ss])
    (root / 'seeds.json').write_text(json.dumps(seeds))
    out = str(tmp_path / 'w')
    editing.prepare(src=str(root), data_dir=out, vocab_size=64, workers=1)
    m = check_world(out)
    assert m['source'] == 'instructpix2pix' and m['skipped'] == {'train': 1, 'val': 0, 'test': 0}
    assert {s: c['instruct'] for s, c in m['splits'].items()} == {'train': 18, 'val': 1, 'test': 1}   # 19 - 1 skipped
    recs, convs = world(out, 'train')
    by_path = {r['image']: r for r in recs}
    c = convs[0]
    assert c['image'] == str(root / '0000000' / '100_0.jpg') and c['target_image'] == str(root / '0000000' / '100_1.jpg')
    assert c['conversations'] == [{'from': 'human', 'value': '<image>\nmake it 0'}, {'from': 'gpt', 'value': '<image>'}]
    assert c['target_caption'] == 'painting 0' and by_path[c['target_image']]['caption'] == 'painting 0'
    assert by_path[c['image']]['caption'] == 'photo 0' and c['image_id'] == by_path[c['image']]['id']
    assert world(out, 'test')[1][0]['conversations'][0]['value'] == '<image>\nmake it 19'


def test_magicbrush(tmp_path):
    root = tmp_path / 'MagicBrush'
    for folder, sessions in (('train', {'31': 2, '7': 1}), ('dev', {'5': 1})):
        es = {}
        for sid, turns in sessions.items():
            d = root / folder / 'images' / sid
            save(d / f'{sid}-input.png', (12, 10))
            es[sid] = []
            for t in range(1, turns + 1):
                save(d / f'{sid}-output{t}.png', (12, 10), (0, 0, 40 * t))
                save(d / f'{sid}-mask{t}.png', (12, 10), (255, 255, 255))
                es[sid].append({'input': f'{sid}-input.png' if t == 1 else f'{sid}-output{t - 1}.png',
                                'mask': f'{sid}-mask{t}.png', 'output': f'{sid}-output{t}.png',
                                'instruction': f'edit {sid} turn {t}'})
        (root / folder / 'edit_sessions.json').write_text(json.dumps(es))
    out = str(tmp_path / 'w')
    editing.prepare(src=str(root), data_dir=out, vocab_size=64, workers=1)
    m = check_world(out)
    assert m['source'] == 'magicbrush' and {s: (c['images'], c['instruct']) for s, c in m['splits'].items()} == {
        'train': (5, 3), 'val': (2, 1)}
    recs, convs = world(out, 'train')
    img = lambda sid, f: str(root / 'train' / 'images' / sid / f)               # noqa: E731
    assert [(c['image'], c['target_image'], c['turn'], c['edit_mask']) for c in convs] == [
        (img('7', '7-input.png'), img('7', '7-output1.png'), 1, img('7', '7-mask1.png')),
        (img('31', '31-input.png'), img('31', '31-output1.png'), 1, img('31', '31-mask1.png')),
        (img('31', '31-output1.png'), img('31', '31-output2.png'), 2, img('31', '31-mask2.png'))]
    # a conversation follows the record of its source image
    order = [r['image'] for r in recs]
    assert order.index(convs[2]['image']) > order.index(convs[1]['image'])
    r = run_script('data/editing/prepare.py', f'src={tmp_path / "nothing"}', f'data_dir={tmp_path / "w2"}', check=False)
    assert r.returncode == 2 and r.stderr.strip().startswith('error: editing dataset folder') \
        and len(r.stderr.strip().splitlines()) == 1, r.stderr
