"""
Train SeTok (ViT encoder + density-peak clustering + token merger), its detokenizer and a small
concept text encoder, with   loss = recon_weight * reconstruction + contrast_weight * contrastive.

    python train_setok.py config=small                    # the CPU toy, minutes on a laptop
    torchrun --nproc_per_node=8 train_setok.py config=full
    python train_setok.py config=small init_from=resume   # continue exactly where it stopped
    python train_setok.py config=small eval_only=True     # metrics + picture panel of a checkpoint
    python bench.py rows=smoke config=full                # the full preset's shapes, one step (time, memory)
    torchrun --nproc_per_node=8 train_setok.py config=full data_dirs=data/cc3m/world,data/refcoco/world \
        data_weights=0.9,0.1 num_workers=8               # converted real data (data/*/prepare.py), streamed

With data_dirs the images are streamed (data.stream.StreamingLoader: decoded, squared to image_size
and their concepts tokenised in num_workers processes; each DDP rank reads its own shard; the loader's
position is in the checkpoint, so init_from=resume goes on at the exact sample). Images without
concepts (caption and LLaVA worlds) add nothing to the contrastive loss; eval reports PSNR alone when
the val images have no instance maps.

Every module-level value below is a setting, overridable as key=value on the command line.
"""
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import sentencepiece as spm
import torch

from checkpoint import (RunLock, check_config, check_resume, load_checkpoint, load_weights, rng_state, save_checkpoint,
                        set_rng_state)
from common import (HERE, Progress, RunLog, adamw, as_list, cluster_overlay, compile_on, configure, count_flops,
                    counted_flops, die, keep_freed_memory, lr_at, pick_device, plot_curves, save_panel, setup_ddp,
                    to_uint8, wrap_ddp)
from data.order import DataOrder
from data.shapes.prepare import prepare
from data.stream import StreamingLoader
from data.world import load_split, resolve_world, world_settings, world_splits
from detok import DetokConfig, Tokenizer, psnr
from pretrained import init_vit, pretrained_config, vit_shape
from eval_setok import Partitions, error_overlay, error_sums, to_pixels
from setok import SeTokConfig, grid_labels

# -----------------------------------------------------------------------------
# settings
out_dir = 'out/setok'
data_dir = 'data/shapes/world'    # prepared automatically when missing
data_dirs = []                    # real worlds (data/captions, data/llava, data/refcoco, data/editing), streamed;
                                  # [] = data_dir, read into memory. The first world's tokenizer.model is used
data_weights = []                 # a mixture over data_dirs: one weight each ([] = every image once per epoch)
num_workers = 4                   # image-decoding processes of the streaming loader (0: in the main process)
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
cluster_threshold = 0.5         # on rho * delta, distances in units of the mean feature length (setok.py)
cluster_pos_weight = 1.0
cluster_layer = -1                # clustered features: -1 the encoder's output, L the hidden state after L blocks
cluster_merge = 0.0               # touching clusters closer than this across their boundary are joined (setok.merge_clusters; 0: off)
cluster_min_size = 0              # a cluster of at most this many patches joins its closest neighbour
min_tokens = 1
max_tokens = 16
grid_size = 3
# the encoder: from scratch, or pretrained CLIP / SigLIP weights (a Hugging Face folder: config.json +
# model.safetensors or pytorch_model.bin), whose config.json then fixes dim, depth, n_head, patch_size
# and the vit_ settings (SeTokConfig)
vit_init = ''                     # '' = from scratch | path to the folder
freeze_encoder = False            # the paper's frozen encoder: no gradients, eval mode, not in the optimizer
vit_style = 'nano'                # nano | clip | siglip
vit_mlp = 0                       # encoder MLP width (0: 4 * dim)
vit_act = ''                      # encoder MLP nonlinearity ('': the style's)
# detokenizer (DetokConfig with a dec_ prefix)
dec_sprite_size = 16              # each token draws an S x S sprite
dec_dim = 256                     # hidden width of the token -> sprite MLP
dec_sharpness = 10.0              # gain on the sprites' alpha logits (detok.py: steep edges from the start)
# concept text encoder
text_dim = 128
text_depth = 2
max_concepts = 6                  # concept slots per image
concept_len = 8                   # subword ids per concept
# loss
recon_weight = 1.0
contrast_weight = 1.0
grad_weight = 1.0                 # weight of the edge (finite-difference) term in the recon loss
geo_weight = 1.0                  # weight of the detokenizer's token-geometry loss (centre/spread of each cluster)
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
dtype = 'auto'                    # auto (bf16 on capable GPUs and CPUs, else float32: common.pick_device) | float32 | bfloat16
compile = 'auto'                  # auto: on for CUDA | True | False
threads = 0                       # CPU threads (0: torch's default)
config = configure(globals())
# -----------------------------------------------------------------------------


