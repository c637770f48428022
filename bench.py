"""
How fast is nanoSeTok, measured side by side on this machine; and how big and how heavy are its
models at a preset's shapes. Prints one markdown table.

    python bench.py                                   # every row but smoke (CPU: about 15 minutes on 2 cores)
    python bench.py rows=tokenize,ratio               # only SeTok's tokenization and its cost vs the encoder
    python bench.py rows=train presets=small          # training throughput of the two training scripts
    python bench.py device=cuda                       # the GPU rows (bf16 autocast, MFU)
    python bench.py compile=True                      # also torch.compile the batched tokenization
    python bench.py rows=smoke config=full            # both models at config/full.py's shapes: parameters, one step
    python bench.py rows=smoke config=full device=cuda text_tokenizer=gpt2 init_from=pretrained/gpt2 \
        vit_init=pretrained/siglip freeze_encoder=True    # ... as the paper builds them, memory at the real batch

Machines here are shared and noisy, so every speed figure is either a ratio of two things timed in
the same run, interleaved (A, B, A, B, ... and the median of each side), or a throughput printed next
to the machine's name. The rows:

  peak      the machine's usable peak: a large square matmul in float32 and in bf16, FLOP/s. The
            train rows give each step's counted FLOP rate as a share of it (MFU, on a CPU too).
  tokenize  SeTok's tokenization (density-peak clustering + token merger), batched as setok.py does
            it, against the authors' algorithm: one image at a time (DPC-KNN on that image), one
            cluster at a time (the intra-cluster transformer on that cluster's patches alone, mean
            pooled), then the inter-cluster transformer (TokenMerger.reference). Same inputs, same
            weights, and the outputs are checked to agree. At the paper's shapes (SigLIP so400m/14 at
            378 px: 27x27 = 729 patches of width 1152, 64 or more clusters, batch 16) and at
            config/small's. Target: >= 10x on CPU, >= 50x on GPU.
  ratio     clustering + merger against the ViT encoder's forward (SigLIP so400m shapes), same batch.
            Target: <= 25% of the encoder.
  train     images/s and tokens/s of train_setok.py and train_setokim.py (the scripts themselves,
            run as subprocesses on a small world of the same kind), eager against torch.compile, in
            the scripts' dtype=auto, and eager in float32 beside it where auto is bf16 (a CPU with
            native bf16, a GPU); each with its counted FLOP rate and MFU, a share of the peak row's
            figure for the run's dtype.
  ddp       train_setok.py under torchrun with 2 processes (gloo on CPU) against 1, same global batch.
  memory    peak resident memory of a config=small train_setok.py run on the real world.
  smoke     (not in the default rows) what train_setok.py and train_setokim.py would build at a
            preset's shapes, checked before a long run: config=NAME and the model settings below
            (with vit_init / freeze_encoder, init_from / text_tokenizer). For each model: its
            parameters per component, and one optimizer step on random data (no world, no
            checkpoint) with its loss and time; on a GPU at the preset's batch, with the peak memory
            of a second step (the first one warms up); on a CPU at 1 image / one conversation per
            task (config=full: a few minutes and ~7 GB, RESULTS.md section 6).

The features fed to the tokenizer are synthetic but shaped like real ones: each image is cut into
R Voronoi regions (R drawn per image), each region has its own random feature, plus noise, so the
clustering finds about R clusters of uneven sizes.

The training rows time the scripts as a user runs them, with log_interval=1: each script writes a
record per step to its log.jsonl (common.RunLog; "time" is the wall clock since the run started),
and bench.py reads that file once the run is over. The rate is taken between the first record at or
after the warm-up steps (compilation happens there) and the last one before the final step (which
the final eval follows). The scripts' printed output is kept only to say why a run failed.
"""
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, fields

import torch

from common import HERE, RunLog, configure, die, load_preset, pick_device, timed_step
from data.batch import Bank, collate, encode_conversation, pack
from data.conversations import TASKS
from data.shapes.prepare import ensure_world
from data.text import TextTokenizer
from detok import DetokConfig, Tokenizer
from pretrained import gpt2_shape, init_gpt2, init_vit, pretrained_config, vit_shape
from setok import MLP, SeTok, SeTokConfig, TokenMerger, ViT, density_peak_cluster, pos_embed_2d
from setokim import SETOKIM, GPTConfig, pos_emb_error

