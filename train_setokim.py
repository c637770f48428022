"""
Train SETOKIM (setokim.py): a GPT that reads and writes SeTok's visual tokens, on the shapes world's
conversations. SeTok and its detokenizer are frozen.

    python train_setokim.py config=small                   # stage 1 then stage 2; trains SeTok first
                                                           # (train_setok.py) when out/small/ckpt.pt is missing
    python train_setokim.py config=small stage=2           # instruction tuning only, from stage 1's checkpoint
    python train_setokim.py config=small tokenizer=grid    # the controlled comparison: only the visual
                                                           # tokenizer changes (setok | grid | patch)
    python train_setokim.py config=small init_from=resume  # continue exactly where it stopped
    python train_setokim.py config=small eval_only=True    # test-split metrics of the latest checkpoint
    torchrun --nproc_per_node=8 train_setokim.py config=full

Stage 1 (multimodal pretraining): captioning (image -> text) and text-to-image (text -> image).
Stage 2 (instruction tuning), initialised from stage 1: the whole mix (captioning, VQA, referring
segmentation, text-to-image, editing). The loss is on answers only in both. Unlike the paper (a
pretrained Vicuna, frozen in stage 1) the LLM here starts from scratch, so both stages train every
SETOKIM weight.

Files, in out_dir/run_name (run_name defaults to setokim, or setokim_grid / setokim_patch):
    stage1.pt, stage2.pt   checkpoints (kind 'setokim'); stage2.pt is the final model (sample.py loads it)
    eval.json              the latest eval's metrics;   samples.png   generated images and masks
Next to the SeTok checkpoint: setokim_cache/<ckpt name>-<tokenizer>-<hash>.pt holds SeTok's tokens
and labels for every image of the world (train and test images and their edit targets), computed
once up front since SeTok is frozen; the hash covers the checkpoint's bytes, the tokenizer setting
and the world's settings.

Settings that train_setok.py also has, with another meaning there (batch size, learning rate,
iterations, eval interval, ...), carry an llm_ prefix here, so one preset can hold both.
Every module-level value below is a setting, overridable as key=value on the command line.
"""
import ast
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from common import (HERE, configure, die, load_checkpoint, lr_at, pick_device, rng_state, save_checkpoint,
                    save_panel, set_rng_state, setup_ddp, to_uint8)
from setokim import (SETOKIM, Bank, GPTConfig, TextTokenizer, collate, encode_conversation, loss_counts, pack,
                     reading_order, visual_tokens)

# -----------------------------------------------------------------------------
# settings
out_dir = 'out/setok'             # the SeTok run's folder (train_setok.py's out_dir)
data_dir = 'data/shapes/world'    # prepared automatically when missing
setok_ckpt = ''                   # '' = out_dir/ckpt.pt, what train_setok.py writes
tokenizer = 'setok'               # setok | grid | patch: swaps ONLY the visual tokenizer (load_setok override)
grid_size = 0                     # tokens per side for tokenizer=grid (0: the SeTok checkpoint's)
run_name = ''                     # '' = setokim for tokenizer=setok, else setokim_<tokenizer>
stage = 0                         # 0: stage 1 then stage 2 | 1 | 2
init_from = 'scratch'             # scratch | resume (from run_name/stage{1,2}.pt)
eval_only = False
llm_eval_interval = 500           # eval + checkpoint every this many steps (and at the end of a stage)
eval_per_task = 200               # test conversations per task used by eval (0: all)
eval_batch_size = 64
log_interval = 10
seed = 1337
# the LLM (GPTConfig)
llm_n_layer = 4
llm_n_head = 4
llm_n_embd = 192
block_size = 640                  # longest sequence; 'patch' tokens (256 per 64px image) need ~560
# the mask decoder
mask_dim = 128
mask_depth = 2
mask_n_head = 4
mask_refine = True
# loss
ce_weight = 1.0                   # text CE (answers only)
reg_weight = 1.0                  # visual regression: MSE + cos_weight * (1 - cosine)
cos_weight = 1.0
mask_weight = 1.0                 # referring masks: BCE + dice_weight * dice
dice_weight = 1.0
# optimiser (per stage: a fresh AdamW and a fresh schedule)
llm_batch_size = 32               # conversations per process per micro-step
llm_grad_accum = 1
llm_learning_rate = 1e-3
stage1_max_iters = 1000
stage2_max_iters = 3000
llm_lr_decay_iters = 0            # 0: = the stage's max_iters
llm_warmup_iters = 100
llm_min_lr_ratio = 0.1
llm_weight_decay = 0.1
llm_beta1 = 0.9
llm_beta2 = 0.95
llm_grad_clip = 1.0
cache_batch_size = 256            # images per SeTok call when building the token cache
# system
device = 'auto'                   # auto | cpu | cuda | cuda:1 | mps
dtype = 'auto'                    # auto (bf16 on capable GPUs, else float32) | float32 | bfloat16
compile = 'auto'                  # auto: on for CUDA | True | False
threads = 0                       # CPU threads (0: torch's default)
config = configure(globals())
# -----------------------------------------------------------------------------