# the SeTok settings that fix parameter shapes; the clustering settings may change at eval time
ARCH_KEYS = ('image_size', 'patch_size', 'dim', 'depth', 'n_head', 'token_dim', 'intra_depth', 'inter_depth')
# what a resume must keep (checkpoint.check_resume): the model, the data and its order, the batch
RUN_KEYS = (*ARCH_KEYS, *(f.name for f in fields(SeTokConfig)), 'dec_sprite_size', 'dec_dim', 'dec_sharpness', 'text_dim',
            'text_depth', 'max_concepts', 'concept_len', 'vit_init', 'freeze_encoder', 'data_dir', 'data_dirs',
            'data_weights', 'data', 'batch_size', 'grad_accum', 'seed', 'processes')


def setok_config(cfg):
    return SeTokConfig(**{f.name: cfg[f.name] for f in fields(SeTokConfig)})


def detok_config(cfg):
    return DetokConfig(image_size=cfg['image_size'], token_dim=cfg['token_dim'], sprite_size=cfg['dec_sprite_size'],
                       dim=cfg['dec_dim'], sharpness=cfg['dec_sharpness'])


def encode_concepts(sp, records, P, L):
    """Each record's concepts -> ids (N, P, L) long padded with the tokenizer's pad id, valid (N, P) bool."""
    pad = sp.pad_id()
    ids = torch.full((len(records), P, L), pad, dtype=torch.long)
    for i, r in enumerate(records):
        for j, c in enumerate(r.get('concepts', ())[:P]):   # a real world may have none
            t = sp.encode(c)[:L]
            ids[i, j, :len(t)] = torch.tensor(t)
    return ids, (ids != pad).any(-1)


class ConceptIds:
    """The streaming loader's transform: one record's concepts -> {'concept_ids': (P, L), 'concept_valid':
    (P,)}, computed in the loader's workers (each loads the sentencepiece model once). A record without
    concepts (caption and LLaVA worlds have none) gets no valid slot: concept_contrastive_loss then
    has no positive for that image and it adds nothing to the contrastive term."""

    def __init__(self, model_file, P, L):
        self.model_file, self.P, self.L, self.sp = model_file, P, L, None

    def __getstate__(self):                          # workers started by spawn load the model themselves
        return {**self.__dict__, 'sp': None}

    def __call__(self, rec):
        if self.sp is None:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        ids, valid = encode_concepts(self.sp, [rec], self.P, self.L)
        return {'concept_ids': ids[0], 'concept_valid': valid[0]}


def streamed_data(dirs, sp_file, rank, world, master, cuda):
    """data_dirs: a StreamingLoader over their train splits (this rank's shard; images squared to
    image_size and concept ids made in the workers), and on rank 0 the eval set, held in memory as
    load_split's: the first eval_images of a seeded shuffle of their val images (test where no world
    has val; None where none has either), with 'instances' only when every one has a map and objects."""
    loader = StreamingLoader(dirs, 'train', image_size, batch_size, weights=data_weights, rank=rank, world=world,
                             seed=seed, workers=num_workers, pin_memory=cuda,
                             transform=ConceptIds(sp_file, max_concepts, concept_len))
    have = []
    for split in ('val', 'test'):
        have = [d for d in dirs if split in world_splits(d)[1]]
        if have:
            break
    if not master or not have or not eval_images:
        return loader, None
    got, n = [], 0
    for b in StreamingLoader(have, split, image_size, batch_size, seed=seed, workers=num_workers, instances=True):
        got.append(b)
        n += len(b['index'])
        if n >= eval_images:
            break
    records = [r for b in got for r in b['record']][:eval_images]
    val = {'images': torch.cat([b['image'] for b in got])[:eval_images].permute(0, 2, 3, 1).contiguous(),  # (N, S, S, 3)
           'records': records}
    if all(r.get('instances') and r.get('objects') for r in records):
        val['instances'] = torch.cat([b['instances'] for b in got])[:eval_images]   # (N, S, S)
    print(f"eval: {len(records)} {split} images of {len(have)} world(s)"
          + ('' if 'instances' in val else ', without instance maps: PSNR and tokens only'), flush=True)
    return loader, val


