"""
SETOKIM's data (train_setokim.py): SeTok's tokens of every image, cached once; a world's
conversations tokenised once into Packed arrays (data.batch.pack); and, for converted real worlds
(data_dirs), conversations streamed with their images, tokenised by SeTok inside the training step.
Nothing here imports a model: the caller hands in `tokenize` (images -> SeTok's tokens in reading
order, setokim.setok_tokens with the frozen SeTok bound to it).

    cache, path = token_cache(tokenize, setok_path, setok_hash, overrides, world_dir, dev, master, ddp, batch_size)
    train = conversations(world_dir, 'train', tok, cache['train'], vis_id)    # {'P', 'convs', 'task', ...}
    bank = make_bank(cache['train'])                                          # data.batch.Bank: rows of tokens

SeTok is frozen while SETOKIM trains, so in a world that fits in memory each image's tokens, their
count and the patch labels are computed once, up front, and stored next to the SeTok checkpoint:
setokim_cache/<ckpt name>-<tokenizer>-<hash>.pt (the hash covers the checkpoint's bytes, the tokenizer
setting and the world's settings, so a retrained SeTok or another world never reads a stale cache).
"""
import itertools
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import as_list, atomic_save, die, sweep_tmp
from data.batch import Bank, collate, encode_conversation, loss_counts, pack
from data.order import DataOrder
from data.stream import StreamingLoader, WorldDataset, line_tasks
from data.text import TextTokenizer
from data.shapes.prepare import mean_background
from data.world import (ImageError, load_image, load_image_with_map, load_instruct, load_png, load_split, read_jsonl,
                        world_settings)

TASKS = ('caption', 'vqa', 'refer', 't2i', 'edit')
KINDS = ('count', 'attribute', 'existence', 'relation')   # the VQA question kinds
STREAM_TASKS = TASKS + ('chat',)  # data_dirs may also hold LLaVA's multi-turn chats (a loss on every gpt turn)
CACHE_VERSION = 2                 # bump when what the cache holds changes

# -----------------------------------------------------------------------------
# SeTok's tokens of every image, once

def cache_file(setok_path, setok_hash, overrides, world_dir):
    """The cache's path. setok_hash: common.sha1_file of the SeTok checkpoint (a copy is extended)."""
    h = setok_hash.copy()                              # the checkpoint's bytes, then the settings
    h.update(json.dumps({'overrides': overrides, 'world': world_settings(world_dir), 'version': CACHE_VERSION},
                        sort_keys=True).encode())
    name = os.path.splitext(os.path.basename(setok_path))[0]
    tag = overrides['tokenizer'] + (str(overrides['grid_size']) if 'grid_size' in overrides else '')
    return os.path.join(os.path.dirname(setok_path), 'setokim_cache', f"{name}-{tag}-{h.hexdigest()[:12]}.pt")


@torch.no_grad()
def build_split_cache(tokenize, world_dir, split, dev, batch_size=256):
    """tokenize (SeTok) on every image of a split (sources, then their edit targets)."""
    data = load_split(world_dir, split)
    recs = data['records']
    edits = np.stack([load_png(world_dir, f"edits/{split}/{r['id']}.png", 'RGB')
                      for r in tqdm(recs, desc=f'load {split} edits', leave=False, mininterval=0.5)])
    images = np.concatenate([data['images'], edits])                        # (2n, H, W, 3) uint8
    toks, ntok, labels = [], [], []
    for i in tqdm(range(0, len(images), batch_size), desc=f'SeTok tokens ({split})', dynamic_ncols=True):
        img = torch.from_numpy(images[i:i + batch_size]).to(dev).permute(0, 3, 1, 2).float() / 255
        t, n, lab = tokenize(img)
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


