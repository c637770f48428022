"""
Train SeTok (ViT encoder + density-peak clustering + token merger), its detokenizer and a small
concept text encoder, with   loss = recon_weight * reconstruction + contrast_weight * contrastive.

    python train_setok.py config=small                    # the CPU toy, minutes on a laptop
    torchrun --nproc_per_node=8 train_setok.py config=full
    python train_setok.py config=small init_from=resume   # continue exactly where it stopped
    python train_setok.py config=small eval_only=True     # metrics + picture panel of a checkpoint

Every module-level value below is a setting, overridable as key=value on the command line.
"""
import functools
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common import (HERE, cluster_overlay, configure, die, gather_all, load_checkpoint, lr_at, pick_device,
                    rng_state, save_checkpoint, save_panel, set_rng_state, setup_ddp, to_uint8)
from detok import DetokConfig, Detokenizer, detok_loss, psnr
from setok import SeTok, SeTokConfig, TextEncoder, concept_contrastive_loss, grid_labels

# -----------------------------------------------------------------------------
# settings
out_dir = 'out/setok'
data_dir = 'data/shapes/world'    # prepared automatically when missing
init_from = 'scratch'             # 'scratch' or 'resume' (from out_dir/ckpt.pt)
eval_only = False
eval_interval = 500
eval_images = 500                 # val images used by eval
log_interval = 10
seed = 1337
# data
batch_size = 64                   # per process, per micro-step
grad_accum = 1
# SeTok (names match SeTokConfig)
image_size = 64
patch_size = 4
dim = 128
depth = 4
n_head = 4
token_dim = 128
intra_depth = 2
inter_depth = 2
tokenizer = 'setok'               # setok | grid | patch
cluster_k = 5
cluster_threshold = 0.1
cluster_pos_weight = 1.0
min_tokens = 1
max_tokens = 16
grid_size = 3
# detokenizer (DetokConfig with a dec_ prefix)
dec_patch_size = 8
dec_dim = 128
dec_depth = 4
dec_n_head = 4
# concept text encoder
text_dim = 128
text_depth = 2
max_concepts = 6                  # concept slots per image
concept_len = 8                   # subword ids per concept
# loss
recon_weight = 1.0
contrast_weight = 1.0
grad_weight = 1.0                 # weight of the edge (finite-difference) term in the recon loss
# optimiser
learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 0                # 0: = max_iters
warmup_iters = 200
min_lr_ratio = 0.1
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# system
device = 'auto'                   # auto | cpu | cuda | cuda:1 | mps
dtype = 'auto'                    # auto (bf16 on capable GPUs, else float32) | float32 | bfloat16
compile = 'auto'                  # auto: on for CUDA | True | False
threads = 0                       # CPU threads (0: torch's default)
config = configure(globals())
# -----------------------------------------------------------------------------


# the SeTok settings that fix parameter shapes; the clustering settings may change at eval time
ARCH_KEYS = ('image_size', 'patch_size', 'dim', 'depth', 'n_head', 'token_dim', 'intra_depth', 'inter_depth')


def setok_config(cfg):
    return SeTokConfig(**{f.name: cfg[f.name] for f in fields(SeTokConfig)})


def detok_config(cfg):
    return DetokConfig(image_size=cfg['image_size'], patch_size=cfg['dec_patch_size'], token_dim=cfg['token_dim'],
                       dim=cfg['dec_dim'], depth=cfg['dec_depth'], n_head=cfg['dec_n_head'])


class Tokenizer(nn.Module):
    """Everything train_setok.py trains, in one module so that DDP and torch.compile see one graph."""

    def __init__(self, setok_cfg, detok_cfg, vocab_size, cfg):
        super().__init__()
        self.setok = SeTok(setok_cfg)
        self.detok = Detokenizer(detok_cfg)
        self.text = TextEncoder(vocab_size, cfg['text_dim'], cfg['text_depth'], cfg['n_head'], setok_cfg.token_dim,
                                max_len=cfg['concept_len'])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # CLIP's init, temperature 0.07
        self.w = (cfg['recon_weight'], cfg['contrast_weight'], cfg['grad_weight'])

    def forward(self, img, concept_ids, concept_valid):
        tokens, token_mask, labels = self.setok(img)                        # (B,K,D), (B,K), (B,N)
        recon = self.detok(tokens, token_mask)                              # (B,3,H,W)
        rec_loss, mse = detok_loss(recon.float(), img, self.w[2])
        B, P, L = concept_ids.shape
        concepts = self.text(concept_ids.view(B * P, L)).view(B, P, -1)     # (B,P,D)
        # in-batch negatives come from every DDP rank (identity on one process)
        con_loss = concept_contrastive_loss(gather_all(tokens), gather_all(token_mask, grad=False),
                                            gather_all(concepts), gather_all(concept_ids, grad=False),
                                            gather_all(concept_valid, grad=False), self.logit_scale)
        loss = self.w[0] * rec_loss + self.w[1] * con_loss
        return loss, {'mse': mse.detach(), 'contrast': con_loss.detach(), 'tokens': token_mask.sum(1).float().mean()}