@torch.no_grad()
def evaluate(model, sp, val, concept_vocab, cfg, ctx, dev, panel_path=None):
    """Reconstruction PSNR; the partition against the objects (eval_setok.py: FG-ARI, mBO, cover90,
    excess tokens, Spearman(tokens, objects)), beside the grid baseline at the same mean token count;
    concept retrieval; and a picture panel. Without instance maps (val has no 'instances': real images
    of a caption or LLaVA world) PSNR and tokens per image only."""
    if not val:
        return {}
    model.eval()
    setok, n, full, B = model.setok, len(val['images']), 'instances' in val, cfg['batch_size']
    K = setok.max_tokens
    if full:
        vocab_ids, _ = encode_concepts(sp, [{'concepts': concept_vocab}], len(concept_vocab), cfg['concept_len'])
        vocab_emb = torch.nn.functional.normalize(model.text(vocab_ids[0].to(dev)).float(), dim=-1)  # (V, D)
        name_to_idx = {c: i for i, c in enumerate(concept_vocab)}
    ps, ntok, parts, hits, total, err, px = [], [], Partitions(), 0, 0, 0, 0
    for i in range(0, n, B):
        img = val['images'][i:i + B].to(dev).permute(0, 3, 1, 2).float() / 255
        with ctx:
            tokens, token_mask, labels = setok(img)
            recon = model.detok(tokens, token_mask)
        ps.append(psnr(recon.float(), img))
        ntok.append(token_mask.sum(1))
        inst, pix = (val['instances'][i:i + B].to(dev), to_pixels(img, labels, K)) if full else (None, None)
        if panel_path and i == 0:   # image, clusters (at pixel level), what is wrong with them, reconstruction
            k = min(8, len(img))
            errors = [error_overlay(img[j], inst[j], pix[j]) for j in range(k)] if full else []
            rows = [[to_uint8(img[j], 4) for j in range(k)],
                    [cluster_overlay(img[j], pix[j] if full else labels[j], 4) for j in range(k)],
                    *([[e[0] for e in errors]] if full else []), [to_uint8(recon[j].float(), 4) for j in range(k)]]
            text = [[''] * k, [f'{int(token_mask[j].sum())} tokens' for j in range(k)],
                    *([[e[1] for e in errors]] if full else []), [f'{ps[-1][j]:.1f} dB' for j in range(k)]]
            save_panel(rows, panel_path, text)
        if not full:
            continue
        m = parts.add(inst, pix, K, ntok[-1])
        e, c = error_sums(recon, img, inst)                                 # near edges, objects, background
        err, px = err + e, px + c
        # concept retrieval: the token of each object's best cluster, nearest concept in the vocabulary
        tok = torch.nn.functional.normalize(tokens.float(), dim=-1).gather(1, m['best'][..., None].expand(-1, -1, tokens.shape[-1]))
        pred = (tok @ vocab_emb.T).argmax(-1)                               # (B, O)
        for b, rec in enumerate(val['records'][i:i + B]):
            for o, obj in enumerate(rec['objects']):
                if m['present'][b, o]:
                    total += 1
                    name = obj.get('concept', obj.get('category'))      # RefCOCO's objects: a category
                    hits += int(pred[b, o].item() == name_to_idx.get(name, -1))
    out = {'psnr': torch.cat(ps).mean().item(), 'tokens': torch.cat(ntok).float().mean().item()}
    if full:
        # the grid baseline at the same mean number of tokens: g x g cells, g = round(sqrt(mean tokens))
        g, grid = max(1, round(out['tokens'] ** 0.5)), Partitions()
        for i in range(0, n, B):
            img = val['images'][i:i + B].permute(0, 3, 1, 2).float() / 255
            grid.add(val['instances'][i:i + B], to_pixels(img, grid_labels(len(img), setok.grid, g), g * g), g * g,
                     torch.full((len(img),), g * g))
        out.update(parts.summary(), retrieval=hits / max(1, total), grid_tokens=g * g,
                   **{f'grid_{k}': v for k, v in grid.summary().items() if k in ('fg_ari', 'mbo', 'mbo_bg')})
        # where the error lies: shares of the squared error and of the pixels near edges / objects / background,
        # and PSNR by the number of objects in the image
        ps, nobj = torch.cat(ps).cpu(), parts.column('objects')
        out.update(err_share=(err / err.sum()).tolist(), px_share=(px / px.sum()).tolist(),
                   psnr_by_objects={int(k): ps[nobj == k].mean().item() for k in nobj.unique()})
    model.train()
    return out