# -----------------------------------------------------------------------------
# settings
rows = 'peak,tokenize,ratio,train,ddp,memory'   # which rows, comma-separated (also: smoke)
device = 'cpu'                    # cpu | cuda | cuda:1 | auto
dtype = 'auto'                    # auto (bf16 autocast on capable GPUs and CPUs, else float32) | float32 | bfloat16
threads = 0                       # CPU threads, in this process and in the training scripts (0: torch's default)
repeats = 3                       # interleaved repetitions of each in-process timing (medians)
compile = False                   # tokenize/ratio rows: also time the batched path under torch.compile
# tokenize / ratio
shapes = 'paper,small'            # tokenize rows, at these shapes (see SHAPES; 'tiny' is for the tests)
tokenize_batch = 16               # images per tokenization call
ref_images = 4                    # the looped reference is timed on this many images and scaled to tokenize_batch (0: all)
ratio_shape = 'paper'             # the ratio row's shapes
ratio_batch = 0                   # images in the ratio row (0: 16 on GPU, 2 on CPU where a 27-layer ViT is slow)
# train / ddp / memory
presets = 'small,full'            # train rows at these presets
scripts = 'setok,setokim'         # train and smoke rows: train_setok.py's model (SeTok) and train_setokim.py's (SETOKIM)
train_steps = 12                  # timed steps per run (after the warm-up)
train_warmup = 10                 # steps left out of the timing (the first ones compile; in bf16 on a CPU oneDNN builds kernels)
train_repeats = 2                 # runs per side (eager, compile; 1 or 2 processes), interleaved
train_compile = True              # the train rows also run the scripts with compile=True (False: eager only)
train_float32 = True              # ... and with dtype=float32 where dtype resolves to bf16: bf16's gain side by side
full_cpu_batch = 0                # config=full on CPU: run train_setok.py at this batch (0: GPU-only: minutes a step, ~10 GB)
ddp_threads = 1                   # threads per process in the ddp row
mem_steps = 20                    # steps of the memory run
bench_dir = 'out/bench'           # the small worlds and the runs' checkpoints
# smoke: the model settings of train_setok.py and train_setokim.py, same names, same defaults;
# config=NAME sets them from config/NAME.py as it does for the scripts
seed = 1337
smoke_compile = 'auto'            # the smoke steps under torch.compile: auto (on for CUDA, as the scripts) | True | False
# SeTok: setok.SeTokConfig's fields and defaults, under the names train_setok.py gives them too
globals().update(asdict(SeTokConfig()))
vit_init = ''                     # '' = encoder from scratch | a CLIP / SigLIP folder (its config.json fixes the encoder)
freeze_encoder = False            # the paper's frozen encoder: not in the optimizer
# the detokenizer (detok.DetokConfig, dec_ prefix), the concept text encoder, the loss, the step
dec_sprite_size = 16
dec_dim = 256
dec_sharpness = 10.0
text_dim = 128
text_depth = 2
max_concepts = 6
concept_len = 8
recon_weight = 1.0
contrast_weight = 1.0
grad_weight = 1.0
geo_weight = 1.0
batch_size = 64                   # SeTok's images per step on a GPU (on a CPU: 1)
learning_rate = 1e-3
# SETOKIM (setokim.GPTConfig)
llm_n_layer = 4
llm_n_head = 4
llm_n_embd = 192
block_size = 640
pos_emb = 'learned'               # learned (GPT-2's table; what init_from=GPT-2 needs) | rope2d | learned+rope2d
mask_dim = 128
mask_depth = 2
mask_n_head = 4
mask_refine = True
gen_head = 'diffusion'            # the writing head (train_setokim.py's settings)
diff_width = 256
diff_depth = 3
diff_mean = True                  # the diffusion head samples the residual around a regressed mean (False: MAR's head)
copy_head = True                  # an edit's written token is an input token, kept exactly or changed
text_tokenizer = 'sentencepiece'  # sentencepiece | gpt2: the id layout (and size) of the stand-in text vocabulary
init_from = 'scratch'             # scratch | a GPT-2 folder (Hugging Face layout; its config.json fixes the llm_ shape)
llm_batch_size = 32               # conversations per step on a GPU (on a CPU: one per task of the stage)
llm_learning_rate = 1e-3
config = configure(globals())
# -----------------------------------------------------------------------------

# Shapes of the tokenize / ratio rows. 'paper': SigLIP so400m/14 at 378 px (the paper's encoder) and
# the authors' merger (2 intra + 2 inter blocks at the encoder's width); the clustering settings
# give 64 to 128 clusters on these features. 'small' is filled in from config/small.py below.
SHAPES = {
    'paper': dict(grid=27, patch=14, dim=1152, n_head=16, mlp=4304, depth=27, intra=2, inter=2, token_dim=1024,
                  k=5, threshold=0.5, min_tokens=64, max_tokens=128, pos_weight=1.0, regions=(64, 96)),
    'tiny': dict(grid=8, patch=4, dim=32, n_head=4, mlp=128, depth=1, intra=1, inter=1, token_dim=32,
                 k=3, threshold=0.5, min_tokens=1, max_tokens=8, pos_weight=0.5, regions=(2, 6)),
}
_s = load_preset('small')
SHAPES['small'] = dict(grid=_s['image_size'] // _s['patch_size'], patch=_s['patch_size'], dim=_s['dim'],
                       n_head=_s['n_head'], mlp=4 * _s['dim'], depth=_s['depth'], intra=_s['intra_depth'],
                       inter=_s['inter_depth'], token_dim=_s['token_dim'], k=_s['cluster_k'],
                       threshold=_s['cluster_threshold'], min_tokens=1, max_tokens=_s['max_tokens'],
                       pos_weight=_s['cluster_pos_weight'], regions=(3, 10))
ROWS = ('peak', 'tokenize', 'ratio', 'train', 'ddp', 'memory', 'smoke')


def split(text, allowed, what):
    items = [t.strip() for t in text.split(',') if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        die(f"{what}={text}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def machine(dev):
    """The name of what the figures were measured on."""
    if dev.startswith('cuda'):
        return f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}"
    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def sync(dev):
    if dev.startswith('cuda'):
        torch.cuda.synchronize(dev)


def interleaved(fns, dev, n):
    """Time each function n times, in turn (A, B, A, B, ...). -> median seconds of each, last outputs."""
    times, outs = [[] for _ in fns], [None] * len(fns)
    for _ in range(n):
        for i, fn in enumerate(fns):
            sync(dev)
            t = time.perf_counter()
            outs[i] = fn()
            sync(dev)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times], outs


# -----------------------------------------------------------------------------
# tokenization: batched (setok.py) against the authors' loop

