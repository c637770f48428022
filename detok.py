"""
The detokenizer: from a variable-length set of SeTok tokens back to pixels.

Every token paints one layer of the image and the layers are blended by per-pixel weights (a
spatial-broadcast decoder with alpha compositing, as in Slot Attention / MONet):

    tokens (B, K, D), token_mask (B, K)
      -> geometry: each token's centre (x, y) and spread (sx, sy), read from the token     (B, K, 2) x2
      -> for every token k and output patch m (p x p pixels at position pos_m):
           h = W_t token_k + W_r phi((pos_m - centre_k) / spread_k) + W_p pos_m           (B, K, M, C)
           MLP -> p*p colours and p*p alpha logits                                        (B, K, M, p*p*4)
      -> alpha softmax over the real tokens (+ a soft ball around each centre)
      -> image = sum_k alpha_k * colour_k, unpatchified                                   (B, 3, H, W)

Why this shape and not a transformer over the pixels: a token stands for one concept (an object, a
piece of background), so the natural renderer lets each token draw its own region. Working in
coordinates relative to the token's centre and spread makes "draw a large red circle here" the same
function wherever the circle is and whatever its size, which is what lets it learn in minutes on a CPU.
The queries never see the clustering, only the tokens: centre and spread are *predicted* from the
token (trained against the centroid and spread of the token's cluster, `geometry_loss`), so the
same renderer draws the tokens that SETOKIM writes.

Loss (detok_loss): mean squared error on pixels (what PSNR measures) plus an L1 loss on the
horizontal and vertical finite differences of the image. The gradient term is free (no pretrained
network such as LPIPS, which we cannot download here) and penalises blurred edges much more than
flat regions, which is exactly where a pure L2 loss is content with a blurry average.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from setok import pos_embed_2d

N_FREQ = 4    # sin/cos frequencies of the relative coordinates fed to the painter


@dataclass
class DetokConfig:
    image_size: int = 64
    patch_size: int = 4       # each (token, output patch) pair paints p x p pixels
    token_dim: int = 128      # D, the width of SeTok's tokens
    dim: int = 64             # width of the painter MLP
    depth: int = 3            # its layers


def patch_coords(g, p=1):
    """Centres of a (g*p) x (g*p) pixel grid, grouped per g x g patch, in [-1, 1] image units, (x, y).
    -> (g*g, p*p, 2), row-major patches, row-major pixels inside each patch."""
    c = (torch.arange(g * p, dtype=torch.float32) + 0.5) / (g * p) * 2 - 1               # (g*p,)
    y, x = torch.meshgrid(c, c, indexing='ij')                                           # (g*p, g*p)
    xy = torch.stack([x, y], -1).view(g, p, g, p, 2).permute(0, 2, 1, 3, 4)              # (g, g, p, p, 2)
    return xy.reshape(g * g, p * p, 2)


def cluster_geometry(labels, grid, K):
    """Each cluster's centroid and spread (std, at least half a patch) in [-1, 1] image units, from
    its patches. labels (B, N) -> centre (B, K, 2), spread (B, K, 2). Empty slots get 0 and 1/grid."""
    xy = patch_coords(grid).to(labels.device)[:, 0]                                       # (N, 2)
    onehot = F.one_hot(labels, K).float()                                                # (B, N, K)
    n = onehot.sum(1).clamp_min(1)[..., None]                                            # (B, K, 1)
    mean = onehot.transpose(1, 2) @ xy / n                                               # (B, K, 2)
    var = onehot.transpose(1, 2) @ xy ** 2 / n - mean ** 2
    return mean, var.clamp_min(0).sqrt().clamp_min(1.0 / grid)


class Detokenizer(nn.Module):
    def __init__(self, cfg: DetokConfig):
        super().__init__()
        self.cfg = cfg
        g, p, C = cfg.image_size // cfg.patch_size, cfg.patch_size, cfg.dim
        self.grid = g
        self.register_buffer('xy', patch_coords(g, p), persistent=False)                 # (M, p*p, 2) pixels
        self.register_buffer('pos', pos_embed_2d(g, g, C), persistent=False)             # (M, C)
        self.geo = nn.Linear(cfg.token_dim, 4)                  # -> centre (2), log spread (2)
        self.paint = nn.Linear(cfg.token_dim, 3 + 1 + 3)        # -> flat colour (3), edge sharpness (1), ball mix (3)
        self.from_token = nn.Linear(cfg.token_dim, C)
        self.from_rel = nn.Linear(2 + 4 * N_FREQ, C)
        self.mlp = nn.ModuleList([nn.Linear(C, C) for _ in range(cfg.depth - 1)])
        self.head = nn.Linear(C, p * p * 4)                     # p*p colours (3) and alpha logits (1)

    def geometry(self, tokens):
        """tokens (B, K, D) -> centre (B, K, 2) in [-1, 1], spread (B, K, 2) > 0."""
        g = self.geo(tokens.float())
        return torch.tanh(g[..., :2]), g[..., 2:].clamp(-6, 2).exp()

    def forward(self, tokens, token_mask):
        B, K, _ = tokens.shape
        p, g = self.cfg.patch_size, self.grid
        centre, spread = self.geometry(tokens)                                           # (B, K, 2) x2
        # relative coordinates of every pixel to every token's centre, in units of its spread
        rel = (self.xy[None, None] - centre[:, :, None, None]) / spread[:, :, None, None]  # (B, K, M, p*p, 2)
        r = rel.mean(3)                                                                  # (B, K, M, 2) patch centres
        freqs = 2.0 ** torch.arange(N_FREQ, device=r.device) * 0.5                       # (F,)
        phi = torch.cat([r, (r[..., None] * freqs).flatten(-2).sin(), (r[..., None] * freqs).flatten(-2).cos()], -1)
        h = self.from_token(tokens)[:, :, None] + self.from_rel(phi) + self.pos          # (B, K, M, C)
        for lin in self.mlp:
            h = lin(F.gelu(h, approximate='tanh'))
        out = self.head(F.gelu(h, approximate='tanh')).view(B, K, g * g, p * p, 4)        # (B, K, M, p*p, 4)
        # Each token first paints a flat colour inside a soft ball around its centre: the ball is a
        # token-chosen mix of the L2 (disc), L1 (diamond) and L-inf (square) unit balls in its own
        # (spread-scaled) coordinates, with a token-chosen edge sharpness. The MLP adds the details
        # (colour variation, other outlines) on top, per pixel.
        paint = self.paint(tokens.float())                                               # (B, K, 7)
        colour, sharp, mix = paint[..., :3], F.softplus(paint[..., 3] + 3), paint[..., 4:].softmax(-1)
        a = rel.abs()                                                                    # (B, K, M, p*p, 2)
        balls = torch.stack([rel.pow(2).sum(-1).add(1e-6).sqrt(), a.sum(-1), a.amax(-1)], -1)  # (B, K, M, p*p, 3)
        dist = (balls * mix[:, :, None, None]).sum(-1)                                   # (B, K, M, p*p)
        # the ball's edge sits at 2 spreads (a disc of radius R has spread R/2); where balls overlap the
        # smaller one wins (- log area, as in a mixture of densities), so objects sit on their background
        prior = sharp[:, :, None, None] * (2 - dist) - spread.log().sum(-1)[:, :, None, None]
        logit = out[..., 3] + prior                                                      # (B, K, M, p*p)
        logit = logit.masked_fill(~token_mask[:, :, None, None], float('-inf'))
        alpha = logit.softmax(1)                                                         # over tokens
        rgb = (alpha[..., None] * (out[..., :3] + colour[:, :, None, None])).sum(1) + 0.5  # (B, M, p*p, 3)
        x = rgb.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)                          # (B, 3, g, p, g, p)
        return x.reshape(B, 3, g * p, g * p)                                              # (B, 3, H, W)

    def geometry_loss(self, tokens, token_mask, labels, grid):
        """MSE between each real token's predicted centre / log spread and those of its cluster."""
        centre, spread = self.geometry(tokens)
        t_centre, t_spread = cluster_geometry(labels, grid, tokens.shape[1])
        err = (centre - t_centre).pow(2).sum(-1) + (spread.log() - t_spread.log()).pow(2).sum(-1)  # (B, K)
        # mean over each image's real tokens, then over images (so equal DDP shards average exactly)
        return ((err * token_mask).sum(1) / token_mask.sum(1).clamp_min(1)).mean()