def fmt(m):
    if not m:
        return "no val or test images in data_dirs: eval skipped"
    if 'fg_ari' not in m:
        return (f"psnr {m['psnr']:.2f} dB | tokens {m['tokens']:.2f} | (no instance maps in the val images: "
                f"FG-ARI, mBO, Spearman and retrieval skipped)")
    return (f"psnr {m['psnr']:.2f} dB | FG-ARI {m['fg_ari']:.3f} (grid {m['grid_fg_ari']:.3f}) | mBO {m['mbo']:.3f} "
            f"(grid {m['grid_mbo']:.3f}), background {m['mbo_bg']:.3f} (grid {m['grid_mbo_bg']:.3f}) | cover90 {m['cover90']:.3f} | "
            f"tokens {m['tokens']:.2f} (grid {m['grid_tokens']}), excess {m['excess']:.2f}, exact {m['exact']:.3f} | "
            f"spearman {m['spearman']:.3f} | retrieval {m['retrieval']:.3f}")


def fmt_errors(m):
    """Where the reconstruction's error lies (eval_only prints it under the metrics)."""
    where = ('within 2 px of an edge', 'in objects', 'in the background')
    return ("squared error: " + ', '.join(f'{a:.0%} {w} ({b:.0%} of the pixels)' for a, b, w in
                                          zip(m['err_share'], m['px_share'], where))
            + " | PSNR by objects in the image: " + ', '.join(f'{k}: {v:.2f} dB' for k, v in sorted(m['psnr_by_objects'].items())))


# -----------------------------------------------------------------------------
# building the model: from scratch, or with a pretrained (and perhaps frozen) encoder

VIT_KEYS = ('vit_style', 'vit_mlp', 'vit_act')


def build_model(scfg, dcfg, sp, ck=None):
    """Tokenizer(...) with vit_init's weights in its encoder (unless a checkpoint `ck` brings all the
    weights) and the encoder frozen when freeze_encoder is set. sp: the text tokenizer."""
    model = Tokenizer(scfg, dcfg, sp.get_piece_size(), sp.pad_id(), config)
    if ck is not None:
        check_config(ckpt_path, {**asdict(SeTokConfig()), **ck['setok_config']}, {k: asdict(scfg)[k] for k in VIT_KEYS},
                     fix="pass the vit_init it was trained with")
    init_vit(model.setok.encoder, '' if ck is not None else vit_init, freeze_encoder)
    return model


