"""
Reading (and, for the real-data converters, writing) worlds in the format of data/shapes/prepare.py
(see the docstring there for the files and their fields).

Small worlds, in memory: what train_setok.py and train_setokim.py use now. 20k images of 64x64 are
~250 MB as uint8, so a split is read once into numpy arrays and the training scripts index into them.

    from data.loader import load_split, load_instruct
    train = load_split('data/shapes/world', 'train')   # {'images', 'instances', 'records'}
    convs = load_instruct('data/shapes/world', 'train') # [conversation record, ...]

Large worlds, streamed: StreamingLoader reads one split of one or more worlds (a weighted mixture)
without ever holding the images, or even the parsed manifest, in memory: it indexes the byte offset
of every manifest line once, and DataLoader workers read their lines, decode the images with PIL
(EXIF orientation applied, converted to RGB, the shorter side resized and centre-cropped to
image_size, exactly as sample.py treats a user's image: load_image below) and hand back uint8.
Each DDP rank reads its own shard of a permutation that depends only on (seed, epoch), from an exact
position that state_dict() / load_state_dict() carry through a checkpoint. An image that cannot be
read (missing, truncated, not an image) is replaced by the next readable one of its world (so the
batch is the same on every run), counted, and reported on stderr as a warning line with the count
and the first few paths. How a training loop uses it:

    from data.loader import StreamingLoader
    loader = StreamingLoader(data_dirs, split='train', image_size=image_size, batch_size=batch_size,
                             weights=data_weights,          # None: every image once per epoch
                             rank=rank, world=world_size,   # from common.setup_ddp()
                             seed=seed, workers=4, pin_memory=device.startswith('cuda'))
    if init_from == 'resume':
        loader.load_state_dict(ckpt['data'])                # the next batch is the one that would have come
    batches = loader.batches()                              # endless: epoch after epoch
    for step in range(start_step, max_iters):
        b = next(batches)         # {'image': uint8 (B, 3, S, S), 'record': [manifest dicts], 'index', ...}
        x = b['image'].to(device, non_blocking=True).float() / 255
        ...                       # forward, backward, step
        if step % ckpt_interval == 0:
            save_checkpoint({..., 'data': loader.state_dict()}, path)   # counts every batch handed out

A mixture: data_dirs=['data/cc3m/world', 'data/coco/world'], weights=[0.7, 0.3] draws each sample of an
epoch from world 0 with probability 0.7 (each world's images in a fresh permutation, cycled when a
world is used up); an epoch is epoch_size samples (default: all images of all worlds). List settings
come from the command line as strings ('a,b' or '[0.7, 0.3]'); as_list() reads both.

With instances=True a batch also has 'instances': uint8 (B, S, S), each record's instance map turned
and cropped with its image (nearest-neighbour), zeros for a record without one.

Real-data worlds (written by data/captions, data/llava, data/refcoco, data/editing) differ from the
shapes world in these ways; StreamingLoader reads both, load_split only worlds of one image size with
an instance map for every image, in the splits train/val/test:
  * images are not copied or resized: "image" is the ABSOLUTE path of the original file where it was
    downloaded (os.path.join(world, path) is then that path), with its "width" and "height" as stored
    in the file (before EXIF orientation). Files a converter writes itself (RefCOCO's instance maps)
    are relative to the world folder, as in the shapes world.
  * fields a dataset lacks are absent: caption datasets have no "objects", "concepts", "instances" or
    "background"; "captions" (every caption) is there when an image has more than one.
  * splits are named as the dataset names them (RefCOCO: train, val, test, testA, testB); meta.json
    "splits" lists them.
  * every image a conversation names (edit targets included) is a record of the same split's
    manifest, so a token cache can be built from the manifest alone.
  * tasks: caption and t2i (caption datasets), chat (LLaVA: its turns as they are, any number),
    refer (RefCOCO: "instances" + "mask_id" exactly as in the shapes world, plus "ref_id", "ann_id"),
    edit ("target_image", "target_caption" when the dataset has one; no "edit" dict).
  * meta.json: format, format_version, "source" (which converter), "settings" (the converter's),
    splits, tasks, vocab (the same tokenizer layout and special tokens as the shapes world), and
    "skipped" (per split: inputs left out because their image was missing or unreadable).

A relative world_dir is looked up against the repo root first, then the current directory.
Anything missing gives a one-line error (exit code 2) that says what to do, never a traceback.
"""
import json
import os
import re
import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from common import config_keys, die  # noqa: E402

