"""
From converted real data to training runs: tiny fixtures in the layouts the datasets are distributed
in (a CC3M-style TSV, a LLaVA json, a refer-toolkit folder, a MagicBrush folder; images of many sizes),
converted by data/captions, data/llava, data/refcoco and data/editing, then a few steps of
train_setok.py and train_setokim.py streaming them (data_dirs): the losses are finite, the streamed
batches are the token cache's layout, and a resumed run continues at the exact sample.
Run: python -m pytest tests/test_realdata.py -q
"""
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import run_script
from test_converters import save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SETOK = ['image_size=32', 'patch_size=4', 'dim=32', 'depth=1', 'n_head=4', 'token_dim=32', 'intra_depth=1',
              'inter_depth=1', 'max_tokens=6', 'cluster_threshold=0.5', 'dec_sprite_size=8', 'dec_dim=32',
              'text_dim=32', 'text_depth=1', 'eval_images=8', 'log_interval=1', 'warmup_iters=2',
              'learning_rate=3e-3', 'threads=1', 'batch_size=4', 'lr_decay_iters=6', 'eval_interval=3', 'num_workers=0']
TINY_LM = ['llm_n_layer=1', 'llm_n_head=2', 'llm_n_embd=32', 'block_size=96', 'mask_dim=16', 'mask_depth=1',
           'mask_n_head=2', 'eval_per_task=2', 'eval_batch_size=4', 'log_interval=1', 'llm_warmup_iters=1',
           'threads=1', 'llm_learning_rate=3e-3', 'llm_batch_size=4', 'cache_batch_size=8', 'stage1_max_iters=2',
           'llm_lr_decay_iters=4', 'llm_eval_interval=2', 'num_workers=0']
COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (160, 60, 200), (250, 250, 250)]
SIZES = [(40, 30), (48, 64), (33, 33), (64, 40), (30, 52), (45, 36)]


