"""
SETOKIM's data (train_setokim.py): SeTok's tokens of every image, cached once; a world's
conversations tokenised once into Packed arrays (setokim.pack); and, for converted real worlds
(data_dirs), conversations streamed with their images, tokenised by SeTok inside the training step.

    cache, path = token_cache(setok, setok_path, overrides, world_dir, dev, ctx, master, ddp, batch_size)
    train = conversations(world_dir, 'train', tok, cache['train'], vis_id)    # {'P', 'convs', 'task', ...}
    bank = make_bank(cache['train'])                                          # setokim.Bank: rows of tokens

SeTok is frozen while SETOKIM trains, so in a world that fits in memory each image's tokens, their
count and the patch labels are computed once, up front, and stored next to the SeTok checkpoint:
setokim_cache/<ckpt name>-<tokenizer>-<hash>.pt (the hash covers the checkpoint's bytes, the tokenizer
setting and the world's settings, so a retrained SeTok or another world never reads a stale cache).
"""
import hashlib
import itertools
import json
import os
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import die
from data.loader import (ImageError, WorldDataset, _load_with_map, line_tasks, load_image, load_instruct, load_png,
                         load_split)
from setokim import Bank, TextTokenizer, encode_conversation, pack, reading_order

TASKS = ('caption', 'vqa', 'refer', 't2i', 'edit')
KINDS = ('count', 'attribute', 'existence', 'relation')   # the VQA question kinds
STREAM_TASKS = TASKS + ('chat',)  # data_dirs may also hold LLaVA's multi-turn chats (a loss on every gpt turn)
CACHE_VERSION = 1                 # bump when what the cache holds changes

# -----------------------------------------------------------------------------
# SeTok's tokens of every image, once

