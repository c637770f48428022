"""
Train SETOKIM (setokim.py): a GPT that reads and writes SeTok's visual tokens, on the shapes world's
conversations. SeTok and its detokenizer are frozen.

    python train_setokim.py config=small                   # stage 1 then stage 2; trains SeTok first
                                                           # (train_setok.py) when out/small/ckpt.pt is missing
    python train_setokim.py config=small stage=2           # instruction tuning only, from stage 1's checkpoint
    python train_setokim.py config=small tokenizer=grid    # the controlled comparison: only the visual
                                                           # tokenizer changes (setok | grid | patch)
    python train_setokim.py config=small pos_emb=rope2d    # 2D rotary positions for visual tokens (setokim.py, 1)
    python train_setokim.py config=small init_from=resume  # continue exactly where it stopped
    python train_setokim.py config=small eval_only=True    # test-split metrics of the latest checkpoint (eval_setokim.py)
    python bench.py rows=smoke config=full                 # the full preset's shapes, one step of each stage
    torchrun --nproc_per_node=8 train_setokim.py config=full
    torchrun --nproc_per_node=8 train_setokim.py config=full text_tokenizer=gpt2 num_workers=8 \
        data_dirs=data/cc3m/world,data/llava/world,data/refcoco/world,data/magicbrush/world

With data_dirs (real worlds converted by data/*/prepare.py) the conversations are streamed and their
images tokenised by the frozen SeTok inside the training step (data/conversations.py: StreamedBatches);
chat (LLaVA's turns) joins the tasks, and eval is the teacher-forced losses on the worlds' val split.

Stage 1 (multimodal pretraining): captioning (image -> text) and text-to-image (text -> image).
Stage 2 (instruction tuning), initialised from stage 1: the whole mix (captioning, VQA, referring
segmentation, text-to-image, editing). The loss is on answers only in both. Unlike the paper (a
pretrained Vicuna, frozen in stage 1) the LLM here starts from scratch, so both stages train every
SETOKIM weight.

Files, in out_dir/run_name (run_name defaults to setokim, or setokim_grid / setokim_patch): stage1.pt,
stage2.pt (checkpoints; sample.py loads stage2.pt), eval.json and samples.png (the latest eval),
log.jsonl and curves.png (every log line and eval). Next to the SeTok checkpoint, setokim_cache/ holds
SeTok's tokens of every image of the world, computed once since SeTok is frozen (data/conversations.py).

Settings that train_setok.py also has, with another meaning there (batch size, learning rate,
iterations, eval interval, ...), carry an llm_ prefix here, so one preset can hold both.
Every module-level value below is a setting, overridable as key=value on the command line.
"""
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial

import torch

from checkpoint import (RunLock, check_config, check_resume, gpt_config_of, load_checkpoint, load_setok, load_weights, rng_state,
                        save_checkpoint, set_rng_state)
from common import (HERE, Progress, RunLog, adamw, as_list, compile_on, configure, count_flops, counted_flops, die,
                    lr_at, parse_args, peak_flops, pick_device, plot_curves, setup_ddp, sha1_file, wrap_ddp)
from data.conversations import (STREAM_TASKS, TASKS, CachedBatches, StreamedBatches, conversation_loader, load_world,
                                parse_repeat, stage_rows, token_cache, token_stats)
from data.shapes.prepare import prepare
from data.text import TextTokenizer, tiktoken_gpt2
from data.world import resolve_world, world_settings, world_splits
from eval_setokim import Eval, evaluate, fmt, stat_means, stat_vector, stream_losses
from pretrained import gpt2_shape, init_gpt2, pretrained_config
from setokim import SETOKIM, GPTConfig, pos_emb_error, sampling_error, setok_tokens

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
pos_emb = 'learned'               # learned: GPT-2's table | rope2d: rotary positions, 2D for visual tokens (setokim.py,
                                  # section 1) | learned+rope2d: both (RESULTS.md, section 16: learned writes better)
