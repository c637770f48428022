"""SeTok's parts on synthetic inputs: clustering, merging, merger, compile, the contrastive loss."""
import pytest
import torch

from setok import (Linear, SeTok, SeTokConfig, TokenMerger, bucket, concept_contrastive_loss, density_peak_cluster,
                   density_peak_cluster_reference, grid_labels, merge_clusters, merge_clusters_reference, pos_embed_2d)


def blobs(n_blobs, per=20, C=16, seed=0):
    """n_blobs well-separated Gaussian blobs in C dims, points shuffled. -> x (N, C), truth (N,)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_blobs, C, generator=g) * 10
    truth = torch.arange(n_blobs).repeat_interleave(per)
    x = centres[truth] + 0.3 * torch.randn(len(truth), C, generator=g)
    perm = torch.randperm(len(truth), generator=g)
    return x[perm], truth[perm]


def same_partition(a, b):
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_blobs_are_recovered_exactly():
    # a batch of images with 2, 3, 4, 5 blobs (padded to the same N by duplicating blob points)
    for n in (2, 3, 4, 5):
        x, truth = blobs(n, per=24, seed=n)
        labels, num = density_peak_cluster(x[None], k=5, threshold=0.5, max_tokens=16)
        assert num.item() == n
        assert same_partition(labels[0], truth)
    # batched: different blob counts in one batch (same N = 120 points each)
    xs, truths = zip(*[blobs(n, per=120 // n, seed=10 + n) for n in (2, 3, 4, 5)])
    labels, num = density_peak_cluster(torch.stack(xs), k=5, threshold=0.5)
    assert num.tolist() == [2, 3, 4, 5]
    for l, t in zip(labels, truths):
        assert same_partition(l, t)


def test_clustering_is_scale_free_and_deterministic():
    x, _ = blobs(4, seed=3)
    a = density_peak_cluster(x[None], threshold=0.5)
    b = density_peak_cluster(1000 * x[None], threshold=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # exact ties (duplicated points) are broken the same way every time
    x = torch.cat([x, x])[None]
    r1, r2 = density_peak_cluster(x), density_peak_cluster(x)
    assert torch.equal(r1[0], r2[0])


def test_batched_clustering_matches_looped_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 40, 8, generator=g)
    for thr, k, lo, hi in [(0.1, 5, 1, 16), (0.3, 3, 2, 6), (0.05, 7, 1, 40), (0.9, 4, 3, 10)]:
        labels, num = density_peak_cluster(x, k=k, threshold=thr, min_tokens=lo, max_tokens=hi)
        for b in range(len(x)):
            ref_labels, ref_n = density_peak_cluster_reference(x[b], k=k, threshold=thr, min_tokens=lo, max_tokens=hi)
            assert num[b].item() == ref_n
            assert torch.equal(labels[b], ref_labels)


def test_merging_joins_a_drifting_region_and_keeps_objects_apart():
    """An 8x8 patch grid: a background whose feature drifts from left to right (cut by position into
    four column bands), one object (a jump in the features) and one lone edge patch. The bands join
    however far apart their ends are, the object stays apart, and the lone patch joins its neighbour."""
    g, C = 8, 4
    col = torch.arange(g).float().repeat(g)                                 # (N,) column of each patch
    x = torch.zeros(g * g, C)
    x[:, 0] = 1 + 0.1 * col                                                 # the drift: 0.1 per patch
    obj = torch.zeros(g, g, dtype=torch.bool)
    obj[2:5, 2:5] = True
    obj = obj.flatten()
    x[obj] = torch.tensor([0.0, 3.0, 0.0, 0.0])                             # the object: far from all of it
    x[63, 2] = 1.0                                                          # a patch unlike its neighbours
    labels = (col // 2).long()                                              # 4 bands, as position cuts them
    labels[obj], labels[63] = 4, 5
    merged, n = merge_clusters(x[None], labels[None], K=8, tau=0.2, min_size=0)
    assert n.item() == 3 and len(set(merged[0][~obj].tolist()) - {int(merged[0, 63])}) == 1
    merged, n = merge_clusters(x[None], labels[None], K=8, tau=0.2, min_size=1)
    assert n.item() == 2 and merged[0][obj].eq(1).all() and merged[0][~obj].eq(0).all()
    # without merging nothing changes; ids stay in order: a cluster keeps the place of its lowest id
    assert torch.equal(merge_clusters(x[None], labels[None], K=8, tau=0.0)[0][0], labels)


def test_batched_merging_matches_looped_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, 8, 6, generator=g)
    x = ((x + x.roll(1, 1) + x.roll(1, 2)) / 3).view(6, 64, 6)             # neighbours alike, as in images
    labels, _ = density_peak_cluster(x, k=3, threshold=0.05, max_tokens=12)
    merged = 0
    for tau, min_size in [(0.3, 0), (0.5, 2), (0.7, 3), (0.0, 4)]:
        out, num = merge_clusters(x, labels, 12, tau, min_size)
        for b in range(len(x)):
            ref, ref_n = merge_clusters_reference(x[b], labels[b], tau, min_size)
            assert torch.equal(out[b], ref) and num[b].item() == ref_n
        merged += int((num < labels.amax(1) + 1).sum())
    assert merged > 0, "the test needs merges to happen"


def test_every_patch_has_one_cluster_and_counts_are_bounded():
    x = torch.randn(6, 64, 12)
    for thr, lo, hi in [(0.0, 1, 16), (1e9, 3, 16), (0.1, 2, 5), (0.2, 1, 64)]:
        labels, num = density_peak_cluster(x, threshold=thr, min_tokens=lo, max_tokens=hi)
        assert labels.shape == (6, 64) and labels.dtype == torch.long
        assert ((num >= lo) & (num <= hi)).all()
        assert (labels < num[:, None]).all() and (labels >= 0).all()
        for b in range(6):  # every cluster id in [0, num) is used
            assert torch.equal(labels[b].unique(), torch.arange(num[b]))
    assert (density_peak_cluster(x, threshold=0.0, max_tokens=16)[1] == 16).all()
    assert (density_peak_cluster(x, threshold=1e9, min_tokens=3)[1] == 3).all()


def blob_batch(counts=(2, 3, 4), N=36, C=32):
    """A batch of 'images' whose patches form 2, 3, 4 ... blobs: different token counts per image."""
    return torch.stack([blobs(n, per=N // n + 1, C=C, seed=n)[0][:N] for n in counts])


def small_merger():
    torch.manual_seed(0)
    return TokenMerger(dim=32, n_head=4, out_dim=24, intra_depth=2, inter_depth=2).eval()


def test_batched_merger_matches_looped_reference():
    m = small_merger()
    x = blob_batch()
    labels, num = density_peak_cluster(x, threshold=0.5, max_tokens=8)
    assert len(set(num.tolist())) > 1, "want different token counts in the batch"
    pos = pos_embed_2d(6, 6, 32)
    with torch.no_grad():
        out, mask = m(x, pos, labels, num, 8)
        ref = m.reference(x, pos, labels, num, 8)
    assert torch.equal(mask.sum(1), num)
    assert torch.allclose(out[mask], ref[mask], atol=1e-5)
    # under bf16 autocast (dtype=bfloat16) too, to bf16's precision;
    # the block-masked attention runs in float32 there (setok.Attention), the projections in bf16
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out16, _ = m(x, pos, labels, num, 8)
    assert out16.dtype == torch.bfloat16
    assert (out16.float() - ref)[mask].abs().max() < 0.05 * ref[mask].abs().max()


def test_intra_cluster_token_depends_only_on_its_own_patches():
    m = small_merger()
    x = blob_batch()
    labels, num = density_peak_cluster(x, threshold=0.5, max_tokens=8)
    pos = pos_embed_2d(6, 6, 32)
    with torch.no_grad():
        before = m.pool(x, pos, labels, 8)
        y = x.clone()
        y[labels == 1] += 5 * torch.randn_like(y[labels == 1])             # perturb cluster 1 only
        after = m.pool(y, pos, labels, 8)
    others = torch.arange(8) != 1
    assert torch.allclose(before[:, others], after[:, others], atol=1e-6)
    assert not torch.allclose(before[:, 1], after[:, 1])


def tiny_setok(**kw):
    cfg = SeTokConfig(**{**dict(image_size=32, patch_size=4, dim=32, depth=1, n_head=4, token_dim=24, intra_depth=1,
                                inter_depth=1, max_tokens=8, cluster_threshold=0.5), **kw})
    torch.manual_seed(0)
    return SeTok(cfg).eval()


def test_setok_shapes_and_baselines():
    img = torch.rand(3, 3, 32, 32)
    for tok, K in [('setok', 8), ('grid', 4), ('patch', 64)]:
        m = tiny_setok(tokenizer=tok, grid_size=2)
        tokens, mask, labels = m(img)
        assert tokens.shape == (3, K, 24) and mask.shape == (3, K) and labels.shape == (3, 64)
        assert (labels < mask.sum(1, keepdim=True)).all()
    assert torch.equal(grid_labels(1, 4, 2)[0].view(4, 4), torch.tensor([[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2))


def test_cluster_layer_groups_the_tapped_features():
    """cluster_layer=L clusters the hidden state after the first L blocks, and the merger pools the
    encoder's output: changing the later blocks changes the tokens, never the clusters."""
    img = torch.stack([blocky(n, n) for n in (1, 3, 4)])
    m = tiny_setok(depth=3, cluster_layer=1)
    x, h = m.encoder(img, tap=1)
    enc = m.encoder
    want = enc.blocks[0](enc.patch((img - enc.mean) / enc.std).flatten(2).transpose(1, 2) + enc.pos)
    assert torch.allclose(h, want, atol=1e-6) and torch.equal(x, m.encoder(img))
    with torch.no_grad():
        tokens, _, labels = m(img)
        assert torch.equal(labels, m.cluster(torch.nn.functional.layer_norm(h, (32,)))[0])
        for p in m.encoder.blocks[1:].parameters():
            p.add_(0.5 * torch.randn_like(p))
        tokens2, _, labels2 = m(img)
    assert torch.equal(labels, labels2) and not torch.allclose(tokens, tokens2)
    assert labels.max() > 0                                             # more than one cluster