def cache_file(setok_path, overrides, world_dir):
    h = hashlib.sha1()
    with open(setok_path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    with open(os.path.join(world_dir, 'meta.json')) as f:
        world = json.load(f)['settings']
    h.update(json.dumps({'overrides': overrides, 'world': world, 'version': CACHE_VERSION}, sort_keys=True).encode())
    name = os.path.splitext(os.path.basename(setok_path))[0]
    tag = overrides['tokenizer'] + (str(overrides['grid_size']) if 'grid_size' in overrides else '')
    return os.path.join(os.path.dirname(setok_path), 'setokim_cache', f"{name}-{tag}-{h.hexdigest()[:12]}.pt")


@torch.no_grad()
def setok_rows(setok, img, ctx):
    """SeTok on images (b, 3, H, W) in [0, 1] -> on the CPU: their real tokens in reading order, image
    after image (sum of counts, D) float, the token count of each (b,), patch labels (b, N) int16."""
    with ctx:
        t, m, lab = setok(img)                                              # (b,K,D), (b,K), (b,N)
    t, m, lab = reading_order(t.float(), m, lab, setok.grid)
    return t[m].cpu(), m.sum(1).cpu(), lab.short().cpu()


@torch.no_grad()
def build_split_cache(setok, world_dir, split, dev, ctx, batch_size=256):
    """SeTok on every image of a split (sources, then their edit targets), in reading order."""
    data = load_split(world_dir, split)
    recs = data['records']
    edits = np.stack([load_png(world_dir, f"edits/{split}/{r['id']}.png", 'RGB')
                      for r in tqdm(recs, desc=f'load {split} edits', leave=False, mininterval=0.5)])
    images = np.concatenate([data['images'], edits])                        # (2n, H, W, 3) uint8
    toks, ntok, labels = [], [], []
    for i in tqdm(range(0, len(images), batch_size), desc=f'SeTok tokens ({split})', dynamic_ncols=True):
        img = torch.from_numpy(images[i:i + batch_size]).to(dev).permute(0, 3, 1, 2).float() / 255
        t, n, lab = setok_rows(setok, img, ctx)
        toks.append(t.half())                                               # (sum of real tokens, D)
        ntok.append(n)
        labels.append(lab)
    ntok = torch.cat(ntok)
    out = {'tokens': torch.cat(toks), 'off': ntok.cumsum(0) - ntok, 'ntok': ntok, 'labels': torch.cat(labels),
           'instances': torch.from_numpy(data['instances']),
           'paths': [r['image'] for r in recs] + [f"edits/{split}/{r['id']}.png" for r in recs]}
    if split == 'test':
        out['images'] = torch.from_numpy(images)                            # eval's ground truth
    return out


def token_cache(setok, setok_path, overrides, world_dir, dev, ctx, master, ddp, batch_size=256):
    path = cache_file(setok_path, overrides, world_dir)
    if master and not os.path.isfile(path):
        t0 = time.time()
        cache = {split: build_split_cache(setok, world_dir, split, dev, ctx, batch_size) for split in ('train', 'test')}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f'{path}.{os.getpid()}.tmp'
        torch.save(cache, tmp)
        os.replace(tmp, path)                                               # atomic
        prefix = os.path.basename(path).rsplit('-', 1)[0] + '-'
        for f in os.listdir(os.path.dirname(path)):                         # older caches of this name+tokenizer
            if f.startswith(prefix) and f.endswith('.pt') and f != os.path.basename(path):
                os.remove(os.path.join(os.path.dirname(path), f))
        print(f"SeTok tokens of {sum(len(c['ntok']) for c in cache.values())} images in {time.time() - t0:.0f}s -> {path}")
    if ddp:
        torch.distributed.barrier()
    return torch.load(path, weights_only=False), path


def conversations(world_dir, split, tok, cache, vis_id):
    """A split's conversations, tokenised once: Packed arrays + the per-conversation fields eval needs."""
    convs = load_instruct(world_dir, split)
    where = {p: i for i, p in enumerate(cache['paths'])}
    off, ntok = cache['off'].tolist(), cache['ntok'].tolist()
    enc, img, target, mask_id = [], [], [], []
    for c in convs:                                    # string work, once per run (not per step)
        src, tgt = where.get(c.get('image')), where.get(c.get('target_image'))
        if (c.get('image') and src is None) or (c.get('target_image') and tgt is None):
            die(f"{split} conversation {c['id']} names an image that is not in the world; prepare the world again")
        ref = lambda is_out, s=src, t=tgt: (off[t], ntok[t]) if is_out else (off[s], ntok[s])
        enc.append(encode_conversation(tok, c['conversations'], ref, vis_id))
        img.append(-1 if src is None else src)
        target.append(-1 if tgt is None else tgt)
        mask_id.append(c.get('mask_id', 0))
    P = pack(enc, img, mask_id, tok.seg)
    return {'P': P, 'convs': convs, 'target': torch.tensor(target),
            'task': torch.tensor([TASKS.index(c['task']) for c in convs]),
            'kind': torch.tensor([KINDS.index(c['kind']) if c['task'] == 'vqa' else -1 for c in convs])}


def answer_prior(train_convs, convs):
    """The text-only baseline of VQA: for each conversation of `convs`, the answer given most often in
    train to the same question text (else to its kind's questions), never looking at the image;
    None for conversations that are not VQA. Eval reports its accuracy next to the model's, so that
    what a model reads from the image shows as the difference (existence and relation are yes / no)."""
    question = lambda c: c['conversations'][0]['value']
    by_q, by_kind = {}, {}
    for c in train_convs:
        if c['task'] == 'vqa':
            by_q.setdefault(question(c), Counter())[c['answer']] += 1
            by_kind.setdefault(c['kind'], Counter())[c['answer']] += 1
    return [(by_q.get(question(c)) or by_kind.get(c['kind']) or Counter({'': 1})).most_common(1)[0][0]
            if c['task'] == 'vqa' else None for c in convs]


def parse_repeat(items):
    """train_setokim's task_repeat (['vqa:2', 'refer:2'], or 'vqa:2,refer:2') -> {'vqa': 2, 'refer': 2}."""
    from data.loader import as_list
    out = {}
    for it in as_list(items):
        task, _, n = it.partition(':')
        if task not in TASKS or not n.isdigit() or int(n) < 1:
            die(f"task_repeat: '{it}' is not task:n with a task of {', '.join(TASKS)} and n >= 1 (e.g. vqa:2)")
        out[task] = int(n)
    return out


def stage_rows(task, tasks, repeat=None):
    """The training conversations of one epoch of a stage: those whose task (task: (n,) index into
    TASKS) is one of `tasks`, each repeat.get(its task, 1) times. -> (rows,) long, sorted."""
    rows = torch.isin(task, torch.tensor([TASKS.index(t) for t in tasks])).nonzero()[:, 0]
    times = torch.tensor([(repeat or {}).get(t, 1) for t in TASKS])
    return rows.repeat_interleave(times[task[rows]])


def make_bank(c):
    return Bank(tokens=c['tokens'], off=c['off'], ntok=c['ntok'], labels=c['labels'], instances=c['instances'])


# -----------------------------------------------------------------------------
# data_dirs: conversations streamed, their images tokenised by SeTok inside the training step
#
# A worker reads a conversation, tokenises its text with ONE visual slot per image (SeTok's token
# count of the image is not known yet: ref 0 marks the input image, ref 1 the image the model writes)
# and decodes its images. The training step runs SeTok on all the batch's images at once, and
# widen() repeats each slot as many times as its image has tokens; from there on the batch is the
# token cache's: pack() and collate() over a Bank of this batch's images.

class Conversations(WorldDataset):
    """One split of one or more worlds, one conversation ({split}_instruct.jsonl) per item, only
    those of `tasks` (the lines of other tasks are left out of the index; `unknown` counts the lines
    whose task this script does not know). An item: 'enc' (encode_conversation's lists, one slot per
    image), 'source' / 'target' uint8 (3, S, S) when the conversation has them, and for 'refer' the
    source's 'instances' (S, S). A conversation whose image is unreadable is replaced by the next."""

    def __init__(self, dirs, split, image_size, tasks, text_model, vis_id):
        super().__init__(dirs, split, image_size, suffix='_instruct')
        self.text_model, self.vis_id, self.tok, self.unknown = text_model, vis_id, None, Counter()
        for w, path in enumerate(self.paths):
            names = line_tasks(path, self.lines[w][0])                       # (n,) str, no JSON parsing
            self.unknown.update(names[~np.isin(names, STREAM_TASKS)].tolist())
            keep = np.isin(names, tasks)
            self.lines[w] = (self.lines[w][0][keep], self.lines[w][1][keep])
        self.sizes = [len(starts) for starts, _ in self.lines]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __getstate__(self):                          # workers started by spawn load the tokenizer themselves
        return {**super().__getstate__(), 'tok': None}

    def _load(self, w, k):
        where = f"{self.paths[w]} (the conversation at byte {int(self.lines[w][0][k])})"
        try:
            rec = json.loads(self._line(w, k))
            self.tok = self.tok or TextTokenizer(self.text_model)
            enc = encode_conversation(self.tok, rec['conversations'], lambda is_out: (int(is_out), 1), self.vis_id)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ImageError(f"{where} is not a conversation record ({type(e).__name__})") from None
        item = {'enc': enc}
        for slot, key, name in ((0, 'image', 'source'), (1, 'target_image', 'target')):
            if slot not in enc[1]:
                continue
            if not rec.get(key):
                raise ImageError(f"{where} shows an image but names no {key}")
            path = os.path.join(self.dirs[w], rec[key])
            if name == 'source' and rec['task'] == 'refer':
                if not rec.get('instances'):
                    raise ImageError(f"{where} is a refer conversation without 'instances'")
                item['source'], item['instances'] = _load_with_map(path, os.path.join(self.dirs[w], rec['instances']),
                                                                   self.image_size)
            else:
                item[name] = load_image(path, self.image_size)
        item['mask_id'] = int(rec.get('mask_id', 0))
        return rec, item


def collate_conversations(samples):
    """Conversations items -> one batch: the encodings end to end (ids, ref, ans, out (L,); length (B,)),
    the images stacked, sources then targets (images (M, 3, S, S) uint8; src, tgt (B,): each
    conversation's row, -1 for none), the sources' instance maps (n_src, S, S) (zeros but for refer),
    mask_id (B,). Runs in the workers."""
    for s in samples:
        if 'fatal' in s:
            return {'fatal': s['fatal']}
    enc = [s['enc'] for s in samples]
    flat = lambda j, dt: torch.from_numpy(np.fromiter(itertools.chain.from_iterable(e[j] for e in enc), dt))
    has = {k: [i for i, s in enumerate(samples) if k in s] for k in ('source', 'target')}
    rows = {k: torch.full((len(samples),), -1, dtype=torch.long) for k in has}
    rows['source'][has['source']] = torch.arange(len(has['source']))
    rows['target'][has['target']] = len(has['source']) + torch.arange(len(has['target']))
    images = [samples[i][k] for k in has for i in has[k]]
    S = images[0].shape[-1] if images else 1
    return {'ids': flat(0, np.int64), 'ref': flat(1, np.int64), 'ans': flat(2, np.bool_), 'out': flat(3, np.bool_),
            'length': torch.tensor([len(e[0]) for e in enc]), 'src': rows['source'], 'tgt': rows['target'],
            'images': torch.stack(images) if images else torch.zeros(0, 3, S, S, dtype=torch.uint8),
            'instances': torch.stack([samples[i].get('instances', torch.zeros(S, S, dtype=torch.uint8))
                                      for i in has['source']]) if has['source'] else torch.zeros(0, S, S, dtype=torch.uint8),
            'mask_id': torch.tensor([s['mask_id'] for s in samples]), 'index': torch.tensor([s['index'] for s in samples]),
            'skipped': [r for s in samples for r in s['skipped']]}


def widen(b, ntok, off, seg_id, max_len):
    """One slot per image -> each image's ntok slots, vectorised: position t of the batch is repeated
    n_t times (n_t = its image's token count at a visual slot, else 1), and the k-th copy of a slot
    refers to row off + k of the batch's Bank. Conversations longer than max_len are cut there.
    Returns (Packed, number cut)."""
    L, B = b['length'], len(b['length'])
    conv = torch.arange(B).repeat_interleave(L)                             # (T,) owner of each position
    img = torch.where(b['ref'] == 0, b['src'][conv], b['tgt'][conv])
    img = torch.where(b['ref'] >= 0, img, -1)                               # (T,) Bank image of a slot, -1 text
    n = F.pad(ntok, (0, 1), value=1)[img]                                   # (T,) copies; img -1 reads the pad
    pos = torch.arange(int(n.sum()))                                        # (T',) widened positions
    first = (n.cumsum(0) - n).repeat_interleave(n)                          # (T',) start of its run
    img_w = img.repeat_interleave(n)
    ref = torch.where(img_w >= 0, F.pad(off, (0, 1))[img_w] + pos - first, -1)
    conv_w = conv.repeat_interleave(n)
    length = torch.zeros(B, dtype=torch.long).index_add_(0, conv, n)        # (B,) widened lengths
    keep = pos - (length.cumsum(0) - length)[conv_w] < max_len              # (T',) within max_len
    cols = [x[keep].numpy() for x in (b['ids'].repeat_interleave(n), ref, b['ans'].repeat_interleave(n),
                                      b['out'].repeat_interleave(n))]
    cut = length.clamp(max=max_len)
    bounds = cut.cumsum(0)[:-1].numpy()
    enc = list(zip(*(np.split(c, bounds) for c in cols)))                   # per conversation, for pack()
    return pack(enc, b['src'], b['mask_id'], seg_id), int((length > max_len).sum())