# the mask decoder
mask_dim = 128
mask_depth = 2
mask_n_head = 4
mask_refine = True
# writing images (setokim.py section 4)
gen_head = 'diffusion'            # diffusion (a per-token diffusion head samples each written token) | mse (regression)
diff_width = 256                  # the diffusion head's width and residual blocks
diff_depth = 3
diff_mean = True                  # the diffusion head samples the residual around a regressed mean (False: MAR's head)
copy_head = True                  # an edit's written token is an input token, kept exactly or changed (setokim.py, 4b)
diff_draws = 4                    # noise draws per written token in the diffusion loss
cond_drop = 0.1                   # share of written tokens trained without their condition (for cfg_scale)
copy_weight = 1.0                 # the copy head's loss (pointer CE + keep BCE), added to each edit token's loss
copy_tau = 0.1                    # the keep gate's target: the pointed input token is kept within this mean squared distance
img_temperature = 0.25            # sampling: the diffusion head's starting noise scale (1: a plain draw; lower: surer)
diff_steps = 50                   # sampling: denoising steps per token
cfg_scale = 1.0                   # sampling: classifier-free guidance (1: none)
# loss
ce_weight = 1.0                   # text CE (answers only)
reg_weight = 1.0                  # written visual tokens: the diffusion loss (or MSE + cos_weight * (1 - cosine))
cos_weight = 1.0
mask_weight = 1.0                 # referring masks: BCE + dice_weight * dice
dice_weight = 1.0
# optimiser (per stage: a fresh AdamW and a fresh schedule)
llm_batch_size = 32               # conversations per process per micro-step
llm_grad_accum = 1
llm_pack_rows = True              # several conversations per row (data.batch.collate): the same loss on fewer padded
                                  # positions. False: one conversation per row, padded to the batch's longest
llm_learning_rate = 1e-3
task_repeat = []                  # stage 2's mix, name:n entries: task_repeat=vqa:2,refer:2 puts each VQA and referring
                                  # conversation into an epoch twice; a VQA kind too (relation:3, count:2) ([]: the world's
                                  # mix once; data_dirs: use data_weights)
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
dtype = 'auto'                    # auto (bf16 on capable GPUs and CPUs, else float32: common.pick_device) | float32 | bfloat16
compile = 'auto'                  # auto: on for CUDA | True | False
threads = 0                       # CPU threads (0: torch's default)
config = configure(globals())
# -----------------------------------------------------------------------------

STAGE_TASKS = {1: ('caption', 't2i'), 2: TASKS}
STREAM_STAGE_TASKS = {1: ('caption', 't2i'), 2: STREAM_TASKS}
NORM_IMAGES = 1024                # data_dirs: SeTok tokens of this many train images set SETOKIM's token statistics
RUN_KEYS = ('data_dir', 'data_dirs', 'data_weights', 'task_repeat', 'llm_batch_size', 'llm_grad_accum', 'llm_pack_rows',
            'seed', 'tokenizer', 'grid_size', 'text_tokenizer', 'processes', 'data', 'setok')   # check_resume's
FORWARD = ('out_dir', 'data_dir', 'data_dirs', 'data_weights', 'num_workers', 'log_interval', 'seed', 'device', 'dtype',
           'compile', 'threads')  # the settings train_setok.py shares, passed on when it trains SeTok first

if tokenizer not in ('setok', 'grid', 'patch'):
    die(f"tokenizer={tokenizer}: expected setok, grid or patch")
if stage not in (0, 1, 2):
    die(f"stage={stage}: expected 0 (both), 1 or 2")
if text_tokenizer not in ('sentencepiece', 'gpt2'):
    die(f"text_tokenizer={text_tokenizer}: expected sentencepiece or gpt2")
if gen_head not in ('diffusion', 'mse'):
    die(f"gen_head={gen_head}: expected diffusion or mse")
for name, value, ok, want in (('diff_draws', diff_draws, diff_draws >= 1, 'an integer >= 1'),
                              ('cond_drop', cond_drop, 0 <= cond_drop < 1, 'in [0, 1)'),
                              ('copy_tau', copy_tau, copy_tau > 0, '> 0')):
    if not ok:
        die(f"{name}={value}: expected {want}")
if err := sampling_error(diff_steps, img_temperature, cfg_scale):
    die(err)
repeat = parse_repeat(task_repeat)
if repeat and data_dirs:
    die("task_repeat mixes the shapes world's tasks; mix streamed worlds (data_dirs) with data_weights")
presets = [v for k, v in parse_args(sys.argv[1:], globals()) if k == 'config']
pretrained = '' if init_from in ('scratch', 'resume') else gpt2_dir if init_from == 'gpt2-local' else init_from
if pretrained and not os.path.isdir(pretrained):
    die(f"init_from={init_from}: {pretrained} is not a folder; expected scratch, resume, gpt2-local (GPT-2 in gpt2_dir="
        f"{gpt2_dir}) or a GPT-2 folder (huggingface-cli download openai-community/gpt2 config.json model.safetensors "
        f"--local-dir {gpt2_dir})")