def detok_loss(pred, target, grad_weight=1.0):
    """MSE + grad_weight * L1 on finite differences (sharp edges). pred, target (B, 3, H, W)."""
    mse = F.mse_loss(pred, target)
    dx = lambda im: im[..., :, 1:] - im[..., :, :-1]
    dy = lambda im: im[..., 1:, :] - im[..., :-1, :]
    grad = F.l1_loss(dx(pred), dx(target)) + F.l1_loss(dy(pred), dy(target))
    return mse + grad_weight * grad, mse


def psnr(pred, target):
    """Peak signal-to-noise ratio per image, in dB, for images in [0, 1]. (B,)"""
    mse = ((pred.clamp(0, 1) - target) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def load_setok(path, device='cpu', **overrides):
    """A trained SeTok and its detokenizer from a train_setok.py checkpoint, in eval mode.
    overrides: SeTokConfig fields to change that do not touch the weights (the clustering settings,
    tokenizer='grid'|'patch'). Returns (setok, detok, checkpoint dict)."""
    from common import load_checkpoint, load_weights
    from setok import SeTok, SeTokConfig
    ck = load_checkpoint(path, kind='setok', what='SeTok checkpoint')
    setok = SeTok(SeTokConfig(**{**ck['setok_config'], **overrides}))
    detok = Detokenizer(DetokConfig(**ck['detok_config']))
    sd = ck['model']
    load_weights(setok, {k[6:]: v for k, v in sd.items() if k.startswith('setok.')}, path)
    load_weights(detok, {k[6:]: v for k, v in sd.items() if k.startswith('detok.')}, path)
    return setok.to(device).eval(), detok.to(device).eval(), ck