def voronoi_features(B, s, dev, seed=0):
    """(B, N, C) patch features: each image cut into R Voronoi regions (R in s['regions'], per image),
    one random feature per region plus noise. -> x, R (B,)"""
    g = torch.Generator().manual_seed(seed)
    lo, hi = s['regions']
    R = torch.randint(lo, hi + 1, (B,), generator=g)
    centres = torch.rand(B, hi, 2, generator=g) * s['grid']                             # (B, hi, 2)
    yx = torch.stack(torch.meshgrid(torch.arange(s['grid']), torch.arange(s['grid']), indexing='ij'), -1)
    yx = yx.view(1, -1, 2).float().expand(B, -1, -1) + 0.5                               # (B, N, 2)
    d = torch.cdist(yx, centres).masked_fill(torch.arange(hi)[None, None] >= R[:, None, None], float('inf'))
    region = d.argmin(-1)                                                                # (B, N)
    feat = torch.randn(B, hi, s['dim'], generator=g)
    x = feat.gather(1, region[..., None].expand(-1, -1, s['dim']))                       # (B, N, C)
    return (x + 0.3 * torch.randn(x.shape, generator=g)).to(dev), R


def cluster_args(s):
    return s['k'], s['threshold'], s['min_tokens'], s['max_tokens']


def batched(merger, pos, x, s):
    """setok.py's path: the whole batch in one clustering call and one merger call."""
    labels, num = density_peak_cluster(x + s['pos_weight'] * pos, *cluster_args(s))      # (B, N), (B,)
    tokens, mask = merger(x, pos, labels, num, s['max_tokens'])                         # (B, K, D), (B, K)
    return tokens, labels, num


def looped(merger, pos, x, s):
    """The authors' path: DPC-KNN on one image at a time, then the merger one cluster at a time."""
    out = []
    for b in range(len(x)):
        labels, num = density_peak_cluster(x[b:b + 1] + s['pos_weight'] * pos, *cluster_args(s))
        out.append((merger.reference(x[b:b + 1], pos, labels, num, s['max_tokens']), labels, num))
    return tuple(torch.cat(t) for t in zip(*out))


def agreement(fast, ref):
    """How well the batched outputs match the looped ones on the images the reference ran."""
    (tokens, labels, num), (rtokens, rlabels, rnum) = fast, ref
    n = len(rnum)
    same_labels = (labels[:n] == rlabels).float().mean().item()
    real = torch.arange(tokens.shape[1], device=tokens.device)[None] < rnum[:, None]     # (n, K)
    diff = ((tokens[:n] - rtokens).float().abs()[real].max() / rtokens.float().abs()[real].max()).item()
    tol = 1e-4 if tokens.dtype == torch.float32 and rtokens.dtype == torch.float32 else 5e-2
    ok = same_labels == 1.0 and torch.equal(num[:n], rnum) and diff < tol
    return ok, f"{'agree' if ok else 'DIFFER'}: labels {100 * same_labels:.1f}% equal, max relative token error {diff:.1e}"


def merger_for(s, dev):
    torch.manual_seed(0)
    m = TokenMerger(s['dim'], s['n_head'], s['token_dim'], s['intra'], s['inter']).to(dev).eval()
    return m, pos_embed_2d(s['grid'], s['grid'], s['dim']).to(dev)


@torch.no_grad()
def tokenize_row(name, dev, ctx):
    s, B = SHAPES[name], tokenize_batch
    merger, pos = merger_for(s, dev)
    x, R = voronoi_features(B, s, dev)
    n_ref = min(ref_images or B, B)
    fast = lambda xs: batched(merger, pos, xs, s)
    fns = {'eager': fast, **({'compiled': torch.compile(fast, dynamic=False)} if compile else {})}
    with ctx:
        fast(x[:1]), looped(merger, pos, x[:1], s)                          # warm-up
        if compile:
            fns['compiled'](x)                                              # compilation, at the timed shape
        (t_ref, *t_fast), (ref, *outs) = interleaved([lambda: looped(merger, pos, x[:n_ref], s),
                                                      *[lambda f=f: f(x) for f in fns.values()]], dev, repeats)
    t_ref *= B / n_ref                                                     # the whole batch, linearly
    num = outs[0][2].float()
    target = 50 if dev.startswith('cuda') else 10
    scaled = f", looped timed on {n_ref} of {B} images and scaled x{B / n_ref:g}" if n_ref < B else ''
    out = []
    for kind, t, o in zip(fns, t_fast, outs):
        ok, check = agreement(o, ref)
        out.append(dict(
            row=f"tokenize, {name} shapes{', compiled' if kind == 'compiled' else ''}",
            figure=f"{t_ref / t:.1f}x faster", target=f">= {target}x", ok=t_ref / t >= target, check=check,
            notes=f"batch {B} x {s['grid'] ** 2} patches x {s['dim']}, {num.mean():.1f} clusters/image "
                  f"(min {num.min():.0f}, max {num.max():.0f}), merger {s['intra']}+{s['inter']} blocks; "
                  f"batched {t:.3f} s, looped {t_ref:.3f} s per batch{scaled}; median of {repeats}"))
    return out


@torch.no_grad()
def ratio_row(dev, ctx):
    """Clustering + merger against the encoder's forward, same batch (SigLIP's MLP width: 4304)."""
    s = SHAPES[ratio_shape]
    B = ratio_batch or (16 if dev.startswith('cuda') else 2)
    torch.manual_seed(0)
    vit = ViT(s['grid'] * s['patch'], s['patch'], s['dim'], s['depth'], s['n_head'])
    for blk in vit.blocks:
        blk.mlp = MLP(s['dim'], s['mlp'])
    vit = vit.to(dev).eval()
    merger, pos = merger_for(s, dev)
    x, _ = voronoi_features(B, s, dev)
    img = torch.rand(B, 3, s['grid'] * s['patch'], s['grid'] * s['patch'], device=dev)
    with ctx:
        vit(img[:1]), batched(merger, pos, x[:1], s)                       # warm-up
        (t_enc, t_tok), (_, out) = interleaved([lambda: vit(img), lambda: batched(merger, pos, x, s)], dev, repeats)
    num = out[2].float()
    return [dict(row=f"clustering + merger / encoder, {ratio_shape} shapes", figure=f"{100 * t_tok / t_enc:.1f}%",
                 target="<= 25%", ok=t_tok / t_enc <= 0.25, check='',
                 notes=f"batch {B}: ViT {s['depth']}x{s['dim']} ({s['n_head']} heads, MLP {s['mlp']}, patch {s['patch']}, "
                       f"{s['grid'] ** 2} patches) {t_enc:.3f} s, clustering + merger {t_tok:.3f} s "
                       f"({num.mean():.1f} clusters/image); median of {repeats}")]