if pretrained and text_tokenizer != 'gpt2':
    die(f"init_from={init_from}: GPT-2's weights only know GPT-2's BPE ids; add text_tokenizer=gpt2")
if err := pos_emb_error(pos_emb, bool(pretrained)):
    die(err)
llm_shape = (gpt2_shape(pretrained_config(pretrained)) if pretrained else
             {'n_layer': llm_n_layer, 'n_head': llm_n_head, 'n_embd': llm_n_embd})

# ---- system, and the paths of this run
ddp, rank, world, dev = setup_ddp(device)
dev, ptdtype, ctx = pick_device(dev, dtype)
master = rank == 0
if threads:
    torch.set_num_threads(threads)
if text_tokenizer == 'gpt2':
    tiktoken_gpt2()                                # before any work: a one-line error when it is not cached
out = out_dir if os.path.isabs(out_dir) else os.path.join(HERE, out_dir)
setok_path = setok_ckpt or os.path.join(out, 'ckpt.pt')
setok_path = setok_path if os.path.isabs(setok_path) else os.path.join(HERE, setok_path)
run_dir = os.path.join(out, run_name or ('setokim' if tokenizer == 'setok' else f'setokim_{tokenizer}'))
ckpt_path = {s: os.path.join(run_dir, f'stage{s}.pt') for s in (1, 2)}

# ---- the checkpoints this run needs are checked before any work; one writer per run folder
if master:
    RunLock(run_dir)
if eval_only:
    have = [s for s in ([2, 1] if stage == 0 else [stage]) if os.path.isfile(ckpt_path[s])]
    if not have:
        die(f"eval_only: no checkpoint {' or '.join(ckpt_path[s] for s in ([2, 1] if stage == 0 else [stage]))}; train first")
elif init_from == 'resume' and not any(os.path.isfile(ckpt_path[s]) for s in ((1, 2) if stage == 0 else (stage,))):
    die(f"init_from=resume: no checkpoint to resume in {run_dir}; start with init_from=scratch")
elif stage == 2 and not (init_from == 'resume' and os.path.isfile(ckpt_path[2])) and not os.path.isfile(ckpt_path[1]):
    die(f"stage=2 starts from stage 1's checkpoint {ckpt_path[1]}, which does not exist; run stage=1 first")

# ---- the frozen SeTok: config=small trains one first when it is missing
if not os.path.isfile(setok_path):
    if setok_ckpt or 'small' not in presets:
        die(f"SeTok checkpoint {setok_path} not found; train one first: torchrun --nproc_per_node=8 train_setok.py "
            f"config=full, then torchrun --nproc_per_node=8 train_setokim.py config=full (the CPU toy, config=small, "
            f"trains its own), or pass setok_ckpt=PATH")
    if master:
        args = [f'config={p}' for p in presets] + [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                                                    for k in FORWARD if (v := config[k]) != []]
        print(f"no SeTok checkpoint at {setok_path}: training one first: train_setok.py {' '.join(args)}", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE',
               'MASTER_ADDR', 'MASTER_PORT', 'GROUP_RANK', 'ROLE_RANK', 'TORCHELASTIC_RUN_ID')}   # one process
        r = subprocess.run([sys.executable, os.path.join(HERE, 'train_setok.py'), *args], cwd=HERE, env=env)
        if r.returncode != 0 or not os.path.isfile(setok_path):
            die(f"train_setok.py failed (exit {r.returncode}); fix that first, then run train_setokim.py again")
    if ddp:
        torch.distributed.barrier()
overrides = {'tokenizer': tokenizer, **({'grid_size': grid_size} if grid_size else {})}
setok, detok, _ = load_setok(setok_path, dev, **overrides)
for p in [*setok.parameters(), *detok.parameters()]:
    p.requires_grad_(False)
tokenize = partial(setok_tokens, setok, ctx=ctx)   # images -> SeTok's tokens in reading order (setokim.py)
setok_hash = sha1_file(setok_path)                 # its identity: the token cache's name, what a resume checks

# ---- the text tokenizer and the data: the shapes world with SeTok's tokens of every image cached, or
# with data_dirs the worlds streamed (SeTok runs inside the training step)
stream = [resolve_world(d) for d in as_list(data_dirs)]
world_dir = stream[0] if stream else data_dir if os.path.isabs(data_dir) else os.path.join(HERE, data_dir)
if not stream and master and not os.path.exists(os.path.join(world_dir, 'meta.json')):
    prepare(data_dir=world_dir, image_size=setok.cfg.image_size)