if __name__ == '__main__':
    ddp, rank, world, dev = setup_ddp(device)
    dev, ptdtype, ctx = pick_device(dev, dtype)
    if dev == 'cpu':
        keep_freed_memory()
    master = rank == 0
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = os.path.join(HERE, out_dir) if not os.path.isabs(out_dir) else out_dir
    ckpt_path = os.path.join(out, 'ckpt.pt')

    # ---- a pretrained encoder: its config.json fixes the encoder's shape (build_model loads the weights)
    if vit_init:
        shape = vit_shape(pretrained_config(vit_init), vit_init)
        config.update(shape)
        globals().update(shape)
        if master:
            print(f"encoder: {vit_init} ({', '.join(f'{k}={v}' for k, v in shape.items())})")
    if tokenizer not in ('setok', 'grid', 'patch'):
        die(f"tokenizer={tokenizer}: expected setok, grid or patch")
    if not -1 <= cluster_layer < depth:
        die(f"cluster_layer={cluster_layer}: expected -1 (the encoder's output) or a number of blocks 0..{depth - 1}")
    if cluster_merge < 0 or cluster_min_size < 0:
        die(f"cluster_merge={cluster_merge}, cluster_min_size={cluster_min_size}: expected numbers >= 0 (0: no merging)")

    # ---- a checkpoint to resume from is checked first, before any data is loaded
    scfg, dcfg = setok_config(config), detok_config(config)
    ck = None
    if master:
        RunLock(out)                                                       # one writer per run folder
    if init_from == 'resume' or eval_only:
        ck = load_checkpoint(ckpt_path, kind='setok')
        arch = lambda s, d: {**{k: s.get(k) for k in ARCH_KEYS}, **{f'dec_{k}': v for k, v in d.items()}}
        check_config(ckpt_path, arch(ck['setok_config'], ck['detok_config']), arch(asdict(scfg), asdict(dcfg)),
                     fix="use the config it was trained with")
        if not eval_only and bool(data_dirs) != ('data' in ck):            # the data order must go on as it was
            die(f"{ckpt_path} was trained on {'streamed worlds (data_dirs)' if 'data' in ck else 'data_dir in memory'}; "
                f"resume it with the same data settings")
    elif init_from != 'scratch':
        die(f"init_from={init_from}: expected scratch or resume")

    # ---- data: real worlds (data_dirs) streamed, or the shapes world (data_dir) read into memory,
    # prepared on first use (rank 0 only, the others wait)
    stream = [resolve_world(d) for d in as_list(data_dirs)]
    world_dir = stream[0] if stream else data_dir if os.path.isabs(data_dir) else os.path.join(HERE, data_dir)
    if not stream:
        if master and not os.path.exists(os.path.join(world_dir, 'meta.json')):
            prepare(data_dir=world_dir, image_size=image_size)         # first run: make the shapes world
        if ddp:
            torch.distributed.barrier()
    # the text tokenizer: the checkpoint's (its text encoder knows those ids), else the (first) world's
    sp_file = ck['tokenizer_model'] if ck is not None and os.path.isfile(ck.get('tokenizer_model', '')) else \
        os.path.join(world_dir, 'tokenizer.model')
    if not os.path.isfile(sp_file):
        die(f"{world_dir} has no tokenizer.model; prepare (or convert) the world again")
    sp = spm.SentencePieceProcessor(model_file=sp_file)
    run = {'processes': world, 'data': [world_settings(d) for d in (stream or [world_dir])]}   # + config: check_resume's
    if ck is not None and not eval_only:
        check_resume(ckpt_path, ck, {**config, **run}, RUN_KEYS)
    if stream:
        loader, val = streamed_data(stream, sp_file, rank, world, master,
                                    dev.startswith('cuda'))
        n_train = len(loader.dataset)
        concept_vocab = sorted({c for r in (val or {}).get('records', ()) for c in r.get('concepts', ())})
    else:
        train = load_split(world_dir, 'train')
        val = load_split(world_dir, 'val')
        if train['images'].shape[1] != image_size:
            die(f"{world_dir} holds {train['images'].shape[1]}px images but image_size={image_size}; prepare a world of that size (data_dir=...)")
        train_img = torch.from_numpy(train['images'])                      # (N, H, W, 3) uint8
        n_train = len(train_img)
        train_ids, train_valid = encode_concepts(sp, train['records'], max_concepts, concept_len)
        val = {'images': torch.from_numpy(val['images'][:eval_images]), 'instances': torch.from_numpy(val['instances'][:eval_images]),
               'records': val['records'][:eval_images]}
        concept_vocab = sorted({c for r in train['records'] for c in r['concepts']})

    # ---- model, optimiser, (resumed) state
    model = build_model(scfg, dcfg, sp, ck).to(dev)
    opt = adamw(model.parameters(), learning_rate, weight_decay, (beta1, beta2))
    step = 0
    if ck is not None:
        load_weights(model, ck['model'], ckpt_path)
        opt.load_state_dict(ck['optimizer'])
        step = ck['step']
        set_rng_state(ck['rng'])
        if stream and not eval_only:
            loader.load_state_dict(ck['data'])                             # the next batch is the one that was due
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    n_params = sum(p.numel() for p in model.setok.parameters())
    if master:
        print(f"SeTok {n_params / 1e6:.2f}M params, detok {sum(p.numel() for p in model.detok.parameters()) / 1e6:.2f}M, "
              f"text {sum(p.numel() for p in model.text.parameters()) / 1e6:.2f}M | {n_train} train images"
              f"{f' in {len(stream)} streamed world(s)' if stream else ''} | "
              f"device {dev} {ptdtype} | {world} process(es)")

    def save(step):
        save_checkpoint({'kind': 'setok', 'model': model.state_dict(), 'optimizer': opt.state_dict(), 'step': step,
                         'rng': rng_state(), 'config': config, 'setok_config': asdict(scfg), 'detok_config': asdict(dcfg),
                         'tokenizer_model': sp_file, 'concept_vocab': concept_vocab, 'run': run,
                         **({'data': loader.state_dict()} if stream else {})}, ckpt_path)

    if eval_only:
        if master:
            m = evaluate(model, sp, val, concept_vocab, config, ctx, dev, os.path.join(out, 'eval.png'))
            print(f"eval step {step} | {fmt(m)}" + (f"\n{fmt_errors(m)}" if 'err_share' in m else '')
                  + f"\nwrote {os.path.join(out, 'eval.png')}")
        sys.exit(0)

    fwd = torch.compile(model) if compile_on(compile, dev) else model
    if ddp:
        fwd = wrap_ddp(fwd, dev)

    # ---- data order (data/order.py): a step number alone says which images it sees in memory, and
    # rank r takes its slice of the global batch (DDP == 1 process); streamed, each rank reads its
    # own shard and the loader's position, saved in the checkpoint, says which images come next.
    if stream:
        batches = loader.batches()

        def next_batch(step, micro):
            b = next(batches)
            return (b['image'].to(dev, non_blocking=True).float() / 255,    # (B, 3, H, W) in [0, 1]
                    b['concept_ids'].to(dev), b['concept_valid'].to(dev))   # (B, P, L), (B, P)
    else:
        order = DataOrder([len(train_img)], seed=seed)

        def next_batch(step, micro):
            idx = order.batch(step, batch_size, world, grad_accum).view(grad_accum, world, batch_size)[micro, rank]
            return (train_img[idx].to(dev).permute(0, 3, 1, 2).float() / 255,  # (B, 3, H, W) in [0, 1]
                    train_ids[idx].to(dev), train_valid[idx].to(dev))

    # ---- the training loop; log.jsonl gets a record every log_interval steps and at every eval
    log = RunLog(os.path.join(out, 'log.jsonl'), keep=(lambda r: r['step'] <= step) if ck is not None else None,
                 enabled=master)
    if ck is None:
        log.write('setup', 0, params=sum(p.numel() for p in model.parameters()), images=n_train, world=world,
                  dtype=str(ptdtype).replace('torch.', ''))
    total = lr_decay_iters or max_iters
    bar = Progress(max_iters, step, 'train_setok', log_interval, enabled=master)
    t0, seen, step_flops = time.time(), 0, None
    while step < max_iters:
        lr = lr_at(step, learning_rate, warmup_iters, total, min_lr_ratio)
        for g in opt.param_groups:
            g['lr'] = lr
        for micro in range(grad_accum):
            img, ids, valid = next_batch(step, micro)
            sync = not ddp or micro == grad_accum - 1
            # the first micro-step's FLOPs: the log's 'flops' is one step of this process, from which
            # bench.py gives the CPU / GPU MFU
            count = count_flops(step_flops is None and step == 0 and fwd is model)
            with ctx, count, (fwd.no_sync() if not sync else nullcontext()):
                loss, stats = fwd(img, ids, valid)
                (loss / grad_accum).backward()
            if step_flops is None:
                step_flops = counted_flops(count) * grad_accum
        if not torch.isfinite(loss):
            die(f"loss is {loss.item()} at step {step}; stopping. The last good checkpoint is {ckpt_path}: "
                f"resume from it with a lower learning_rate (init_from=resume learning_rate=...)", code=1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seen += batch_size * world * grad_accum
        news = {}
        if master and step % log_interval == 0:
            rec = log.write('train', step, lr=lr, loss=loss.item(), psnr=-10 * math.log10(max(stats['mse'].item(), 1e-10)),
                            contrast=stats['contrast'].item(), tokens=stats['tokens'].item(),
                            img_s=seen / (time.time() - t0), **({'flops': step_flops} if step_flops else {}))
            news = dict(loss=f"{rec['loss']:.4f}", psnr=f"{rec['psnr']:.1f}", con=f"{rec['contrast']:.3f}",
                        tok=f"{rec['tokens']:.1f}", img_s=f"{rec['img_s']:.0f}")
        bar.update(step, **news)
        if step % eval_interval == 0 or step == max_iters:
            if master:
                save(step)
                m = evaluate(model, sp, val, concept_vocab, config, ctx, dev, os.path.join(out, 'eval.png'))
                log.write('eval', step, **m)
                plot_curves(log.records(), os.path.join(out, 'curves.png'),
                            ['loss', 'psnr', 'contrast', 'tokens', 'fg_ari', 'mbo', 'excess', 'spearman', 'retrieval'])
                bar.write(f"step {step} | {fmt(m)} | {time.time() - t0:.0f}s")
            if ddp:
                torch.distributed.barrier()
    bar.close()
    if master:
        print(f"done: {ckpt_path}, panel {os.path.join(out, 'eval.png')}, curves {os.path.join(out, 'curves.png')}")
    if ddp:
        torch.distributed.destroy_process_group()