# -----------------------------------------------------------------------------
# the training scripts, timed from their logs (log.jsonl)

class RunFailed(Exception):
    pass


def run(cmd, timeout=3600):
    """Run cmd from the repo root, its output captured (only to say why a run failed: the figures
    come from the run's log.jsonl). -> {'text', 'rc', 'maxrss': the process's peak resident set, bytes}."""
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    text = p.stdout.read().decode(errors='replace')         # until the process closes its output
    p.stdout.close()
    _, status, usage = os.wait4(p.pid, 0)                   # wait4, not wait: it also gives the child's rusage
    p.returncode = os.waitstatus_to_exitcode(status)
    killer.cancel()
    return {'text': text, 'rc': p.returncode, 'maxrss': usage.ru_maxrss * 1024}


def check_run(r, what):
    """A failed run becomes its row's figure (the bench goes on and exits 1 at the end)."""
    if r['rc'] != 0:
        lines = [l.strip() for l in re.split(r'[\r\n]', r['text']) if l.strip()]
        where = [l for l in lines if l.startswith('File ')][-1:]
        raise RunFailed(f"{what} exited {r['rc']}: {' / '.join(where + lines[-1:])}".replace('|', '/'))


def read_log(path, what):
    """The records of a finished run's log.jsonl (RunLog with enabled=False reads and never writes)."""
    records = RunLog(path, enabled=False).records()
    if not any(rec['kind'] == 'train' for rec in records):
        raise RunFailed(f"{what} wrote no train records to {path}")
    return records


def train_records(records, stage=None):
    """The train records (of one stage of train_setokim.py) as (step, record), in step order."""
    return sorted(((rec['step'], rec) for rec in records
                   if rec['kind'] == 'train' and (stage is None or rec.get('stage') == stage)), key=lambda x: x[0])


def steps_per_s(records, warmup, total, stage=None):
    """The step rate between the first train record at or after the warm-up steps and the last one
    before the final step (`total`: the final step is followed by an eval, which may delay its record).
    A record's step is the number of steps done and its time the wall clock since the run started."""
    seen = [(n, rec['time']) for n, rec in train_records(records, stage) if warmup <= n < total]
    if len(seen) < 2:
        raise RunFailed(f"too few train records to time ({[n for n, _ in seen]}); raise train_steps")
    (n0, t0), (n1, t1) = seen[0], seen[-1]
    return (n1 - n0) / (t1 - t0)


def llm_tokens_per_step(records, stage):
    """train_setokim.py: the LLM tokens of one step (all processes), over the stage's steps so far."""
    n, last = train_records(records, stage)[-1]
    return last['llm_tokens'] / n


def python(script, *args, torchrun=0):
    pre = ['-m', 'torch.distributed.run', f'--nproc_per_node={torchrun}', f'--master_port={free_port()}'] if torchrun else []
    return [sys.executable, *pre, script, *args]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def world(preset):
    """A small world of the preset's image size (steps cost the same whatever the dataset size)."""
    size = load_preset(preset)['image_size']
    return ensure_world(os.path.join(bench_dir, f'world{size}'), workers=1, image_size=size,
                        n_train=256, n_val=16, n_test=16)


def common_args(preset, dev, nthreads, dt=None):
    return [f'config={preset}', f'device={dev}', f'dtype={dt or dtype}', f'threads={nthreads}']


def fresh(path):
    """A log path with no file from an earlier run in it (a run that writes none must not be timed from it)."""
    if os.path.exists(path):
        os.remove(path)
    return path


def setok_run(preset, dev, comp, steps, warmup, batch, nthreads, tag, nproc=0, data=None, dt=None):
    """train_setok.py, one record per step -> (run with its 'log' records, its checkpoint's path)."""
    out = os.path.join(bench_dir, f'setok_{preset}_{tag}')
    log = fresh(os.path.join(HERE, out, 'log.jsonl'))
    args = [*common_args(preset, dev, nthreads, dt), f'data_dir={data or world(preset)}', f'out_dir={out}',
            f'max_iters={warmup + steps + 1}', 'eval_interval=1000000000', 'log_interval=1',
            'eval_images=16', f'compile={comp}', *([f'batch_size={batch}'] if batch else [])]
    what = f"train_setok.py {' '.join(args)}"
    r = run(python('train_setok.py', *args, torchrun=nproc))
    check_run(r, what)
    r['log'] = read_log(log, what)
    return r, os.path.join(out, 'ckpt.pt')


def setokim_run(preset, dev, comp, steps, warmup, nthreads, setok_ckpt, tag, dt=None):
    """train_setokim.py's stage 1, one record per step -> the run with its 'log' records."""
    out = os.path.join(bench_dir, f'setokim_{preset}')
    log = fresh(os.path.join(HERE, out, tag, 'log.jsonl'))           # train_setokim.py logs in out_dir/run_name
    args = [*common_args(preset, dev, nthreads, dt), f'data_dir={world(preset)}', f'out_dir={out}', f'setok_ckpt={setok_ckpt}',
            f'run_name={tag}', 'stage=1', f'stage1_max_iters={warmup + steps + 1}', 'llm_eval_interval=1000000000',
            'log_interval=1', 'eval_per_task=1', f'compile={comp}']
    what = f"train_setokim.py {' '.join(args)}"
    r = run(python('train_setokim.py', *args))
    check_run(r, what)
    r['log'] = read_log(log, what)
    return r


