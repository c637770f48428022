"""
Reading a world, the on-disk format of data/shapes/prepare.py (its docstring documents the files and
their fields): the folder, its splits and manifests, a split read into memory, and any image file
turned into a model input (sample.py, the streaming loader and the converters decode images here).

    from data.world import load_split, load_instruct, load_image
    train = load_split('data/shapes/world', 'train')    # {'images', 'instances', 'records'}
    convs = load_instruct('data/shapes/world', 'train')  # [conversation record, ...]
    img = load_image('photo.jpg', 64)                    # uint8 (3, 64, 64), or ImageError

Small worlds are read into memory: 20k images of 64x64 are ~250 MB as uint8, so a split is read once
into numpy arrays and the training scripts index into them. Large worlds are streamed
(data/stream.py). Real-data worlds (written by data/captions, data/llava, data/refcoco, data/editing
through data/writer.py) differ from the shapes world in these ways; the streaming loader reads both,
load_split only worlds of one image size with an instance map for every image, in the splits
train/val/test:
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
import sys

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common import HERE as REPO
from common import die

SPLITS = ('train', 'val', 'test')
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def resolve_world(world_dir):
    """The absolute world folder, or die saying how to make one."""
    cands = [world_dir] if os.path.isabs(world_dir) else [os.path.join(REPO, world_dir), os.path.abspath(world_dir)]
    for d in cands:
        if os.path.isdir(d):
            return d
    die(f"world folder {world_dir} not found; make it with: python data/shapes/prepare.py data_dir={world_dir}")


WORLD_FIX = 'the world is incomplete: delete its folder and prepare it again'


def iter_jsonl(path, what, fix=WORLD_FIX):
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


def read_jsonl(path, what, progress=None):
    """The records of a JSONL file (with a tqdm bar titled `progress`, if given)."""
    lines = iter_jsonl(path, what)
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
    records = read_jsonl(os.path.join(world_dir, f'{split}.jsonl'), 'manifest')
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
    return read_jsonl(path, 'instruction data', progress=f'load {split} instruct')


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


def load_image_with_map(path, map_path, size):
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



def world_meta(world_dir):
    """The absolute world folder and its meta.json, or die saying what is wrong."""
    d = resolve_world(world_dir)
    meta = os.path.join(d, 'meta.json')
    if not os.path.isfile(meta):
        die(f"{d} has no meta.json: the world is unfinished; prepare (or convert) it again")
    try:
        with open(meta, encoding='utf-8') as f:
            m = json.load(f)
        return d, dict(m)
    except (OSError, ValueError, AttributeError, TypeError):
        die(f"{meta} is unreadable; prepare (or convert) the world again")


def world_splits(world_dir):
    """The absolute world folder and the splits its meta.json lists, or die saying what is wrong."""
    d, m = world_meta(world_dir)
    return d, dict(m.get('splits', {}))


def world_settings(world_dir):
    """What made a world (meta.json's settings: the generator's or the converter's): a world rewritten
    with other settings (another seed, size, source) is other data."""
    return world_meta(world_dir)[1].get('settings', {})


def manifest(world_dir, split, suffix=''):
    """The absolute world folder and its manifest for `split` ({split}{suffix}.jsonl: suffix '_instruct'
    for the conversations), or die saying what is wrong."""
    d, splits = world_splits(world_dir)
    if split not in splits:
        die(f"{d} has no split '{split}'; it has: {', '.join(splits) or 'none'}")
    path = os.path.join(d, f'{split}{suffix}.jsonl')
    if not os.path.isfile(path):
        die(f"manifest {path} not found; {WORLD_FIX}")
    return d, path


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