if not stream and ddp:
    torch.distributed.barrier()
tok = TextTokenizer(os.path.join(world_dir, 'tokenizer.model') if text_tokenizer == 'sentencepiece' else 'tiktoken:gpt2')
vis_id = tok.vocab_size                            # the extra vocabulary row: "a visual token follows"
t0 = time.time()
cache_path = None                                  # streamed: no token cache
if not stream:
    cache, cache_path = token_cache(tokenize, setok_path, setok_hash, overrides, world_dir, dev, master, ddp,
                                    cache_batch_size)
    if cache['test']['images'].shape[1] != setok.cfg.image_size:
        die(f"{world_dir} holds {cache['test']['images'].shape[1]}px images but the SeTok checkpoint wants "
            f"{setok.cfg.image_size}px; use the world it was trained on (data_dir=...)")
    train, test, longest = load_world(world_dir, tok, cache, vis_id, block_size)
run = {'processes': world, 'data': [world_settings(d) for d in (stream or [world_dir])],
       'setok': setok_hash.hexdigest()[:12]}

# ---- the model: its special-token ids come from the text tokenizer, its token statistics from the data
gcfg = GPTConfig.for_tokenizer(tok, block_size=block_size, pos_emb=pos_emb, **llm_shape, token_dim=setok.cfg.token_dim, grid=setok.grid,
                               image_size=setok.cfg.image_size, mask_dim=mask_dim, mask_depth=mask_depth,
                               mask_n_head=mask_n_head, mask_refine=mask_refine, gen_head=gen_head,
                               diff_width=diff_width, diff_depth=diff_depth, diff_mean=diff_mean, copy_head=copy_head)
torch.manual_seed(seed)
model = SETOKIM(gcfg)
if pretrained:
    note = init_gpt2(model.gpt, pretrained)
    if master:
        print(note, flush=True)
if stream:
    mean, std, nt = token_stats(stream, setok.cfg.image_size, tokenize, NORM_IMAGES, cache_batch_size, seed, num_workers, dev)
else:
    mean, std, nt = train['bank'].tokens.float().mean(0), train['bank'].tokens.float().std(0), train['bank'].ntok.float()
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


def load_model(path, what):
    ck = load_checkpoint(path, kind='setokim', what=what)
    check_config(path, gpt_config_of(ck), asdict(gcfg))
    load_weights(model, ck['model'], path)
    return ck


def run_eval(s, batches=None):
    """The metrics of stage s's tasks (all of them for eval_only), written to eval.json."""
    if stream:
        split = next((sp for sp in ('val', 'test') if any(sp in world_splits(d)[1] for d in stream)), None)
        held = split and conversation_loader([d for d in stream if split in world_splits(d)[1]], split,
                                             STREAM_STAGE_TASKS[s], setok.cfg.image_size, tok.model, vis_id,
                                             eval_batch_size, seed, workers=num_workers)
        m = stream_losses(model, batches, held, eval_per_task * len(STREAM_STAGE_TASKS[s]), ctx, dev, split) if held else {}
    else:
        ev = Eval(model, detok, tok, test, ctx, dev, eval_per_task, eval_batch_size, llm_pack_rows, seed,
                  img_temperature=img_temperature, diff_steps=diff_steps, cfg_scale=cfg_scale)
        m = evaluate(ev, TASKS if eval_only else STAGE_TASKS[s], setok.max_tokens, os.path.join(run_dir, 'samples.png'))
    with open(os.path.join(run_dir, 'eval.json'), 'w') as f:
        json.dump({'stage': s, **m}, f, indent=2)
    return m


if eval_only:
    if master:
        s = have[0]
        ck = load_model(ckpt_path[s], 'SETOKIM checkpoint')
        batches = StreamedBatches(None, tokenize, tok, setok.cfg.token_dim, setok.grid, block_size, 1,
                                  llm_pack_rows) if stream else None
        m = run_eval(s, batches)
        print(f"eval stage {s} step {ck['step']} | {fmt(m)}\nwrote {os.path.join(run_dir, 'eval.json')}"
              + ('' if stream else f", {os.path.join(run_dir, 'samples.png')}"))
    sys.exit(0)

fwd = torch.compile(model, dynamic=True) if compile_on(compile, dev) else model
if ddp:
    fwd = wrap_ddp(fwd, dev)