PEAKS = {}


def matmul_peak(dev, dt):
    """The machine's usable peak in dtype dt: FLOP/s of a large square matmul (2048 on a CPU, 8192 on
    a GPU), the median of `repeats`, measured once per bench run. MFU is a share of it."""
    if dt not in PEAKS:
        n = 8192 if dev.startswith('cuda') else 2048
        a, b = (torch.randn(n, n, device=dev, dtype=dt) for _ in range(2))
        a @ b                                                               # warm-up
        (t,), _ = interleaved([lambda: a @ b], dev, repeats)
        PEAKS[dt] = (2 * n ** 3 / t, n)
    return PEAKS[dt]


def peak_rows(dev):
    out = []
    for dt in (torch.float32, torch.bfloat16):
        flops, n = matmul_peak(dev, dt)
        out.append(dict(row=f"matmul peak, {str(dt).replace('torch.', '')}", figure=f"{flops / 1e9:.0f} GFLOP/s",
                        target='-', ok=None, check='',
                        notes=f"{n} x {n} @ {n} x {n}, median of {repeats}: the usable peak the MFU figures are shares of"))
    return out


def mfu(runs, rate, dev, key):
    """The achieved FLOP rate of a training step and its share of the matmul peak of the run's dtype.
    key: 'flops' (train_setok.py: the FLOPs of one step, rate in steps/s) or 'flops_tok'
    (train_setokim.py: FLOPs per LLM token, rate in tokens/s), counted by the script on its first
    step with torch.utils.flop_counter (forward + backward; eager runs only, so a compiled run takes
    the eager run's count)."""
    recs = [r for run in runs for r in run['log']]
    count = next((r[key] for r in recs if r['kind'] == 'train' and r.get(key)), None)
    if count is None:
        return 'MFU: no FLOP count in the logs'
    name = next((r.get('dtype') for r in recs if r['kind'] == 'setup'), None) or 'float32'
    peak, _ = matmul_peak(dev, getattr(torch, name))
    return (f"{count * rate / 1e9:.0f} GFLOP/s counted ({count / 1e9:.2f} GFLOP per "
            f"{'step' if key == 'flops' else 'token'}): MFU {100 * count * rate / peak:.0f}% of the {name} matmul peak")


def train_rows(dev):
    """Eager against compile for each preset and script; one row per side, or one row saying why not."""
    gpu, out = dev.startswith('cuda'), []
    for preset in split(presets, ('small', 'full'), 'presets'):
        cpu_full = preset == 'full' and not gpu
        for script in split(scripts, ('setok', 'setokim'), 'scripts'):
            name = f"train_{script}, config={preset}"
            if cpu_full and (script == 'setokim' or not full_cpu_batch):
                why = ("GPU-only: its token cache runs SeTok-full (ViT-B/16, 384 px) over every image and each "
                       "step is a GPT-2-medium step" if script == 'setokim' else
                       "GPU-only: on CPU a step takes minutes and ~10 GB even at batch 2 (full_cpu_batch=N runs it)")
                out.append(dict(row=name, figure='-', target='-', ok=None, check='', notes=why))
                continue
            try:
                out += train_row(script, preset, name, dev)
            except RunFailed as e:
                out.append(dict(row=name, figure='run failed', target='-', ok=False, check='', notes=str(e)))
    return out


