"""
SeTok's evaluation: does each token stand for one thing in the scene? Batched, no loops over images.

The partition a tokenizer makes (a cluster id per patch) is compared with the true one (an instance
map per pixel: 0 the background, i the i-th object), at pixel level, with the yardsticks of the
object-centric literature (Slot Attention, AdaSlot):

    FG-ARI      adjusted Rand index of the clusters against the objects, on the objects' pixels only
                (the background excluded): 1 when every object is one cluster, whatever the
                background does; ~0 for a partition unrelated to the objects. An object split in two
                costs much more than a slightly wrong edge.
    mBO         mean best overlap: for each object, the best IoU of any one cluster with it, averaged
                over objects; mBO_bg the same for the background as one region
    cover90     the share of objects with at least 90% of their pixels in one cluster
    excess      tokens - objects - 1 per image (the background is one unit), and exact, the share of
                images with excess == 0

The clusters are brought to pixels by to_pixels (upsampled from the patches, guided by the image).
On this world the best patch partition (each patch labelled with the object that covers most of it:
patch_majority) then scores FG-ARI 0.99 and mBO 1.00, so what the figures miss is the tokenizer's.
With one object in the image, FG-ARI is 1 when the object is one cluster and 0 when any of its
pixels lie in another: ARI has no partial credit for a single true region.

Each figure stands beside the grid baseline (g x g cells, g*g the nearest square to SeTok's mean token
count), which knows nothing of the image.
"""
import numpy as np
import torch
import torch.nn.functional as F

from common import to_uint8


