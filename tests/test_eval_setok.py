"""SeTok's partition metrics (eval_setok.py) on hand-made partitions, whose figures are known."""
import torch

from eval_setok import (Partitions, contingency, error_overlay, fg_ari, partition_metrics, patch_majority, to_pixels,
                        upsample)


def ari(truth, pred):
    """FG-ARI of one image given as flat lists: truth 0 = background, pred any cluster ids."""
    t, p = torch.tensor([truth]), torch.tensor([pred])
    return fg_ari(contingency(t, p, int(t.max()) + 1, int(p.max()) + 1)[:, 1:]).item()


def test_fg_ari_on_hand_made_partitions():
    # scikit-learn's documented example: adjusted_rand_score([0, 0, 1, 1], [0, 0, 1, 2]) = 4/7
    assert abs(ari([1, 1, 2, 2], [0, 0, 1, 2]) - 4 / 7) < 1e-6
    # the background is excluded: however it is cut, a perfect object partition scores 1
    assert ari([0, 0, 0, 1, 1, 2, 2], [5, 6, 7, 0, 0, 1, 1]) == 1.0
    assert ari([0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1]) == 1.0       # an object in the background's cluster too
    # renaming clusters changes nothing; two objects in one cluster score 0 (as chance)
    assert ari([1, 1, 2, 2], [3, 3, 0, 0]) == 1.0
    assert ari([1, 1, 2, 2], [0, 0, 0, 0]) == 0.0
    # one object: 1 when it is one cluster, 0 when any pixel of it lies elsewhere (no partial credit)
    assert ari([1, 1, 1, 1], [2, 2, 2, 2]) == 1.0
    assert ari([1, 1, 1, 1], [2, 2, 2, 3]) == 0.0
    # no object pixel: undefined, left out of the mean
    assert torch.isnan(fg_ari(torch.zeros(1, 0, 3)))


def test_best_overlap_cover_and_excess_on_hand_made_partitions():
    # a 4x4 image: object 1 the top-left 2x2, object 2 the right column; the clusters cut object 2 in two
    # and the background in two
    inst = torch.tensor([[1, 1, 0, 2], [1, 1, 0, 2], [0, 0, 0, 2], [0, 0, 0, 2]])[None]
    pix = torch.tensor([[0, 0, 1, 3], [0, 0, 1, 3], [2, 2, 1, 4], [2, 2, 1, 4]]).view(1, 16)
    m = partition_metrics(inst, pix, 5)
    assert torch.allclose(m['iou'][0], torch.tensor([1.0, 0.5])) and m['bg_iou'].item() == 0.5
    assert torch.allclose(m['cover'][0], torch.tensor([1.0, 0.5])) and m['best'][0, 0] == 0
    parts = Partitions()
    parts.add(inst, pix, 5, torch.tensor([5]))                              # 5 tokens, 2 objects: 2 excess
    parts.add(inst, torch.tensor([[0, 0, 2, 1] * 4]), 5, torch.tensor([3])) # exactly objects + 1
    s = parts.summary()
    assert s['excess'] == 1.0 and s['exact'] == 0.5 and s['tokens'] == 4.0
    assert s['cover90'] == 0.75 and abs(s['mbo'] - (1 + 0.5 + 0.5 + 1) / 4) < 1e-6
    picture, caption = error_overlay(torch.rand(3, 4, 4), inst[0], pix[0], scale=1)
    assert caption == '1 split, 0 merged, bg in 2' and picture.shape == (4, 4, 3)
    assert (picture[2:, 3] == (255, 40, 40)).all()                           # object 2's other half: red
    # object 1 in the background's cluster: merged, painted yellow
    picture, caption = error_overlay(torch.rand(3, 4, 4), inst[0], pix[0].masked_fill(pix[0] == 0, 1), scale=1)
    assert caption == '1 split, 1 merged, bg in 2' and (picture[:2, :2] == (255, 230, 0)).all()


def test_pixels_follow_the_edges_inside_a_patch():
    """Clusters upsampled guided by the image: an object whose edges cut through patches gets its own
    pixels exactly, from the best patch partition (patch_majority). Nearest upsampling cannot."""
    inst = torch.zeros(1, 20, 20, dtype=torch.long)
    inst[0, 5:15, 5:15] = 1                                                 # edges inside patches of 4
    inst[0, 17:20, 1:3] = 2                                                 # in one patch's corner
    img = torch.full((1, 3, 20, 20), 0.2)
    img[0, :, inst[0] == 1] = torch.tensor([0.9, 0.1, 0.1])[:, None]
    img[0, :, inst[0] == 2] = torch.tensor([0.1, 0.1, 0.9])[:, None]
    labels = patch_majority(inst, 5)                                        # (1, 16) patch labels
    assert labels[0].view(5, 5).tolist() == [[0] * 5, [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0] * 5]
    pix = to_pixels(img, labels, 3).view(20, 20)
    assert torch.equal(pix[inst[0] < 2], inst[0][inst[0] < 2])              # object 1 and the background, exactly
    assert (pix[inst[0] == 2] == 0).all()                                   # object 2 has no patch: no cluster of its own
    assert not torch.equal(upsample(labels, 20).view(20, 20)[inst[0] < 2], inst[0][inst[0] < 2])
