"""
The streaming loader of data/stream.py on tiny worlds written here: every image is one flat colour
that encodes its index, so each sample says which image it really is. Checked: 2 DataLoader workers
give the sampler's order; a resume mid-epoch gives exactly the remaining samples; 2 ranks' shards are
disjoint and cover the epoch; corrupt images are replaced by the next readable one, counted and
reported; a weighted mixture draws by its weights; instance maps follow the image's EXIF turn and crop.
Run: python -m pytest tests/test_loader.py -q
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from common import as_list  # noqa: E402
from data.order import ShardSampler  # noqa: E402
from data.stream import StreamingLoader  # noqa: E402

BAD = (5, 11)       # a truncated PNG and a text file named .png


def colour(i):
    return (10 * i, 255 - 10 * i, 60)


def make_world(d, n, bad=BAD, tag='w'):
    """n flat-colour images of assorted sizes (image i has red = 10 i), manifest, meta.json."""
    os.makedirs(d / 'images')
    recs = []
    for i in range(n):
        rel = f'images/{tag}{i}.png'
        Image.new('RGB', (12 + i % 5, 9 + i % 7), colour(i)).save(d / rel)
        if i == bad[0]:                                          # a real PNG, cut off half-way through its pixels
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), np.uint8)).save(d / rel)
            data = (d / rel).read_bytes()
            (d / rel).write_bytes(data[:len(data) // 2])
        elif i in bad:
            (d / rel).write_text('not an image')
        recs.append({'id': f'{tag}_{i}', 'image': rel if i % 2 else str(d / rel), 'width': 12 + i % 5, 'height': 9 + i % 7})
    (d / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    (d / 'meta.json').write_text(json.dumps({'format': 'nanosetok-world', 'splits': {'train': {'images': n}}}))
    return str(d)


def which(batch):
    """The image each sample really shows, from its colour."""
    return (batch['image'][:, 0, 4, 4].long() // 10).tolist()


def flat(batches, key='index'):
    return [i for b in batches for i in (which(b) if key == 'shows' else b[key].tolist())]


def test_two_workers_resume_exactly_and_skip_corrupt_images(tmp_path, capsys):
    w = make_world(tmp_path / 'w', 24)
    make = lambda: StreamingLoader(w, 'train', image_size=8, batch_size=5, workers=2, seed=3)   # noqa: E731
    loader = make()
    epoch = list(loader)
    assert [len(b['index']) for b in epoch] == [5, 5, 5, 5, 4]
    order = flat(epoch)
    assert order == loader.sampler.shard(0).tolist() and sorted(order) == list(range(24))
    # every sample is the image it names, except the corrupt ones: the next readable one stands in
    assert flat(epoch, 'shows') == flat(epoch, 'used') == [i + 1 if i in BAD else i for i in order]
    assert [r['id'] for b in epoch for r in b['record']] == [f'w_{i + (i in BAD)}' for i in order]
    assert all(b['image'].dtype == torch.uint8 and b['image'].shape[1:] == (3, 8, 8) for b in epoch)
    err = capsys.readouterr().err
    assert loader.state_dict()['skipped'] == 2 and 'warning: skipped 2 unreadable images' in err
    assert 'w5.png is truncated or corrupt' in err and 'w11.png is not an image' in err
    # resume mid-epoch: two batches, a checkpoint, a fresh loader -> exactly the rest
    first = make()
    it = iter(first)
    head = [next(it), next(it)]
    state = json.loads(json.dumps(first.state_dict()))                          # as a checkpoint keeps it
    assert state['pos'] == 10 and state['epoch'] == 0
    again = make()
    again.load_state_dict(state)
    rest = list(again)
    assert flat(head) + flat(rest) == order and flat(rest, 'shows') == flat(epoch, 'shows')[10:]
    assert all(torch.equal(a['image'], b['image']) for a, b in zip(rest, epoch[2:]))
    # the next epoch: another order, the state moved on; batches() goes on across epochs
    assert again.state_dict()['epoch'] == 1 and flat(list(loader)) == loader.sampler.shard(1).tolist() != order
    endless = make().batches()
    assert sorted(flat([next(endless) for _ in range(10)])) == sorted(list(range(24)) * 2)


def test_two_ranks_are_disjoint_and_cover_the_epoch(tmp_path):
    w = make_world(tmp_path / 'w', 24, bad=(-1,))
    shards = [flat(StreamingLoader(w, 'train', image_size=8, batch_size=7, rank=r, world=2, seed=5, workers=0))
              for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12 and not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(24))
    # an epoch that does not divide: equal lengths (every rank makes the same steps), all covered
    for n, world in ((25, 2), (7, 3), (2, 4)):
        s = [ShardSampler([n], rank=r, world=world, seed=1).shard(0).tolist() for r in range(world)]
        assert len({len(x) for x in s}) == 1 and set(sum(s, [])) == set(range(n)) and len(s[0]) == -(-n // world)
    with pytest.raises(SystemExit):                                              # a checkpoint of another world size
        ShardSampler([24], world=2).load_state_dict(ShardSampler([24], world=4).state_dict())


def test_weighted_mixture(tmp_path):
    a, b = make_world(tmp_path / 'a', 24, bad=(-1,)), make_world(tmp_path / 'b', 6, bad=(-1,), tag='b')
    loader = StreamingLoader([a, b], 'train', image_size=8, batch_size=4, weights='[0.7, 0.3]', workers=0,
                             epoch_size=3000, seed=9)
    s = loader.sampler
    o0, o1 = s.order.epoch(0), s.order.epoch(1)
    assert len(o0) == 3000 and np.array_equal(o0, ShardSampler([24, 6], [0.7, 0.3], seed=9, epoch_size=3000).order.epoch(0))
    assert not np.array_equal(o0, o1)
    share = (o0 >= 24).mean()
    assert abs(share - 0.3) < 0.03, share
    per_image = np.bincount(o0, minlength=30)
    for lo, hi in ((0, 24), (24, 30)):       # each world's images in whole permutations: used evenly
        assert per_image[lo:hi].max() - per_image[lo:hi].min() <= 1
    batch = next(iter(loader))
    assert [r['id'] for r in batch['record']] == [f"{'w' if i < 24 else 'b'}_{i if i < 24 else i - 24}" for i in o0[:4]]
    assert as_list('[0.7, 0.3]', float) == as_list(['0.7,0.3'], float) == [0.7, 0.3]


def test_instance_maps_follow_the_image(tmp_path):
    """A landscape JPEG stored red | blue with EXIF orientation 3 (upside down): shown upright it is
    blue | red. Its instance map (stored frame: 1 under red, 2 under blue) must turn and crop with it."""
    d = tmp_path / 'w'
    os.makedirs(d / 'images')
    im = Image.new('RGB', (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 3
    im.save(d / 'images' / 'a.jpg', exif=exif, quality=95)
    m = np.ones((20, 40), np.uint8)
    m[:, 20:] = 2
    Image.fromarray(m).save(d / 'images' / 'a_inst.png')
    Image.new('RGB', (10, 10), (0, 255, 0)).save(d / 'images' / 'b.png')         # no instance map: zeros
    recs = [{'id': 'a', 'image': 'images/a.jpg', 'instances': 'images/a_inst.png', 'width': 40, 'height': 20},
            {'id': 'b', 'image': 'images/b.png', 'width': 10, 'height': 10}]
    (d / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    (d / 'meta.json').write_text(json.dumps({'splits': {'train': {'images': 2}}}))
    ds = StreamingLoader(str(d), 'train', image_size=8, workers=0, instances=True).dataset
    a, b = ds[0], ds[1]
    red = a['image'][0].int() > a['image'][2].int()                              # (8, 8)
    assert not red[:, :4].any() and red[:, 4:].all()                             # upright: blue left, red right
    assert torch.equal(a['instances'], torch.where(red, 1, 2).to(torch.uint8))   # 2 under blue, 1 under red
    assert b['instances'].shape == (8, 8) and not b['instances'].any()


def test_all_unreadable_is_one_line_error(tmp_path, capsys):
    d = tmp_path / 'w'
    make_world(d, 3, bad=(0, 1, 2))
    with pytest.raises(SystemExit) as e:
        next(iter(StreamingLoader(str(d), 'train', image_size=8, batch_size=2, workers=0)))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith('error: 3 images in a row') and 'is the image folder there' in err[-1]
    with pytest.raises(SystemExit):
        StreamingLoader(str(d), 'val')                                           # no such split