def upsample(labels, size):
    """Patch labels (B, N) of a square grid -> pixel labels (B, size*size), each pixel its patch's."""
    B, N = labels.shape
    g = int(round(N ** 0.5))
    return labels.view(B, g, 1, g, 1).expand(B, g, size // g, g, size // g).reshape(B, size * size)


def to_pixels(img, labels, K):
    """The clusters at pixel level: img (B, 3, H, W), patch labels (B, N) in [0, K) -> (B, H*W).
    Upsampled from the patches, guided by the image (joint upsampling): each pixel takes, of the
    clusters of its own patch and its 8 neighbours, the one whose mean colour is nearest to its own
    (ties: its own patch's). A patch that straddles an edge so splits along the edge, which is what a
    patch tokenizer means by it; plain nearest upsampling gives all its pixels to one side, and even
    the best patch partition then scores FG-ARI 0.61 on the shapes world (RESULTS.md, section 14)."""
    B, N = labels.shape
    H, g = img.shape[-1], int(round(N ** 0.5))
    p = H // g
    col = img.float().flatten(2).transpose(1, 2)                            # (B, P, 3) pixel colours
    oh = F.one_hot(upsample(labels, H), K).float()                          # (B, P, K)
    mean = oh.transpose(1, 2) @ col / oh.sum(1)[..., None].clamp_min(1)     # (B, K, 3) cluster colours
    grid = F.pad(labels.view(B, 1, g, g).float(), (1, 1, 1, 1), mode='replicate')
    near = F.unfold(grid, 3).long()                                         # (B, 9, N) 3x3 neighbours, own at 4
    near = torch.cat([near[:, 4:5], near[:, :4], near[:, 5:]], 1)           # own patch first: it wins ties
    near = near.view(B, 9, g, 1, g, 1).expand(B, 9, g, p, g, p).reshape(B, 9, H * H)   # (B, 9, P)
    cand = mean.gather(1, near.reshape(B, -1, 1).expand(-1, -1, 3)).view(B, 9, H * H, 3)
    dist = (cand - col[:, None]).pow(2).sum(-1)                             # (B, 9, P)
    return near.gather(1, dist.argmin(1, keepdim=True))[:, 0]               # (B, P)


def contingency(gt, pred, n_gt, n_pred):
    """gt (B, P) in [0, n_gt), pred (B, P) in [0, n_pred) -> counts (B, n_gt, n_pred) of pixels in
    true region i and cluster j (a one-hot matmul)."""
    return F.one_hot(gt.long(), n_gt).float().transpose(1, 2) @ F.one_hot(pred.long(), n_pred).float()


def _pairs(n):
    return n * (n - 1) / 2


def fg_ari(table):
    """Adjusted Rand index per image from a contingency table (B, O, K) of the objects' pixels
    (rows: objects only, no background). ARI = (index - expected) / (max - expected), with
    index = sum_ij C(n_ij, 2), rows a_i, columns b_j, expected = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2)
    and max = (sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2. Where max == expected (one object and one
    cluster) the partitions agree and ARI is 1, as in the reference implementation
    (deepmind/multi_object_datasets). Images without an object pixel get NaN. -> (B,)"""
    n = table.sum((1, 2))
    index = _pairs(table).sum((1, 2))
    rows, cols = _pairs(table.sum(2)).sum(1), _pairs(table.sum(1)).sum(1)
    expected = rows * cols / _pairs(n).clamp_min(1)
    den = (rows + cols) / 2 - expected
    ari = torch.where(den > 0, (index - expected) / den.clamp_min(1e-9), torch.ones_like(n))
    return torch.where(n > 0, ari, torch.full_like(n, float('nan')))


def partition_metrics(inst, pix, K):
    """inst (B, H, W) instance maps (0 background, i object i); pix (B, H*W) a cluster id in [0, K) per
    pixel (to_pixels). -> per image: FG-ARI (B,); per object (B, O): best IoU, cover (its biggest share
    in one cluster), best (that IoU's cluster), present; the background's best IoU (B,)."""
    O = int(inst.max())
    table = contingency(inst.flatten(1), pix, O + 1, K)                     # (B, 1+O, K)
    size = table.sum(2)                                                     # (B, 1+O) pixels per region
    iou = table / (size[..., None] + table.sum(1, keepdim=True) - table).clamp_min(1)   # (B, 1+O, K)
    best = iou.amax(-1)                                                     # (B, 1+O) best overlap
    return {'ari': fg_ari(table[:, 1:]), 'iou': best[:, 1:], 'best': iou[:, 1:].argmax(-1),
            'cover': table[:, 1:].amax(-1) / size[:, 1:].clamp_min(1), 'present': size[:, 1:] > 0,
            'bg_iou': best[:, 0]}


def patch_majority(inst, grid):
    """Instance maps (B, H, W) -> each patch's majority label (B, N): the best partition a patch
    tokenizer can make (ties to the lower label)."""
    B, H, W = inst.shape
    p = H // grid
    oh = F.one_hot(inst.long(), int(inst.max()) + 1).float()                # (B, H, W, 1+O)
    return oh.view(B, grid, p, grid, p, -1).sum((2, 4)).argmax(-1).flatten(1)   # (B, N)


def spearman(a, b):
    """Spearman rank correlation with average ranks for ties."""
    def rank(x):
        x = np.asarray(x, float)
        order = x.argsort(kind='stable')
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):                                              # average the ranks of ties
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


class Partitions:
    """Accumulates partition_metrics over batches; summary() -> the dataset's figures."""

    def __init__(self):
        self.parts = []

    def add(self, inst, pix, K, num_tokens):
        """-> this batch's partition_metrics."""
        m = partition_metrics(inst, pix, K)
        present = m['present']
        self.parts.append({'ari': m['ari'], 'iou': m['iou'][present], 'cover': m['cover'][present], 'bg_iou': m['bg_iou'],
                           'objects': present.sum(1), 'tokens': num_tokens})
        return m

    def column(self, key):
        """One of the accumulated values over every batch: 'ari', 'iou', 'cover', 'bg_iou', 'objects' or
        'tokens' (per image; 'iou' and 'cover' per object)."""
        return torch.cat([p[key] for p in self.parts]).cpu()

    def summary(self):
        cat = {k: self.column(k) for k in self.parts[0]}
        ari, excess = cat['ari'], (cat['tokens'] - cat['objects'] - 1).float()
        return {'fg_ari': ari[~ari.isnan()].mean().item(), 'mbo': cat['iou'].mean().item(),
                'mbo_bg': cat['bg_iou'].mean().item(), 'cover90': (cat['cover'] >= 0.9).float().mean().item(),
                'excess': excess.mean().item(), 'exact': (excess == 0).float().mean().item(),
                'tokens': cat['tokens'].float().mean().item(),
                'spearman': spearman(cat['tokens'].numpy(), cat['objects'].numpy())}