SPLITS = ('train', 'val', 'test')
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def resolve_world(world_dir):
    """The absolute world folder, or die saying how to make one."""
    cands = [world_dir] if os.path.isabs(world_dir) else [os.path.join(_REPO, world_dir), os.path.abspath(world_dir)]
    for d in cands:
        if os.path.isdir(d):
            return d
    die(f"world folder {world_dir} not found; make it with: python data/shapes/prepare.py data_dir={world_dir}")


_WORLD_FIX = 'the world is incomplete: delete its folder and prepare it again'


def _iter_jsonl(path, what, fix=_WORLD_FIX):
    """(line number, record) of a JSONL file, one line at a time; dies on a missing file or a bad line."""
    if not os.path.isfile(path):
        die(f"{what} {path} not found; {fix}")
    with open(path, encoding='utf-8') as f:
        for k, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield k, json.loads(line)
                except ValueError:
                    die(f"{path} line {k} is not valid JSON; {fix}")


def _read_jsonl(path, what, progress=None):
    """The records of a JSONL file (with a tqdm bar titled `progress`, if given)."""
    lines = _iter_jsonl(path, what)
    if progress:
        lines = tqdm(lines, desc=progress, unit='rec', dynamic_ncols=True, mininterval=0.5, leave=False)
    return [r for _, r in lines]


