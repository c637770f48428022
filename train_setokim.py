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
    torchrun --nproc_per_node=8 train_setokim.py config=full text_tokenizer=gpt2 num_workers=8 \
        data_dirs=data/cc3m/world,data/llava/world,data/refcoco/world,data/magicbrush/world

With data_dirs (worlds converted from real data by data/*/prepare.py) nothing is cached: the
conversations are streamed (each DDP rank its own shard, the loader's position in the checkpoint),
their images decoded in num_workers processes and tokenised by the frozen SeTok inside the training
step, all of a micro-batch's images in one call. Tasks: caption, vqa, refer, t2i, edit and chat
(LLaVA's multi-turn conversations, a loss on every gpt turn); conversations of other tasks are
counted and skipped with a warning; ones longer than block_size are cut there (counted, warned).
Eval is then the teacher-forced losses on the worlds' val split (test where there is no val).

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
once up front since SeTok is frozen (data/conversations.py: the cache, the conversations tokenised,
and the streamed ones of data_dirs).

Settings that train_setok.py also has, with another meaning there (batch size, learning rate,
iterations, eval interval, ...), carry an llm_ prefix here, so one preset can hold both.
Every module-level value below is a setting, overridable as key=value on the command line.
"""
import ast
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

from common import (HERE, configure, die, load_checkpoint, load_preset, lr_at, peak_flops, pick_device, rng_state, save_checkpoint,
                    save_panel, set_rng_state, setup_ddp, timed_step, to_uint8)
from pretrained import gpt2_shape, load_gpt2, pretrained_config, pretrained_weights, tiktoken_gpt2
from setok import SeTokConfig
from setokim import SETOKIM, Bank, GPTConfig, TextTokenizer, collate, encode_conversation, loss_counts, pack, visual_tokens
from data.conversations import (KINDS, STREAM_TASKS, TASKS, Conversations, answer_prior, collate_conversations,
                                conversations, make_bank, parse_repeat, setok_rows, stage_rows, token_cache, widen)

# -----------------------------------------------------------------------------
# settings
out_dir = 'out/setok'             # the SeTok run's folder (train_setok.py's out_dir)
data_dir = 'data/shapes/world'    # prepared automatically when missing
data_dirs = []                    # real worlds (data/captions, data/llava, data/refcoco, data/editing): their
                                  # conversations streamed, their images tokenised by the frozen SeTok inside the
                                  # training step (no token cache). [] = data_dir. The first world's tokenizer.model
data_weights = []                 # a mixture over data_dirs: one weight each ([] = every conversation once per epoch)
num_workers = 4                   # image-decoding and tokenising processes of the streaming loader (0: none)
setok_ckpt = ''                   # '' = out_dir/ckpt.pt, what train_setok.py writes
tokenizer = 'setok'               # setok | grid | patch: swaps ONLY the visual tokenizer (load_setok override)
grid_size = 0                     # tokens per side for tokenizer=grid (0: the SeTok checkpoint's)
run_name = ''                     # '' = setokim for tokenizer=setok, else setokim_<tokenizer>
stage = 0                         # 0: stage 1 then stage 2 | 1 | 2
init_from = 'scratch'             # scratch | resume (from run_name/stage{1,2}.pt) | gpt2-local (GPT-2's weights
                                  # from gpt2_dir; its config.json then fixes the llm_ shape) | a GPT-2 folder
gpt2_dir = 'pretrained/gpt2'      # Hugging Face GPT-2 folder: config.json + model.safetensors or pytorch_model.bin
text_tokenizer = 'sentencepiece'  # sentencepiece (the world's tokenizer.model) | gpt2 (tiktoken's GPT-2 BPE)
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
llm_pack_rows = True              # several conversations per row (setokim.collate): the same loss on fewer padded
                                  # positions. False: one conversation per row, padded to the batch's longest
llm_learning_rate = 1e-3
task_repeat = []                  # stage 2's mix, task:n entries: task_repeat=vqa:2,refer:2 puts each VQA and referring
                                  # conversation into an epoch twice ([]: the world's mix once; data_dirs: use data_weights)
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
smoke = False                     # the model at the preset's shapes: its parameters, one step of each stage on random data
config = configure(globals())
# -----------------------------------------------------------------------------

STAGE_TASKS = {1: ('caption', 't2i'), 2: TASKS}
STREAM_STAGE_TASKS = {1: ('caption', 't2i'), 2: STREAM_TASKS}
NORM_IMAGES = 1024                # data_dirs: SeTok tokens of this many train images set SETOKIM's token statistics
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


def stat_vector(st):
    """SETOKIM.forward's stats -> (6,): the sums of the three loss terms, then their counts; add these
    up over batches (and processes) and divide with test_losses."""
    return torch.tensor([float(st[k]) for k in ('ce', 'reg', 'mask', 'n_ce', 'n_reg', 'n_seg')])


def test_losses(sums):
    """Summed stat_vectors -> the mean text CE per answer token, regression per visual token and, when
    there were masks, mask loss per sample."""
    m = dict(zip(('test_ce', 'test_reg'), (sums[:2] / sums[3:5].clamp_min(1)).tolist()))
    if sums[5] > 0:
        m['test_mask'] = (sums[2] / sums[5]).item()
    return m


@torch.no_grad()
def evaluate(model, detok, tok, test, records, tasks, gcfg, ctx, dev, max_image_tokens, panel_path=None):
    """Test-split metrics, greedy and batched:
      VQA accuracy per kind and overall: exact match of the answer after strip/lower; and the same
        questions answered blind (answer_prior: the commonest train answer to the same question);
      caption object F1: parse_caption's (size, colour, shape) of the generated caption vs the image's
        objects, as multisets, pooled over all captions;
      referring mIoU (mean of per-sample IoUs) and cIoU (total intersection / total union), pixels
        with logit > 0; the answer's [SEG] is forced (the prompt ends in it);
      text-to-image and editing: the answer's [Img] is forced, the model writes tokens until [/Img];
        PSNR of the detokenized image vs the true one, and per-object colour IoU (for each true object:
        IoU of the pixels within 60/255 of its colour, output vs truth); the same two numbers for
        SeTok's own reconstruction of the truth are the ceiling; and PSNR baselines that write no
        tokens: for t2i, caption_guess (what the caption alone tells: each object averaged over its
        3x3 cell, on the train split's mean background), for editing, the source image unchanged;
      teacher-forced test losses (text CE per answer token, regression per visual token, mask per sample)."""
    from data.shapes.prepare import COLORS, caption_guess, parse_caption
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
            _, st = model(to(collate(P, bank, r, gcfg, pack_rows=llm_pack_rows)))
        sums += stat_vector(st)
    m.update(test_losses(sums))
    if 'vqa' in tasks:
        hit, tot, prior = Counter(), Counter(), Counter()
        for r in chunks(rows_of('vqa')):
            with ctx:
                ids, _ = model.generate(to(collate(P, bank, r, gcfg, prompt_extra=torch.zeros_like(r))), max_new_tokens=8)
            for j, row in enumerate(r.tolist()):                           # string comparison per answer
                kind = KINDS[int(test['kind'][row])]
                answer = test['convs'][row]['answer'].strip().lower()
                hit[kind] += tok.decode(ids[j].tolist()).strip().lower() == answer
                tot[kind] += 1
                prior[kind] += test['prior'][row].strip().lower() == answer          # the text-only baseline
        m['vqa'] = sum(hit.values()) / max(1, sum(tot.values()))
        m.update({f'vqa_{k}': hit[k] / tot[k] for k in KINDS if tot[k]})
        m['vqa_text_prior'] = sum(prior.values()) / max(1, sum(tot.values()))
        m.update({f'vqa_text_prior_{k}': prior[k] / tot[k] for k in KINDS if tot[k]})
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
        ps, oracle, cious, oracle_cious, ntok, base = [], [], [], [], [], []
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
            if task == 't2i':                                               # no image written: the baselines
                guess = np.stack([caption_guess(records[int(test['target'][row])]['objects'], test['background'],
                                                target.shape[-1]) for row in r.tolist()])      # (b, H, W, 3)
                base.append(psnr(torch.from_numpy(guess).permute(0, 3, 1, 2).float(), target.cpu()))
            else:
                base.append(psnr(imgs(P.img[r]), target).cpu())
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
        m['t2i_guess_psnr' if task == 't2i' else 'edit_copy_psnr'] = torch.cat(base).mean().item()
    if panel_path and panel:
        width = max(len(row) for row, _ in panel)
        rows = [row + [np.zeros_like(row[0])] * (width - len(row)) for row, _ in panel]
        save_panel(rows, panel_path, [lab + [''] * (width - len(lab)) for _, lab in panel])
    model.train()
    return m


def fmt(m):
    if not m:
        return 'no held-out conversations of these tasks: eval skipped'
    parts = [f"test ce {m['test_ce']:.3f} reg {m['test_reg']:.3f}" + (f" mask {m['test_mask']:.3f}" if 'test_mask' in m else '')]
    if 'vqa' in m:
        parts.append(f"VQA {m['vqa']:.3f} (" + ' '.join(f"{k} {m[f'vqa_{k}']:.2f}" for k in KINDS if f'vqa_{k}' in m)
                     + f"; text-only prior {m['vqa_text_prior']:.3f})")
    if 'caption_f1' in m:
        parts.append(f"caption F1 {m['caption_f1']:.3f}")
    if 'refer_miou' in m:
        parts.append(f"refer mIoU {m['refer_miou']:.3f} cIoU {m['refer_ciou']:.3f}")
    for t in ('t2i', 'edit'):
        if f'{t}_psnr' in m:
            base = (f"caption-only guess {m['t2i_guess_psnr']:.2f} dB" if t == 't2i' else
                    f"source copied {m['edit_copy_psnr']:.2f} dB")
            parts.append(f"{t} PSNR {m[f'{t}_psnr']:.2f} dB colour IoU {m[f'{t}_colour_iou']:.3f} tok {m[f'{t}_tokens']:.1f} "
                         f"({base}; SeTok recon {m[f'{t}_oracle_psnr']:.2f} dB, {m[f'{t}_oracle_colour_iou']:.3f})")
    return ' | '.join(parts)


# -----------------------------------------------------------------------------
# building the model (from scratch or from GPT-2's weights), and smoke=True

def preset_names():
    """The presets named on the command line (config=NAME), in order."""
    return [raw[0].split('=', 1)[1] if '=' in raw[0] else raw[-1] for k, raw in argv_pairs(sys.argv[1:]) if k == 'config']


def pretrained_dir():
    """The GPT-2 folder init_from asks for ('' for scratch / resume)."""
    if init_from in ('scratch', 'resume'):
        return ''
    path = gpt2_dir if init_from == 'gpt2-local' else init_from
    if not os.path.isdir(path):
        die(f"init_from={init_from}: {path} is not a folder; expected scratch, resume, gpt2-local (GPT-2 in gpt2_dir="
            f"{gpt2_dir}) or a GPT-2 folder (huggingface-cli download openai-community/gpt2 config.json model.safetensors "
            f"--local-dir {gpt2_dir})")
    return path


def gpt_config(tok, scfg, shape):
    """GPTConfig for text tokenizer `tok`, SeTok's config `scfg` and the LLM shape (n_layer, n_head, n_embd)."""
    return GPTConfig(vocab_size=tok.vocab_size + 1, block_size=block_size, **shape, token_dim=scfg.token_dim,
                     grid=scfg.image_size // scfg.patch_size, image_size=scfg.image_size, mask_dim=mask_dim,
                     mask_depth=mask_depth, mask_n_head=mask_n_head, mask_refine=mask_refine, img_id=tok.img,
                     img_end_id=tok.img_end, seg_id=tok.seg, eos_id=tok.eos, pad_id=tok.pad)


def build_model(gcfg, pretrained, log=True):
    """SETOKIM with a random GPT, or GPT-2's weights in it (init_from=gpt2-local or a folder)."""
    torch.manual_seed(seed)
    model = SETOKIM(gcfg)
    if pretrained:
        n_pos = load_gpt2(model.gpt, pretrained_weights(pretrained), pretrained)
        if log:
            print(f"GPT-2 weights from {pretrained}" + (f"; positions {n_pos}..{block_size - 1} start random (GPT-2 has "
                  f"{n_pos})" if block_size > n_pos else ''), flush=True)
    return model


class SmokeText:
    """smoke=True's stand-in for TextTokenizer: the id layout of text_tokenizer (n text ids, then the
    special tokens and pad, as tiktoken's) without any file; encode('17 42 [SEG]') -> [17, 42, seg]."""

    def __init__(self, n):
        self.special = {s: n + k for k, s in enumerate(TextTokenizer.SPECIAL)}
        self.img, self.img_end, self.seg, self.user, self.assistant = self.special.values()
        self.eos, self.pad, self.vocab_size = n - 1, n + len(self.special), n + len(self.special) + 1

    def encode(self, text):
        return [self.special.get(w) or int(w) for w in text.split()]


SMOKE_TEXT_VOCAB = {'gpt2': 50257, 'sentencepiece': 32000}   # GPT-2's BPE; a typical size for real captions
SMOKE_TURNS = {'caption': ('<image> {w}', '{w}'), 't2i': ('{w}', '<image>'), 'vqa': ('<image> {w}', '{w}'),
               'refer': ('<image> {w}', '[SEG]'), 'edit': ('<image> {w}', '<image>')}   # (human, gpt) turns


def smoke_test(dev, ctx, shape, pretrained):
    """smoke=True: SETOKIM at the preset's shapes, its parameters per component, and one optimizer
    step of each stage on random conversations (random words of 40 ids, every image with SeTok's
    most tokens, random token vectors and labels): no world and no SeTok checkpoint needed. SeTok's
    shape (token width, patch grid, tokens per image) comes from the presets on the command line.
    On a GPU at the real batch size, with the time and peak memory of a second step (the first one
    warms up); on a CPU on one conversation of each task of the stage."""
    preset = {}
    for name in preset_names():
        preset.update(load_preset(name))
    scfg = SeTokConfig(**{k: v for k, v in preset.items() if k in SeTokConfig.__dataclass_fields__})
    tok = SmokeText(SMOKE_TEXT_VOCAB[text_tokenizer])
    gcfg = gpt_config(tok, scfg, shape)
    model = build_model(gcfg, pretrained).to(dev)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"GPT {count(model.gpt):.2f}M ({model.gpt.num_params() / 1e6:.2f}M without position embeddings; vocabulary "
          f"{gcfg.vocab_size}: text {text_tokenizer}, specials, pad, VIS) | in_proj {count(model.in_proj):.2f}M | "
          f"out_proj {count(model.out_proj):.2f}M | mask decoder {count(model.mask_decoder):.2f}M | "
          f"total {count(model):.2f}M", flush=True)
    cuda = dev.startswith('cuda')
    N, D = gcfg.grid ** 2, scfg.token_dim
    K = {'setok': scfg.max_tokens, 'grid': (grid_size or scfg.grid_size) ** 2, 'patch': N}[tokenizer]   # SeTok's most
    g = torch.Generator().manual_seed(seed)
    words = lambda: ' '.join(map(str, torch.randint(0, tok.eos, (40,), generator=g).tolist()))
    use_compile = str(compile).lower() in ('true', '1', 'yes') or (compile == 'auto' and cuda)
    fwd = torch.compile(model, dynamic=True) if use_compile else model
    for s in (1, 2):
        B = llm_batch_size if cuda else len(STAGE_TASKS[s])                 # on a CPU: one conversation per task
        bank = Bank(tokens=torch.randn(2 * B * K, D, generator=g).half(), off=torch.arange(2 * B) * K,
                    ntok=torch.full((2 * B,), K), labels=torch.randint(0, K, (2 * B, N), generator=g).short(),
                    instances=torch.randint(0, 3, (2 * B, scfg.image_size, scfg.image_size), generator=g).byte())
        tasks = [STAGE_TASKS[s][i % len(STAGE_TASKS[s])] for i in range(B)]   # conversation i: images 2i (in), 2i+1 (out)
        enc = [encode_conversation(tok, [{'from': 'human', 'value': SMOKE_TURNS[t][0].format(w=words())},
                                         {'from': 'gpt', 'value': SMOKE_TURNS[t][1].format(w=words())}],
                                   lambda out, i=i: ((2 * i + out) * K, K), gcfg.vis_id) for i, t in enumerate(tasks)]
        P = pack(enc, torch.arange(B) * 2, [int(t == 'refer') for t in tasks], tok.seg)
        if int(P.length.max()) > block_size:
            die(f"smoke: a conversation has {int(P.length.max())} tokens, more than block_size={block_size}")
        b = {k: v.to(dev) for k, v in collate(P, bank, torch.arange(B), gcfg).items()}
        opt = torch.optim.AdamW(model.parameters(), lr=llm_learning_rate)
        loss, st, dt, mem = timed_step(lambda: fwd(b), opt, ctx, dev)
        print(f"smoke stage {s} ({', '.join(STAGE_TASKS[s])}): one optimizer step on {B} random conversations of up to "
              f"{int(P.length.max())} tokens ({K} per image; {st['n_ce']} text, {st['n_reg']} visual and {st['n_seg']} "
              f"mask targets): loss {loss:.4f}, {dt:.2f} s"
              + (f", peak memory {mem:.2f} GiB" if mem is not None else '') + f" | device {dev} {ptdtype}", flush=True)


# -----------------------------------------------------------------------------
if __name__ == '__main__':
    if tokenizer not in ('setok', 'grid', 'patch'):
        die(f"tokenizer={tokenizer}: expected setok, grid or patch")
    if stage not in (0, 1, 2):
        die(f"stage={stage}: expected 0 (both), 1 or 2")
    if text_tokenizer not in ('sentencepiece', 'gpt2'):
        die(f"text_tokenizer={text_tokenizer}: expected sentencepiece or gpt2")
    repeat = parse_repeat(task_repeat)
    if repeat and data_dirs:
        die("task_repeat mixes the shapes world's tasks; mix streamed worlds (data_dirs) with data_weights")
    pretrained = pretrained_dir()                  # '' or the GPT-2 folder init_from names
    if pretrained and text_tokenizer != 'gpt2':
        die(f"init_from={init_from}: GPT-2's weights only know GPT-2's BPE ids; add text_tokenizer=gpt2")
    llm_shape = (gpt2_shape(pretrained_config(pretrained)) if pretrained else
                 {'n_layer': llm_n_layer, 'n_head': llm_n_head, 'n_embd': llm_n_embd})
    ddp, rank, world, dev = setup_ddp(device)
    dev, ptdtype, ctx = pick_device(dev, dtype)
    master = rank == 0
    if threads:
        torch.set_num_threads(threads)
    if smoke:
        smoke_test(dev, ctx, llm_shape, pretrained)
        sys.exit(0)
    if text_tokenizer == 'gpt2':
        tiktoken_gpt2()                            # before any work: a one-line error when it is not cached
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
        if setok_ckpt or 'small' not in preset_names():
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

    # ---- the world, the text tokenizer, SeTok's tokens of every image (cached), the conversations;
    # or, with data_dirs, the text tokenizer of the first world (the conversations stream in train_stage)
    from data.loader import StreamingLoader, as_list, resolve_world, world_splits
    stream = [resolve_world(d) for d in as_list(data_dirs)]
    world_dir = stream[0] if stream else data_dir if os.path.isabs(data_dir) else os.path.join(HERE, data_dir)
    if not stream:
        from data.shapes.prepare import mean_background, prepare
        if master and not os.path.exists(os.path.join(world_dir, 'meta.json')):
            prepare(data_dir=world_dir, image_size=setok.cfg.image_size)
        if ddp:
            torch.distributed.barrier()
    tok_path = os.path.join(world_dir, 'tokenizer.model')
    tok = TextTokenizer(tok_path if text_tokenizer == 'sentencepiece' else 'tiktoken:gpt2')
    vis_id = tok.vocab_size                        # the extra vocabulary row: "a visual token follows"
    t0 = time.time()
    if not stream:
        cache, cache_path = token_cache(setok, setok_path, overrides, world_dir, dev, ctx, master, ddp,
                                        cache_batch_size)
        if cache['test']['images'].shape[1] != setok.cfg.image_size:
            die(f"{world_dir} holds {cache['test']['images'].shape[1]}px images but the SeTok checkpoint wants "
                f"{setok.cfg.image_size}px; use the world it was trained on (data_dir=...)")
        train = conversations(world_dir, 'train', tok, cache['train'], vis_id)
        test = conversations(world_dir, 'test', tok, cache['test'], vis_id)
        train['bank'], test['bank'] = make_bank(cache['train']), make_bank(cache['test'])
        test['images'] = cache['test']['images']
        test['prior'] = answer_prior(train['convs'], test['convs'])
        with open(os.path.join(world_dir, 'test.jsonl')) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(world_dir, 'train.jsonl')) as f:         # for t2i's caption-only guess
            test['background'] = mean_background([json.loads(line) for line in f if line.strip()], setok.cfg.image_size)
        longest = max(int(train['P'].length.max()), int(test['P'].length.max()))
        if longest > block_size:
            die(f"the longest conversation has {longest} tokens with tokenizer={tokenizer}, more than block_size={block_size}; "
                f"raise block_size")
    else:
        cache_path = None                          # no token cache: SeTok runs inside the training step

    def stream_loader(split, tasks, dirs, batch, seed_, rank_=0, world_=1, weights=None):
        """A StreamingLoader over the conversations of `tasks` in `split` of `dirs` (this rank's shard);
        a world without any gets weight 0. None when there is none at all."""
        ds = Conversations(dirs, split, setok.cfg.image_size, tasks, tok.model, vis_id)
        if ds.unknown and master and not warned:
            warned.append(True)
            print(f"warning: skipped {sum(ds.unknown.values())} {split} conversations of tasks this script does not "
                  f"know: {', '.join(f'{t or chr(39) * 2} {n}' for t, n in ds.unknown.most_common())} (it knows "
                  f"{', '.join(STREAM_TASKS)})", file=sys.stderr, flush=True)
        if not len(ds):
            return None
        weights = [w if n else 0.0 for w, n in zip(as_list(weights, float), ds.sizes)] if weights else None
        return StreamingLoader(None, batch_size=batch, weights=weights, rank=rank_, world=world_, seed=seed_,
                               workers=num_workers, pin_memory=dev.startswith('cuda'), dataset=ds,
                               collate_fn=collate_conversations)
    warned = []

    def stream_batch(b):
        """A streamed batch -> (the model's batch on dev, its loss counts (n_ce, n_reg, n_seg), the number
        of conversations cut at block_size): SeTok tokenises all its images in one call, widen() gives
        each visual slot its image's token count, and collate() pads it as for the token cache."""
        toks, ntok, labels = (torch.zeros(0, setok.cfg.token_dim), torch.zeros(0, dtype=torch.long),
                              torch.zeros(0, setok.grid ** 2, dtype=torch.int16))    # a batch without images
        if len(b['images']):
            toks, ntok, labels = setok_rows(setok, b['images'].to(dev, non_blocking=True).float() / 255, ctx)
        bank = Bank(tokens=toks, off=ntok.cumsum(0) - ntok, ntok=ntok, labels=labels, instances=b['instances'])
        P, cut = widen(b, ntok, bank.off, tok.seg, block_size)
        rows = torch.arange(len(P.length))
        return {k: v.to(dev) for k, v in collate(P, bank, rows, gcfg, pack_rows=llm_pack_rows).items()}, loss_counts(P, rows), cut

    @torch.no_grad()
    def stream_token_stats():
        """SeTok's per-channel token mean and std over the first NORM_IMAGES train images of a seeded
        shuffle (every rank sees the same ones), and those images' token counts."""
        s1 = s2 = 0.0
        counts = []
        for b in StreamingLoader(stream, 'train', setok.cfg.image_size, cache_batch_size, seed=seed, workers=num_workers):
            t, n, _ = setok_rows(setok, b['image'].to(dev).float() / 255, ctx)
            s1, s2 = s1 + t.double().sum(0), s2 + t.double().pow(2).sum(0)
            counts.append(n)
            if sum(map(len, counts)) >= NORM_IMAGES:
                break
        nt = torch.cat(counts).float()
        M = nt.sum()
        mean = s1 / M
        return mean.float(), ((s2 - M * mean ** 2) / (M - 1)).clamp_min(0).sqrt().float(), nt

    @torch.no_grad()
    def stream_eval(tasks):
        """data_dirs: the teacher-forced test losses (text CE per answer token, regression per visual token,
        mask per sample) of the first eval_per_task * len(tasks) conversations (0: all) of a seeded shuffle
        of the held-out split: val, else test, of the worlds that have one. The generation metrics of
        evaluate() (VQA, caption F1, masks, t2i/edit PSNR) need the shapes world's ground truth."""
        split = next((sp for sp in ('val', 'test') if any(sp in world_splits(d)[1] for d in stream)), None)
        loader = split and stream_loader(split, tasks, [d for d in stream if split in world_splits(d)[1]],
                                         eval_batch_size, seed)
        if loader is None:
            return {}
        model.eval()
        sums, n, want = torch.zeros(6), 0, eval_per_task * len(tasks) or len(loader.dataset)
        for b in loader:
            bb, _, _ = stream_batch(b)
            with ctx:
                _, st = model(bb)
            sums += stat_vector(st)
            n += len(b['length'])
            if n >= want:
                break
        model.train()
        return dict(test_losses(sums), split=split, conversations=n)

    # ---- the model
    gcfg = gpt_config(tok, setok.cfg, llm_shape)
    model = build_model(gcfg, pretrained, log=master)
    if stream:
        mean, std, nt = stream_token_stats()
    else:
        bank_tokens = train['bank'].tokens.float()
        mean, std, nt = bank_tokens.mean(0), bank_tokens.std(0), train['bank'].ntok.float()
    model.tok_mean.copy_(mean)
    model.tok_std.copy_(std.clamp_min(1e-3))
    model.to(dev)
    if master:
        data_line = (f"conversations streamed from {len(stream)} world(s), SeTok tokens made on the fly" if stream else
                     f"{len(train['convs'])} train / {len(test['convs'])} test conversations, longest {longest} tokens "
                     f"(prepared in {time.time() - t0:.0f}s)")
        print(f"SETOKIM {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params (GPT {model.gpt.num_params() / 1e6:.2f}M "
              f"non-embedding) | tokenizer {tokenizer}: {nt.mean():.2f} tokens/image (min {int(nt.min())}, max {int(nt.max())}"
              f"{f' over {len(nt)} train images' if stream else ''}) | {data_line} | device {dev} {ptdtype} | {world} process(es)")

    def save(s, step, opt, data=None):
        save_checkpoint({'kind': 'setokim', 'stage': s, 'step': step, 'model': model.state_dict(),
                         'optimizer': opt.state_dict(), 'rng': rng_state(), 'config': config,
                         'gpt_config': asdict(gcfg), 'text_tokenizer': tok.model,
                         # relative to this checkpoint's folder, so that out/ can move as a whole
                         'setok_ckpt': os.path.relpath(setok_path, os.path.dirname(os.path.abspath(ckpt_path[s]))),
                         'setok_overrides': overrides, 'setok_config': asdict(setok.cfg),
                         'detok_config': asdict(detok.cfg), 'token_cache': cache_path,
                         **({'data': data} if data is not None else {})},     # the streaming loader's position
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
            m = stream_eval(STREAM_STAGE_TASKS[s]) if stream else \
                evaluate(model, detok, tok, test, records, TASKS, gcfg, ctx, dev, setok.max_tokens,
                         os.path.join(run_dir, 'samples.png'))
            report(s, m)
            print(f"eval stage {s} step {ck['step']} | {fmt(m)}\nwrote {os.path.join(run_dir, 'eval.json')}"
                  + ('' if stream else f", {os.path.join(run_dir, 'samples.png')}"))
        sys.exit(0)

    use_compile = str(compile).lower() in ('true', '1', 'yes') or (compile == 'auto' and dev.startswith('cuda'))
    fwd = torch.compile(model, dynamic=True) if use_compile else model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(fwd, device_ids=[int(os.environ['LOCAL_RANK'])] if dev.startswith('cuda') else None)
    mfu_peak = peak_flops(dev) if dev.startswith('cuda') else None

    def train_stage(s):
        max_iters = stage1_max_iters if s == 1 else stage2_max_iters
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{'params': decay, 'weight_decay': llm_weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                                lr=llm_learning_rate, betas=(llm_beta1, llm_beta2))
        step, ck = 0, None
        if init_from == 'resume' and os.path.isfile(ckpt_path[s]):
            ck = load_weights(ckpt_path[s], f'stage {s} checkpoint')
            opt.load_state_dict(ck['optimizer'])
            step = ck['step']
            set_rng_state(ck['rng'])
            if bool(stream) != ('data' in ck):
                die(f"{ckpt_path[s]} was trained on {'streamed worlds (data_dirs)' if 'data' in ck else 'data_dir'}; "
                    f"resume it with the same data settings")
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

        # each loss term is a mean over the GLOBAL batch: its sum on a micro-batch divided by the global
        # count (over world, since DDP averages gradients over processes). step_batches(step) -> the
        # micro-batches of this rank, on dev, and those counts.
        if stream:
            # streamed: each rank reads its shard of the stage's conversations; the loader's position
            # (in the checkpoint) says which come next; the counts are known once SeTok has run, and
            # summed over ranks
            loader = stream_loader('train', STREAM_STAGE_TASKS[s], stream, llm_batch_size, seed * 10 + s, rank, world,
                                   data_weights)
            if loader is None:
                die(f"stage {s} trains on {', '.join(STREAM_STAGE_TASKS[s])} conversations and data_dirs has none; "
                    f"add a world that has them" + (" (a captions world: data/captions/prepare.py)" if s == 1 else ''))
            if ck is not None:
                loader.load_state_dict(ck['data'])
            batches, cut = loader.batches(), [0]

            def step_batches(step):
                got = [stream_batch(next(batches)) for _ in range(llm_grad_accum)]
                counts = torch.tensor([sum(c[j] for _, c, _ in got) for j in range(3)], dtype=torch.float64, device=dev)
                if ddp:
                    torch.distributed.all_reduce(counts)
                cut[0] += sum(n for _, _, n in got)
                return [b for b, _, _ in got], tuple(max(1, n) / world for n in counts.tolist())
        else:
            # in memory: a fixed order of the stage's conversations per epoch, from (seed, stage, epoch);
            # a step number alone says which conversations it sees (exact resume), and rank r takes its
            # slices of the global batch (DDP == 1 process)
            rows_all = stage_rows(train['task'], STAGE_TASKS[s], repeat if s == 2 else None)
            N, G = len(rows_all), llm_batch_size * world * llm_grad_accum
            perms = {}

            def global_rows(step):
                i = step * G + torch.arange(G)
                epoch, pos = i // N, i % N
                out_ = torch.empty_like(i)
                for e in epoch.unique().tolist():                           # a step spans <= 2 epochs
                    if e not in perms:
                        perms.clear()
                        perms[e] = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000003 + s * 10007 + e))
                    out_[epoch == e] = perms[e][pos[epoch == e]]
                return rows_all[out_]

            def step_batches(step):
                rows = global_rows(step)
                norm = tuple(max(1, n) / world for n in loss_counts(train['P'], rows))
                mine = [rows[(micro * world + rank) * llm_batch_size:][:llm_batch_size] for micro in range(llm_grad_accum)]
                return [{k: v.to(dev) for k, v in collate(train['P'], train['bank'], r, gcfg, pack_rows=llm_pack_rows).items()} for r in mine], norm

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
            micro_batches, norm = step_batches(step)
            loss_sum = 0.0
            for micro, b in enumerate(micro_batches):
                sync = not ddp or micro == llm_grad_accum - 1
                with ctx, (fwd.no_sync() if not sync else nullcontext()):
                    loss, st = fwd(b, norm=norm, **weights)
                    loss.backward()
                loss_sum += loss.item() / world
                acc += stat_vector(st)
                tokens_seen += int(b['real'].sum()) * world
                seqs_seen += (int(b['doc'].max()) + 1) * world           # conversations (rows may hold several)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), llm_grad_clip)   # global: same on every rank
            if not (math.isfinite(loss_sum) and math.isfinite(gnorm.item())):
                die(f"loss is {loss_sum} at stage {s} step {step}; stopping. The last good checkpoint is {ckpt_path[s]}: "
                    f"resume from it with a lower learning rate (init_from=resume llm_learning_rate=...)", code=1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % log_interval == 0:
                if ddp:
                    acc = acc.to(dev)                                       # nccl reduces GPU tensors only
                    torch.distributed.all_reduce(acc)
                    acc = acc.cpu()
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
                    save(s, step, opt, loader.state_dict() if stream else None)
                    metrics = stream_eval(STREAM_STAGE_TASKS[s]) if stream else \
                        evaluate(model, detok, tok, test, records, STAGE_TASKS[s], gcfg, ctx, dev,
                                 setok.max_tokens, os.path.join(run_dir, 'samples.png'))
                    report(s, metrics)
                    if stream and cut[0]:
                        tqdm.write(f"warning: {cut[0]} conversations so far were longer than block_size={block_size} "
                                   f"tokens and cut there (raise block_size)", file=sys.stderr)
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
        print(f"done: {ckpt_path[stages[-1]]}, {os.path.join(run_dir, 'eval.json')}"
              + ('' if stream else f", {os.path.join(run_dir, 'samples.png')}"))
    if ddp:
        torch.distributed.destroy_process_group()
