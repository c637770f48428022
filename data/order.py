"""
The order in which a training run sees its samples: written once, for both training scripts, in
memory and streamed. Exact resume rests on it: the order is a function of (seed, epoch) alone, so a
step number (in memory) or a position (streamed) says which samples come next.

    order = DataOrder([n], seed=(seed,))                 # n samples read into memory
    idx = order.batch(step, batch_size, world, accum)    # (accum * world * batch_size,) the global batch
    mine = idx.view(accum, world, batch_size)[micro, rank]

Epoch e is a permutation of all samples, drawn by numpy from the seed sequence (*seed, e); with
weights (a mixture of worlds) or an epoch_size, it is epoch_size draws of a world by weight, each
world's samples taken in fresh permutations. In memory, the samples follow each other epoch after
epoch and a global batch may span two epochs. Streamed, ShardSampler pads each epoch to a multiple
of the number of processes and rank r reads every world-th sample from position r; with one
process the two read the same sequence.
"""
import numpy as np
import torch

from common import die


def as_seed(seed):
    """An int or a sequence of ints (a run's seed and, say, its stage) -> a tuple of ints."""
    return tuple(int(s) for s in np.atleast_1d(seed))


class DataOrder:
    def __init__(self, sizes, weights=None, seed=1337, epoch_size=0):
        self.sizes = [int(n) for n in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        if weights is not None:
            weights = [float(x) for x in weights]
            if len(weights) != len(self.sizes) or min(weights) < 0 or sum(weights) <= 0:
                die(f"weights {weights}: need one weight >= 0 per world ({len(self.sizes)}), not all 0")
        self.weights, self.seed, self.epoch_size = weights, as_seed(seed), int(epoch_size)
        self._cache = {}

    def __len__(self):
        """Samples in one epoch."""
        return self.epoch_size or int(self.offsets[-1])

    def epoch(self, e):
        """The whole epoch's order: (len(self),) int64 sample indices. The last two are cached."""
        if e not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[e] = self._draw(e)
        return self._cache[e]

    def _draw(self, e):
        rng = np.random.default_rng([*self.seed, e])
        total = int(self.offsets[-1])
        if self.weights is None and not self.epoch_size:
            return rng.permutation(total)
        p = np.asarray(self.weights if self.weights is not None else self.sizes, np.float64)
        pick = rng.choice(len(self.sizes), size=len(self), p=p / p.sum())      # (L,) the world of each sample
        order = np.empty(len(self), np.int64)
        for w, n in enumerate(self.sizes):                                       # a loop over worlds, not samples
            where = np.flatnonzero(pick == w)
            if len(where):
                perms = [rng.permutation(n) for _ in range(-(-len(where) // n))]
                order[where] = self.offsets[w] + np.concatenate(perms)[:len(where)]
        return order

    def take(self, start, n):
        """Samples start .. start+n-1 of the endless sequence, epoch after epoch: (n,) int64 tensor."""
        i = start + np.arange(n)
        e, pos = i // len(self), i % len(self)
        out = np.empty(n, np.int64)
        for k in np.unique(e):                                                   # at most two epochs per batch
            out[e == k] = self.epoch(int(k))[pos[e == k]]
        return torch.from_numpy(out)

    def batch(self, step, batch_size, world=1, accum=1):
        """The global batch of step `step` (all processes, all micro-steps): (accum * world *
        batch_size,) sample indices; rank r's micro-batch m is the slice [(m * world + r) * batch_size:][:batch_size]."""
        G = batch_size * world * accum
        return self.take(step * G, G)


class ShardSampler(torch.utils.data.Sampler):
    """The streaming loader's sampler: this rank's shard of an epoch of a DataOrder, from position `pos`
    on. The epoch is padded with its own beginning to a multiple of `world` (as torch's
    DistributedSampler does) and rank r reads every world-th sample from position r: the shards are
    disjoint (when the epoch divides evenly), cover the epoch, and are equally long, so every rank
    makes the same number of steps. `epoch` and `pos` are the whole state; the loader moves them."""

    def __init__(self, sizes, weights=None, rank=0, world=1, seed=1337, epoch_size=0):
        super().__init__()
        if not 0 <= rank < world:
            die(f"rank {rank} is not in 0..{world - 1}")
        self.order = DataOrder(sizes, weights, seed, epoch_size)
        self.rank, self.world = rank, world
        self.epoch, self.pos = 0, 0

    def shard(self, epoch):
        """This rank's part of epoch `epoch`: (ceil(L / world),) int64."""
        o = self.order.epoch(epoch)
        o = np.resize(o, -(-len(o) // self.world) * self.world)                 # pad by repeating the start
        return o[self.rank::self.world]

    def __len__(self):
        return -(-len(self.order) // self.world)

    def __iter__(self):
        return iter(self.shard(self.epoch)[self.pos:].tolist())

    def state_dict(self):
        o = self.order
        return {'epoch': self.epoch, 'pos': self.pos, 'seed': list(o.seed), 'world': self.world,
                'sizes': list(o.sizes), 'weights': o.weights, 'epoch_size': o.epoch_size}

    def load_state_dict(self, state):
        mine = self.state_dict()
        theirs = {**state, 'seed': list(as_seed(state.get('seed', ())))}
        diff = [f"{k} {theirs.get(k)!r} (now {mine[k]!r})" for k in ('seed', 'world', 'sizes', 'weights', 'epoch_size')
                if theirs.get(k) != mine[k]]
        if diff:
            die(f"cannot resume the data order exactly: the checkpoint was made with {', '.join(diff)}; "
                f"resume with the same data, seed and number of processes")
        self.epoch, self.pos = int(state['epoch']), int(state['pos'])