def _check_split(split):
    if split not in SPLITS:
        die(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")


def load_png(world_dir, relpath, mode):
    """One image of the world as a uint8 array ('RGB' -> (H, W, 3), 'L' -> (H, W))."""
    path = os.path.join(world_dir, relpath)
    if not os.path.isfile(path):
        die(f"image {path} not found; the world is incomplete: delete its folder and prepare it again")
    with Image.open(path) as im:
        if im.mode != mode:
            im = im.convert(mode)
        return np.asarray(im, dtype=np.uint8)


def load_split(world_dir, split):
    """{'images': uint8 (N, H, W, 3), 'instances': uint8 (N, H, W), 'records': manifest dicts}."""
    _check_split(split)
    world_dir = resolve_world(world_dir)
    records = _read_jsonl(os.path.join(world_dir, f'{split}.jsonl'), 'manifest')
    if not records:
        die(f"{os.path.join(world_dir, split + '.jsonl')} is empty; prepare the world with n_{split} > 0")
    for r in records:   # check every file first, so an error is never tangled with the progress bar
        for key in ('image', 'instances'):
            if not os.path.isfile(os.path.join(world_dir, r[key])):
                die(f"image {os.path.join(world_dir, r[key])} not found; the world is incomplete: "
                    f"delete its folder and prepare it again")
    H, W = records[0]['height'], records[0]['width']
    images = np.zeros((len(records), H, W, 3), dtype=np.uint8)
    instances = np.zeros((len(records), H, W), dtype=np.uint8)
    for k, r in enumerate(tqdm(records, desc=f'load {split}', unit='img', dynamic_ncols=True,
                               mininterval=0.5, leave=False)):
        img, inst = load_png(world_dir, r['image'], 'RGB'), load_png(world_dir, r['instances'], 'L')
        if img.shape[:2] != (H, W) or inst.shape != (H, W):
            die(f"{r['image']} is {img.shape[1]}x{img.shape[0]}, but the split's images are {W}x{H}; "
                f"all images of a split must have one size")
        images[k], instances[k] = img, inst
    return {'images': images, 'instances': instances, 'records': records}


def load_instruct(world_dir, split):
    """The conversation records of {split}_instruct.jsonl, in file order."""
    _check_split(split)
    world_dir = resolve_world(world_dir)
    path = os.path.join(world_dir, f'{split}_instruct.jsonl')
    return _read_jsonl(path, 'instruction data', progress=f'load {split} instruct')


# -----------------------------------------------------------------------------
# any image file -> a model input (sample.py and the streaming loader both use this)

class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and says why."""


def to_rgb(im, background=(255, 255, 255)):
    """Any PIL image -> 8-bit RGB. High bit depths are scaled (not clipped), transparency is
    composited on `background` (white)."""
    mode = im.mode
    if mode.startswith('I;16') or mode in ('I', 'F'):                 # 16/32-bit integer or float
        a = np.asarray(im).astype(np.float64)
        if mode.startswith('I;16') or (mode == 'I' and a.max(initial=0) > 255):
            a = a / 257.0                                              # 65535 -> 255
        elif mode == 'F' and a.max(initial=0) <= 1.0:
            a = a * 255.0                                              # a [0, 1] float image
        im = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8))   # mode 'L'
    if im.mode == 'P':
        im = im.convert('RGBA')                  # the palette, and its transparent index if it has one
    elif im.mode in ('LA', 'La', 'PA', 'RGBa', 'RGBX'):
        im = im.convert('RGBA')
    if im.mode == 'RGBA':
        bg = Image.new('RGBA', im.size, tuple(background) + (255,))
        im = Image.alpha_composite(bg, im)
    return im.convert('RGB')                     # L, 1, CMYK, YCbCr, ... -> RGB


# EXIF orientation -> the transpose that shows the picture upright (what ImageOps.exif_transpose does)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _open_upright(path, size):
    """An image file -> (8-bit RGB PIL image shown upright, the EXIF transpose applied or None).
    Raises ImageError with a one-line message for anything that is not a usable image."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path} is a folder, not an image")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.draft(im.mode, (size, size))      # JPEG: decode at 1/2..1/8 scale when much larger (still >= size)
            im.load()                            # decode now, so a truncated file fails here
            try:
                turn = _UPRIGHT.get(im.getexif().get(0x0112, 1))
            except Exception:                    # a broken EXIF block: keep the pixels as stored
                turn = None
            if turn is not None:
                im = im.transpose(turn)
            try:
                im = to_rgb(im)
            except (ValueError, OSError, TypeError) as e:
                raise ImageError(f"{path}: cannot convert its colour mode {im.mode} to RGB ({e})") from None
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file PIL can read (JPEG, PNG, WebP, BMP, GIF, TIFF, ...)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path} is too large to open safely ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as e:
        raise ImageError(f"{path} is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return im, turn


def _square(im, size, resample):
    """The largest centred square of a PIL image, resized to size x size. The same as "resize the
    shorter side to size, then centre-crop"; cropped first, so the filter sees nothing outside it."""
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    return im if s == size else im.resize((size, size), resample)


def load_image(path, size):
    """An image file -> uint8 tensor (3, size, size): EXIF orientation applied, converted to 8-bit RGB
    (transparency on white), the centred square resized (bicubic, antialiased when shrinking).
    Raises ImageError with a one-line message for anything that is not a usable image."""
    im, _ = _open_upright(path, size)
    return _chw(_square(im, size, Image.Resampling.BICUBIC))


def _chw(im):
    """An RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def _load_with_map(path, map_path, size):
    """An image and its instance map (8-bit, in the frame the image is stored in) -> uint8 (3, S, S) and
    (S, S): the map gets the image's EXIF turn and the same centred square, resized nearest-neighbour."""
    im, turn = _open_upright(path, size)
    try:
        with Image.open(map_path) as m:
            m = m.convert('L') if m.mode != 'L' else m.copy()
    except (OSError, ValueError) as e:
        raise ImageError(f"instance map {map_path} is unreadable ({type(e).__name__})") from None
    if turn is not None:
        m = m.transpose(turn)
    # the same aspect ratio (not size: a large JPEG is decoded at a reduced scale by im.draft)
    if abs(m.size[0] * im.size[1] - m.size[1] * im.size[0]) > 0.02 * m.size[1] * im.size[1]:
        raise ImageError(f"instance map {map_path} is {m.size[0]}x{m.size[1]}, not the shape of its image")
    return _chw(_square(im, size, Image.Resampling.BICUBIC)), \
        torch.from_numpy(np.array(_square(m, size, Image.Resampling.NEAREST), dtype=np.uint8))


# -----------------------------------------------------------------------------
# inputs left out: counted, and reported as one warning line (the loader and the converters)

class Skips:
    """A count of things left out and the first few reasons, reported as one warning line."""

    def __init__(self, keep=3):
        self.count, self.examples, self.keep = 0, [], keep

    def add(self, reason):
        self.count += 1
        if len(self.examples) < self.keep and reason not in self.examples:
            self.examples.append(reason)

    def report(self, what):
        if self.count:
            more = ' ...' if self.count > len(self.examples) else ''
            print(f"warning: skipped {self.count} {what}: {'; '.join(self.examples)}{more}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# streaming: a manifest index, a Dataset over one or more worlds, a resumable DDP sampler, the loader

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


def line_index(path, chunk=1 << 24):
    """(start, length) in bytes of every non-empty line of a text file, two (n,) int64 arrays. The file
    is read in chunks and only the newline positions are kept: 12M lines cost ~200 MB, not gigabytes."""
    newlines, base = [], 0
    with open(path, 'rb') as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            newlines.append(np.flatnonzero(np.frombuffer(buf, np.uint8) == 10) + base)
            base += len(buf)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)               # a line starts after each newline
    ends = np.concatenate([nl, [base]]).astype(np.int64)
    keep = ends - starts > 0
    return starts[keep], (ends - starts)[keep]


_TASK = re.compile(rb'"task"\s*:\s*"([^"\\]*)"')


def line_tasks(path, starts, chunk=1 << 24):
    """The "task" of every line of a conversation JSONL whose lines start at byte offsets `starts`
    (line_index), found by a regex on the raw bytes instead of parsing each line (millions of
    lines in seconds): (n,) array of str, '' for a line without one. Inside a JSON string a quote is
    escaped, so a match is a key: the first one of a line is its record's "task"."""
    pos, names, base, rest = [], [], 0, b''
    with open(path, 'rb') as f:
        while True:
            buf = f.read(chunk)
            data = rest + buf
            cut = data.rfind(b'\n') + 1 if buf else len(data)    # whole lines; the tail waits for the next chunk
            for m in _TASK.finditer(data, 0, cut):
                pos.append(base + m.start())
                names.append(m.group(1).decode('utf-8', 'replace'))
            base, rest = base + cut, data[cut:]
            if not buf:
                break
    out = np.full(len(starts), '', dtype=object)
    line = np.searchsorted(starts, np.asarray(pos, np.int64), side='right') - 1   # the line of each match
    first, at = np.unique(line, return_index=True)                                # its first match
    keep = first >= 0
    out[first[keep]] = np.asarray(names, dtype=object)[at[keep]]
    return out


def world_splits(world_dir):
    """The absolute world folder and the splits its meta.json lists, or die saying what is wrong."""
    d = resolve_world(world_dir)
    meta = os.path.join(d, 'meta.json')
    if not os.path.isfile(meta):
        die(f"{d} has no meta.json: the world is unfinished; prepare (or convert) it again")
    try:
        with open(meta, encoding='utf-8') as f:
            return d, dict(json.load(f).get('splits', {}))
    except (OSError, ValueError, AttributeError, TypeError):
        die(f"{meta} is unreadable; prepare (or convert) the world again")


def _manifest(world_dir, split, suffix=''):
    """The absolute world folder and its manifest for `split` ({split}{suffix}.jsonl: suffix '_instruct'
    for the conversations), or die saying what is wrong."""
    d, splits = world_splits(world_dir)
    if split not in splits:
        die(f"{d} has no split '{split}'; it has: {', '.join(splits) or 'none'}")
    path = os.path.join(d, f'{split}{suffix}.jsonl')
    if not os.path.isfile(path):
        die(f"manifest {path} not found; {_WORLD_FIX}")
    return d, path


class WorldDataset(torch.utils.data.Dataset):
    """The images of one split of one or more worlds, numbered world after world. dataset[i] reads
    line i of its manifest (a seek; each worker process opens its own file handles), decodes the
    image and returns {'image': uint8 (3, S, S), 'index': i, 'used': the index actually returned,
    'world': which world, 'record': the manifest dict, 'skipped': [reasons]} (+ 'instances': uint8
    (S, S), 0 where there is no map, with instances=True). An unreadable image is replaced by the next
    readable one of the same world (i+1, i+2, ...), its reason listed in 'skipped'; after max_tries
    in a row the item is {'fatal': message} and the loader stops with that one-line error.
    transform(record) -> {name: tensor}, if given, adds per-sample tensors (computed in the workers,
    stacked by collate: train_setok.py's concept ids). suffix='_instruct' indexes the conversations
    ({split}_instruct.jsonl) instead, for a subclass whose _load reads them (train_setokim.py's)."""

    def __init__(self, world_dirs, split, image_size, instances=False, max_tries=64, suffix='', transform=None):
        self.split, self.image_size, self.instances, self.max_tries = split, image_size, instances, max_tries
        self.transform = transform
        found = [_manifest(d, split, suffix) for d in world_dirs]
        self.dirs, self.paths = [d for d, _ in found], [p for _, p in found]
        self.lines = [line_index(p) for p in self.paths]                   # [(starts, lengths)] per world
        self.sizes = [len(s) for s, _ in self.lines]
        for p, n in zip(self.paths, self.sizes):
            if n == 0:
                die(f"{p} is empty: that world has no {split} images")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)   # (worlds + 1,)
        self._files, self._pid = {}, None

    def __len__(self):
        return int(self.offsets[-1])

    def __getstate__(self):                          # workers started by spawn (macOS) get no open files
        return {**self.__dict__, '_files': {}, '_pid': None}

    def _line(self, w, k):
        if self._pid != os.getpid():                 # a fresh worker: its own handles, never the parent's
            self._files, self._pid = {}, os.getpid()
        if w not in self._files:
            self._files[w] = open(self.paths[w], 'rb')
        f = self._files[w]
        f.seek(int(self.lines[w][0][k]))
        return f.read(int(self.lines[w][1][k]))

    def record(self, i):
        """The manifest dict of sample i."""
        w = int(np.searchsorted(self.offsets, i, side='right')) - 1
        return json.loads(self._line(w, i - int(self.offsets[w])))

    def _load(self, w, k):
        where = f"{self.paths[w]} line {k + 1}"
        try:
            rec = json.loads(self._line(w, k))
            path = os.path.join(self.dirs[w], rec['image'])
        except (ValueError, KeyError, TypeError) as e:
            raise ImageError(f"{where} is not a manifest record ({type(e).__name__})") from None
        if not self.instances:
            return rec, {'image': load_image(path, self.image_size)}
        if rec.get('instances'):
            img, inst = _load_with_map(path, os.path.join(self.dirs[w], rec['instances']), self.image_size)
        else:
            img = load_image(path, self.image_size)
            inst = torch.zeros(self.image_size, self.image_size, dtype=torch.uint8)
        return rec, {'image': img, 'instances': inst}

    def __getitem__(self, i):
        w = int(np.searchsorted(self.offsets, i, side='right')) - 1
        k0, n, skipped = i - int(self.offsets[w]), self.sizes[w], []
        for t in range(min(n, self.max_tries)):
            k = (k0 + t) % n
            try:
                rec, arrays = self._load(w, k)
            except ImageError as e:
                skipped.append(str(e))
                continue
            if self.transform is not None:
                arrays = {**arrays, **self.transform(rec)}
            return {**arrays, 'index': i, 'used': int(self.offsets[w]) + k, 'world': w, 'record': rec,
                    'skipped': skipped}
        return {'fatal': f"{len(skipped)} images in a row of {self.paths[w]} are unreadable, from line {k0 + 1} "
                         f"on (first: {skipped[0]}); is the image folder there?"}


