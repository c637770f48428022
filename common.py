"""
The plumbing that every nanoSeTok script shares, written once:

  configure(...)     nanoGPT-style configuration: plain module-level values overridden from the
                     command line (key=value, --key=value, --key value, config=NAME); as_list
  die(...)           a one-line error and exit code 2, never a traceback
  pick_device(...)   cuda > mps > cpu, and the autocast context that goes with it; compile_on,
                     cpu_has_bf16, keep_freed_memory (glibc's allocator, for CPU steps),
                     count_flops / counted_flops (one training step's FLOPs, for the MFU)
  adamw(...)         AdamW with weight decay on the matrices only
  setup_ddp(), wrap_ddp(...), gather_all(...)   torchrun-aware DistributedDataParallel (nccl / gloo)
  timed_step(...)    the time and peak GPU memory of one training step (bench.py's smoke row)
  atomic_save(...)   torch.save that a kill cannot corrupt (checkpoint.py and the token cache use it);
                     sweep_tmp, pid_alive, sha1_file
  RunLog, plot_curves   a run's metrics as JSON lines (log.jsonl) and a picture of their curves
  Progress           a tqdm bar on a terminal, a plain line every log_interval steps in a file
  lr_at(...)         linear warmup then cosine decay
  palette, to_uint8, cluster_overlay, mask_overlay, save_panel   pictures
"""
import colorsys
import difflib
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils import flop_counter
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

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


def parse_args(argv, namespace):
    """argv -> [(key, raw value)] for key=value, --key=value, --key value and --key v1 v2 ... (a list
    setting of `namespace`); dies on an argument it cannot read."""
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
    return pairs


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
    pairs = parse_args(argv, namespace)
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


def as_list(value, kind=str):
    """A list setting as Python or the command line gives it (['a', 'b'], ['a,b'], '[0.7, 0.3]') -> [kind]."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for it in items:
        if isinstance(it, str):
            out += [p.strip().strip('\'"') for p in it.strip().strip('[]').split(',') if p.strip().strip('\'"')]
        else:
            out.append(it)
    try:
        return [kind(x) for x in out]
    except (TypeError, ValueError):
        die(f"{value!r}: expected a list of {kind.__name__} values, e.g. a,b or [a, b]")


# -----------------------------------------------------------------------------
# devices, precision, distributed

def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there a bf16 matmul runs about
    4x float32's (bench.py's peak row); elsewhere bf16 is emulated and slower than float32."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((l.split(':', 1)[1].split() for l in f if l.startswith('flags')), [])
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def pick_device(device='auto', dtype='auto'):
    """Returns (device string, torch dtype for autocast, autocast context). cuda > mps > cpu.
    dtype=auto: bf16 autocast on GPUs that have it and on CPUs with native bf16, else float32. On such
    a CPU the projections and MLPs run in bf16 at ~4x float32's matmul rate; attention and the
    detokenizer stay in float32 (setok.Attention, detok.py), autocast keeps norms and losses in
    float32, and setok.Linear keeps oneDNN from building a kernel for every new row count
    (RESULTS.md, sections 12 and 13)."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if dtype == 'auto':
        bf16 = torch.cuda.is_bf16_supported() if device.startswith('cuda') else device == 'cpu' and cpu_has_bf16()
        dtype = 'bfloat16' if bf16 else 'float32'
    ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    dev_type = 'cuda' if device.startswith('cuda') else device
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type=dev_type, dtype=ptdtype)
    return device, ptdtype, ctx


# torch.utils.flop_counter counts the GPUs' fused attention kernels but not the CPU's (0 FLOPs): the same formulas
for _op, _formula in ((torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
                      (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop)):
    if _op not in flop_counter.flop_registry and _op.default not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(_op, get_raw=True)(_formula)   # _formula already takes tensors


def count_flops(on):
    """A FlopCounterMode to wrap one training step in when `on` (the scripts count step 0 of a fresh,
    eager run only: under the counter a step does not come out bit-identical, so a resumed run must not
    count where the uninterrupted one did not), else a context that counts nothing."""
    return flop_counter.FlopCounterMode(display=False) if on else nullcontext()


def counted_flops(counter):
    """The FLOPs (forward + backward) that count_flops(...) saw; 0 when it counted nothing."""
    return counter.get_total_flops() if isinstance(counter, flop_counter.FlopCounterMode) else 0


def keep_freed_memory():
    """Ask glibc to keep freed memory for the next step. By default it hands large freed blocks back
    to the kernel, so every step page-faults its big activations in again (SeTok's detokenizer makes
    25 MB tensors; without this SeTok's CPU step is ~15% slower, RESULTS.md section 12). Blocks up
    to 32 MB (glibc's largest mmap threshold) now come from the heap, and the heap keeps up to 1 GB
    it could trim. No-op where the C library is not glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL('libc.so.6')
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3           # malloc.h
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):
        pass


def compile_on(setting, dev):
    """The compile setting: True/False, or auto = on for CUDA. Not on a CPU: there a step's time is in
    the fused attention kernel and the matmuls, which compiled code calls just the same; what Inductor
    fuses (the element-wise rest) is a small share, the density-peak clustering (sorts, top-k) splits
    SeTok's graph, and compiling costs about a minute on 2 cores (RESULTS.md, section 12)."""
    return str(setting).lower() in ('true', '1', 'yes') or (setting == 'auto' and str(dev).startswith('cuda'))


def adamw(params, lr, weight_decay, betas):
    """AdamW with weight decay on the matrices only (not on biases, norms and the like), over the
    parameters that train (a frozen encoder's are left out). Fused (one kernel over all parameters) on
    CPUs and GPUs: on 2 CPU cores a SETOKIM step's update takes 3 ms instead of 11."""
    params = [p for p in params if p.requires_grad]
    fused = all(p.device.type in ('cpu', 'cuda') for p in params) or None
    return torch.optim.AdamW([{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}], lr=lr, betas=betas,
                             fused=fused)


PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}   # dense bf16 FLOP/s, for MFU