mfu_peak = peak_flops(dev) if dev.startswith('cuda') else None
weights = dict(ce_weight=ce_weight, reg_weight=reg_weight, mask_weight=mask_weight, cos_weight=cos_weight,
               dice_weight=dice_weight, draws=diff_draws, cond_drop=cond_drop, copy_weight=copy_weight, copy_tau=copy_tau)

# -----------------------------------------------------------------------------
# training: stage 1, then stage 2 from stage 1's weights; each with a fresh AdamW and schedule
stages = [stage] if stage else [1, 2]
if stage == 0 and init_from == 'resume' and os.path.isfile(ckpt_path[2]):
    stages = [2]                                   # stage 1 is behind us
for s in stages:
    max_iters = stage1_max_iters if s == 1 else stage2_max_iters
    opt = adamw(model.parameters(), llm_learning_rate, llm_weight_decay, (llm_beta1, llm_beta2))
    step, ck = 0, None
    if init_from == 'resume' and os.path.isfile(ckpt_path[s]):
        ck = load_model(ckpt_path[s], f'stage {s} checkpoint')
        check_resume(ckpt_path[s], ck, {**config, **run}, RUN_KEYS, ignore=('init_from', 'eval_only', 'stage'))
        if bool(stream) != ('data' in ck):
            die(f"{ckpt_path[s]} was trained on {'streamed worlds (data_dirs)' if 'data' in ck else 'data_dir'}; "
                f"resume it with the same data settings")
        opt.load_state_dict(ck['optimizer'])
        step = ck['step']
        set_rng_state(ck['rng'])
    elif s == 2:
        load_model(ckpt_path[1], 'stage 1 checkpoint')
    if master:
        print(f"stage {s}: " + (f"resumed from {ckpt_path[s]} at step {step}" if ck else
                                f"starting from {ckpt_path[1]}" if s == 2 else "from scratch"))
    if step >= max_iters:
        if master:
            print(f"stage {s}: already at step {step} >= {max_iters}, nothing to do")
        continue

    # the stage's batches: batches(step, dev) -> this rank's micro-batches and the loss counts (data/conversations.py)
    if stream:
        loader = conversation_loader(stream, 'train', STREAM_STAGE_TASKS[s], setok.cfg.image_size, tok.model, vis_id,
                                     llm_batch_size, (seed, s), rank, world, data_weights, num_workers,
                                     dev.startswith('cuda'), warn=master and s == stages[0])
        if loader is None:
            die(f"stage {s} trains on {', '.join(STREAM_STAGE_TASKS[s])} conversations and data_dirs has none; "
                f"add a world that has them" + (" (a captions world: data/captions/prepare.py)" if s == 1 else ''))
        if ck is not None:
            loader.load_state_dict(ck['data'])
        batches = StreamedBatches(loader, tokenize, tok, setok.cfg.token_dim, setok.grid, block_size, llm_grad_accum,
                                  llm_pack_rows)
    else:
        batches = CachedBatches(train, stage_rows(train, STAGE_TASKS[s], repeat if s == 2 else None),
                                llm_batch_size, world, rank, llm_grad_accum, (seed, s), tok, llm_pack_rows)
    # the log: one file for both stages, kept up to the resumed step when resuming
    keep = (lambda r: r.get('stage', 0) < s or (r.get('stage') == s and r['step'] <= step)) if ck or s == 2 else None
    log = RunLog(os.path.join(run_dir, 'log.jsonl'), keep=keep, enabled=master)
    if ck is None and s == stages[0]:
        log.write('setup', 0, stage=s, params=sum(p.numel() for p in model.parameters()),
                  gpt_params=model.gpt.num_params(), world=world, dtype=str(ptdtype).replace('torch.', ''))
    bar = Progress(max_iters, step, f'stage {s}', log_interval, enabled=master)
    t_start, tokens_seen, seqs_seen, step0, flops_tok = time.time(), 0, 0, step, None
    acc = torch.zeros(8)
    while step < max_iters:
        lr = lr_at(step, llm_learning_rate, llm_warmup_iters, llm_lr_decay_iters or max_iters, llm_min_lr_ratio)
        for g in opt.param_groups:
            g['lr'] = lr
        micro_batches, counts = batches(step, dev)
        if batches.local_counts and ddp:           # each rank counted its own conversations: sum them
            counts = torch.tensor(counts, dtype=torch.float64, device=dev)
            torch.distributed.all_reduce(counts)
            counts = counts.tolist()
        norm = tuple(max(1, n) / world for n in counts)     # DDP averages gradients over processes
        loss_sum = 0.0
        for micro, b in enumerate(micro_batches):
            b = {k: v.to(dev) for k, v in b.items()}
            sync = not ddp or micro == llm_grad_accum - 1
            # the stage's first micro-batch: its FLOPs per LLM token, logged as 'flops_tok' for bench.py's MFU
            count = count_flops(flops_tok is None and step == 0 and fwd is model)
            with ctx, count, (fwd.no_sync() if not sync else nullcontext()):
                loss, st = fwd(b, norm=norm, **weights)
                loss.backward()
            if flops_tok is None:
                flops_tok = counted_flops(count) / int(b['real'].sum())
            loss_sum += loss.item() / world
            acc += stat_vector(st)
            tokens_seen += int(b['real'].sum()) * world
            seqs_seen += (int(b['doc'].max()) + 1) * world               # conversations (rows may hold several)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), llm_grad_clip)   # global: same on every rank
        if not (math.isfinite(loss_sum) and math.isfinite(gnorm.item())):
            die(f"loss is {loss_sum} at stage {s} step {step}; stopping. The last good checkpoint is {ckpt_path[s]}: "
                f"resume from it with a lower learning rate (init_from=resume llm_learning_rate=...)", code=1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        news = {}
        if step % log_interval == 0:
            if ddp:
                acc = acc.to(dev)                                           # nccl reduces GPU tensors only
                torch.distributed.all_reduce(acc)
                acc = acc.cpu()
            if master:
                dt = time.time() - t_start
                means = stat_means(acc)
                if not gcfg.rope:
                    del means['pos']
                rec = log.write('train', step, stage=s, lr=lr, **means, tok_s=tokens_seen / dt,
                                llm_tokens=tokens_seen, **({'flops_tok': flops_tok} if flops_tok else {}))
                news = {**{k: f"{v:.2e}" if k == 'pos' else f"{v:.3f}" for k, v in means.items()}, 'lr': f"{lr:.1e}",
                        'tok_s': f"{rec['tok_s']:.0f}"}
                if mfu_peak:                                                # mean sequence length as T
                    news['mfu'] = f"{100 * model.gpt.estimate_mfu(tokens_seen / dt, tokens_seen / seqs_seen, mfu_peak):.1f}%"
            acc.zero_()
        bar.update(step, **news)
        if step % llm_eval_interval == 0 or step == max_iters:
            t_eval = time.time()
            if master:
                save_checkpoint({'kind': 'setokim', 'stage': s, 'step': step, 'model': model.state_dict(),
                                 'optimizer': opt.state_dict(), 'rng': rng_state(), 'config': config,
                                 'gpt_config': asdict(gcfg), 'text_tokenizer': tok.model,
                                 # relative to this checkpoint's folder, so that out/ can move as a whole
                                 'setok_ckpt': os.path.relpath(setok_path, run_dir),
                                 'setok_overrides': overrides, 'setok_config': asdict(setok.cfg),
                                 'detok_config': asdict(detok.cfg), 'token_cache': cache_path, 'run': run,
                                 **({'data': batches.state_dict()} if stream else {})}, ckpt_path[s])
                m = run_eval(s, batches)
                log.write('eval', step, stage=s, **m)
                plot_curves(log.records(), os.path.join(run_dir, 'curves.png'),
                            ['ce', 'reg', 'mask', 'test_ce', 'test_reg', 'vqa', 'caption_f1', 'refer_miou', 't2i_psnr'])
                if stream and batches.cut:
                    print(f"warning: {batches.cut} conversations so far were longer than block_size={block_size} "
                          f"tokens and cut there (raise block_size)", file=sys.stderr, flush=True)
                dt = t_eval - t_start
                bar.write(f"stage {s} step {step} | {fmt(m)} | train {tokens_seen / dt:.0f} tok/s, "
                          f"{dt / (step - step0):.3f} s/step | eval {time.time() - t_eval:.0f}s")
            if ddp:
                torch.distributed.barrier()
            t_start += time.time() - t_eval                                 # throughput counts training only
    bar.close()
if master:
    print(f"done: {ckpt_path[stages[-1]]}, {os.path.join(run_dir, 'eval.json')}, {os.path.join(run_dir, 'curves.png')}"
          + ('' if stream else f", {os.path.join(run_dir, 'samples.png')}"))
if ddp:
    torch.distributed.destroy_process_group()