def token_cache(tokenize, setok_path, setok_hash, overrides, world_dir, dev, master, ddp, batch_size=256):
    """The token cache of a world (built by rank 0 when missing, the others wait) and its path."""
    path = cache_file(setok_path, setok_hash, overrides, world_dir)
    if master:
        sweep_tmp(os.path.dirname(path))                                    # cache builds that a kill interrupted
    if master and not os.path.isfile(path):
        t0 = time.time()
        cache = {split: build_split_cache(tokenize, world_dir, split, dev, batch_size) for split in ('train', 'test')}
        atomic_save(cache, path)
        prefix = os.path.basename(path).rsplit('-', 1)[0] + '-'
        for f in os.listdir(os.path.dirname(path)):                         # older caches of this name+tokenizer
            if f.startswith(prefix) and f.endswith('.pt') and f != os.path.basename(path):
                os.remove(os.path.join(os.path.dirname(path), f))
        print(f"SeTok tokens of {sum(len(c['ntok']) for c in cache.values())} images in {time.time() - t0:.0f}s -> {path}")
    if ddp:
        torch.distributed.barrier()
    try:
        return torch.load(path, weights_only=True), path                    # tensors and plain values only
    except Exception as e:
        die(f"the token cache {path} is unreadable ({type(e).__name__}); delete it and run again (it is rebuilt)")


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
    """train_setokim's task_repeat (['vqa:2', 'relation:3'], or 'vqa:2,relation:3') -> {'vqa': 2, 'relation': 3}.
    A key is a task (TASKS) or a kind of VQA question (KINDS)."""
    out = {}
    for it in as_list(items):
        task, _, n = it.partition(':')
        if task not in TASKS + KINDS or not n.isdigit() or int(n) < 1:
            die(f"task_repeat: '{it}' is not name:n with a task ({', '.join(TASKS)}) or a VQA kind ({', '.join(KINDS)}) "
                f"and n >= 1 (e.g. vqa:2 or relation:3)")
        out[task] = int(n)
    return out


