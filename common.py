"""
The plumbing that every nanoSeTok script shares, written once:

  configure(...)     nanoGPT-style configuration: plain module-level values overridden from the
                     command line (key=value, --key=value, --key value, config=NAME)
  die(...)           a one-line error and exit code 2, never a traceback
  pick_device(...)   cuda > mps > cpu, and the autocast context that goes with it
  setup_ddp()        torchrun-aware DistributedDataParallel setup (nccl on GPU, gloo on CPU)
  timed_step(...)    the time and peak GPU memory of one training step (smoke=True)
  save_checkpoint / load_checkpoint   atomic writes, checked reads
  rng_state / set_rng_state           everything exact resume needs from the random generators
  lr_at(...)         linear warmup then cosine decay
"""
import difflib
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def die(msg, code=2):
    """Print one line that says what is wrong (and what to do) and exit. No traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# -----------------------------------------------------------------------------
# configuration

SIMPLE_TYPES = (bool, int, float, str, list)


def config_keys(namespace):
    """The settings of a script: its public module-level values of a simple type (not CONSTANTS)."""
    return [k for k, v in namespace.items()
            if not k.startswith('_') and not k.isupper() and isinstance(v, SIMPLE_TYPES) and not callable(v)]


def parse_value(key, text, default):
    """Turn the command-line string `text` into the type of `default`, or die naming the key."""
    kind = type(default)
    if kind is bool:
        low = text.lower()
        if low in ('1', 'true', 'yes', 'on'):
            return True
        if low in ('0', 'false', 'no', 'off'):
            return False
        die(f"{key}={text}: expected a bool (true/false), default is {default}")
    if kind is int:
        try:
            f = float(text)
            if f == int(f):
                return int(f)
        except ValueError:
            pass
        die(f"{key}={text}: expected an int, default is {default}")
    if kind is float:
        try:
            return float(text)
        except ValueError:
            die(f"{key}={text}: expected a float, default is {default}")
    if kind is list:
        return text if isinstance(text, list) else [text]
    return text


def load_preset(name):
    """Execute config/NAME.py (or a path to a .py file) and return the values it sets."""
    path = name if name.endswith('.py') else os.path.join(HERE, 'config', f'{name}.py')
    if not os.path.isfile(path):
        choices = sorted(f[:-3] for f in os.listdir(os.path.join(HERE, 'config')) if f.endswith('.py'))
        die(f"no preset '{name}' ({path} does not exist); choose one of: {', '.join(choices)}")
    values = {}
    exec(compile(open(path).read(), path, 'exec'), {}, values)
    return {k: v for k, v in values.items() if not k.startswith('_')}


def configure(namespace, argv=None, script=None):
    """
    Override the settings in `namespace` (a script's globals(), updated in place) from argv.
    Accepted: config=NAME (loads config/NAME.py first, whatever its position), key=value,
    --key=value, --key value, and for list settings --key v1 v2 ... . A preset describes one world
    for every script, so preset keys that this script does not have are skipped; a key on the
    command line that the script does not have is an error. Returns {key: value} of all settings.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    script = script or os.path.basename(sys.argv[0])
    keys = config_keys(namespace)
    if '--help' in argv or '-h' in argv:
        print(f"settings of {script} (override with key=value; config=NAME loads config/NAME.py):")
        for k in keys:
            print(f"  {k} = {namespace[k]!r}")
        sys.exit(0)
    # 1) split argv into (key, value) pairs
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        body = arg[2:] if arg.startswith('--') else arg
        if '=' in body:
            key, val = body.split('=', 1)
            i += 1
        elif arg.startswith('--'):  # --key value [value ...]
            key, i = body, i + 1
            vals = []
            while i < len(argv) and not argv[i].startswith('--') and '=' not in argv[i]:
                vals.append(argv[i])
                i += 1
                if not isinstance(namespace.get(key), list):
                    break
            if not vals:
                die(f"--{key} needs a value: write --{key}=VALUE")
            val = vals if isinstance(namespace.get(key), list) else vals[0]
        else:
            die(f"cannot read argument '{arg}': write key=value")
        pairs.append((key.replace('-', '_'), val))
    # 2) the preset first, then the overrides in order
    presets = [v for k, v in pairs if k == 'config']
    for name in presets:
        for k, v in load_preset(name).items():
            if k in keys:
                if not isinstance(v, type(namespace[k])) and not (type(namespace[k]) is float and type(v) is int):
                    die(f"preset {name}: {k}={v!r} is a {type(v).__name__}, expected {type(namespace[k]).__name__}")
                namespace[k] = type(namespace[k])(v) if type(namespace[k]) is float else v
    for k, v in pairs:
        if k == 'config':
            continue
        if k not in keys:
            close = difflib.get_close_matches(k, keys, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ''
            die(f"unknown setting '{k}' for {script}{hint}; valid settings: {', '.join(keys)}")
        namespace[k] = parse_value(k, v, namespace[k])
    return {k: namespace[k] for k in keys}


# -----------------------------------------------------------------------------
# devices, precision, distributed

def pick_device(device='auto', dtype='auto'):
    """Returns (device string, torch dtype for autocast, autocast context). cuda > mps > cpu."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if dtype == 'auto':
        dtype = 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    dev_type = 'cuda' if device.startswith('cuda') else device
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=dev_type, dtype=ptdtype)
    return device, ptdtype, ctx


PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}   # dense bf16 FLOP/s, for MFU


def peak_flops(dev):
    """The bf16 dense peak FLOP/s of a CUDA device, for MFU; None when its name is not in PEAK_BF16."""
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)

def setup_ddp(device):
    """Under torchrun: init the process group and return (ddp, rank, world_size, device)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, device
    import torch.distributed as dist
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, rank, world, device


def timed_step(forward, opt, ctx, dev):
    """One optimizer step of the loss that forward() returns as (loss, stats) -> (loss as a float,
    stats, seconds, peak GPU memory in GiB or None). On a GPU it steps twice and measures the second
    step: the first one warms up (kernels, torch.compile) and creates the optimizer state, which the
    peak then includes. The training scripts' smoke=True."""
    cuda = str(dev).startswith('cuda')
    for _ in range(2 if cuda else 1):
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.time()
        with ctx:
            loss, stats = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()                                      # waits for the GPU
        dt = time.time() - t0
    return loss, stats, dt, torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 that lets gradients flow back to every rank (works on gloo too):
    the backward sums the incoming gradient over ranks and keeps this rank's slice."""
    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_all(x, grad=True):
    """Concatenate x over all DDP ranks (identity without DDP)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if grad:
        return GatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


# -----------------------------------------------------------------------------
# checkpoints and exact resume

def save_checkpoint(obj, path):
    """Write atomically: a kill during the save leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, kind=None, what='checkpoint'):
    """Load a checkpoint written by save_checkpoint, or die with a line that says what is wrong."""
    if not os.path.isfile(path):
        die(f"{what} {path} not found; train one first or pass its path")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__}); pass a file written by nanoSeTok")
    if not isinstance(ckpt, dict) or 'kind' not in ckpt:
        die(f"{path} is not a nanoSeTok checkpoint; pass a file written by train_setok.py or train_setokim.py")
    if kind is not None and ckpt['kind'] != kind:
        die(f"{path} is a {ckpt['kind']} checkpoint, but a {kind} checkpoint is needed here")
    return ckpt