def train_row(script, preset, name, dev):
    c, gpu = load_preset(preset), dev.startswith('cuda')
    cpu_full = preset == 'full' and not gpu                  # a few steps at a small batch, eager only
    # sides: (the scripts' compile setting, their dtype): eager, compiled, and eager in float32 where
    # dtype resolves to bf16
    sides = [('False', dtype)] + [('True', dtype)] * (train_compile and not cpu_full)
    sides += [('False', 'float32')] * (train_float32 and pick_device(dev, dtype)[1] != torch.float32)
    steps, warmup = (3, 1) if cpu_full else (train_steps, train_warmup)
    batch = full_cpu_batch if cpu_full else c['batch_size' if script == 'setok' else 'llm_batch_size']
    nthreads = threads or torch.get_num_threads()
    if script == 'setokim':   # a SeTok checkpoint of the current code to read tokens from
        _, ckpt = setok_run(preset, dev, 'False', 0, 1, 2, nthreads, 'for_setokim')
    rate, per_step, runs = {s: [] for s in sides}, {s: [] for s in sides}, []
    for _ in range(train_repeats):
        for side in sides:
            comp, dt = side
            if script == 'setok':
                r, _ = setok_run(preset, dev, comp, steps, warmup, batch if cpu_full else 0, nthreads, f'compile{comp}_{dt}',
                                 dt=dt)
                rate[side].append(steps_per_s(r['log'], warmup, warmup + steps + 1))
            else:
                r = setokim_run(preset, dev, comp, steps, warmup, nthreads, ckpt, f'compile{comp}_{dt}', dt=dt)
                rate[side].append(steps_per_s(r['log'], warmup, warmup + steps + 1, stage=1))
                per_step[side].append(llm_tokens_per_step(r['log'], 1))
            runs.append((side, r))
    out = []
    for side in sides:
        comp, dt = side
        same_dtype = [r for (_, d), r in runs if d == dt]                   # a compiled run takes the eager one's count
        sps = statistics.median(rate[side])
        img_s = sps * batch
        if script == 'setok':
            patches = (c['image_size'] // c['patch_size']) ** 2
            tok = f"{img_s * patches:.0f} patch tokens/s ({patches} per image)"
            util = mfu(same_dtype, sps, dev, 'flops')
        else:
            tps = statistics.median(per_step[side])
            tok = f"{sps * tps:.0f} tokens/s (LLM tokens, {tps / batch:.0f} per sequence, one image each)"
            util = mfu(same_dtype, sps * tps, dev, 'flops_tok')
        eager = statistics.median(rate[('False', dtype)])
        speed = (f"; {sps / eager:.2f}x eager" if comp == 'True' else
                 f"; dtype={dtype} is {eager / sps:.2f}x this" if dt != dtype else '')
        out.append(dict(
            row=f"{name}, {'compile' if comp == 'True' else 'eager'}{', float32' if dt != dtype else ''}",
            figure=f"{img_s:.1f} img/s{speed}",
            target='-', ok=None, check='',
            notes=f"{util}; {tok}; batch {batch}{' (reduced on CPU)' if cpu_full else ''}, steps {warmup}..{warmup + steps} "
                  f"timed, median of {train_repeats} runs"))
    return out


def ddp_row(dev):
    """2 processes (torchrun; gloo on CPU, nccl on GPU) against 1, the same global batch."""
    c = load_preset('small')
    B, rate = c['batch_size'], {1: [], 2: []}
    for _ in range(train_repeats):
        for nproc in (1, 2):
            r, _ = setok_run('small', dev, 'False', train_steps, train_warmup, B // nproc, ddp_threads, f'ddp{nproc}',
                             nproc=nproc if nproc > 1 else 0)
            rate[nproc].append(steps_per_s(r['log'], train_warmup, train_warmup + train_steps + 1) * B)
    one, two = statistics.median(rate[1]), statistics.median(rate[2])
    backend = 'nccl' if dev.startswith('cuda') else 'gloo'
    return [dict(row=f"DDP train_setok config=small, 2 processes / 1 ({backend})", figure=f"{two / one:.2f}x",
                 target='-', ok=None, check='',
                 notes=f"{two:.1f} img/s (2 x {B // 2}) against {one:.1f} img/s (1 x {B}), {ddp_threads} thread(s) "
                       f"per process, median of {train_repeats} runs each")]


def memory_row(dev):
    """Peak resident set of a short config=small run on the real world (its data is held in memory)."""
    args = [*common_args('small', dev, threads or torch.get_num_threads()), f'out_dir={os.path.join(bench_dir, "memory")}',
            f'max_iters={mem_steps}', f'eval_interval={mem_steps}']
    r = run(python('train_setok.py', *args))
    check_run(r, f"train_setok.py {' '.join(args)}")
    gib = r['maxrss'] / 2 ** 30
    return [dict(row='peak memory, train_setok config=small', figure=f"{gib:.2f} GiB", target='< 2 GiB', ok=gib < 2,
                 check='', notes=f"ru_maxrss of the process: {mem_steps} steps and an eval on the default world "
                                 f"({load_preset('small')['data_dir']})")]


# -----------------------------------------------------------------------------
# smoke: the two models at a preset's shapes, one optimizer step each on random data

class SmokeText:
    """A stand-in for data.text.TextTokenizer (same attribute names) that needs no file: n text ids
    (the last one is eos, as GPT-2's <|endoftext|>), then the special tokens, then pad: tiktoken's layout
    (data/text.py). A word is already an id: encode('17 42 [SEG]') -> [17, 42, seg]."""

    def __init__(self, n):
        self.special = {s: n + k for k, s in enumerate(TextTokenizer.SPECIAL)}
        self.img, self.img_end, self.seg, self.user, self.assistant = self.special.values()
        self.eos, self.pad, self.vocab_size = n - 1, n + len(self.special), n + len(self.special) + 1

    def encode(self, text):
        return [self.special.get(w) or int(w) for w in text.split()]


SMOKE_TEXT_VOCAB = {'gpt2': 50257, 'sentencepiece': 32000}   # GPT-2's BPE; a typical size for real captions
STAGE_TASKS = {1: ('caption', 't2i'), 2: TASKS}              # train_setokim.py's stages
SMOKE_TURNS = {'caption': ('<image> {w}', '{w}'), 't2i': ('{w}', '<image>'), 'vqa': ('<image> {w}', '{w}'),
               'refer': ('<image> {w}', '[SEG]'), 'edit': ('<image> {w}', '<image>')}   # (human, gpt) turns


def smoke_settings():
    """The smoke row's settings, checked (one-line errors) before any row runs -> (SeTok's settings
    with vit_init's encoder shape, that shape, the GPT-2 folder or '', the LLM shape)."""
    if tokenizer not in ('setok', 'grid', 'patch'):
        die(f"tokenizer={tokenizer}: expected setok, grid or patch")
    if text_tokenizer not in SMOKE_TEXT_VOCAB:
        die(f"text_tokenizer={text_tokenizer}: expected {' or '.join(SMOKE_TEXT_VOCAB)}")
    if str(smoke_compile).lower() not in ('auto', 'true', 'false', '1', '0', 'yes', 'no'):
        die(f"smoke_compile={smoke_compile}: expected auto, True or False")
    vit = vit_shape(pretrained_config(vit_init), vit_init) if vit_init else {}   # its config.json fixes the encoder
    s = {**config, **vit}
    if not -1 <= s['cluster_layer'] < s['depth']:
        die(f"cluster_layer={cluster_layer}: expected -1 (the encoder's output) or a number of blocks 0..{s['depth'] - 1}")
    gpt2 = '' if init_from == 'scratch' else init_from
    if gpt2 and text_tokenizer != 'gpt2':
        die(f"init_from={init_from}: GPT-2's weights only know GPT-2's BPE ids; add text_tokenizer=gpt2")
    if err := pos_emb_error(pos_emb, bool(gpt2)):
        die(err)
    shape = gpt2_shape(pretrained_config(gpt2)) if gpt2 else {'n_layer': llm_n_layer, 'n_head': llm_n_head,
                                                                'n_embd': llm_n_embd}
    return s, vit, gpt2, shape


def smoke_step(model, forward, params, lr, dev, ctx, dynamic=False):
    """timed_step of forward(model), the model compiled as the scripts compile it -> loss, stats,
    seconds, memory as text: the GPU's peak, or on a CPU this process's peak resident set so far
    (earlier rows included). dynamic: shapes vary from batch to batch (SETOKIM's sequences)."""
    use = str(smoke_compile).lower() in ('true', '1', 'yes') or (smoke_compile == 'auto' and dev.startswith('cuda'))
    fwd = torch.compile(model, dynamic=dynamic) if use else model
    opt = torch.optim.AdamW(params, lr=lr)
    loss, stats, dt, mem = timed_step(lambda: forward(fwd), opt, ctx, dev)
    mem = (f"peak GPU memory {mem:.2f} GiB (second step)" if mem is not None else
           f"peak RSS of this process so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    return loss, stats, dt, f"{mem}; {'compiled' if use else 'eager'}"


def oom_row(name, batch, e):
    return dict(row=name, figure='out of memory', target='-', ok=False, check='',
                notes=f"at batch {batch}: {str(e).splitlines()[0]}".replace('|', '/'))


def smoke_setok(s, dev, ctx):
    """train_setok.py's model (detok.Tokenizer: SeTok, detokenizer, concept text encoder) at these
    shapes, and one step on random images and concepts (words of random text ids)."""
    scfg = SeTokConfig(**{f.name: s[f.name] for f in fields(SeTokConfig) if f.name in s})   # vit_*: vit_init's
    dcfg = DetokConfig(image_size=s['image_size'], token_dim=s['token_dim'], sprite_size=s['dec_sprite_size'],
                       dim=s['dec_dim'], sharpness=s['dec_sharpness'])
    tok = SmokeText(SMOKE_TEXT_VOCAB['sentencepiece'])   # train_setok.py reads the world's sentencepiece model
    torch.manual_seed(seed)
    model = Tokenizer(scfg, dcfg, tok.vocab_size, tok.pad, s)
    init_vit(model.setok.encoder, vit_init, freeze_encoder)
    model = model.to(dev)
    count = lambda ps: sum(p.numel() for p in ps) / 1e6
    parts = {'encoder': model.setok.encoder, 'merger': model.setok.merger, 'detok': model.detok, 'text': model.text}
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows = [dict(row='smoke SeTok: parameters', figure=f"{count(model.parameters()):.2f}M", target='-', ok=None, check='',
                 notes=', '.join(f"{k} {count(m.parameters()):.2f}M" for k, m in parts.items()) +
                       f"; total {count(model.parameters()):.2f}M, trainable {count(trainable):.2f}M (encoder "
                       f"{scfg.vit_style}{', frozen' if freeze_encoder else ''}; text vocabulary {tok.vocab_size}); "
                       f"{scfg.image_size}px, ViT {scfg.depth}x{scfg.dim} patch {scfg.patch_size}, "
                       f"up to {scfg.max_tokens} tokens of {scfg.token_dim}")]
    B = batch_size if dev.startswith('cuda') else 1
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(B, 3, scfg.image_size, scfg.image_size, generator=g).to(dev)               # (B, 3, H, W)
    ids = torch.randint(0, tok.eos, (B, max_concepts, concept_len), generator=g).to(dev)        # (B, P, L) text ids
    valid = torch.ones(B, max_concepts, dtype=torch.bool, device=dev)                           # (B, P)
    name = 'smoke SeTok: one optimizer step'
    try:
        loss, stats, dt, mem = smoke_step(model, lambda f: f(img, ids, valid), trainable, learning_rate, dev, ctx)
    except torch.OutOfMemoryError as e:
        return rows + [oom_row(name, B, e)]
    rows.append(dict(row=name, figure=f"{dt:.2f} s", target='-', ok=None, check='',
                     notes=f"{B} random {scfg.image_size}px image{'s' * (B > 1)} ({stats['tokens'].item():.1f} tokens "
                           f"each): loss {loss:.4f}; {mem}"))
    return rows


def smoke_setokim(s, gpt2, shape, dev, ctx):
    """train_setokim.py's model (SETOKIM) at these shapes, with GPT-2's weights when init_from names a
    folder, and one step of each stage on random conversations: words of 40 random text ids, every
    image with SeTok's most tokens (random vectors and labels). No SeTok checkpoint is needed: SeTok's
    shape (token width, patch grid, tokens per image) comes from the settings."""
    tok = SmokeText(SMOKE_TEXT_VOCAB[text_tokenizer])
    grid = s['image_size'] // s['patch_size']
    gcfg = GPTConfig.for_tokenizer(tok, block_size=block_size, pos_emb=pos_emb, **shape, token_dim=s['token_dim'], grid=grid,
                                   image_size=s['image_size'], mask_dim=mask_dim, mask_depth=mask_depth,
                                   mask_n_head=mask_n_head, mask_refine=mask_refine, gen_head=gen_head,
                                   diff_width=diff_width, diff_depth=diff_depth, diff_mean=diff_mean,
                                   copy_head=copy_head)   # the special ids: the tokenizer's
    torch.manual_seed(seed)
    model = SETOKIM(gcfg)
    weights = ''
    if gpt2:
        weights = init_gpt2(model.gpt, gpt2)
        print(weights, flush=True)
    model = model.to(dev)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    rows = [dict(row='smoke SETOKIM: parameters', figure=f"{count(model):.2f}M", target='-', ok=None, check='',
                 notes=f"GPT {count(model.gpt):.2f}M ({model.gpt.num_params() / 1e6:.2f}M without position embeddings; "
                       f"{shape['n_layer']} blocks of {shape['n_embd']}, vocabulary {gcfg.vocab_size}: text "
                       f"{text_tokenizer}, specials, pad, VIS), in_proj {count(model.in_proj):.2f}M, {gen_head} head "
                       f"{count(model.diff_head if gen_head == 'diffusion' else model.out_proj):.2f}M, mask decoder "
                       f"{count(model.mask_decoder):.2f}M"
                       + (f"; {weights}" if weights else ''))]
    cuda, N, D = dev.startswith('cuda'), grid ** 2, s['token_dim']
    K = {'setok': s['max_tokens'], 'grid': s['grid_size'] ** 2, 'patch': N}[tokenizer]   # SeTok's most tokens
    g = torch.Generator().manual_seed(seed)
    words = lambda: ' '.join(map(str, torch.randint(0, tok.eos, (40,), generator=g).tolist()))   # text ids only
    for st in (1, 2):
        B = llm_batch_size if cuda else len(STAGE_TASKS[st])              # on a CPU: one conversation per task
        tasks = [STAGE_TASKS[st][i % len(STAGE_TASKS[st])] for i in range(B)]
        # conversation i reads image 2i and writes image 2i+1; each image has K tokens in the bank
        bank = Bank(tokens=torch.randn(2 * B * K, D, generator=g).half(), off=torch.arange(2 * B) * K,
                    ntok=torch.full((2 * B,), K), labels=torch.randint(0, K, (2 * B, N), generator=g).short(),
                    instances=torch.randint(0, 3, (2 * B, s['image_size'], s['image_size']), generator=g).byte())
        enc = [encode_conversation(tok, [{'from': 'human', 'value': SMOKE_TURNS[t][0].format(w=words())},
                                         {'from': 'gpt', 'value': SMOKE_TURNS[t][1].format(w=words())}],
                                   lambda out, i=i: ((2 * i + out) * K, K), gcfg.vis_id) for i, t in enumerate(tasks)]
        P = pack(enc, torch.arange(B) * 2, [int(t == 'refer') for t in tasks], tok.seg)   # refer: object 1's mask
        if int(P.length.max()) > block_size:
            die(f"smoke: a conversation has {int(P.length.max())} tokens, more than block_size={block_size}")
        # one conversation per row, padded (pack_rows=False): the most memory a step of B can take
        b = {k: v.to(dev) for k, v in collate(P, bank, torch.arange(B), tok).items()}
        name = f"smoke SETOKIM stage {st} ({', '.join(STAGE_TASKS[st])}): one optimizer step"
        try:
            loss, stats, dt, mem = smoke_step(model, lambda f: f(b), model.parameters(), llm_learning_rate, dev, ctx,
                                              dynamic=True)
        except torch.OutOfMemoryError as e:
            rows.append(oom_row(name, B, e))
            continue
        rows.append(dict(row=name, figure=f"{dt:.2f} s", target='-', ok=None, check='',
                         notes=f"{B} random conversations of up to {int(P.length.max())} tokens ({K} per image; "
                               f"{stats['n_ce']} text, {stats['n_reg']} visual and {stats['n_seg']} mask targets): "
                               f"loss {loss:.4f}; {mem}"))
    return rows


def smoke_rows(dev, ctx, settings):
    s, vit, gpt2, shape = settings
    if vit:
        print(f"encoder: {vit_init} ({', '.join(f'{k}={v}' for k, v in vit.items())})", flush=True)
    out = []
    for script in split(scripts, ('setok', 'setokim'), 'scripts'):
        out += smoke_setok(s, dev, ctx) if script == 'setok' else smoke_setokim(s, gpt2, shape, dev, ctx)
        if dev.startswith('cuda'):
            torch.cuda.empty_cache()                     # the next model's peak starts from an empty GPU
    return out


def table(results):
    lines = ['| row | figure | target | pass | check | notes |', '| --- | --- | --- | --- | --- | --- |']
    for r in results:
        ok = '' if r['ok'] is None else ('pass' if r['ok'] else 'FAIL')
        lines.append(f"| {r['row']} | {r['figure']} | {r['target']} | {ok} | {r['check']} | {r['notes']} |")
    return '\n'.join(lines)


if __name__ == '__main__':
    todo = split(rows, ROWS, 'rows')
    split(gen_head, ('diffusion', 'mse'), 'gen_head')
    for name in split(shapes, tuple(SHAPES), 'shapes') + [ratio_shape]:
        if name not in SHAPES:
            die(f"ratio_shape={name}: choose from {', '.join(SHAPES)}")
    if device.startswith('cuda') and not torch.cuda.is_available():
        die(f"device={device}: no CUDA device here; use device=cpu")
    smoke = smoke_settings() if 'smoke' in todo else None
    dev, ptdtype, ctx = pick_device(device, dtype)
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(os.path.join(HERE, bench_dir) if not os.path.isabs(bench_dir) else bench_dir, exist_ok=True)
    print(f"nanoSeTok bench | {machine(dev)} | device {dev} {str(ptdtype).replace('torch.', '')}", flush=True)
    print(f"command: python bench.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    results = []
    for row in todo:
        t0 = time.time()
        if row == 'peak':
            results += peak_rows(dev)
        elif row == 'tokenize':
            for name in split(shapes, tuple(SHAPES), 'shapes'):
                results += tokenize_row(name, dev, ctx)
        elif row == 'ratio':
            results += ratio_row(dev, ctx)
        elif row == 'train':
            results += train_rows(dev)
        elif row == 'smoke':
            results += smoke_rows(dev, ctx, smoke)
        elif row in ('ddp', 'memory'):
            try:
                results += ddp_row(dev) if row == 'ddp' else memory_row(dev)
            except RunFailed as e:
                results.append(dict(row=row, figure='run failed', target='-', ok=False, check='', notes=str(e)))
        print(f"({row}: {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    print()
    print(table(results))
    if any(r['check'].startswith('DIFFER') or r['figure'] in ('run failed', 'out of memory') for r in results):
        sys.exit(1)                                        # wrong outputs, a script that failed, a step too big
