"""
Large worlds, streamed: StreamingLoader reads one split of one or more worlds (a weighted mixture)
without ever holding the images, or even the parsed manifest, in memory. It indexes the byte offset
of every manifest line once, and DataLoader workers read their lines, decode the images
(data.world.load_image: EXIF orientation applied, converted to RGB, the centred square resized to
image_size, exactly as sample.py treats a user's image) and hand back uint8. The order is
data/order.py's: each DDP rank reads its own shard of a permutation that depends only on (seed,
epoch), from an exact position that state_dict() / load_state_dict() carry through a checkpoint.
An image that cannot be read (missing, truncated, not an image) is replaced by the next readable one
of its world (so the batch is the same on every run), counted, and reported on stderr as a warning
line with the count and the first few paths. How a training loop uses it:

    from data.stream import StreamingLoader
    loader = StreamingLoader(data_dirs, split='train', image_size=image_size, batch_size=batch_size,
                             weights=data_weights,          # None: every image once per epoch
                             rank=rank, world=world_size,   # from common.setup_ddp()
                             seed=seed, workers=4, pin_memory=device.startswith('cuda'))
    if init_from == 'resume':
        loader.load_state_dict(ckpt['data'])                # the next batch is the one that would have come
    batches = loader.batches()                              # endless: epoch after epoch
    for step in range(start_step, max_iters):
        b = next(batches)         # {'image': uint8 (B, 3, S, S), 'record': [manifest dicts], 'index', ...}
        ...
        save_checkpoint({..., 'data': loader.state_dict()}, path)   # counts every batch handed out

A mixture: data_dirs=['data/cc3m/world', 'data/coco/world'], weights=[0.7, 0.3] draws each sample of an
epoch from world 0 with probability 0.7 (data/order.py). With instances=True a batch also has
'instances': uint8 (B, S, S), each record's instance map turned and cropped with its image
(nearest-neighbour), zeros for a record without one.
"""
import json
import multiprocessing
import os
import re

import numpy as np
import torch

from common import as_list, die
from data.order import ShardSampler
from data.world import ImageError, Skips, load_image, load_image_with_map, manifest

# Workers are forked where the platform can (Linux, macOS): a spawned worker re-imports the script that
# started it, and the training scripts run their training at the top level, as nanoGPT's train.py does.
WORKER_START = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else None

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
        found = [manifest(d, split, suffix) for d in world_dirs]
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
            img, inst = load_image_with_map(path, os.path.join(self.dirs[w], rec['instances']), self.image_size)
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
                                         prefetch_factor=self.prefetch if self.workers else None,
                                         multiprocessing_context=WORKER_START if self.workers else None)
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