def load_weights(module, state, path):
    """module.load_state_dict(state), or die saying the checkpoint is from another version of the model."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if len(str(e).strip().splitlines()) > 1 else str(e)
        die(f"{path} does not fit this version of the model ({first[:160]}); retrain it with this code")

def rng_state():
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def lr_at(step, max_lr, warmup, total, min_ratio=0.1):
    """Linear warmup for `warmup` steps, then cosine decay to min_ratio * max_lr at `total`."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# -----------------------------------------------------------------------------
# pictures: cluster overlays and panels (train_setok.py's eval panel, sample.py)

def palette(n):
    """n well-separated colours (golden-ratio hues), (n, 3) uint8."""
    import colorsys
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1, 0.85, 1.0)] for i in range(n)], np.uint8)


def to_uint8(img, scale=1):
    """(3, H, W) float tensor in [0, 1] -> (H*scale, W*scale, 3) uint8, nearest upscaling."""
    a = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return a.repeat(scale, 0).repeat(scale, 1)


def cluster_overlay(img, labels, scale=4, alpha=0.55):
    """The image with one colour per cluster blended over it and cluster boundaries drawn in white.
    img (3, H, W) in [0, 1]; labels (N,) cluster id per patch of a square patch grid."""
    g = int(round(labels.numel() ** 0.5))
    base = to_uint8(img, scale).astype(np.float32)
    H = base.shape[0]
    lab = labels.view(g, g).cpu().numpy().repeat(H // g, 0).repeat(H // g, 1)   # (H', W') per pixel
    col = palette(int(lab.max()) + 1)[lab].astype(np.float32)
    out = (1 - alpha) * base + alpha * col
    edge = np.zeros(lab.shape, bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    out[edge] = 255
    return out.round().astype(np.uint8)


def save_panel(rows, path, labels=None, pad=2):
    """Save a grid of equally sized uint8 images (a list of rows) as one PNG. `labels`, if given,
    is a same-shaped list of short strings written in the top-left corner of each picture."""
    from PIL import Image, ImageDraw
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = Image.new('RGB', (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            x, y = pad + j * (w + pad), pad + i * (h + pad)
            canvas.paste(Image.fromarray(im), (x, y))
            if labels and labels[i][j]:
                draw.text((x + 3, y + 2), labels[i][j], fill=(255, 255, 255))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path