def peak_flops(dev):
    """The bf16 dense peak FLOP/s of a CUDA device, for MFU; None when its name is not in PEAK_BF16."""
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)

def setup_ddp(device):
    """Under torchrun: init the process group and return (ddp, rank, world_size, device)."""
    if int(os.environ.get('RANK', -1)) == -1:
        return False, 0, 1, device
    rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return True, rank, world, device


def wrap_ddp(model, dev):
    """DistributedDataParallel around a model (or its compiled form), on this process's GPU if any."""
    return DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if str(dev).startswith('cuda') else None)


def timed_step(forward, opt, ctx, dev):
    """One optimizer step of the loss that forward() returns as (loss, stats) -> (loss as a float,
    stats, seconds, peak GPU memory in GiB or None). On a GPU it steps twice and measures the second
    step: the first one warms up (kernels, torch.compile) and creates the optimizer state, which the
    peak then includes. bench.py's smoke row."""
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
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_all(x, grad=True):
    """Concatenate x over all DDP ranks (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if grad:
        return GatherWithGrad.apply(x)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


# -----------------------------------------------------------------------------
# files, logs and progress

def atomic_save(obj, path):
    """torch.save that a kill cannot corrupt: write a temporary file (<path>.<pid>.tmp), fsync it,
    rename it over `path` (the previous file stays intact until the rename), and fsync the folder so
    that the rename itself survives a crash. Checkpoints and the token cache. A failed write (a full
    disk) is a one-line error that says the previous file is intact."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        die(f"could not write {path} ({e.strerror or type(e).__name__}); "
            f"{'the previous one is intact' if os.path.exists(path) else 'nothing was written'}: free space and resume")


def sweep_tmp(folder):
    """Remove the temporary files (<name>.<pid>.tmp) that saves killed midway left in `folder`: those
    whose process is gone (a live one may still be writing its file)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        pid = name.rsplit('.', 2)[-2] if name.endswith('.tmp') and name.count('.') >= 2 else ''
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def pid_alive(pid):
    """Is process pid running (on this machine)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha1_file(path):
    """A sha1 hasher fed with a file's bytes, read 1 MB at a time (.hexdigest(): the file's identity)."""
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h


class RunLog:
    """A run's metrics as JSON lines in log.jsonl, one record per log line or eval:
        {"kind": "train", "step": 120, "time": 31.4, "lr": 0.002, "loss": 0.61, ...}
        {"kind": "eval", "step": 500, "time": 140.2, "psnr": 22.1, ...}
    (time: seconds since the run started; extra fields such as "stage" as the script passes them).
    A run from scratch starts a new file; a resumed run keeps the records that keep(record) accepts
    (those before the resumed step), so that the file always reads as one straight run.
    plot_curves(log.records(), path, keys) draws the curves as a PNG (pillow only)."""

    def __init__(self, path, keep=None, enabled=True):
        self.path, self.enabled, self.t0 = path, enabled, time.time()
        if not enabled:
            return
        old = self.records() if keep is not None else []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in old if keep(r))

    def records(self):
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def write(self, kind, step, **values):
        rec = {'kind': kind, 'step': step, 'time': round(time.time() - self.t0, 3), **values}
        if self.enabled:
            with open(self.path, 'a') as f:
                f.write(json.dumps(rec) + '\n')
        return rec