def error_overlay(img, inst, pix, scale=4):
    """What is wrong with one image's partition, drawn: img (3, H, W), inst (H, W), pix (H*W,). Each true
    region's main cluster is the one holding most of it. Painted: an object that shares its main
    cluster with another region (merged: it has no token of its own) yellow; an object's pixels
    outside its main cluster (split) red; the background's outside its main cluster (cut up) orange.
    -> (picture, caption)."""
    H = inst.shape[-1]
    gt, pix = inst.flatten().long(), pix.long()
    table = contingency(gt[None], pix[None], int(gt.max()) + 1, int(pix.max()) + 1)[0]   # (1+O, K)
    sizes = table.sum(1)                                                    # (1+O,)
    main = table.argmax(1).masked_fill(sizes == 0, -1)                      # (1+O,) each region's main cluster
    shared = ((main[:, None] == main[None, :]).sum(1) > 1) & (sizes > 0)    # (1+O,) main cluster not its own
    shared[0] = False
    up = lambda m: m.view(H, H).cpu().numpy().repeat(scale, 0).repeat(scale, 1)
    wrong, is_obj, merged = up(pix != main[gt]), up(gt > 0), up(shared[gt])
    out = to_uint8(img, scale).astype(np.float32) * 0.35                    # dimmed image under the errors
    out[merged] = (255, 230, 0)
    out[wrong & is_obj] = (255, 40, 40)
    out[wrong & ~is_obj] = (255, 160, 0)
    m = partition_metrics(inst[None], pix[None], table.shape[1])
    split = int(((m['cover'] < 0.9) & m['present']).sum())                  # as cover90 counts them
    bg_pieces = int(((table.argmax(0) == 0) & (table.sum(0) > 0)).sum())      # clusters mostly background
    return out.round().astype(np.uint8), f'{split} split, {int(shared.sum())} merged, bg in {bg_pieces}'


def error_sums(recon, img, inst, band=2):
    """Where the reconstruction's squared error lies: recon, img (B, 3, H, W), inst (B, H, W) ->
    (3,) squared error summed over the pixels within `band` pixels of an edge between two true regions,
    the objects' other pixels and the background's other pixels, and (3,) the pixel counts of the three."""
    lab = inst.float()[:, None]                                             # (B, 1, H, W)
    edge = torch.zeros_like(lab, dtype=torch.bool)
    edge[..., :, 1:] |= lab[..., :, 1:] != lab[..., :, :-1]
    edge[..., :, :-1] |= lab[..., :, 1:] != lab[..., :, :-1]
    edge[..., 1:, :] |= lab[..., 1:, :] != lab[..., :-1, :]
    edge[..., :-1, :] |= lab[..., 1:, :] != lab[..., :-1, :]
    near = F.max_pool2d(edge.float(), 2 * band - 1, 1, band - 1)[:, 0] > 0  # (B, H, W) pixels near an edge
    err = (recon.float().clamp(0, 1) - img.float()).pow(2).sum(1)          # (B, H, W)
    where = torch.stack([near, ~near & (inst > 0), ~near & (inst == 0)])    # (3, B, H, W)
    return (err[None] * where).flatten(1).sum(1), where.flatten(1).sum(1).float()