def collate(samples):
    """A list of WorldDataset items -> one batch: image uint8 (B, 3, S, S), index/used/world (B,) long,
    record [B dicts], skipped [reasons of all B], instances uint8 (B, S, S) if asked for, and each
    tensor a transform added, stacked."""
    for s in samples:
        if 'fatal' in s:
            return {'fatal': s['fatal']}
    out = {'image': torch.stack([s['image'] for s in samples])}                 # (B, 3, S, S)
    if 'instances' in samples[0]:
        out['instances'] = torch.stack([s['instances'] for s in samples])       # (B, S, S)
    for key in ('index', 'used', 'world'):
        out[key] = torch.tensor([s[key] for s in samples])                      # (B,)
    out['record'] = [s['record'] for s in samples]
    out['skipped'] = [r for s in samples for r in s['skipped']]
    for key, v in samples[0].items():
        if key not in out and isinstance(v, torch.Tensor):
            out[key] = torch.stack([s[key] for s in samples])                   # (B, ...) from a transform
    return out


class ShardSampler(torch.utils.data.Sampler):
    """This rank's shard of an epoch's sample order, from position `pos` on.

    The order of epoch e is a function of (seed, e) only: a permutation of all samples, or, with
    weights (or an epoch_size), epoch_size draws of a world by weight, each world's images taken in
    fresh permutations. It is padded with its own beginning to a multiple of `world` (as torch's
    DistributedSampler does) and rank r reads every world-th sample from position r: the shards are
    disjoint (when the epoch divides evenly), cover the epoch, and are equally long, so every rank
    makes the same number of steps. `epoch` and `pos` are the whole state; the loader moves them."""

    def __init__(self, sizes, weights=None, rank=0, world=1, seed=1337, epoch_size=0):
        super().__init__()
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        if weights is not None:
            weights = [float(x) for x in weights]
            if len(weights) != len(self.sizes) or min(weights) < 0 or sum(weights) <= 0:
                die(f"weights {weights}: need one weight >= 0 per world ({len(self.sizes)}), not all 0")
        if not 0 <= rank < world:
            die(f"rank {rank} is not in 0..{world - 1}")
        self.weights, self.rank, self.world, self.seed = weights, rank, world, seed
        self.epoch_size = int(epoch_size)
        self.epoch, self.pos = 0, 0

    def order(self, epoch):
        """The whole epoch's order over all ranks: (L,) int64 sample indices."""
        rng = np.random.default_rng([self.seed, epoch])
        total = int(self.offsets[-1])
        if self.weights is None and not self.epoch_size:
            return rng.permutation(total)
        p = np.asarray(self.weights if self.weights is not None else self.sizes, np.float64)
        L = self.epoch_size or total
        pick = rng.choice(len(self.sizes), size=L, p=p / p.sum())               # (L,) the world of each sample
        order = np.empty(L, np.int64)
        for w, n in enumerate(self.sizes):                                       # a loop over worlds, not samples
            where = np.flatnonzero(pick == w)
            if len(where):
                perms = [rng.permutation(n) for _ in range(-(-len(where) // n))]
                order[where] = self.offsets[w] + np.concatenate(perms)[:len(where)]
        return order

    def shard(self, epoch):
        """This rank's part of epoch `epoch`: (ceil(L / world),) int64."""
        o = self.order(epoch)
        o = np.resize(o, -(-len(o) // self.world) * self.world)                 # pad by repeating the start
        return o[self.rank::self.world]

    def __len__(self):
        return -(-(self.epoch_size or int(self.offsets[-1])) // self.world)

    def __iter__(self):
        return iter(self.shard(self.epoch)[self.pos:].tolist())

    def state_dict(self):
        return {'epoch': self.epoch, 'pos': self.pos, 'seed': self.seed, 'world': self.world,
                'sizes': list(self.sizes), 'weights': self.weights, 'epoch_size': self.epoch_size}

    def load_state_dict(self, state):
        mine = self.state_dict()
        diff = [f"{k} {state.get(k)!r} (now {mine[k]!r})" for k in ('seed', 'world', 'sizes', 'weights', 'epoch_size')
                if state.get(k) != mine[k]]
        if diff:
            die(f"cannot resume the data order exactly: the checkpoint was made with {', '.join(diff)}; "
                f"resume with the same data, seed and number of processes")
        self.epoch, self.pos = int(state['epoch']), int(state['pos'])


class StreamingLoader:
    """Batches of one split of one or more worlds for one DDP rank (see the module docstring).
    Iterating gives the rest of the current epoch; batches() goes on forever. state_dict() after a
    batch resumes at the batch after it; the warning count of unreadable images carries over too."""

    def __init__(self, world_dirs, split='train', image_size=64, batch_size=32, weights=None, rank=0, world=1,
                 seed=1337, workers=2, epoch_size=0, instances=False, pin_memory=False, prefetch=2, transform=None,
                 dataset=None, collate_fn=collate):
        """dataset, if given, replaces WorldDataset(world_dirs, split, ...): any dataset with its .sizes
        and items of the same kind (train_setokim.py's conversations), batched by collate_fn."""
        weights = None if weights is None or (isinstance(weights, (list, tuple)) and not weights) else as_list(weights, float)
        self.dataset = dataset or WorldDataset(as_list(world_dirs), split, image_size, instances=instances,
                                               transform=transform)
        self.collate = collate_fn
        self.sampler = ShardSampler(self.dataset.sizes, weights, rank, world, seed, epoch_size)
        self.batch_size, self.workers, self.pin_memory, self.prefetch = batch_size, workers, pin_memory, prefetch
        self.skips, self._reported = Skips(), 0

    def __len__(self):
        """Batches in a whole epoch (the same on every rank)."""
        return -(-len(self.sampler) // self.batch_size)

    def _report(self):
        self._reported = self.skips.count
        rank = f" on rank {self.sampler.rank}" if self.sampler.world > 1 else ''
        self.skips.report(f"unreadable image{'s' * (self.skips.count != 1)}{rank} so far, each replaced by the "
                          f"next readable one")

    def __iter__(self):
        s = self.sampler
        if s.pos >= len(s):                                   # a finished epoch: the next one
            s.epoch, s.pos = s.epoch + 1, 0
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, sampler=s, collate_fn=self.collate,
                                         num_workers=self.workers, pin_memory=self.pin_memory,
                                         prefetch_factor=self.prefetch if self.workers else None)
        for batch in dl:
            if 'fatal' in batch:
                die(batch['fatal'])
            s.pos += len(batch['index'])                      # counted as handed out: state_dict() is exact
            if batch['skipped']:
                was = self.skips.count
                for r in batch['skipped']:
                    self.skips.add(r)
                if was == 0 or len(str(self.skips.count)) > len(str(was)):   # at 1, 10, 100, ... skipped
                    self._report()
            yield batch
        if self.skips.count > self._reported:                   # and at the end of every epoch
            self._report()
        s.epoch, s.pos = s.epoch + 1, 0

    def batches(self):
        """Batch after batch, epoch after epoch, forever."""
        while True:
            yield from self

    def state_dict(self):
        return {**self.sampler.state_dict(), 'skipped': self.skips.count}

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)
        self.skips.count = self._reported = int(state.get('skipped', 0))


# -----------------------------------------------------------------------------
# writing a real-data world (data/captions, data/llava, data/refcoco, data/editing share this)

def converter_settings(namespace, overrides, script):
    """A converter's settings: its module-level values (common.config_keys) with `overrides` on top."""
    cfg = {k: namespace[k] for k in config_keys(namespace)}
    for k, v in overrides.items():
        if k not in cfg:
            die(f"unknown setting '{k}' for {script}; valid settings: {', '.join(cfg)}")
        cfg[k] = v
    return cfg


def source_path(path, what, example):
    """An input file or folder that must exist -> its absolute path, or die saying what to pass."""
    if not path:
        die(f"no {what} given; pass {example}")
    if not os.path.exists(path):
        die(f"{what} {path} not found; pass {example}")
    return os.path.abspath(path)


def split_sources(cfg, example):
    """[(split, source, image folder)] of a converter with train/val/test/images settings, all checked
    before anything is written; the image folder defaults to the source's own folder."""
    named = [(split, cfg[split]) for split in ('train', 'val', 'test') if cfg[split]]
    if not named:
        die(f"no source given; pass train={example}")
    out = []
    for split, src in named:
        src = source_path(src, f'{split} source', f'{split}={example}')
        root = source_path(cfg['images'], 'image folder', 'images=FOLDER') if cfg['images'] else \
            src if os.path.isdir(src) else os.path.dirname(src)
        out.append((split, src, root))
    return out


def load_json(path, what):
    """A JSON file, or die with a line that says what is wrong with it."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        die(f"{path} is not a readable {what} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")


def _probe(path):
    """(width, height) of an image file as stored, from its header alone; or why it cannot be used."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        return f"{path}: no such file"
    except Exception as e:
        return f"{path} is not a readable image ({type(e).__name__})"


def probe_images(paths, workers, desc):
    """The stored size of every image (only headers are read; a pool of `workers` processes for many):
    a list, in order, of (width, height) or the reason the image cannot be used. A file truncated
    after its header passes here; the streaming loader skips it later."""
    bar = dict(total=len(paths), desc=desc, unit='img', dynamic_ncols=True, mininterval=0.5)
    if workers > 1 and len(paths) > 512:
        import multiprocessing
        with multiprocessing.get_context('fork').Pool(workers) as pool:
            return list(tqdm(pool.imap(_probe, paths, chunksize=256), **bar))
    return list(tqdm(map(_probe, paths), **bar))


def image_sizes(paths, workers, desc, skips, known=None):
    """{path: (width, height)} of the images among `paths` whose header is readable (sizes in `known`
    are taken as they are); every other one is added to `skips` with its reason."""
    paths, known = list(dict.fromkeys(paths)), dict(known or {})
    todo = [p for p in paths if p not in known]
    known.update(zip(todo, probe_images(todo, workers, desc)))
    for p in paths:
        if isinstance(known[p], str):
            skips.add(known[p])
    return {p: tuple(int(v) for v in known[p]) for p in paths if not isinstance(known[p], str)}


TOKENIZER_SENTENCES = 2_000_000   # the tokenizer trains on at most this many sentences (an even subsample)


class WorldWriter:
    """Writes one real-data world: split after split, {split}.jsonl and {split}_instruct.jsonl; then the
    tokenizer on all the text written, and meta.json last (a folder without it is unfinished).

        w = WorldWriter(data_dir, source='coco-captions', settings=cfg)
        w.write_split('train', items, skips)   # items: (image record or None, [its conversations]) pairs
        w.finish(vocab_size)
    """

    def __init__(self, data_dir, source, settings):
        from data.shapes.prepare import resolve
        self.out, self.source, self.settings = resolve(data_dir), source, settings
        os.makedirs(self.out, exist_ok=True)
        self.meta_path = os.path.join(self.out, 'meta.json')
        if os.path.exists(self.meta_path):
            os.remove(self.meta_path)                 # unfinished until meta.json is written again
        self.text, self.tasks, self.splits, self.skipped = [], Counter(), {}, {}

    def _collect(self, rec, convs):
        """The sentences the tokenizer trains on: captions, concepts, every turn ("<image>" taken out)."""
        if rec is not None:
            self.text += [rec['caption']] if 'caption' in rec else []
            self.text += rec.get('captions', [])[1:] + rec.get('concepts', [])
        for c in convs:
            values = [t['value'].replace('<image>', ' ') for t in c['conversations']] + [c.get('target_caption', '')]
            self.text += [line.strip() for v in values for line in v.split('\n') if line.strip()]

    def write_split(self, split, items, skips, total=None):
        """Write one split from (record or None, [conversations]) pairs, in that order; report skips."""
        n_img = n_conv = 0
        with open(os.path.join(self.out, f'{split}.jsonl'), 'w', encoding='utf-8') as fm, \
                open(os.path.join(self.out, f'{split}_instruct.jsonl'), 'w', encoding='utf-8') as fi:
            for rec, convs in tqdm(items, total=total, desc=f'{self.source} {split}', unit='img',
                                   dynamic_ncols=True, mininterval=0.5):
                if rec is not None:
                    fm.write(json.dumps(rec) + '\n')
                    n_img += 1
                for c in convs:
                    fi.write(json.dumps(c) + '\n')
                    self.tasks[c['task']] += 1
                n_conv += len(convs)
                self._collect(rec, convs)
        skips.report(f"{split} input{'s' * (skips.count != 1)} (left out of the world)")
        if n_img + n_conv == 0:
            die(f"nothing of the {split} split could be converted ({skips.count} inputs skipped); "
                f"check the image folder setting")
        self.splits[split] = {'images': n_img, 'instruct': n_conv}
        self.skipped[split] = skips.count

    def finish(self, vocab_size):
        """The tokenizer (the shapes world's: the same special tokens) and meta.json, written last."""
        from data.shapes.prepare import _FORMAT_VERSION, train_tokenizer, vocab_meta
        if type(vocab_size) is not int or vocab_size < 32:
            die(f"vocab_size={vocab_size!r}: expected an int >= 32")
        text = sorted(t for t in self.text if t)
        if len(text) > TOKENIZER_SENTENCES:
            text = text[::-(-len(text) // TOKENIZER_SENTENCES)]
        print(f"training the tokenizer on {len(text)} sentences ...", flush=True)
        sp = train_tokenizer(text, self.out, vocab_size)
        meta = {'format': 'nanosetok-world', 'format_version': _FORMAT_VERSION, 'source': self.source,
                'settings': self.settings, 'splits': self.splits, 'tasks': dict(sorted(self.tasks.items())),
                'vocab': vocab_meta(sp, vocab_size), 'skipped': self.skipped}
        tmp = self.meta_path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(meta, f, indent=2)
            f.write('\n')
        os.replace(tmp, self.meta_path)
        print(f"wrote the {self.source} world to {self.out}:")
        for split, c in self.splits.items():
            print(f"  {split}: {c['images']} images in {split}.jsonl, {c['instruct']} conversations in "
                  f"{split}_instruct.jsonl; skipped: {self.skipped[split]}")
        print(f"  tasks: {', '.join(f'{k} {v}' for k, v in meta['tasks'].items())}")
        print(f"  tokenizer.model / tokenizer.vocab: {sp.get_piece_size()} pieces; meta.json")
        return self.out