def encode_concepts(sp, records, P, L, pad=3):
    """Each record's concepts -> ids (N, P, L) long padded with `pad`, valid (N, P) bool."""
    ids = torch.full((len(records), P, L), pad, dtype=torch.long)
    for i, r in enumerate(records):
        for j, c in enumerate(r['concepts'][:P]):
            t = sp.encode(c)[:L]
            ids[i, j, :len(t)] = torch.tensor(t)
    return ids, (ids != pad).any(-1)


def patch_gt(instances, grid, n_obj):
    """Instance maps (B, H, W) -> each patch's majority label (B, N): 0 background, i object i."""
    B, H, W = instances.shape
    p = H // grid
    oh = torch.nn.functional.one_hot(instances.long(), n_obj + 1).float()   # (B, H, W, O+1)
    oh = oh.view(B, grid, p, grid, p, -1).sum((2, 4))                       # (B, g, g, O+1) pixel counts
    return oh.argmax(-1).flatten(1)                                         # (B, N)


def best_iou(gt, labels, n_obj, K):
    """For each ground-truth object: the best IoU of any one cluster with it, at patch level.
    gt, labels (B, N). Returns (B, n_obj) IoUs and (B, n_obj) mask of objects with >= 1 patch."""
    g = torch.nn.functional.one_hot(gt, n_obj + 1)[..., 1:].float()         # (B, N, O) objects only
    c = torch.nn.functional.one_hot(labels, K).float()                      # (B, N, K)
    inter = g.transpose(1, 2) @ c                                           # (B, O, K)
    union = g.sum(1)[..., None] + c.sum(1)[:, None, :] - inter
    return (inter / union.clamp_min(1)).amax(-1), g.sum(1) > 0


def spearman(a, b):
    """Spearman rank correlation with average ranks for ties."""
    def rank(x):
        x = np.asarray(x, float)
        order = x.argsort(kind='stable')
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):                                              # average the ranks of ties
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def evaluate(model, sp, val, concept_vocab, cfg, ctx, dev, panel_path=None):
    """Reconstruction PSNR, mean best IoU (SeTok vs the grid baseline at the same mean token count),
    Spearman(tokens, objects), concept retrieval accuracy; and a picture panel."""
    model.eval()
    setok, n = model.setok, len(val['images'])
    n_obj = int(val['instances'].max())
    vocab_ids, _ = encode_concepts(sp, [{'concepts': concept_vocab}], len(concept_vocab), cfg['concept_len'])
    vocab_emb = torch.nn.functional.normalize(model.text(vocab_ids[0].to(dev)).float(), dim=-1)  # (V, D)
    name_to_idx = {c: i for i, c in enumerate(concept_vocab)}
    ps, ious, masks, ntok, nobj, hits, total, grid_ious = [], [], [], [], [], 0, 0, []
    for i in range(0, n, cfg['batch_size']):
        img = val['images'][i:i + cfg['batch_size']].to(dev).permute(0, 3, 1, 2).float() / 255
        inst = val['instances'][i:i + cfg['batch_size']].to(dev)
        with ctx:
            tokens, token_mask, labels = setok(img)
            recon = model.detok(tokens, token_mask)
        ps.append(psnr(recon.float(), img))
        gt = patch_gt(inst, setok.grid, n_obj)
        iou, m = best_iou(gt, labels, n_obj, setok.max_tokens)
        ious.append(iou[m]); masks.append(m)
        ntok.append(token_mask.sum(1)); nobj.append(inst.flatten(1).amax(1))
        # concept retrieval: the token of each object's best cluster, nearest concept in the vocabulary
        oh_g = torch.nn.functional.one_hot(gt, n_obj + 1)[..., 1:].float()
        oh_c = torch.nn.functional.one_hot(labels, setok.max_tokens).float()
        inter = oh_g.transpose(1, 2) @ oh_c
        best = (inter / (oh_g.sum(1)[..., None] + oh_c.sum(1)[:, None] - inter).clamp_min(1)).argmax(-1)  # (B, O)
        tok = torch.nn.functional.normalize(tokens.float(), dim=-1).gather(1, best[..., None].expand(-1, -1, tokens.shape[-1]))
        pred = (tok @ vocab_emb.T).argmax(-1)                               # (B, O)
        for b, rec in enumerate(val['records'][i:i + cfg['batch_size']]):
            for o, obj in enumerate(rec['objects']):
                if m[b, o]:
                    total += 1
                    hits += int(pred[b, o].item() == name_to_idx.get(obj['concept'], -1))
        if panel_path and i == 0:
            k = min(8, len(img))
            rows = [[to_uint8(img[j], 4) for j in range(k)],
                    [cluster_overlay(img[j], labels[j], 4) for j in range(k)],
                    [to_uint8(recon[j].float(), 4) for j in range(k)]]
            text = [[''] * k, [f'{int(token_mask[j].sum())} tokens' for j in range(k)],
                    [f'{ps[-1][j]:.1f} dB' for j in range(k)]]
            save_panel(rows, panel_path, text)
    ntok, nobj = torch.cat(ntok).cpu(), torch.cat(nobj).cpu()
    # the grid baseline at the same mean number of tokens: g x g cells, g = round(sqrt(mean tokens))
    g = max(1, round(ntok.float().mean().sqrt().item()))
    for i in range(0, n, cfg['batch_size']):
        inst = val['instances'][i:i + cfg['batch_size']]
        gt = patch_gt(inst, setok.grid, n_obj)
        iou, m = best_iou(gt, grid_labels(len(inst), setok.grid, g), n_obj, g * g)
        grid_ious.append(iou[m])
    model.train()
    return {'psnr': torch.cat(ps).mean().item(), 'miou': torch.cat(ious).mean().item(),
            'grid_miou': torch.cat(grid_ious).mean().item(), 'grid_tokens': g * g,
            'tokens': ntok.float().mean().item(), 'spearman': spearman(ntok.numpy(), nobj.numpy()),
            'retrieval': hits / max(1, total)}


