"""The judge (data/shapes/judge.py): it reads rendered scenes exactly, and its scores of text-to-image and
editing say what the images show; and the diffusion head (setokim.py) learns a two-mode distribution that
regression would average, with samples fixed by their seed."""
import numpy as np
import pytest
import torch

from data.shapes.judge import edit_target, judge, key, score_edit, score_t2i
from data.shapes.prepare import make_sample
from setokim import DiffusionHead

CFG = {'seed': 7, 'image_size': 64, 'min_objects': 1, 'max_objects': 6}


def samples(n=24):
    return [make_sample('test', i, CFG) for i in range(n)]


def test_the_judge_reads_rendered_scenes_exactly():
    got = samples()
    pred = judge(torch.from_numpy(np.stack([arrays['image'] for _, _, arrays, _ in got])))
    for (record, _, _, _), p in zip(got, pred):
        true = record['objects']
        assert [key(o) for o in p] == [key(o) for o in true]              # the same objects, in caption order
        assert [o['center'] for o in p] == [o['center'] for o in true]
        assert score_t2i(p, true)['exact'] == 1
    # a float image in [0, 1] (what the detokenizer draws) reads the same
    img = torch.from_numpy(got[0][2]['image']).permute(2, 0, 1)[None].float() / 255
    assert [key(o) for o in judge(img)[0]] == [key(o) for o in got[0][0]['objects']]


def test_edit_scores_see_success_and_preservation():
    seen = set()
    for record, conv, arrays, _ in samples(40):
        edit = next(c['edit'] for c in conv if c['task'] == 'edit')
        source = record['objects']
        target, _ = edit_target(source, edit, 64)
        done, untouched = judge(torch.from_numpy(np.stack([arrays['edit'], arrays['image']])))
        assert sorted(map(key, done)) == sorted(map(key, target))         # edit_target is what was drawn
        op = edit['op']
        assert score_edit(done, source, edit, 64) == {'success': 1, 'preserved': 1, 'n': 1, f'{op}_n': 1, f'{op}_success': 1}
        assert score_edit(untouched, source, edit, 64) == {'success': 0, 'preserved': 1, 'n': 1, f'{op}_n': 1,
                                                           f'{op}_success': 0}                 # the copied source
        others = len(target) - (edit['op'] != 'remove')
        assert score_edit([], source, edit, 64)['preserved'] == int(others == 0)    # an empty image keeps nothing
        seen.add(edit['op'])
    assert seen == {'recolor', 'remove', 'move'}


def test_t2i_scores_count_what_is_missing_and_what_is_extra():
    true = next(r for r, *_ in samples(10) if len(r['objects']) >= 3)['objects']
    wrong = [dict(o) for o in true]
    wrong[0]['color'] = next(c for c in ('red', 'green', 'blue', 'pink') if all(o['color'] != c for o in true))
    s = score_t2i(wrong, true)                                            # one object in the wrong colour
    assert (s['exact'], s['matched'], s['bound'], s['placed'], s['count_ok']) == (0, len(true) - 1, len(true) - 1, len(true) - 1, 1)
    s = score_t2i(true + [dict(true[0], position='center' if true[0]['position'] != 'center' else 'top')], true)
    assert (s['exact'], s['matched'], s['n_pred'], s['count_ok']) == (0, len(true), len(true) + 1, 0)   # one too many
    assert score_t2i(true, true) == {'exact': 1, 'matched': len(true), 'n_pred': len(true), 'n_true': len(true),
                                     'count_ok': 1, 'bound': len(true), 'placed': len(true), 'n': 1}


@pytest.mark.parametrize('mean', [False, True])
def test_diffusion_head_learns_two_modes_that_regression_would_average(mean):
    torch.manual_seed(0)
    D, C = 4, 8
    head = DiffusionHead(D, C, 64, 2, mean=mean)                          # mean: the residual around a regressed mean
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    c_one, c_two = torch.randn(C), torch.randn(C)
    mode = torch.tensor([2.0, -1.0, 0.5, 1.0])
    losses = []
    for _ in range(200):          # condition one: the token is `mode`; condition two: +mode or -mode, a coin flip
        one = torch.rand(256) < 0.5
        sign = torch.where(torch.rand(256) < 0.5, 1.0, -1.0)
        x0 = torch.where(one[:, None], mode, sign[:, None] * mode) + 0.05 * torch.randn(256, D)
        loss = head.loss(x0, torch.where(one[:, None], c_one, c_two)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:10])
    seed = lambda s: torch.Generator().manual_seed(s)
    x1 = head.sample(c_one.expand(200, C), 20, generator=seed(0))
    assert (x1 - mode).norm(dim=1).median() < 0.3
    x2 = head.sample(c_two.expand(200, C), 20, generator=seed(0))
    side = x2 @ mode / mode.norm() ** 2                                   # +1 or -1 for a sample on a mode
    assert ((side - 1).abs() < 0.3).float().mean() > 0.3 and ((side + 1).abs() < 0.3).float().mean() > 0.3
    assert (side.abs() < 0.5).float().mean() < 0.1                        # few near 0, the mean regression writes
    assert torch.equal(x2, head.sample(c_two.expand(200, C), 20, generator=seed(0)))     # the seed fixes them
    assert not torch.equal(x2, head.sample(c_two.expand(200, C), 20, generator=seed(1)))
    x3 = head.sample(c_two.expand(200, C), 20, temperature=0.5, generator=seed(0))       # colder: still the two modes
    assert ((x3 @ mode / mode.norm() ** 2).abs() > 0.7).float().mean() > 0.8