def blocky(n, seed, size=32):
    """A plain image with n flat coloured squares on a 4-px-aligned grid."""
    g = torch.Generator().manual_seed(seed)
    img = torch.full((3, size, size), 0.2)
    for i in range(n):
        r, c = 8 * (i // 2), 16 * (i % 2) + 4
        img[:, r:r + 8, c:c + 8] = torch.rand(3, 1, 1, generator=g)
    return img


@pytest.mark.parametrize('merge', [0.0, 0.6])
def test_compiled_setok_does_not_recompile_across_token_counts(merge):
    m = tiny_setok(cluster_merge=merge, cluster_min_size=1)
    torch._dynamo.reset()                                               # the other parameter's graphs
    compiled = torch.compile(m, backend='eager', dynamic=False)
    counts = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(4):
            img = torch.stack([blocky(s + 1, s), blocky(2 * s + 1, s + 10)])  # different token counts
            tokens, mask, labels = compiled(img)
            counts.add(tuple(mask.sum(1).tolist()))
            ref = m(img)
            assert torch.allclose(tokens, ref[0], atol=1e-5)
    assert len(counts) > 1, "the test needs batches with different token counts"


def test_contrastive_loss_prefers_matching_tokens():
    torch.manual_seed(0)
    B, K, P, D = 4, 5, 2, 16
    concepts = torch.randn(B, P, D)
    ids = torch.arange(B * P).view(B, P, 1)
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[0, 1] = False
    mask = torch.ones(B, K, dtype=torch.bool)
    scale = torch.tensor(3.0)
    good = torch.randn(B, K, D)
    good[:, :P] = concepts                                                   # each concept has its token
    bad = torch.randn(B, K, D)
    lg = concept_contrastive_loss(good, mask, concepts, ids, valid, scale)
    lb = concept_contrastive_loss(bad, mask, concepts, ids, valid, scale)
    assert lg < lb
    # a concept's loss must not depend on the invalid slot's content
    c2 = concepts.clone(); c2[0, 1] = torch.randn(D)
    assert torch.allclose(lg, concept_contrastive_loss(good, mask, c2, ids, valid, scale))
    # the same phrase in two images is a positive for both: swapping which image "owns" it changes nothing
    ids2 = ids.clone(); ids2[1, 0] = ids2[2, 0]
    c3 = concepts.clone(); c3[1, 0] = c3[2, 0]
    g3 = good.clone(); g3[1, 0] = c3[1, 0]
    loss = concept_contrastive_loss(g3, mask, c3, ids2, valid, scale)
    assert torch.isfinite(loss)


def test_linear_pads_rows_to_few_shapes_and_changes_nothing():
    # bucket: never fewer rows, at most 25% more, and four sizes per octave
    assert all(n <= bucket(n) <= 1.25 * n for n in range(0, 5000))
    assert {bucket(n) for n in range(1024, 2048)} == {1024, 1280, 1536, 1792, 2048}
    # under CPU bf16 autocast setok.Linear pads its rows, and values and gradients are nn.Linear's exactly
    torch.manual_seed(0)
    lin = Linear(24, 40)
    ref = torch.nn.Linear(24, 40)
    ref.load_state_dict(lin.state_dict())
    for shape in ((3, 37, 24), (1030, 24), (0, 5, 24)):
        x = torch.randn(shape, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y, y2 = lin(x), ref(x2)
        assert y.shape == y2.shape and y.dtype == torch.bfloat16 and torch.equal(y, y2)
        y.float().square().sum().backward()
        y2.float().square().sum().backward()
        assert torch.equal(x.grad, x2.grad) and torch.equal(lin.weight.grad, ref.weight.grad)
        assert torch.equal(lin.bias.grad, ref.bias.grad)
