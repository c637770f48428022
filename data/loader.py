"""
Small in-memory loaders for a world written in the format of data/shapes/prepare.py (see the
docstring there). Worlds are small (20k images of 64x64 are ~250 MB as uint8), so a split is read
once into numpy arrays and the training scripts index into them.

    from data.loader import load_split, load_instruct
    train = load_split('data/shapes/world', 'train')   # {'images', 'instances', 'records'}
    convs = load_instruct('data/shapes/world', 'train') # [conversation record, ...]

A relative world_dir is looked up against the repo root first, then the current directory.
Anything missing gives a one-line error (exit code 2) that says what to do, never a traceback.
"""
import json
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from common import die  # noqa: E402

SPLITS = ('train', 'val', 'test')


def resolve_world(world_dir):
    """The absolute world folder, or die saying how to make one."""
    cands = [world_dir] if os.path.isabs(world_dir) else [os.path.join(_REPO, world_dir), os.path.abspath(world_dir)]
    for d in cands:
        if os.path.isdir(d):
            return d
    die(f"world folder {world_dir} not found; make it with: python data/shapes/prepare.py data_dir={world_dir}")


def _read_jsonl(path, what, progress=None):
    """The records of a JSONL file (with a tqdm bar titled `progress`, if given)."""
    if not os.path.isfile(path):
        die(f"{what} {path} not found; the world is incomplete: delete its folder and prepare it again")
    with open(path, encoding='utf-8') as f:
        lines = f.readlines()
    if progress:
        lines = tqdm(lines, desc=progress, unit='rec', dynamic_ncols=True, mininterval=0.5, leave=False)
    out = []
    for k, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                die(f"{path} line {k} is not valid JSON; delete the world folder and prepare it again")
    return out


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