def fmt(m):
    return (f"psnr {m['psnr']:.2f} dB | mean best IoU {m['miou']:.3f} (grid {m['grid_miou']:.3f} @ {m['grid_tokens']} tok)"
            f" | tokens {m['tokens']:.2f} | spearman {m['spearman']:.3f} | retrieval {m['retrieval']:.3f}")


if __name__ == '__main__':
    ddp, rank, world, dev = setup_ddp(device)
    dev, ptdtype, ctx = pick_device(dev, dtype)
    master = rank == 0
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = os.path.join(HERE, out_dir) if not os.path.isabs(out_dir) else out_dir
    ckpt_path = os.path.join(out, 'ckpt.pt')

    # ---- a checkpoint to resume from is checked first, before any data is loaded
    scfg, dcfg = setok_config(config), detok_config(config)
    ck = None
    if init_from == 'resume' or eval_only:
        ck = load_checkpoint(ckpt_path, kind='setok')
        arch = lambda s, d: {**{k: v for k, v in s.items() if k in ARCH_KEYS}, **{f'dec_{k}': v for k, v in d.items()}}
        mine, theirs = arch(asdict(scfg), asdict(dcfg)), arch(ck['setok_config'], ck['detok_config'])
        if mine != theirs:
            diff = ', '.join(f"{k}={theirs[k]} (here {mine[k]})" for k in mine if mine[k] != theirs.get(k))
            die(f"{ckpt_path} has another model shape: {diff}; use the config it was trained with")
    elif init_from != 'scratch':
        die(f"init_from={init_from}: expected scratch or resume")

    # ---- data: the shapes world is prepared on first use (rank 0 only, the others wait)
    from data.loader import load_split
    from data.shapes.prepare import prepare
    world_dir = data_dir if os.path.isabs(data_dir) else os.path.join(HERE, data_dir)
    if master and not os.path.exists(os.path.join(world_dir, 'meta.json')):
        prepare(data_dir=world_dir, image_size=image_size)             # first run: make the shapes world
    if ddp:
        torch.distributed.barrier()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(world_dir, 'tokenizer.model'))
    train = load_split(world_dir, 'train')
    val = load_split(world_dir, 'val')
    if train['images'].shape[1] != image_size:
        die(f"{world_dir} holds {train['images'].shape[1]}px images but image_size={image_size}; prepare a world of that size (data_dir=...)")
    train_img = torch.from_numpy(train['images'])                          # (N, H, W, 3) uint8
    train_ids, train_valid = encode_concepts(sp, train['records'], max_concepts, concept_len)
    val = {'images': torch.from_numpy(val['images'][:eval_images]), 'instances': torch.from_numpy(val['instances'][:eval_images]),
           'records': val['records'][:eval_images]}
    concept_vocab = sorted({c for r in train['records'] for c in r['concepts']})

    # ---- model, optimiser, (resumed) state
    model = Tokenizer(scfg, dcfg, sp.get_piece_size(), config).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=learning_rate, betas=(beta1, beta2))
    step = 0
    if ck is not None:
        model.load_state_dict(ck['model'])
        opt.load_state_dict(ck['optimizer'])
        step = ck['step']
        set_rng_state(ck['rng'])
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    n_params = sum(p.numel() for p in model.setok.parameters())
    if master:
        print(f"SeTok {n_params / 1e6:.2f}M params, detok {sum(p.numel() for p in model.detok.parameters()) / 1e6:.2f}M, "
              f"text {sum(p.numel() for p in model.text.parameters()) / 1e6:.2f}M | {len(train_img)} train images | "
              f"device {dev} {ptdtype} | {world} process(es)")

    def save(step):
        save_checkpoint({'kind': 'setok', 'model': model.state_dict(), 'optimizer': opt.state_dict(), 'step': step,
                         'rng': rng_state(), 'config': config, 'setok_config': asdict(scfg), 'detok_config': asdict(dcfg),
                         'tokenizer_model': os.path.join(world_dir, 'tokenizer.model'), 'concept_vocab': concept_vocab},
                        ckpt_path)

    if eval_only:
        if master:
            m = evaluate(model, sp, val, concept_vocab, config, ctx, dev, os.path.join(out, 'eval.png'))
            print(f"eval step {step} | {fmt(m)}\nwrote {os.path.join(out, 'eval.png')}")
        sys.exit(0)

    use_compile = str(compile).lower() in ('true', '1', 'yes') or (compile == 'auto' and dev.startswith('cuda'))
    fwd = torch.compile(model) if use_compile else model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(fwd, device_ids=[int(os.environ['LOCAL_RANK'])] if dev.startswith('cuda') else None)

    # ---- data order: a fixed permutation per epoch from the seed, so a step number alone says which
    # images it sees (exact resume), and rank r takes its slice of the global batch (DDP == 1 process)
    N, global_batch = len(train_img), batch_size * world * grad_accum
    @functools.lru_cache(maxsize=2)
    def epoch_perm(e):
        return torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1000 + e))

    def batch_indices(step, micro):
        idx = step * global_batch + (micro * world + rank) * batch_size + torch.arange(batch_size)
        epoch, pos = idx // N, idx % N                                      # a batch spans <= 2 epochs
        out = torch.empty_like(idx)
        for e in epoch.unique().tolist():
            out[epoch == e] = epoch_perm(e)[pos[epoch == e]]
        return out

    total = lr_decay_iters or max_iters
    bar = tqdm(total=max_iters, initial=step, disable=not master, desc='train_setok', dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < max_iters:
        lr = lr_at(step, learning_rate, warmup_iters, total, min_lr_ratio)
        for g in opt.param_groups:
            g['lr'] = lr
        for micro in range(grad_accum):
            idx = batch_indices(step, micro)
            img = train_img[idx].to(dev).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
            sync = not ddp or micro == grad_accum - 1
            with ctx, (fwd.no_sync() if not sync else nullcontext()):
                loss, stats = fwd(img, train_ids[idx].to(dev), train_valid[idx].to(dev))
                (loss / grad_accum).backward()
        if not torch.isfinite(loss):
            die(f"loss is {loss.item()} at step {step}; stopping. The last good checkpoint is {ckpt_path}: "
                f"resume from it with a lower learning_rate (init_from=resume learning_rate=...)", code=1)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += global_batch
        if master and step % log_interval == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{-10 * math.log10(max(stats['mse'].item(), 1e-10)):.1f}",
                            con=f"{stats['contrast'].item():.3f}", tok=f"{stats['tokens'].item():.1f}",
                            img_s=f"{seen / (time.time() - t0):.0f}")
        bar.update(1)
        if step % eval_interval == 0 or step == max_iters:
            if master:
                save(step)
                m = evaluate(model, sp, val, concept_vocab, config, ctx, dev, os.path.join(out, 'eval.png'))
                tqdm.write(f"step {step} | {fmt(m)} | {time.time() - t0:.0f}s")
            if ddp:
                torch.distributed.barrier()
    bar.close()
    if master:
        print(f"done: {ckpt_path}, panel {os.path.join(out, 'eval.png')}")
    if ddp:
        torch.distributed.destroy_process_group()
