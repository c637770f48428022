"""
SeTok: a visual tokenizer that turns an image into a *variable* number of concept tokens.
(Wu et al., "Towards Semantic Equivalence of Tokenization in Multimodal LLM", ICLR 2025.)

Read this file top to bottom; it is the tutorial.

    image (B,3,H,W)
      -> ViT encoder                      patch features   x      (B, N, C)   N = (H/p)*(W/p)
      -> density-peak clustering          labels                  (B, N)      a cluster id per patch
                                          num_tokens              (B,)        how many clusters
      -> merging touching clusters        labels, num_tokens      (B, N), (B,) fewer clusters
           (grouping x, or an earlier block's features: cluster_layer, end of section 3)
      -> token merger                     tokens                  (B, K, D)   K = max_tokens (padded)
           intra-cluster transformer      (patches attend only within their own cluster)
           average pool per cluster
           inter-cluster transformer      (tokens attend to each other, padding masked)
                                          token_mask              (B, K)      True for real tokens
      -> detok.py renders tokens back to pixels; setokim.py feeds them to an LLM.

Training signal (train_setok.py): reconstruction through the detokenizer + a concept-level
contrastive loss between tokens and the noun phrases ("large red circle") of the image.
The clustering itself is hard (no gradient): the encoder learns through the merger.

Sections: 1) building blocks shared by every file  2) ViT encoder (+ CLIP / SigLIP weights)  3) clustering
4) baseline tokenizers  5) token merger  6) SeTok  7) concept text encoder + contrastive loss.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1) Building blocks. Written once here; detok.py and setokim.py import them.


def pos_embed_2d(h, w, dim):
    """Fixed 2D sin-cos position embedding (as in MAE): half the channels encode the row, half the
    column, each as sin/cos at geometrically spaced frequencies. Returns (h*w, dim), row-major."""
    assert dim % 4 == 0, "2D sin-cos embedding needs dim divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing='ij')
    ys, xs = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega                # (h*w, dim/4)
    return torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=1)                    # (h*w, dim)


def bucket(n):
    """n rounded up to one of four evenly spaced sizes per octave: 1000 -> 1024, 1030 -> 1280 (at most
    25% more)."""
    step = 1 << max(0, n.bit_length() - 3)
    return -(-n // step) * step


class Linear(nn.Linear):
    """nn.Linear that, under bf16 autocast on a CPU, pads its rows to bucket(rows). There the matmul runs
    in oneDNN, which builds a kernel for each new shape, and a first call costs 2 to 7 times a repeated
    one. SETOKIM's row counts change at every step (packed rows, written tokens, referred masks), so
    without the padding nearly every bf16 matmul is a first call and bf16 is slower than float32; with
    it a layer sees at most four row counts per octave (RESULTS.md, section 13). Rows are independent,
    so padding changes no value."""

    def forward(self, x):
        if x.device.type != 'cpu' or not torch.is_autocast_enabled('cpu'):
            return super().forward(x)
        M = x.numel() // x.shape[-1]
        pad = bucket(M) - M
        if pad == 0:
            return super().forward(x)
        rows = F.pad(x.reshape(M, x.shape[-1]), (0, 0, 0, pad))                          # (bucket(M), in)
        y = super().forward(rows)[:M]                                                     # (M, out)
        return y.view(*x.shape[:-1], y.shape[-1])


def rotate(x, cos, sin):
    """Rotary positions (RoPE, Su et al. 2021): x (..., d) is d/2 pairs (x_i, x_{i+d/2}), and pair i is
    turned by its angle: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos); cos, sin (..., d/2).
    A query turned by angle a and a key turned by b have the dot product of the unturned pair turned by
    b - a: attention then sees only relative positions. Computed in float32 (angles of long sequences)."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention. mask: bool, broadcastable to (B, heads, Nq, Nk), True = may attend."""

    def __init__(self, dim, n_head):
        super().__init__()
        assert dim % n_head == 0
        self.n_head = n_head
        self.q = Linear(dim, dim)
        # no bias on keys/values: a key bias cancels in the softmax and a value bias passes straight
        # into proj's bias, so both would be dead weights that Adam only fills with noise. The same
        # two facts load pretrained attention (which has them) exactly: Block.pretrained_state
        self.kv = Linear(dim, 2 * dim, bias=False)
        self.proj = Linear(dim, dim)

    def forward(self, x, mask=None, cache=None, rope=None):
        """cache (a dict, used by setokim.py's generation): this layer's keys/values so far; the new
        ones are appended to it and x attends to all of them (a KV cache).
        rope: (cos, sin), each (B, 1, Nq, C/h/2), the rotary angles of x's positions (setokim.py's
        rotary positions): queries and keys are rotated before the keys are cached."""
        B, Nq, C = x.shape
        q = self.q(x).view(B, Nq, self.n_head, C // self.n_head).transpose(1, 2)            # (B, h, Nq, C/h)
        k, v = self.kv(x).view(B, Nq, 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            if 'k' in cache:
                k, v = torch.cat([cache['k'], k], 2), torch.cat([cache['v'], v], 2)        # (B, h, Nk, C/h)
            cache['k'], cache['v'] = k, v
        if q.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
            # the CPU's fused attention kernel is 1.8x slower in bf16 than in float32 at head width 16
            # (RESULTS.md, section 12), so under bf16 autocast only the projections run in bf16
            with torch.autocast('cpu', enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                      # (B, h, Nq, C/h)
        return self.proj(y.transpose(1, 2).reshape(B, Nq, C))


# The MLP's nonlinearity. Ours is GELU's tanh form; pretrained weights need the one they were trained
# with: GPT-2 ('gelu_new') and SigLIP use the tanh form too, OpenAI's CLIP uses quick_gelu.
ACTS = {'gelu_tanh': lambda x: F.gelu(x, approximate='tanh'),
        'gelu': F.gelu,                                               # the exact (erf) form
        'quick_gelu': lambda x: x * torch.sigmoid(1.702 * x)}


class MLP(nn.Module):
    def __init__(self, dim, hidden=None, out=None, act='gelu_tanh'):
        super().__init__()
        self.act = act
        self.fc = Linear(dim, hidden or 4 * dim)
        self.out = Linear(hidden or 4 * dim, out or dim)

    def forward(self, x):
        return self.out(ACTS[self.act](self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). mlp_hidden, act and eps
    exist for pretrained encoders (CLIP, SigLIP) whose shapes differ from ours."""

    def __init__(self, dim, n_head, mlp_hidden=None, act='gelu_tanh', eps=1e-5):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, n_head)
        self.ln2, self.mlp = nn.LayerNorm(dim, eps=eps), MLP(dim, mlp_hidden, act=act)

    def forward(self, x, mask=None, cache=None, rope=None):
        x = x + self.attn(self.ln1(x), mask=mask, cache=cache, rope=rope)
        return x + self.mlp(self.ln2(x))

    @staticmethod
    def pretrained_state(ln1, q, k, v, o, ln2, fc, out):
        """The state dict of a Block from a pretrained pre-norm block (GPT-2, CLIP, SigLIP). Each
        argument is a (weight, bias) pair, weights in nn.Linear's (out, in) layout. Exact, although
        our attention has no key/value biases:
          * the key bias is dropped: it adds q_i . b_k to every score of query i, the same for
            every key, and a softmax does not change when a constant is added to all its inputs;
          * the value bias is folded into proj's bias: the softmax weights sum to 1, so every
            attention output gets exactly b_v added, and proj(y + b_v) = proj(y) + W_o b_v."""
        return {'ln1.weight': ln1[0], 'ln1.bias': ln1[1],
                'attn.q.weight': q[0], 'attn.q.bias': q[1], 'attn.kv.weight': torch.cat([k[0], v[0]]),  # (2C, C)
                'attn.proj.weight': o[0], 'attn.proj.bias': o[1] + o[0] @ v[1],
                'ln2.weight': ln2[0], 'ln2.bias': ln2[1],
                'mlp.fc.weight': fc[0], 'mlp.fc.bias': fc[1], 'mlp.out.weight': out[0], 'mlp.out.bias': out[1]}


# -----------------------------------------------------------------------------
# 2) The vision encoder: a plain ViT. The paper uses a frozen SigLIP; here it is trained from scratch
# by default, and pretrained CLIP or SigLIP weights load into the same module (pretrained.py;
# train_setok.py vit_init=DIR freeze_encoder=True). The three styles differ in
# a few details, all of them options of this one class:
#   nano    ours: fixed 2D sin-cos positions, no class token
#   clip    OpenAI CLIP (Hugging Face CLIPVisionModel): a class token (dropped from the output),
#           learned positions, a LayerNorm before the blocks, quick_gelu, no patch bias
#   siglip  SigLIP (SiglipVisionModel): learned positions, no class token, GELU (tanh), eps 1e-6
# The final LayerNorm is CLIP's / SigLIP's post_layernorm, applied to every patch.

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VIT_STYLES = {
    'nano':   dict(cls=False, learned_pos=False, ln_pre=False, patch_bias=True, act='gelu_tanh', eps=1e-5,
                   mean=(0.5,) * 3, std=(0.25,) * 3),
    'clip':   dict(cls=True, learned_pos=True, ln_pre=True, patch_bias=False, act='quick_gelu', eps=1e-5,
                   mean=CLIP_MEAN, std=CLIP_STD),
    'siglip': dict(cls=False, learned_pos=True, ln_pre=False, patch_bias=True, act='gelu_tanh', eps=1e-6,
                   mean=(0.5,) * 3, std=(0.5,) * 3),
}


class ViT(nn.Module):
    def __init__(self, image_size, patch_size, dim, depth, n_head, style='nano', mlp_hidden=None, act=''):
        super().__init__()
        s = VIT_STYLES[style]
        self.grid, self.frozen = image_size // patch_size, False
        self.patch = nn.Conv2d(3, dim, patch_size, patch_size, bias=s['patch_bias'])   # non-overlapping p x p patches
        self.register_buffer('mean', torch.tensor(s['mean']).view(3, 1, 1), persistent=False)   # pixel normalisation
        self.register_buffer('std', torch.tensor(s['std']).view(3, 1, 1), persistent=False)
        self.cls = nn.Parameter(torch.zeros(dim)) if s['cls'] else None
        if s['learned_pos']:                                      # (1 + N, C) with a class token, else (N, C)
            self.pos = nn.Parameter(torch.randn(self.grid ** 2 + s['cls'], dim) * 0.02)
        else:
            self.register_buffer('pos', pos_embed_2d(self.grid, self.grid, dim), persistent=False)
        self.ln_pre = nn.LayerNorm(dim, eps=s['eps']) if s['ln_pre'] else nn.Identity()
        self.blocks = nn.ModuleList([Block(dim, n_head, mlp_hidden=mlp_hidden, act=act or s['act'], eps=s['eps'])
                                     for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=s['eps'])

    def forward(self, img, tap=None):
        """img (B, 3, H, W) in [0, 1] -> patch features (B, N, C). With tap=L also the hidden state
        after the first L blocks (L=0: the patch embeddings), (B, N, C), without any LayerNorm."""
        x = self.patch((img - self.mean) / self.std)              # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                          # (B, N, C)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1)   # (B, 1+N, C)
        x = self.ln_pre(x + self.pos)
        hidden = None
        for i, blk in enumerate(self.blocks):
            if i == tap:
                hidden = x                                        # (B, [1+]N, C) before block i
            x = blk(x)
        x = self.ln(x)
        patches = (lambda t: t[:, 1:]) if self.cls is not None else (lambda t: t)   # drop the class token
        return patches(x) if tap is None else (patches(x), patches(hidden))

    def freeze(self):
        """A fixed feature extractor, as the paper's frozen SigLIP: no gradients (so no optimizer
        state and no stored activations), and eval mode that a later .train() leaves alone."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        return super().train(mode and not self.frozen)


# -----------------------------------------------------------------------------
# 3) Density-peak clustering (DPC-KNN), batched over images, no Python loops.
#
# A patch is a good cluster centre when it is dense (many patches look like it) AND far from any
# denser patch. Three changes to the authors' version make it robust:
#   * scale-free: distances are divided by the mean length |x_i| of the image's feature vectors, so
#     `threshold` (on rho * delta) means the same whatever the scale of the features: a centre must
#     be dense AND about `threshold` feature lengths away from anything denser. For LayerNorm
#     outputs that unit is nearly the same for every image. The image's mean pairwise distance
#     would not do as the unit: it shrinks for a plain image and grows for a busy one, so the
#     token count would stop following the number of objects;
#   * deterministic: density ties are broken by patch index (lower index counts as denser), never
#     by random noise;
#   * k (the kNN size for density) is its own setting, and the token count is clamped to
#     [min_tokens, max_tokens] by taking the top-scoring patches.

@torch.no_grad()
def density_peak_cluster(x, k=5, threshold=0.5, min_tokens=1, max_tokens=16):
    """x (B, N, C) -> labels (B, N) long in [0, num_tokens[b]), num_tokens (B,) long.
    Cluster 0 is the one whose centre has the highest score, 1 the next, and so on."""
    B, N, C = x.shape
    x = x.float()
    d = torch.cdist(x, x)                                                   # (B, N, N) d_ij
    d = d / x.norm(dim=-1).mean(1)[:, None, None].clamp_min(1e-12)         # scale-free: in units of mean |x_i|
    knn = d.topk(k + 1, dim=-1, largest=False).values[..., 1:]              # (B, N, k) skip self
    rho = torch.exp(-(knn ** 2).mean(-1))                                   # (B, N) local density
    # rank patches by density, ties by index: rank 0 = densest. "j denser than i" <=> rank_j < rank_i
    order = torch.sort(-rho, dim=1, stable=True).indices                    # (B, N)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=x.device).expand(B, N))
    denser = rank[:, None, :] < rank[:, :, None]                            # (B, N, N) [b,i,j]
    delta = torch.where(denser, d, torch.full_like(d, float('inf'))).amin(-1)   # (B, N)
    delta = torch.where(rank == 0, d.amax(-1), delta)                       # densest: its largest distance
    score = rho * delta                                                     # (B, N)
    num_tokens = (score > threshold).sum(1).clamp(min_tokens, max_tokens)   # (B,)
    # centres: the num_tokens highest scores (ties by index); pad to max_tokens for static shapes
    centres = torch.sort(-score, dim=1, stable=True).indices[:, :max_tokens]  # (B, K)
    valid = torch.arange(max_tokens, device=x.device)[None] < num_tokens[:, None]  # (B, K)
    dc = d.gather(2, centres[:, None, :].expand(B, N, max_tokens))          # (B, N, K) patch-centre
    dc = dc.masked_fill(~valid[:, None, :], float('inf'))
    labels = dc.argmin(-1)                                                  # (B, N) nearest centre
    # a centre always belongs to its own cluster (matters only for exact duplicates)
    own = torch.where(valid, torch.arange(max_tokens, device=x.device).expand(B, -1), labels.gather(1, centres))
    labels = labels.scatter(1, centres, own)
    return labels, num_tokens


def density_peak_cluster_reference(x, k=5, threshold=0.5, min_tokens=1, max_tokens=16):
    """The same algorithm for ONE image (N, C), written with plain loops for readability and as the
    reference that tests hold the batched version to. Slow: do not use in training."""
    N, C = x.shape
    x = x.double()
    unit = sum(x[i].norm().item() for i in range(N)) / N                   # mean |x_i|
    d = [[(x[i] - x[j]).norm().item() / unit for j in range(N)] for i in range(N)]
    rho = [math.exp(-sum(v * v for v in sorted(row[:i] + row[i + 1:])[:k]) / k) for i, row in enumerate(d)]
    order = sorted(range(N), key=lambda i: (-rho[i], i))                     # densest first
    rank = {i: r for r, i in enumerate(order)}
    delta = [max(d[i]) if rank[i] == 0 else min(d[i][j] for j in range(N) if rank[j] < rank[i]) for i in range(N)]
    score = [r * dl for r, dl in zip(rho, delta)]
    n = min(max(sum(s > threshold for s in score), min_tokens), max_tokens)
    centres = sorted(range(N), key=lambda i: (-score[i], i))[:n]
    labels = [min(range(n), key=lambda c: (d[i][centres[c]], c)) for i in range(N)]
    for c, i in enumerate(centres):
        labels[i] = c
    return torch.tensor(labels), n


# Merging. Density peaks cut a large region whose features drift (a gradient or textured background,
# the inner part and the rim of a large object) into several clusters, and put the patches that
# straddle an edge, whose features lie between the two sides, into small clusters of their own.
# merge_clusters joins them on the clusters' adjacency graph, as region-merging segmenters do: two
# clusters that touch (4-neighbour patches) are joined when the features across their shared
# boundary are close, the mean distance of their touching patch pairs under `tau` (in the same unit
# of mean feature length). Joining is transitive, so a gradient cut into five pieces becomes one
# cluster however far its ends lie apart, while an object stays apart from a background that touches
# it, whatever its colour: its boundary is a jump in the features. A cluster of at most `min_size`
# patches is too small to be an object and joins the neighbour it is closest to.

@torch.no_grad()
def merge_clusters(x, labels, K, tau=0.6, min_size=0):
    """x (B, N, C) features of a square patch grid, labels (B, N) in [0, K) -> merged labels (B, N),
    num_tokens (B,). A merged cluster takes the place of its lowest old id, so the order (by centre
    score) is kept and the ids stay contiguous."""
    B, N, C = x.shape
    g = int(round(N ** 0.5))
    x = x.float()
    unit = x.norm(dim=-1).mean(1)[:, None].clamp_min(1e-12)                  # (B, 1) mean |x_i|
    xm, lm = x.view(B, g, g, C), labels.view(B, g, g)
    # every pair of 4-neighbour patches: E = 2 g (g - 1) edges, left-right then top-bottom
    dist = torch.cat([(xm[:, :, 1:] - xm[:, :, :-1]).norm(dim=-1).flatten(1),
                      (xm[:, 1:] - xm[:, :-1]).norm(dim=-1).flatten(1)], 1) / unit   # (B, E)
    a = F.one_hot(torch.cat([lm[:, :, :-1].flatten(1), lm[:, :-1].flatten(1)], 1), K).float()   # (B, E, K)
    b = F.one_hot(torch.cat([lm[:, :, 1:].flatten(1), lm[:, 1:].flatten(1)], 1), K).float()     # (B, E, K)
    total = a.transpose(1, 2) @ (b * dist[..., None])                       # (B, K, K) summed distance i -> j
    count = a.transpose(1, 2) @ b                                           # (B, K, K) touching pairs
    total, count = total + total.transpose(1, 2), count + count.transpose(1, 2)   # symmetric
    eye = torch.eye(K, dtype=torch.bool, device=x.device)
    mean = torch.where((count > 0) & ~eye, total / count.clamp_min(1), torch.full_like(total, float('inf')))  # (B, K, K)
    size = F.one_hot(labels, K).sum(1)                                      # (B, K) patches per cluster
    small = (size > 0) & (size <= min_size) & mean.amin(-1).isfinite()     # (B, K) has a neighbour to join
    link = (mean < tau) | (F.one_hot(mean.argmin(-1), K).bool() & small[..., None])   # (B, K, K)
    link = link | link.transpose(1, 2) | eye                               # an undirected graph, with loops
    for _ in range(max(1, math.ceil(math.log2(K)))):                        # paths of length up to K: components
        link = (link.float() @ link.float()) > 0
    root = link.float().argmax(-1)                                          # (B, K) lowest id of each one's component
    is_root = (root == torch.arange(K, device=x.device)) & (size > 0)      # (B, K)
    new_id = is_root.long().cumsum(1) - 1                                   # (B, K) roots renumbered 0, 1, ...
    return new_id.gather(1, root).gather(1, labels), is_root.sum(1)


def merge_clusters_reference(x, labels, tau=0.6, min_size=0):
    """merge_clusters for ONE image (N, C), (N,), with loops and a union-find: the test's reference."""
    N, C = x.shape
    g = int(round(N ** 0.5))
    x = x.double()
    unit = sum(x[i].norm().item() for i in range(N)) / N
    lab = [int(v) for v in labels]
    total, count = {}, {}
    for r in range(g):
        for c in range(g):
            for r2, c2 in ((r, c + 1), (r + 1, c)):
                if r2 < g and c2 < g:
                    i, j = r * g + c, r2 * g + c2
                    a, b = lab[i], lab[j]
                    if a != b:
                        for key in ((a, b), (b, a)):
                            total[key] = total.get(key, 0.0) + (x[i] - x[j]).norm().item() / unit
                            count[key] = count.get(key, 0) + 1
    parent = {k: k for k in set(lab)}

    def find(k):
        while parent[k] != k:
            k = parent[k]
        return k

    def join(p, q):
        p, q = find(p), find(q)
        parent[max(p, q)] = min(p, q)                                       # the lower id is the root

    mean = {key: total[key] / count[key] for key in total}
    for (a, b), m in mean.items():
        if m < tau:
            join(a, b)
    for a in parent:
        near = [(m, b) for (p, b), m in mean.items() if p == a]
        if lab.count(a) <= min_size and near:
            join(a, min(near)[1])                                           # ties: the lower id
    roots = sorted({find(k) for k in parent})
    return torch.tensor([roots.index(find(v)) for v in lab]), len(roots)


# Which features to group. The paper clusters the output of a frozen, pretrained SigLIP. An encoder
# trained from scratch (the toy) learns in its last blocks what the reconstruction needs, such as
# edges and where a patch sits inside its object, and its output stops grouping by object: the rims of
# objects form clusters of their own. Its first blocks stay local and group by object far better
# (RESULTS.md, 1.2). So SeTokConfig.cluster_layer picks the features the clustering reads; the merger
# always pools the encoder's output.


def cluster_centroids(labels, grid, K):
    """Where each cluster is: labels (B, N) of a grid x grid patch map -> centroid (B, K, 2), the mean
    (row, column) of its patches in patch units, and count (B, K), its number of patches (an empty
    slot: (0, 0) and 0). Sums of small integers, so exact in float32 whatever the order of the sum."""
    B, N = labels.shape
    n = torch.arange(N, device=labels.device)
    rc = torch.stack([n // grid, n % grid], -1).float().expand(B, N, 2)    # (B, N, 2) patch row, column
    lab = labels.long()
    count = torch.zeros(B, K, device=labels.device).scatter_add_(1, lab, torch.ones(B, N, device=labels.device))
    total = torch.zeros(B, K, 2, device=labels.device).scatter_add_(1, lab[..., None].expand(B, N, 2), rc)
    return total / count.clamp_min(1)[..., None], count                    # (B, K, 2), (B, K)


# -----------------------------------------------------------------------------
# 4) Baseline tokenizers behind the same interface, for controlled comparisons: they only change
# how patches are grouped; the merger and everything downstream stay the same.

def grid_labels(B, grid, g, device=None):
    """'grid': a fixed g x g partition of the grid x grid patch map. (B, N) labels, g*g tokens."""
    r = torch.arange(grid, device=device) * g // grid                       # patch row -> cell row
    return (r[:, None] * g + r[None, :]).flatten().expand(B, -1)            # (B, N)


def patch_labels(B, N, device=None):
    """'patch': every patch is its own token."""
    return torch.arange(N, device=device).expand(B, -1)                     # (B, N)


# -----------------------------------------------------------------------------
# 5) The token merger.

class TokenMerger(nn.Module):
    """patches (B,N,C) + labels (B,N) -> tokens (B,K,D).
    intra-cluster attention is one dense attention with a block mask (labels_i == labels_j), so
    every cluster of every image is processed in one batched call; average pooling per cluster is a
    one-hot matmul; the inter-cluster transformer masks the padded token slots."""

    def __init__(self, dim, n_head, out_dim, intra_depth=2, inter_depth=2):
        super().__init__()
        self.intra = nn.ModuleList([Block(dim, n_head) for _ in range(intra_depth)])
        self.inter = nn.ModuleList([Block(dim, n_head) for _ in range(inter_depth)])
        self.ln = nn.LayerNorm(dim)
        self.out = Linear(dim, out_dim)

    def pool(self, x, pos, labels, K):
        """The intra-cluster stage: patches attend within their cluster, then are averaged per cluster.
        Token k of an image depends only on the patches of cluster k. -> (B, K, C)"""
        x = x + pos                                                         # (B, N, C)
        same = (labels[:, :, None] == labels[:, None, :])[:, None]          # (B, 1, N, N) block mask
        for blk in self.intra:
            x = blk(x, mask=same)
        onehot = F.one_hot(labels, K).to(x.dtype)                           # (B, N, K)
        counts = onehot.sum(1).clamp_min(1)                                 # (B, K) patches per cluster
        return onehot.transpose(1, 2) @ x / counts[..., None]               # (B, K, C) cluster means

    def forward(self, x, pos, labels, num_tokens, K):
        t = self.pool(x, pos, labels, K)                                    # (B, K, C)
        token_mask = torch.arange(K, device=x.device)[None] < num_tokens[:, None]  # (B, K)
        for blk in self.inter:
            t = blk(t, mask=token_mask[:, None, None, :])                   # keys: real tokens only
        return self.out(self.ln(t)), token_mask                             # (B, K, D), (B, K)

    def reference(self, x, pos, labels, num_tokens, K):
        """The authors' way: loop over images and clusters, run the intra-cluster transformer on each
        cluster's patches alone. Kept as the reference the batched forward is tested against (and
        that bench.py times)."""
        out = x.new_zeros(x.shape[0], K, self.out.out_features)
        for b in range(x.shape[0]):
            xb, toks = x[b] + pos, []                                       # (N, C)
            for c in range(int(num_tokens[b])):
                p = xb[labels[b] == c][None]                                # (1, n_c, C)
                for blk in self.intra:
                    p = blk(p)
                toks.append(p.mean(1))
            t = torch.cat(toks)[None]                                       # (1, k_b, C)
            for blk in self.inter:
                t = blk(t)
            out[b, :t.shape[1]] = self.out(self.ln(t))[0]
        return out


# -----------------------------------------------------------------------------
# 6) SeTok

@dataclass
class SeTokConfig:
    image_size: int = 64
    patch_size: int = 4
    dim: int = 128            # encoder / merger width
    depth: int = 4            # ViT encoder blocks
    n_head: int = 4
    token_dim: int = 128      # D, the width of the output tokens
    intra_depth: int = 2
    inter_depth: int = 2
    tokenizer: str = 'setok'  # setok | grid | patch
    cluster_k: int = 5
    cluster_threshold: float = 0.5
    cluster_pos_weight: float = 1.0
    cluster_layer: int = -1   # which features are clustered: -1 the encoder's output (as the paper);
                              # L >= 0 the hidden state after its first L blocks (0: patch embeddings)
    cluster_merge: float = 0.0     # merge_clusters' tau: touching clusters this close are joined (0: no merging)
    cluster_min_size: int = 0      # ... and a cluster of at most this many patches joins its closest neighbour
    min_tokens: int = 1
    max_tokens: int = 16
    grid_size: int = 3        # tokens per side for tokenizer='grid'
    vit_style: str = 'nano'   # the encoder: nano (ours) | clip | siglip (set by train_setok.py's vit_init)
    vit_mlp: int = 0          # its MLP width (0: 4 * dim)
    vit_act: str = ''         # its MLP nonlinearity ('': the style's, see ACTS)


class SeTok(nn.Module):
    def __init__(self, cfg: SeTokConfig):
        super().__init__()
        assert cfg.tokenizer in ('setok', 'grid', 'patch'), f"unknown tokenizer {cfg.tokenizer}"
        assert -1 <= cfg.cluster_layer < cfg.depth, f"cluster_layer={cfg.cluster_layer}: expected -1 or 0..{cfg.depth - 1}"
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.encoder = ViT(cfg.image_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.n_head, cfg.vit_style,
                           cfg.vit_mlp or None, cfg.vit_act)
        self.merger = TokenMerger(cfg.dim, cfg.n_head, cfg.token_dim, cfg.intra_depth, cfg.inter_depth)
        self.register_buffer('pos', pos_embed_2d(self.grid, self.grid, cfg.dim), persistent=False)

    @property
    def max_tokens(self):
        c = self.cfg
        return {'setok': c.max_tokens, 'grid': c.grid_size ** 2, 'patch': self.grid ** 2}[c.tokenizer]

    def cluster(self, x):
        """x (B, N, C) the features to group -> labels (B, N), num_tokens (B,)."""
        c, (B, N, _) = self.cfg, x.shape
        if c.tokenizer == 'grid':
            return grid_labels(B, self.grid, c.grid_size, x.device), torch.full((B,), c.grid_size ** 2, device=x.device)
        if c.tokenizer == 'patch':
            return patch_labels(B, N, x.device), torch.full((B,), N, device=x.device)
        feats = x.detach() + c.cluster_pos_weight * self.pos                # cluster on content + position
        labels, num_tokens = density_peak_cluster(feats, c.cluster_k, c.cluster_threshold, c.min_tokens, c.max_tokens)
        if c.cluster_merge > 0 or c.cluster_min_size > 0:                   # join on content alone
            labels, num_tokens = merge_clusters(x.detach(), labels, c.max_tokens, c.cluster_merge, c.cluster_min_size)
        return labels, num_tokens

    def forward(self, img):
        """img (B, 3, H, W) in [0,1] -> tokens (B, K, D), token_mask (B, K) bool, labels (B, N)."""
        if self.cfg.cluster_layer < 0:
            x = feats = self.encoder(img)                                   # (B, N, C)
        else:   # group on earlier, more local features (see cluster_layer above), merge the final ones
            x, h = self.encoder(img, tap=self.cfg.cluster_layer)            # (B, N, C) twice
            feats = F.layer_norm(h, h.shape[-1:])                           # a common scale, no weights
        labels, num_tokens = self.cluster(feats)                            # (B, N), (B,)
        tokens, token_mask = self.merger(x, self.pos, labels, num_tokens, self.max_tokens)
        return tokens, token_mask, labels


# -----------------------------------------------------------------------------
# 7) Concept text encoder and the concept-level contrastive loss.

class TextEncoder(nn.Module):
    """A small transformer over the subword ids of a concept ("large red circle"), mean-pooled over
    its real tokens and projected to the token width D. The paper uses SigLIP's text tower."""

    def __init__(self, vocab_size, dim, depth, n_head, out_dim, pad_id, max_len=16):
        super().__init__()
        self.pad_id = pad_id
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        self.blocks = nn.ModuleList([Block(dim, n_head) for _ in range(depth)])
        self.ln, self.out = nn.LayerNorm(dim), Linear(dim, out_dim)

    def forward(self, ids):                                                 # ids (M, L), pad_id: the text tokenizer's
        keep = ids != self.pad_id                                           # (M, L)
        x = self.tok(ids) + self.pos[:ids.shape[1]]                         # (M, L, C)
        for blk in self.blocks:
            x = blk(x, mask=keep[:, None, None, :])
        x = (self.ln(x) * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)  # (M, C)
        return self.out(x)                                                  # (M, D)


def concept_contrastive_loss(tokens, token_mask, concepts, concept_ids, concept_valid, logit_scale):
    """
    Weakly supervised, concept-level image-text InfoNCE (GroupViT-style multi-label targets,
    FILIP-style token matching). No masks are used: which token stands for which concept is learned.
      tokens (B, K, D), token_mask (B, K)   the visual tokens of B images
      concepts (B, P, D)                    text embeddings of up to P concepts per image
      concept_ids (B, P, L)                 their subword ids (to find the same phrase in two images)
      concept_valid (B, P) bool             which of the P slots hold a concept
    Similarity of image b and concept j = cosine of j with b's BEST-matching real token (max over
    tokens). Image -> text: soft targets spread over the concepts the image contains; text -> image:
    over the images containing that phrase (a phrase shared by two images is a positive for both,
    so there are no false negatives). Shapes stay static (padded slots are masked), so it compiles.
    """
    with torch.autocast(tokens.device.type, enabled=False):   # float32: bf16 cosines, x100, would be off by ~0.4
        return _contrastive(tokens.float(), token_mask, concepts.float(), concept_ids, concept_valid, logit_scale)


def _contrastive(tokens, token_mask, concepts, concept_ids, concept_valid, logit_scale):
    B, P, D = concepts.shape
    t = F.normalize(tokens.float(), dim=-1)                                 # (B, K, D)
    c = F.normalize(concepts.float(), dim=-1).reshape(B * P, D)             # (M, D), M = B*P
    sim = torch.einsum('bkd,md->bmk', t, c)                                 # (B, M, K)
    sim = sim.masked_fill(~token_mask[:, None, :], -1.0).amax(-1)           # (B, M) best token
    logits = logit_scale.exp().clamp(max=100) * sim                         # (B, M)
    valid = concept_valid.reshape(B * P)                                    # (M,)
    ids = concept_ids.reshape(B * P, -1)                                    # (M, L)
    same = (ids[:, None, :] == ids[None, :, :]).all(-1) & valid[:, None] & valid[None, :]  # (M, M)
    owner = torch.arange(B, device=tokens.device).repeat_interleave(P)      # (M,) image of slot j
    pos = (F.one_hot(owner, B).T.float() @ same.float()).clamp(max=1)       # (B, M) b contains j
    # image -> text: softmax over the batch's real concepts
    lp = F.log_softmax(logits.masked_fill(~valid[None], -1e4), dim=1)
    loss_i2t = -(pos / pos.sum(1, keepdim=True).clamp_min(1) * lp).sum(1).mean()
    # text -> image: softmax over images, for each real concept
    lp = F.log_softmax(logits, dim=0)
    loss_t2i = -((pos / pos.sum(0, keepdim=True).clamp_min(1) * lp).sum(0) * valid).sum() / valid.sum().clamp_min(1)
    return (loss_i2t + loss_t2i) / 2