def picture(path, i):
    """A coloured box on a coloured background, of size SIZES[i % 6]; returns its absolute path."""
    w, h = SIZES[i % len(SIZES)]
    im = Image.new('RGB', (w, h), COLOURS[(i + 3) % len(COLOURS)])
    ImageDraw.Draw(im).rectangle([w // 4, h // 4, w // 2 + i % 3 * 4, h // 2 + i % 4 * 3], fill=COLOURS[i % len(COLOURS)])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path)
    return os.path.abspath(path)


@pytest.fixture(scope='module')
def worlds(tmp_path_factory):
    """Four converted worlds: captions (train 12 / val 4), LLaVA chats (train, one line of a task no
    script knows added by hand), RefCOCO (train / val) and MagicBrush edits (train / val)."""
    from data.captions import prepare as captions
    from data.editing import prepare as editing
    from data.llava import prepare as llava
    from data.refcoco import prepare as refcoco
    tmp = tmp_path_factory.mktemp('real')
    names = ['red', 'green', 'blue', 'yellow', 'purple', 'white']
    cap = lambda i: f"a {names[i % 6]} box on a {names[(i + 3) % 6]} background"   # noqa: E731
    for i in range(16):
        picture(str(tmp / 'cc' / f'{i}.jpg'), i)
    (tmp / 'cc' / 'train.tsv').write_text(''.join(f'{cap(i)}\t{i}.jpg\n' for i in range(12)))
    (tmp / 'cc' / 'val.tsv').write_text(''.join(f'{cap(i)}\t{i}.jpg\n' for i in range(12, 16)))
    out = {'captions': str(tmp / 'w_captions')}
    captions.prepare(train=str(tmp / 'cc' / 'train.tsv'), val=str(tmp / 'cc' / 'val.tsv'), data_dir=out['captions'],
                     vocab_size=120, workers=1)
    # LLaVA: multi-turn chats about the same pictures, one text-only
    chat = lambda i: [{'from': 'human', 'value': '<image>\nWhat colour is the box?'}, {'from': 'gpt', 'value': names[i % 6]},  # noqa: E731
                      {'from': 'human', 'value': 'And the background?'}, {'from': 'gpt', 'value': names[(i + 3) % 6]}]
    entries = [{'id': f'l{i}', 'image': f'{i}.jpg', 'conversations': chat(i)} for i in range(8)]
    entries.append({'id': 'text', 'conversations': [{'from': 'human', 'value': 'Say red.'}, {'from': 'gpt', 'value': 'red'}]})
    (tmp / 'llava.json').write_text(json.dumps(entries))
    out['llava'] = str(tmp / 'w_llava')
    llava.prepare(train=str(tmp / 'llava.json'), images=str(tmp / 'cc'), data_dir=out['llava'], vocab_size=64, workers=1)
    with open(os.path.join(out['llava'], 'train_instruct.jsonl'), 'a') as f:   # a task from a newer converter
        f.write(json.dumps({'id': 'x', 'task': 'ocr', 'image': None, 'conversations': entries[-1]['conversations']}) + '\n')
    # RefCOCO: two boxes per picture, referred to by colour
    src, anns, images, refs = tmp / 'refer' / 'refcoco', [], [], []
    src.mkdir(parents=True)
    (tmp / 'coco').mkdir()
    for i in range(6):
        w, h = SIZES[i]
        im = Image.new('RGB', (w, h), (90, 90, 90))
        d = ImageDraw.Draw(im)
        boxes = [(2, 2, w // 2 - 1, h // 2 - 1), (w // 2 + 1, h // 2 + 1, w - 3, h - 3)]
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=COLOURS[(i + k) % 6])
            anns.append({'id': 10 * i + k, 'image_id': i, 'category_id': k + 1,
                         'segmentation': [[x0, y0, x1, y0, x1, y1, x0, y1]]})
            refs.append({'ref_id': 10 * i + k, 'ann_id': 10 * i + k, 'image_id': i, 'category_id': k + 1,
                         'split': 'val' if i == 5 else 'train',
                         'sentences': [{'sent': f'the {names[(i + k) % 6]} box', 'raw': '', 'tokens': [], 'sent_id': 0}]})
        im.save(tmp / 'coco' / f'COCO_train2014_{i}.jpg')
        images.append({'id': i, 'file_name': f'COCO_train2014_{i}.jpg', 'width': w, 'height': h})
    (src / 'instances.json').write_text(json.dumps({'images': images, 'annotations': anns, 'categories': [
        {'id': 1, 'name': 'box'}, {'id': 2, 'name': 'crate'}]}))
    with open(src / 'refs(unc).p', 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    out['refcoco'] = str(tmp / 'w_refcoco')
    refcoco.prepare(src=str(src), coco_images=str(tmp / 'coco'), data_dir=out['refcoco'], vocab_size=64)
    # MagicBrush: one-turn and two-turn edit sessions
    mb = tmp / 'MagicBrush'
    for folder, sessions in (('train', {'1': 2, '2': 1}), ('dev', {'3': 1})):
        es = {}
        for sid, turns in sessions.items():
            d = mb / folder / 'images' / sid
            picture(str(d / f'{sid}-input.png'), int(sid))
            es[sid] = []
            for t in range(1, turns + 1):
                picture(str(d / f'{sid}-output{t}.png'), int(sid) + t)
                save(d / f'{sid}-mask{t}.png', SIZES[int(sid) % 6], (255, 255, 255))
                es[sid].append({'input': f'{sid}-input.png' if t == 1 else f'{sid}-output{t - 1}.png',
                                'mask': f'{sid}-mask{t}.png', 'output': f'{sid}-output{t}.png',
                                'instruction': f'make the box {names[(int(sid) + t) % 6]}'})
        (mb / folder / 'edit_sessions.json').write_text(json.dumps(es))
    out['editing'] = str(tmp / 'w_editing')
    editing.prepare(src=str(mb), data_dir=out['editing'], vocab_size=64, workers=1)
    return out


# -----------------------------------------------------------------------------
# train_setok.py

def losses(log_path, key='loss'):
    """The `key` of every train record of a run's log.jsonl."""
    with open(log_path) as f:
        return [r[key] for r in map(json.loads, f) if r['kind'] == 'train']


def setok_run(worlds, out, *args, check=True):
    dirs = ','.join(worlds[k] for k in ('captions', 'refcoco'))
    return run_script('train_setok.py', *TINY_SETOK, f'data_dirs={dirs}', f'out_dir={out}', *args, check=check)


def params(path):
    return torch.load(path, weights_only=False)['model']


@pytest.fixture(scope='module')
def setok_ckpt(worlds, tmp_path_factory):
    """6 steps of SeTok on captions + RefCOCO, streamed (one worker), in one go."""
    out = tmp_path_factory.mktemp('setok')
    r = setok_run(worlds, out, 'max_iters=6', 'num_workers=1', 'data_weights=0.5,0.5')
    ls = losses(os.path.join(out, 'log.jsonl'))
    assert len(ls) >= 6 and all(np.isfinite(ls)) and ls[-1] < ls[0], ls                # a postfix per step (or two)
    assert '17 train images in 2 streamed world(s)' in r.stdout, r.stdout       # 12 captions + 5 RefCOCO
    assert 'eval: 5 val images of 2 world(s), without instance maps' in r.stdout   # the caption images have none
    assert 'FG-ARI, mBO, Spearman and retrieval skipped' in r.stdout
    return out


def test_setok_streamed_resume_is_bit_identical(worlds, setok_ckpt, tmp_path):
    run = lambda *a: setok_run(worlds, tmp_path, 'data_weights=0.5,0.5', *a)   # noqa: E731
    run('max_iters=3')
    ck = torch.load(tmp_path / 'ckpt.pt', weights_only=False)
    assert ck['data']['pos'] == 12 and ck['tokenizer_model'] == os.path.join(worlds['captions'], 'tokenizer.model')
    run('max_iters=6', 'init_from=resume')
    a, b = params(setok_ckpt / 'ckpt.pt'), params(tmp_path / 'ckpt.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint remembers its data: resuming it on the shapes world is a one-line error
    r = run_script('train_setok.py', *TINY_SETOK, f'out_dir={tmp_path}', 'max_iters=7', 'init_from=resume', check=False)
    assert r.returncode == 2 and 'streamed worlds' in r.stderr and r.stderr.count('\n') == 1, r.stderr


def test_setok_eval_with_instance_maps(worlds, setok_ckpt):
    """RefCOCO's val images have instance maps and objects: the full metrics, retrieval by category."""
    r = run_script('train_setok.py', *TINY_SETOK, f"data_dirs={worlds['refcoco']}", f'out_dir={setok_ckpt}',
                   'eval_only=True')
    assert 'FG-ARI' in r.stdout and 'retrieval' in r.stdout, r.stdout


# -----------------------------------------------------------------------------
# train_setokim.py

def test_widen_gives_the_token_cache_layout(worlds):
    """A streamed batch, its slots widened once SeTok's counts are known, packs exactly as the same
    conversations encoded with their real counts up front (the token cache's way)."""
    from data.conversations import collate_conversations, widen
    from data.batch import encode_conversation, pack
    from data.text import TextTokenizer
    tok = TextTokenizer(os.path.join(worlds['captions'], 'tokenizer.model'))
    turns = [[{'from': 'human', 'value': '<image>\nWhat colour?'}, {'from': 'gpt', 'value': 'red'},
              {'from': 'human', 'value': 'More?'}, {'from': 'gpt', 'value': 'a red box on a blue background'}],
             [{'from': 'human', 'value': 'Generate an image: a box'}, {'from': 'gpt', 'value': '<image>'}],
             [{'from': 'human', 'value': 'hello'}, {'from': 'gpt', 'value': 'red'}],
             [{'from': 'human', 'value': '<image>\nmake it blue'}, {'from': 'gpt', 'value': '<image>'}],
             [{'from': 'human', 'value': '<image>\nSegment the red box.'}, {'from': 'gpt', 'value': '[SEG]'}]]
    src, tgt = torch.tensor([0, -1, -1, 1, 2]), torch.tensor([-1, 3, -1, 4, -1])   # Bank rows of the images
    ntok, vis = torch.tensor([3, 1, 5, 2, 4]), tok.vocab_size
    off = ntok.cumsum(0) - ntok
    items = [{'enc': encode_conversation(tok, t, lambda out: (int(out), 1), vis), 'mask_id': 2 * (i == 4),
              'index': i, 'skipped': []} for i, t in enumerate(turns)]
    S = torch.zeros(3, 8, 8, dtype=torch.uint8)
    for i, s in enumerate(src.tolist()):
        if s >= 0:
            items[i]['source'] = S
    for i, t in enumerate(tgt.tolist()):
        if t >= 0:
            items[i]['target'] = S
    b = collate_conversations(items)
    assert b['src'].tolist() == src.tolist() and b['tgt'].tolist() == tgt.tolist() and b['images'].shape == (5, 3, 8, 8)
    want = pack([encode_conversation(tok, t, lambda out, i=i: (off[tgt[i] if out else src[i]].item(),
                                                               ntok[tgt[i] if out else src[i]].item()), vis)
                 for i, t in enumerate(turns)], src, b['mask_id'], tok.seg)
    got, cut = widen(b, ntok, off, tok.seg, 1000)
    assert cut == 0
    for k in want.__dataclass_fields__:
        assert torch.equal(getattr(got, k), getattr(want, k)), k
    assert got.n_reg.tolist() == [0, 2, 0, 4, 0] and got.has_seg.tolist() == [False] * 4 + [True]   # targets' counts
    # cut at max_len: every conversation keeps its first max_len positions
    short, cut = widen(b, ntok, off, tok.seg, 12)
    assert cut == int((want.length > 12).sum()) > 0 and torch.equal(short.length, want.length.clamp(max=12))
    assert torch.equal(short.ids[:12], want.ids[:12])


def setokim_run(worlds, setok_dir, name, *args, check=True):
    dirs = ','.join(worlds[k] for k in ('captions', 'llava', 'refcoco', 'editing'))
    return run_script('train_setokim.py', *TINY_LM, f'data_dirs={dirs}', f'out_dir={setok_dir}', f'run_name={name}',
                      *args, check=check)


def test_setokim_streams_every_task_and_resumes_exactly(worlds, setok_ckpt):
    r = setokim_run(worlds, setok_ckpt, 'straight', 'stage2_max_iters=4', 'num_workers=1')
    assert 'skipped 1 train conversations of tasks this script does not know: ocr 1' in r.stderr, r.stderr
    assert 'SeTok tokens made on the fly' in r.stdout and 'setokim_cache' not in r.stdout
    for s in (1, 2):                                                             # 2 + 4 logged steps, finite
        assert f'stage {s} step {2 * s}' in r.stdout + r.stderr
    ce = losses(os.path.join(setok_ckpt, 'straight', 'log.jsonl'), 'ce')
    assert len(ce) >= 6 and all(np.isfinite(ce)) and ce[-1] < ce[0], ce
    ev = json.load(open(os.path.join(setok_ckpt, 'straight', 'eval.json')))
    assert ev['stage'] == 2 and ev['split'] == 'val' and np.isfinite(ev['test_ce']) and np.isfinite(ev['test_reg'])
    assert 'test_mask' in ev                                                     # RefCOCO's val refer conversations
    straight = params(os.path.join(setok_ckpt, 'straight', 'stage2.pt'))
    setokim_run(worlds, setok_ckpt, 'split', 'stage2_max_iters=2')
    setokim_run(worlds, setok_ckpt, 'split', 'stage2_max_iters=4', 'init_from=resume')
    split = params(os.path.join(setok_ckpt, 'split', 'stage2.pt'))
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    ck = torch.load(os.path.join(setok_ckpt, 'split', 'stage2.pt'), weights_only=False)
    assert ck['data']['pos'] == 16 and ck['token_cache'] is None


def test_setokim_stage1_needs_caption_data(worlds, setok_ckpt):
    r = run_script('train_setokim.py', *TINY_LM, f"data_dirs={worlds['llava']}", f'out_dir={setok_ckpt}',
                   'run_name=chat_only', 'stage=1', 'num_workers=0', check=False)
    last = r.stderr.strip().splitlines()[-1]                                     # after the warning about 'ocr'
    assert r.returncode == 2 and last.startswith('error: stage 1') and 'add a world' in last, r.stderr
    assert 'Traceback' not in r.stderr