def plot_curves(records, path, keys, width=360, height=210):
    """One panel per key in `keys` (a key that no record has is left out): its value against the step,
    train records as thin lines, eval records as dots joined by lines. Records with a "stage" (SETOKIM)
    get one colour per stage, each stage drawn after the one before it on the step axis. Written with
    pillow, so it needs nothing else."""
    stages = sorted({r.get('stage', 0) for r in records})
    last = {s: max((r['step'] for r in records if r.get('stage', 0) == s), default=0) for s in stages}
    offset = {s: sum(last[t] for t in stages if t < s) for s in stages}    # stage 2's step 1 follows stage 1's end
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    panels = []
    for key in keys:
        series = {}
        for r in records:
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]):
                s = r.get('stage', 0)
                series.setdefault((s, r['kind']), []).append((offset[s] + r['step'], r[key]))
        if series:
            panels.append((key, series))
    if not panels:
        return None
    cols = min(3, len(panels))
    canvas = Image.new('RGB', (cols * width, -(-len(panels) // cols) * height), 'white')
    draw = ImageDraw.Draw(canvas)
    for i, (key, series) in enumerate(panels):
        x0, y0 = (i % cols) * width, (i // cols) * height
        left, top, right, bottom = x0 + 48, y0 + 22, x0 + width - 12, y0 + height - 24
        pts = [p for s in series.values() for p in s]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
        xhi, yhi = (xhi if xhi > xlo else xlo + 1), (yhi if yhi > ylo else ylo + abs(ylo) * 0.01 + 1e-6)
        X = lambda v: left + (v - xlo) / (xhi - xlo) * (right - left)
        Y = lambda v: bottom - (v - ylo) / (yhi - ylo) * (bottom - top)
        draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        draw.text((left, y0 + 6), key, fill='black')
        if len(stages) > 1:
            for j, s in enumerate(stages):
                draw.text((right - 110 + 55 * j, y0 + 6), f'stage {s}', fill=colours[j % len(colours)])
        draw.text((x0 + 2, top), f'{yhi:.3g}', fill=(90, 90, 90))
        draw.text((x0 + 2, bottom - 10), f'{ylo:.3g}', fill=(90, 90, 90))
        draw.text((left, bottom + 6), f'{xlo}', fill=(90, 90, 90))
        draw.text((right - 60, bottom + 6), f'step {xhi}', fill=(90, 90, 90))
        for (stage, kind), s in sorted(series.items()):
            c = colours[stages.index(stage) % len(colours)]
            line = [(X(a), Y(b)) for a, b in sorted(s)]
            if len(line) > 1:
                draw.line(line, fill=c, width=1 if kind == 'train' else 2)
            if kind == 'eval':
                for px, py in line:
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=c)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


class Progress:
    """Training progress: one tqdm bar when stderr is a terminal; when the output goes to a file or a
    pipe, one plain line every `every` steps instead of a bar redrawn at every step."""

    def __init__(self, total, initial=0, desc='train', every=10, enabled=True):
        self.total, self.desc, self.every, self.enabled = total, desc, max(1, every), enabled
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) \
            if enabled and sys.stderr.isatty() else None

    def update(self, step, **postfix):
        """Called once per step with the new step count; postfix (name: text) when there is news."""
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(**postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.enabled and postfix and step % self.every == 0:
            print(f"{self.desc} {step}/{self.total} | " + ' '.join(f'{k} {v}' for k, v in postfix.items()), flush=True)

    def write(self, line):
        if self.enabled:
            (tqdm.write if self.bar is not None else print)(line)
            sys.stdout.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -----------------------------------------------------------------------------
# the learning rate

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


def mask_overlay(img, mask, scale, colour=(255, 40, 40), alpha=0.5):
    """The image with a (H, W) mask in [0, 1] blended over it in `colour`, its outline drawn white."""
    base = to_uint8(img, scale).astype(np.float32)
    m = mask.detach().float().cpu().numpy().repeat(scale, 0).repeat(scale, 1)
    out = base * (1 - alpha * m[..., None]) + np.array(colour, np.float32) * alpha * m[..., None]
    b = m > 0.5
    edge = np.zeros_like(b)
    edge[:, :-1] |= b[:, :-1] != b[:, 1:]
    edge[:-1, :] |= b[:-1, :] != b[1:, :]
    out[edge] = 255
    return out.round().astype(np.uint8)


def _font(width):
    try:
        return ImageFont.load_default(size=max(10, width // 22))
    except TypeError:                            # an old PIL without a scalable default font
        return ImageFont.load_default()


def _wrap(text, font, width):
    """Greedy word wrap of text into lines no wider than width pixels."""
    lines = []
    for para in text.splitlines() or ['']:
        line = ''
        for word in para.split(' '):
            cand = f'{line} {word}'.strip()
            if line and font.getlength(cand) > width:
                lines.append(line)
                line = word
            else:
                line = cand
        lines.append(line)
    return '\n'.join(lines)


def save_panel(rows, path, labels=None, pad=2):
    """Save a grid of equally sized uint8 pictures (a list of rows of (H, W, 3)) as one PNG in a dark
    frame of `pad` pixels. `labels`, if given, is a same-shaped list of strings, each written in the
    top-left corner of its picture (white, outlined in black: readable on any colour; wrapped)."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = Image.new('RGB', (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (32, 32, 32))
    draw, font = ImageDraw.Draw(canvas), _font(w)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            x, y = pad + j * (w + pad), pad + i * (h + pad)
            canvas.paste(Image.fromarray(im), (x, y))
            if labels and labels[i][j]:
                draw.multiline_text((x + 4, y + 3), _wrap(labels[i][j], font, w - 8), font=font, fill=(255, 255, 255),
                                    stroke_width=2, stroke_fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path