TASKS = ('caption', 'vqa', 'refer', 't2i', 'edit')
KINDS = ('count', 'attribute', 'existence', 'relation')
STAGE_TASKS = {1: ('caption', 't2i'), 2: TASKS}
CACHE_VERSION = 1                 # bump when what the cache holds changes
NO_FORWARD = {'init_from', 'eval_only', 'tokenizer', 'grid_size'}   # never passed on to train_setok.py


def argv_pairs(argv):
    """(key, raw argument list) for key=value, --key=value and --key value."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        body = a[2:] if a.startswith('--') else a
        if '=' in body or not a.startswith('--'):
            out.append((body.split('=', 1)[0].replace('-', '_'), [a]))
            i += 1
        else:
            out.append((body.replace('-', '_'), argv[i:i + 2]))
            i += 2
    return out


def train_setok_first(setok_path):
    """config=small and no SeTok checkpoint: train one with train_setok.py, passing on config= and the
    overrides that train_setok.py also has (out_dir, data_dir, seed, threads, ...)."""
    tree = ast.parse(open(os.path.join(HERE, 'train_setok.py')).read())
    theirs = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    args = [a for k, raw in argv_pairs(sys.argv[1:]) if k == 'config' or (k in theirs and k not in NO_FORWARD) for a in raw]
    cmd = [sys.executable, os.path.join(HERE, 'train_setok.py'), *args]
    print(f"no SeTok checkpoint at {setok_path}: training one first: {' '.join(cmd[1:])}", flush=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                        'GROUP_RANK', 'ROLE_RANK', 'TORCHELASTIC_RUN_ID')}
    r = subprocess.run(cmd, cwd=HERE, env=env)
    if r.returncode != 0 or not os.path.isfile(setok_path):
        die(f"train_setok.py failed (exit {r.returncode}); fix that first, then run train_setokim.py again")


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
def build_split_cache(setok, world_dir, split, dev, ctx):
    """SeTok on every image of a split (sources, then their edit targets), in reading order."""
    from data.loader import load_png, load_split
    data = load_split(world_dir, split)
    recs = data['records']
    edits = np.stack([load_png(world_dir, f"edits/{split}/{r['id']}.png", 'RGB')
                      for r in tqdm(recs, desc=f'load {split} edits', leave=False, mininterval=0.5)])
    images = np.concatenate([data['images'], edits])                        # (2n, H, W, 3) uint8
    toks, ntok, labels = [], [], []
    for i in tqdm(range(0, len(images), cache_batch_size), desc=f'SeTok tokens ({split})', dynamic_ncols=True):
        img = torch.from_numpy(images[i:i + cache_batch_size]).to(dev).permute(0, 3, 1, 2).float() / 255
        with ctx:
            t, m, lab = setok(img)                                          # (b,K,D), (b,K), (b,N)
        t, m, lab = reading_order(t.float(), m, lab, setok.grid)
        toks.append(t[m].half().cpu())                                      # (sum of real tokens, D)
        ntok.append(m.sum(1).cpu())
        labels.append(lab.short().cpu())
    ntok = torch.cat(ntok)
    out = {'tokens': torch.cat(toks), 'off': ntok.cumsum(0) - ntok, 'ntok': ntok, 'labels': torch.cat(labels),
           'instances': torch.from_numpy(data['instances']),
           'paths': [r['image'] for r in recs] + [f"edits/{split}/{r['id']}.png" for r in recs]}
    if split == 'test':
        out['images'] = torch.from_numpy(images)                            # eval's ground truth
    return out


def token_cache(setok, setok_path, overrides, world_dir, dev, ctx, master, ddp):
    path = cache_file(setok_path, overrides, world_dir)
    if master and not os.path.isfile(path):
        t0 = time.time()
        cache = {split: build_split_cache(setok, world_dir, split, dev, ctx) for split in ('train', 'test')}
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
    from data.loader import load_instruct
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


def make_bank(c):
    return Bank(tokens=c['tokens'], off=c['off'], ntok=c['ntok'], labels=c['labels'], instances=c['instances'])


# -----------------------------------------------------------------------------
# eval on the test split

def edited_colours(objects, edit):
    """The object colours of an edit's target: the source's with the edit applied."""
    objs = [dict(o) for o in objects]
    if edit and edit['op'] == 'recolor':
        objs[edit['object'] - 1]['color'] = edit['color']
    elif edit and edit['op'] == 'remove':
        del objs[edit['object'] - 1]
    return [o['color'] for o in objs]


def colour_iou(pred, target, colours, valid, tau=60 / 255):
    """Per object: IoU between the pixels within tau (RGB distance) of its colour in pred and in
    target. pred, target (B,3,H,W) in [0,1]; colours (B,O,3) in [0,1]; valid (B,O) -> (B,O)."""
    near = lambda im: (im[:, None] - colours[..., None, None]).norm(dim=2) < tau    # (B, O, H, W)
    p, t = near(pred), near(target)
    iou = (p & t).flatten(2).sum(-1) / (p | t).flatten(2).sum(-1).clamp_min(1)
    return iou[valid]


@torch.no_grad()
def evaluate(model, detok, tok, test, records, tasks, gcfg, ctx, dev, max_image_tokens, panel_path=None):
    """Test-split metrics, greedy and batched:
      VQA accuracy per kind and overall: exact match of the answer after strip/lower;
      caption object F1: parse_caption's (size, colour, shape) of the generated caption vs the image's
        objects, as multisets, pooled over all captions;
      referring mIoU (mean of per-sample IoUs) and cIoU (total intersection / total union), pixels
        with logit > 0; the answer's [SEG] is forced (the prompt ends in it);
      text-to-image and editing: the answer's [Img] is forced, the model writes tokens until [/Img];
        PSNR of the detokenized image vs the true one, and per-object colour IoU (for each true object:
        IoU of the pixels within 60/255 of its colour, output vs truth); the same two numbers for
        SeTok's own reconstruction of the truth are the ceiling;
      teacher-forced test losses (text CE per answer token, regression per visual token, mask per sample)."""
    from data.shapes.prepare import COLORS, parse_caption
    from detok import psnr
    model.eval()
    P, bank = test['P'], test['bank']
    m, panel, K = {}, [], max_image_tokens
    to = lambda b: {k: v.to(dev) for k, v in b.items()}
    def rows_of(task):                    # eval_per_task conversations spread evenly over the split
        rows = (test['task'] == TASKS.index(task)).nonzero()[:, 0]
        n = min(len(rows), eval_per_task or len(rows))
        return rows[torch.linspace(0, len(rows) - 1, n).round().long()] if n else rows
    chunks = lambda rows: [rows[i:i + eval_batch_size] for i in range(0, len(rows), eval_batch_size)]
    imgs = lambda i: test['images'][i].to(dev).permute(0, 3, 1, 2).float() / 255  # (b, 3, H, W)
    # teacher-forced losses on the same conversations
    sums = torch.zeros(6)
    for r in chunks(torch.cat([rows_of(t) for t in tasks])):
        with ctx:
            _, st = model(to(collate(P, bank, r, gcfg)))
        sums += torch.tensor([st['ce'].item(), st['reg'].item(), st['mask'].item(), st['n_ce'], st['n_reg'], st['n_seg']])
    m['test_ce'], m['test_reg'] = (sums[:2] / sums[3:5].clamp_min(1)).tolist()
    if sums[5] > 0:
        m['test_mask'] = (sums[2] / sums[5]).item()
    if 'vqa' in tasks:
        hit, tot = Counter(), Counter()
        for r in chunks(rows_of('vqa')):
            with ctx:
                ids, _ = model.generate(to(collate(P, bank, r, gcfg, prompt_extra=torch.zeros_like(r))), max_new_tokens=8)
            for j, row in enumerate(r.tolist()):                           # string comparison per answer
                kind = KINDS[int(test['kind'][row])]
                hit[kind] += tok.decode(ids[j].tolist()).strip().lower() == test['convs'][row]['answer'].strip().lower()
                tot[kind] += 1
        m['vqa'] = sum(hit.values()) / max(1, sum(tot.values()))
        m.update({f'vqa_{k}': hit[k] / tot[k] for k in KINDS if tot[k]})
    if 'caption' in tasks:
        tp = n_pred = n_true = 0
        rows = rows_of('caption')
        longest = int(P.n_ce[rows].max()) + 4 if len(rows) else 8
        for r in chunks(rows):
            with ctx:
                ids, _ = model.generate(to(collate(P, bank, r, gcfg, prompt_extra=torch.zeros_like(r))),
                                        max_new_tokens=min(longest, gcfg.block_size - int(P.prompt_len[r].max())))
            for j, row in enumerate(r.tolist()):
                pred = Counter(parse_caption(tok.decode(ids[j].tolist())))
                true = Counter((o['size'], o['color'], o['shape']) for o in records[int(P.img[row])]['objects'])
                tp, n_pred, n_true = tp + sum((pred & true).values()), n_pred + sum(pred.values()), n_true + sum(true.values())
        m['caption_f1'] = 2 * tp / max(1, n_pred + n_true)                  # pooled over all captions
    if 'refer' in tasks:
        ious, inter, union = [], 0, 0
        for i, r in enumerate(chunks(rows_of('refer'))):
            b = to(collate(P, bank, r, gcfg, prompt_extra=torch.ones_like(r)))   # prompts end in [SEG]
            assert bool((b['idx'][:, -1] == gcfg.seg_id).all())
            img = P.img[r]
            toks, tmask = bank.padded(img)
            with ctx:
                pix = model.segment(b, toks.to(dev), tmask.to(dev), bank.labels[img].long().to(dev))
            pred = pix.float() > 0                                          # (b, H, W)
            gt = (bank.instances[img].long() == P.mask_id[r][:, None, None]).to(dev)
            I, U = (pred & gt).flatten(1).sum(1), (pred | gt).flatten(1).sum(1)
            ious.append(I / U.clamp_min(1))
            inter, union = inter + I.sum().item(), union + U.sum().item()
            if panel_path and i == 0:
                n = min(8, len(r))
                src, red = imgs(img[:n]), torch.tensor([1.0, 0.2, 0.2], device=dev)[:, None, None]
                over = lambda mk: [to_uint8(0.5 * src[j] + 0.5 * mk[j].float() * red, 2) for j in range(n)]  # mask in red
                panel += [(over(gt), ['refer: truth'] + [''] * (n - 1)), (over(pred), ['pred'] + [''] * (n - 1))]
        m['refer_miou'] = torch.cat(ious).mean().item() if ious else 0.0
        m['refer_ciou'] = inter / max(1, union)
    for task in ('t2i', 'edit'):
        if task not in tasks:
            continue
        ps, oracle, cious, oracle_cious, ntok = [], [], [], [], []
        for i, r in enumerate(chunks(rows_of(task))):
            b = to(collate(P, bank, r, gcfg, prompt_extra=torch.ones_like(r)))   # prompts end in [Img]
            assert bool((b['idx'][:, -1] == gcfg.img_id).all())
            with ctx:
                ids, vis = model.generate(b, max_new_tokens=K + 2, max_image_tokens=K)
                toks, tmask = visual_tokens(ids, vis.float(), gcfg.vis_id, K)
                out = detok(toks, tmask).float().clamp(0, 1)                # (b, 3, H, W)
                ttoks, ttmask = bank.padded(test['target'][r])
                recon = detok(ttoks.to(dev), ttmask.to(dev)).float().clamp(0, 1)
            target = imgs(test['target'][r])
            ps.append(psnr(out, target).cpu())
            oracle.append(psnr(recon, target).cpu())
            ntok.append(tmask.sum(1).float().cpu())
            cols = []
            for row in r.tolist():                                          # the target's object colours
                c = test['convs'][row]
                cols.append(edited_colours(records[int(P.img[row]) if task == 'edit' else int(test['target'][row])]['objects'],
                                           c.get('edit')))
            O = max(len(c) for c in cols)
            colours = torch.tensor([[COLORS[x] for x in c] + [(0, 0, 0)] * (O - len(c)) for c in cols], device=dev) / 255
            valid = torch.tensor([[True] * len(c) + [False] * (O - len(c)) for c in cols], device=dev)
            cious.append(colour_iou(out, target, colours, valid).cpu())
            oracle_cious.append(colour_iou(recon, target, colours, valid).cpu())
            if panel_path and i == 0:
                n = min(8, len(r))
                if task == 'edit':
                    src = imgs(P.img[r][:n])
                    panel.append(([to_uint8(src[j], 2) for j in range(n)], ['edit: source'] + [''] * (n - 1)))
                panel.append(([to_uint8(target[j], 2) for j in range(n)], [f'{task}: truth'] + [''] * (n - 1)))
                panel.append(([to_uint8(out[j], 2) for j in range(n)], [f'{int(tmask[j].sum())} tok' for j in range(n)]))
        m[f'{task}_psnr'] = torch.cat(ps).mean().item()
        m[f'{task}_colour_iou'] = torch.cat(cious).mean().item()
        m[f'{task}_tokens'] = torch.cat(ntok).mean().item()
        m[f'{task}_oracle_psnr'] = torch.cat(oracle).mean().item()          # SeTok's own reconstruction
        m[f'{task}_oracle_colour_iou'] = torch.cat(oracle_cious).mean().item()
    if panel_path and panel:
        width = max(len(row) for row, _ in panel)
        rows = [row + [np.zeros_like(row[0])] * (width - len(row)) for row, _ in panel]
        save_panel(rows, panel_path, [lab + [''] * (width - len(lab)) for _, lab in panel])
    model.train()
    return m


def fmt(m):
    parts = [f"test ce {m['test_ce']:.3f} reg {m['test_reg']:.3f}" + (f" mask {m['test_mask']:.3f}" if 'test_mask' in m else '')]
    if 'vqa' in m:
        parts.append(f"VQA {m['vqa']:.3f} (" + ' '.join(f"{k} {m[f'vqa_{k}']:.2f}" for k in KINDS if f'vqa_{k}' in m) + ')')
    if 'caption_f1' in m:
        parts.append(f"caption F1 {m['caption_f1']:.3f}")
    if 'refer_miou' in m:
        parts.append(f"refer mIoU {m['refer_miou']:.3f} cIoU {m['refer_ciou']:.3f}")
    for t in ('t2i', 'edit'):
        if f'{t}_psnr' in m:
            parts.append(f"{t} PSNR {m[f'{t}_psnr']:.2f} dB colour IoU {m[f'{t}_colour_iou']:.3f} tok {m[f'{t}_tokens']:.1f} "
                         f"(SeTok recon {m[f'{t}_oracle_psnr']:.2f} dB, {m[f'{t}_oracle_colour_iou']:.3f})")
    return ' | '.join(parts)


def peak_flops(dev):
    """bf16 dense peak of the GPU, for MFU (nanoGPT uses the A100's 312 TFLOPS)."""
    name = torch.cuda.get_device_name(dev)
    return 989e12 if ('H100' in name or 'H200' in name) else 312e12


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    if tokenizer not in ('setok', 'grid', 'patch'):
        die(f"tokenizer={tokenizer}: expected setok, grid or patch")
    if stage not in (0, 1, 2):
        die(f"stage={stage}: expected 0 (both), 1 or 2")
    if init_from not in ('scratch', 'resume'):
        die(f"init_from={init_from}: expected scratch or resume")
    ddp, rank, world, dev = setup_ddp(device)
    dev, ptdtype, ctx = pick_device(dev, dtype)
    master = rank == 0
    if threads:
        torch.set_num_threads(threads)
    out = out_dir if os.path.isabs(out_dir) else os.path.join(HERE, out_dir)
    setok_path = setok_ckpt or os.path.join(out, 'ckpt.pt')
    setok_path = setok_path if os.path.isabs(setok_path) else os.path.join(HERE, setok_path)
    run_dir = os.path.join(out, run_name or ('setokim' if tokenizer == 'setok' else f'setokim_{tokenizer}'))
    ckpt_path = {s: os.path.join(run_dir, f'stage{s}.pt') for s in (1, 2)}

    # ---- checkpoints this run needs are checked before any work
    if eval_only:
        want = [2, 1] if stage == 0 else [stage]
        have = [s for s in want if os.path.isfile(ckpt_path[s])]
        if not have:
            die(f"eval_only: no checkpoint {' or '.join(ckpt_path[s] for s in want)}; train first")
    elif init_from == 'resume' and not any(os.path.isfile(ckpt_path[s]) for s in ((1, 2) if stage == 0 else (stage,))):
        die(f"init_from=resume: no checkpoint to resume in {run_dir}; start with init_from=scratch")
    elif stage == 2 and not (init_from == 'resume' and os.path.isfile(ckpt_path[2])) and not os.path.isfile(ckpt_path[1]):
        die(f"stage=2 starts from stage 1's checkpoint {ckpt_path[1]}, which does not exist; run stage=1 first")

    # ---- the frozen SeTok: trained first for config=small when missing
    if not os.path.isfile(setok_path):
        presets = [raw[0].split('=', 1)[1] if '=' in raw[0] else raw[-1] for k, raw in argv_pairs(sys.argv[1:]) if k == 'config']
        if setok_ckpt or 'small' not in presets:
            die(f"SeTok checkpoint {setok_path} not found; train one first (python train_setok.py config=... "
                f"out_dir={out_dir}) or pass setok_ckpt=PATH")
        if master:
            train_setok_first(setok_path)
        if ddp:
            torch.distributed.barrier()
    overrides = {'tokenizer': tokenizer, **({'grid_size': grid_size} if grid_size else {})}
    from detok import load_setok
    setok, detok, setok_ck = load_setok(setok_path, dev, **overrides)
    for p in [*setok.parameters(), *detok.parameters()]:
        p.requires_grad_(False)

    # ---- the world, the text tokenizer, SeTok's tokens of every image (cached), the conversations
    from data.shapes.prepare import prepare
    world_dir = data_dir if os.path.isabs(data_dir) else os.path.join(HERE, data_dir)
    if master and not os.path.exists(os.path.join(world_dir, 'meta.json')):
        prepare(data_dir=world_dir, image_size=setok.cfg.image_size)
    if ddp:
        torch.distributed.barrier()
    tok_path = os.path.join(world_dir, 'tokenizer.model')
    tok = TextTokenizer(tok_path)
    cache, cache_path = token_cache(setok, setok_path, overrides, world_dir, dev, ctx, master, ddp)
    if cache['test']['images'].shape[1] != setok.cfg.image_size:
        die(f"{world_dir} holds {cache['test']['images'].shape[1]}px images but the SeTok checkpoint wants "
            f"{setok.cfg.image_size}px; use the world it was trained on (data_dir=...)")
    vis_id = tok.vocab_size                        # the extra vocabulary row: "a visual token follows"
    t0 = time.time()
    train = conversations(world_dir, 'train', tok, cache['train'], vis_id)
    test = conversations(world_dir, 'test', tok, cache['test'], vis_id)
    train['bank'], test['bank'] = make_bank(cache['train']), make_bank(cache['test'])
    test['images'] = cache['test']['images']
    with open(os.path.join(world_dir, 'test.jsonl')) as f:
        records = [json.loads(line) for line in f if line.strip()]
    longest = max(int(train['P'].length.max()), int(test['P'].length.max()))
    if longest > block_size:
        die(f"the longest conversation has {longest} tokens with tokenizer={tokenizer}, more than block_size={block_size}; "
            f"raise block_size")

    # ---- the model
    gcfg = GPTConfig(vocab_size=tok.vocab_size + 1, block_size=block_size, n_layer=llm_n_layer, n_head=llm_n_head,
                     n_embd=llm_n_embd, token_dim=setok.cfg.token_dim, grid=setok.grid, image_size=setok.cfg.image_size,
                     mask_dim=mask_dim, mask_depth=mask_depth, mask_n_head=mask_n_head, mask_refine=mask_refine,
                     img_id=tok.img, img_end_id=tok.img_end, seg_id=tok.seg, eos_id=tok.eos, pad_id=tok.pad)
    torch.manual_seed(seed)
    model = SETOKIM(gcfg)
    bank_tokens = train['bank'].tokens.float()
    model.tok_mean.copy_(bank_tokens.mean(0))
    model.tok_std.copy_(bank_tokens.std(0).clamp_min(1e-3))
    model.to(dev)
    nt = train['bank'].ntok.float()
    if master:
        print(f"SETOKIM {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params (GPT {model.gpt.num_params() / 1e6:.2f}M "
              f"non-embedding) | tokenizer {tokenizer}: {nt.mean():.2f} tokens/image (min {int(nt.min())}, max {int(nt.max())}) | "
              f"{len(train['convs'])} train / {len(test['convs'])} test conversations, longest {longest} tokens "
              f"(prepared in {time.time() - t0:.0f}s) | device {dev} {ptdtype} | {world} process(es)")

    def save(s, step, opt):
        save_checkpoint({'kind': 'setokim', 'stage': s, 'step': step, 'model': model.state_dict(),
                         'optimizer': opt.state_dict(), 'rng': rng_state(), 'config': config,
                         'gpt_config': asdict(gcfg), 'text_tokenizer': tok_path, 'setok_ckpt': setok_path,
                         'setok_overrides': overrides, 'setok_config': asdict(setok.cfg),
                         'detok_config': asdict(detok.cfg), 'token_cache': cache_path},
                        ckpt_path[s])

    def load_weights(path, what):
        ck = load_checkpoint(path, kind='setokim', what=what)
        if ck['gpt_config'] != asdict(gcfg):
            diff = ', '.join(f"{k}={v} (here {asdict(gcfg)[k]})" for k, v in ck['gpt_config'].items() if asdict(gcfg).get(k) != v)
            die(f"{path} has another model shape: {diff}; use the settings it was trained with")
        model.load_state_dict(ck['model'])
        return ck

    def report(s, m):
        with open(os.path.join(run_dir, 'eval.json'), 'w') as f:
            json.dump({'stage': s, **m}, f, indent=2)

    if eval_only:
        if master:
            s = have[0]
            ck = load_weights(ckpt_path[s], 'SETOKIM checkpoint')
            m = evaluate(model, detok, tok, test, records, TASKS, gcfg, ctx, dev, setok.max_tokens,
                         os.path.join(run_dir, 'samples.png'))
            report(s, m)
            print(f"eval stage {s} step {ck['step']} | {fmt(m)}\nwrote {os.path.join(run_dir, 'eval.json')}, "
                  f"{os.path.join(run_dir, 'samples.png')}")
        sys.exit(0)

    use_compile = str(compile).lower() in ('true', '1', 'yes') or (compile == 'auto' and dev.startswith('cuda'))
    fwd = torch.compile(model, dynamic=True) if use_compile else model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(fwd, device_ids=[int(os.environ['LOCAL_RANK'])] if dev.startswith('cuda') else None)
    mfu_peak = peak_flops(dev) if dev.startswith('cuda') else None

    def train_stage(s):
        max_iters = stage1_max_iters if s == 1 else stage2_max_iters
        rows_all = torch.isin(train['task'], torch.tensor([TASKS.index(t) for t in STAGE_TASKS[s]])).nonzero()[:, 0]
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{'params': decay, 'weight_decay': llm_weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                                lr=llm_learning_rate, betas=(llm_beta1, llm_beta2))
        step = 0
        if init_from == 'resume' and os.path.isfile(ckpt_path[s]):
            ck = load_weights(ckpt_path[s], f'stage {s} checkpoint')
            opt.load_state_dict(ck['optimizer'])
            step = ck['step']
            set_rng_state(ck['rng'])
            if master:
                print(f"stage {s}: resumed from {ckpt_path[s]} at step {step}")
        elif s == 2:
            load_weights(ckpt_path[1], 'stage 1 checkpoint')
            if master:
                print(f"stage 2: starting from {ckpt_path[1]}")
        if step >= max_iters:
            if master:
                print(f"stage {s}: already at step {step} >= {max_iters}, nothing to do")
            return

        # data order: a fixed permutation of the stage's conversations per epoch, from (seed, stage,
        # epoch); a step number alone says which conversations it sees (exact resume), and rank r
        # takes its slices of the global batch (DDP == 1 process)
        N, G = len(rows_all), llm_batch_size * world * llm_grad_accum
        perms = {}

        def global_rows(step):
            i = step * G + torch.arange(G)
            epoch, pos = i // N, i % N
            out_ = torch.empty_like(i)
            for e in epoch.unique().tolist():                               # a step spans <= 2 epochs
                if e not in perms:
                    perms.clear()
                    perms[e] = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000003 + s * 10007 + e))
                out_[epoch == e] = perms[e][pos[epoch == e]]
            return rows_all[out_]

        total = llm_lr_decay_iters or max_iters
        bar = tqdm(total=max_iters, initial=step, disable=not master, desc=f'stage {s}', dynamic_ncols=True)
        t_start, tokens_seen, seqs_seen, step0 = time.time(), 0, 0, step
        acc = torch.zeros(6)
        weights = dict(ce_weight=ce_weight, reg_weight=reg_weight, mask_weight=mask_weight, cos_weight=cos_weight,
                       dice_weight=dice_weight)
        while step < max_iters:
            lr = lr_at(step, llm_learning_rate, llm_warmup_iters, total, llm_min_lr_ratio)
            for g in opt.param_groups:
                g['lr'] = lr
            rows = global_rows(step)
            # each loss term is a mean over the GLOBAL batch: its sum on this micro-batch divided by the
            # global count (over world, since DDP averages gradients over processes)
            norm = tuple(max(1, n) / world for n in loss_counts(train['P'], rows))
            loss_sum = 0.0
            for micro in range(llm_grad_accum):
                r = rows[(micro * world + rank) * llm_batch_size:][:llm_batch_size]
                b = {k: v.to(dev) for k, v in collate(train['P'], train['bank'], r, gcfg).items()}
                sync = not ddp or micro == llm_grad_accum - 1
                with ctx, (fwd.no_sync() if not sync else nullcontext()):
                    loss, st = fwd(b, norm=norm, **weights)
                    loss.backward()
                loss_sum += loss.item() / world
                acc += torch.tensor([st['ce'].item(), st['reg'].item(), st['mask'].item(), st['n_ce'], st['n_reg'], st['n_seg']])
                tokens_seen += int(b['real'].sum()) * world
                seqs_seen += len(r) * world
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), llm_grad_clip)   # global: same on every rank
            if not (math.isfinite(loss_sum) and math.isfinite(gnorm.item())):
                die(f"loss is {loss_sum} at stage {s} step {step}; stopping. The last good checkpoint is {ckpt_path[s]}: "
                    f"resume from it with a lower learning rate (init_from=resume llm_learning_rate=...)", code=1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % log_interval == 0:
                if ddp:
                    torch.distributed.all_reduce(acc)
                if master:
                    dt = time.time() - t_start
                    post = dict(ce=f"{acc[0] / acc[3].clamp_min(1):.3f}", reg=f"{acc[1] / acc[4].clamp_min(1):.3f}",
                                mask=f"{acc[2] / acc[5].clamp_min(1):.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_seen / dt:.0f}")
                    if mfu_peak:                                            # mean sequence length as T
                        post['mfu'] = f"{100 * model.gpt.estimate_mfu(tokens_seen / dt, tokens_seen / seqs_seen, mfu_peak):.1f}%"
                    bar.set_postfix(**post)
                acc.zero_()
            bar.update(1)
            if step % llm_eval_interval == 0 or step == max_iters:
                t_eval = time.time()
                if master:
                    save(s, step, opt)
                    metrics = evaluate(model, detok, tok, test, records, STAGE_TASKS[s], gcfg, ctx, dev,
                                       setok.max_tokens, os.path.join(run_dir, 'samples.png'))
                    report(s, metrics)
                    dt = t_eval - t_start
                    tqdm.write(f"stage {s} step {step} | {fmt(metrics)} | train {tokens_seen / dt:.0f} tok/s, "
                               f"{dt / (step - step0):.3f} s/step | eval {time.time() - t_eval:.0f}s")
                if ddp:
                    torch.distributed.barrier()
                t_start += time.time() - t_eval                                # throughput counts training only
        bar.close()

    if master:
        os.makedirs(run_dir, exist_ok=True)
    stages = [stage] if stage else [1, 2]
    if stage == 0 and init_from == 'resume' and os.path.isfile(ckpt_path[2]):
        stages = [2]                                                        # stage 1 is behind us
    for s in stages:
        train_stage(s)
    if master:
        print(f"done: {ckpt_path[stages[-1]]}, {os.path.join(run_dir, 'eval.json')}, {os.path.join(run_dir, 'samples.png')}")
    if ddp:
        torch.distributed.destroy_process_group()