def stage_rows(data, tasks, repeat=None):
    """The training conversations of one epoch of a stage: those of data (a split: its 'task' (n,) index
    into TASKS, 'kind' (n,) into KINDS, -1 for other tasks) whose task is one of `tasks`, each
    repeat[its task] * repeat[its VQA kind] times (1 where not given). -> (rows,) long, sorted."""
    task, kind, r = data['task'], data['kind'], repeat or {}
    rows = torch.isin(task, torch.tensor([TASKS.index(t) for t in tasks])).nonzero()[:, 0]
    times = torch.tensor([r.get(t, 1) for t in TASKS])[task[rows]]
    times = times * torch.tensor([r.get(k, 1) for k in KINDS] + [1])[kind[rows]]   # kind -1 reads the last 1
    return rows.repeat_interleave(times)


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
                item['source'], item['instances'] = load_image_with_map(path, os.path.join(self.dirs[w], rec['instances']),
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


# -----------------------------------------------------------------------------
# training batches of a stage, one object per data source; batches(step, dev) -> (micro-batches of this
# rank, loss counts). Each loss term is a mean over the GLOBAL batch (its sum on a micro-batch divided
# by the global count), so the loss is the same whatever the batch is split into. `local_counts` says
# whether the counts are this rank's own (the training script then sums them over ranks).

class CachedBatches:
    """In memory: the stage's conversations (rows of a split's Packed arrays) in data/order.py's
    order, so a step number alone says which conversations it sees (exact resume); rank r takes
    its slices of the global batch (DDP == 1 process). The counts are the global batch's."""
    local_counts = False

    def __init__(self, data, rows, batch_size, world, rank, accum, seed, tok, pack_rows):
        self.data, self.rows, self.tok, self.pack_rows = data, rows, tok, pack_rows
        self.B, self.world, self.rank, self.accum = batch_size, world, rank, accum
        self.order = DataOrder([len(rows)], seed=seed)

    def __call__(self, step, dev=None):                # dev: the streamed source tokenises there; unused here
        rows = self.rows[self.order.batch(step, self.B, self.world, self.accum)]         # (accum * world * B,)
        mine = rows.view(self.accum, self.world, self.B)[:, self.rank]                   # (accum, B)
        return ([collate(self.data['P'], self.data['bank'], r, self.tok, pack_rows=self.pack_rows) for r in mine],
                loss_counts(self.data['P'], rows))

    def state_dict(self):
        return None                                  # the step is the whole state


class StreamedBatches:
    """Streamed (data_dirs): each rank reads its shard of the stage's conversations; the loader's
    position (in the checkpoint) says which come next. SeTok (tokenize) runs on all of a micro-batch's
    images at once, widen() gives each visual slot its image's token count, and collate() pads it
    as for the token cache. The counts are this rank's; `cut` counts conversations cut at block_size."""
    local_counts = True

    def __init__(self, loader, tokenize, tok, token_dim, grid, block_size, accum, pack_rows):
        self.loader, self.tokenize, self.tok, self.pack_rows = loader, tokenize, tok, pack_rows
        self.token_dim, self.grid, self.block_size, self.accum = token_dim, grid, block_size, accum
        self.batches, self.cut = loader.batches() if loader is not None else None, 0   # None: eval only

    def to_batch(self, b, dev):
        """A streamed batch -> (the model's batch, its loss counts (n_ce, n_reg, n_seg, n_vis), conversations cut)."""
        toks, ntok, labels = (torch.zeros(0, self.token_dim), torch.zeros(0, dtype=torch.long),
                              torch.zeros(0, self.grid ** 2, dtype=torch.int16))   # a batch without images
        if len(b['images']):
            toks, ntok, labels = self.tokenize(b['images'].to(dev, non_blocking=True).float() / 255)
        bank = Bank(tokens=toks, off=ntok.cumsum(0) - ntok, ntok=ntok, labels=labels, instances=b['instances'])
        P, cut = widen(b, ntok, bank.off, self.tok.seg, self.block_size)
        rows = torch.arange(len(P.length))
        return collate(P, bank, rows, self.tok, pack_rows=self.pack_rows), loss_counts(P, rows), cut

    def __call__(self, step, dev='cpu'):
        got = [self.to_batch(next(self.batches), dev) for _ in range(self.accum)]
        self.cut += sum(c for _, _, c in got)
        return [b for b, _, _ in got], tuple(map(sum, zip(*(n for _, n, _ in got))))

    def state_dict(self):
        return self.loader.state_dict()


def conversation_loader(dirs, split, tasks, image_size, text_model, vis_id, batch_size, seed, rank=0, world=1,
                        weights=None, workers=0, pin_memory=False, warn=False):
    """A StreamingLoader over the conversations of `tasks` in `split` of `dirs` (this rank's shard); a
    world without any gets weight 0. None when there is none at all. warn: print one warning line for
    the conversations of tasks this code does not know."""
    ds = Conversations(dirs, split, image_size, tasks, text_model, vis_id)
    if ds.unknown and warn:
        print(f"warning: skipped {sum(ds.unknown.values())} {split} conversations of tasks this script does not "
              f"know: {', '.join(f'{t or chr(39) * 2} {n}' for t, n in ds.unknown.most_common())} (it knows "
              f"{', '.join(STREAM_TASKS)})", file=sys.stderr, flush=True)
    if not len(ds):
        return None
    weights = [w if n else 0.0 for w, n in zip(as_list(weights, float), ds.sizes)] if weights else None
    return StreamingLoader(None, batch_size=batch_size, weights=weights, rank=rank, world=world, seed=seed,
                           workers=workers, pin_memory=pin_memory, dataset=ds, collate_fn=collate_conversations)


@torch.no_grad()
def token_stats(dirs, image_size, tokenize, n_images, batch_size, seed, workers, dev):
    """SeTok's per-channel token mean and std over the first n_images train images of a seeded
    shuffle of the streamed worlds (every rank sees the same ones), and those images' token counts."""
    s1 = s2 = 0.0
    counts = []
    for b in StreamingLoader(dirs, 'train', image_size, batch_size, seed=seed, workers=workers):
        t, n, _ = tokenize(b['image'].to(dev).float() / 255)
        s1, s2 = s1 + t.double().sum(0), s2 + t.double().pow(2).sum(0)
        counts.append(n)
        if sum(map(len, counts)) >= n_images:
            break
    nt = torch.cat(counts).float()
    M = nt.sum()
    mean = s1 / M
    return mean.float(), ((s2 - M * mean ** 2) / (M - 1)).clamp_min(0).sqrt().float(), nt


def load_world(world_dir, tok, cache, vis_id, block_size):
    """The shapes world in memory for train_setokim.py: the train and test splits' conversations
    tokenised (Packed arrays) over their token banks, plus what eval needs of the test split (its
    images, manifest records, the text-only VQA prior) and the train images' mean background (for
    the caption-only t2i baseline). Dies when a conversation is longer than block_size."""
    train = conversations(world_dir, 'train', tok, cache['train'], vis_id)
    test = conversations(world_dir, 'test', tok, cache['test'], vis_id)
    train['bank'], test['bank'] = make_bank(cache['train']), make_bank(cache['test'])
    test['images'] = cache['test']['images']
    test['prior'] = answer_prior(train['convs'], test['convs'])
    test['records'] = read_jsonl(os.path.join(world_dir, 'test.jsonl'), 'manifest')
    test['background'] = mean_background(read_jsonl(os.path.join(world_dir, 'train.jsonl'), 'manifest'), test['images'].shape[1])
    longest = max(int(train['P'].length.max()), int(test['P'].length.max()))
    if longest > block_size:
        die(f"the longest conversation has {longest} tokens with these visual tokens, more than block_size={block_size}; "
            f"raise block_size")
    return train, test, longest
