"""
The detokenizer: from a variable-length set of SeTok tokens back to pixels.

Every token draws one sprite (a small S x S picture with an alpha channel) in its own frame, and
the sprites are alpha-composited into the image, as in layered / sprite-based scene models
(MONet, Slot Attention's spatial-broadcast decoder, MarioNette):

    tokens (B, K, D), token_mask (B, K)
      -> frame:  each token's centre (x, y) and spread (sx, sy), read from the token        (B, K, 2) x2
      -> sprite: an MLP turns each token into S x S colours (3) and alpha logits (1)        (B, K, 4, S, S)
      -> every pixel is looked up in every token's sprite at its coordinates relative to the
         token's frame, (pixel - centre) / (R * spread), with bilinear interpolation        (B, K, 4, H, W)
      -> alpha: softmax over the real tokens of (sprite alpha logit - log spread area)
      -> image = sum_k alpha_k * colour_k                                                  (B, 3, H, W)

Why sprites: a token stands for one concept (an object, a piece of background), so the natural
renderer lets each token draw its own region. In the token's frame a red star looks the same wherever
it is and however large it is, so one S x S template per concept is all the MLP has to learn; the
bilinear lookup of alpha *logits* puts the edge between two sprite cells, so edges come out sharp at
sub-pixel positions (the softmax over tokens turns a steep logit into a hard boundary). It is also
cheap: the MLP runs once per token, not per (token, pixel) pair, and since a frame is axis-aligned
the bilinear lookup splits into rows and columns: two small matmuls per token (lookup_weights).
Where sprites overlap the smaller one wins (- log area, as in a mixture of densities), so
objects sit on their background. A token's frame is *predicted* from the token (trained against the
centroid and spread of the token's cluster, `geometry_loss`, and by the pixels through the lookup),
never read from the clustering, so the same renderer draws the tokens that SETOKIM writes.

Loss (detok_loss): mean squared error on pixels (what PSNR measures) plus an optional L1 loss on the
horizontal and vertical finite differences of the image, a free sharpness term (no pretrained
network such as LPIPS, which we cannot download here) that penalises blurred edges much more than
flat regions, where a pure L2 loss is content with a blurry average.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import gather_all
from setok import MLP, SeTok, TextEncoder, concept_contrastive_loss


@dataclass
class DetokConfig:
    image_size: int = 64
    token_dim: int = 128      # D, the width of SeTok's tokens
    sprite_size: int = 16     # S: each token's sprite is S x S cells
    sprite_range: float = 3.0  # R: the sprite spans centre +- R spreads (a disc of radius r has spread r/2)
    dim: int = 256            # hidden width of the token -> sprite MLP
    sharpness: float = 10.0   # alpha logit = sharpness * the sprite's alpha channel (see forward)


def pixel_coords(n):
    """Centres of an n x n grid in [-1, 1] image units, (x, y), row-major. -> (n*n, 2)"""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1                        # (n,)
    y, x = torch.meshgrid(c, c, indexing='ij')                                           # (n, n)
    return torch.stack([x, y], -1).view(n * n, 2)


def cluster_geometry(labels, grid, K):
    """Each cluster's centroid and spread (std, at least half a patch) in [-1, 1] image units, from
    its patches. labels (B, N) -> centre (B, K, 2), spread (B, K, 2). Empty slots get 0 and 1/grid."""
    xy = pixel_coords(grid).to(labels.device)                                            # (N, 2)
    onehot = F.one_hot(labels, K).float()                                                # (B, N, K)
    n = onehot.sum(1).clamp_min(1)[..., None]                                            # (B, K, 1)
    mean = onehot.transpose(1, 2) @ xy / n                                               # (B, K, 2)
    var = onehot.transpose(1, 2) @ xy ** 2 / n - mean ** 2
    return mean, var.clamp_min(0).sqrt().clamp_min(1.0 / grid)


def lookup_weights(uv, S):
    """Bilinear interpolation as weights: uv (..., n) coordinates in [-1, 1] sprite units -> (..., n, S),
    the weight of each of the S sprite cells, exactly what F.grid_sample(mode='bilinear',
    padding_mode='border', align_corners=False) gives. Cell j has its centre at -1 + (2j + 1) / S;
    a coordinate at fractional cell index i takes weight max(0, 1 - |i - j|) from cell j (the two
    nearest cells, 1 - frac and frac); outside the sprite the index is clamped, so the border repeats.
    Because a weight is a matrix entry, the lookup of a whole sprite is a matmul."""
    i = (((uv + 1) * S - 1) / 2).clamp(0, S - 1)                                       # (..., n) cell index
    return (1 - (i[..., None] - torch.arange(S, device=uv.device)).abs()).clamp_min(0)   # (..., n, S)


class Detokenizer(nn.Module):
    def __init__(self, cfg: DetokConfig):
        super().__init__()
        self.cfg = cfg
        c = pixel_coords(cfg.image_size)[:cfg.image_size, 0]                             # (W,) column centres = row centres
        self.register_buffer('coord', c[:, None].expand(-1, 2).contiguous(), persistent=False)   # (H, 2): (x of column i, y of row i)
        self.geo = nn.Linear(cfg.token_dim, 4)                  # -> centre (2), log spread (2)
        self.sprite = MLP(cfg.token_dim, cfg.dim, 4 * cfg.sprite_size ** 2)   # -> S*S colours (3) + alpha logit (1)

    def geometry(self, tokens):
        """tokens (B, K, D) -> centre (B, K, 2) in [-1, 1], spread (B, K, 2) > 0."""
        with torch.autocast(tokens.device.type, enabled=False):                          # as forward
            g = self.geo(tokens.float())
        return torch.tanh(g[..., :2]), g[..., 2:].clamp(-6, 2).exp()

    def forward(self, tokens, token_mask):
        # float32 under autocast too: the alpha logits are steep (sharpness) and the frames set where
        # every edge falls; bf16's 8-bit mantissa would move both. The MLP is small, the pixel work memory-bound.
        with torch.autocast(tokens.device.type, enabled=False):
            return self.render(tokens.float(), token_mask)

    def render(self, tokens, token_mask):
        B, K, _ = tokens.shape
        H, S = self.cfg.image_size, self.cfg.sprite_size
        centre, spread = self.geometry(tokens)                                           # (B, K, 2) x2
        sprites = self.sprite(tokens).view(B, K, 4, S, S)                                # (B, K, 4, S, S) rows y, cols x
        # every pixel column (x) and row (y) in every token's frame: [-1, 1] spans the sprite
        uv = (self.coord - centre[:, :, None]) / (self.cfg.sprite_range * spread[:, :, None])  # (B, K, H, 2)
        wx, wy = lookup_weights(uv, S).unbind(3)                                         # (B, K, H, S) x2
        # the frame is axis-aligned, so the bilinear lookup is separable: rows, then columns. Colours and
        # alpha are looked up apart, so neither backward has to scatter into the other's slice.
        look = lambda sp: wy[:, :, None] @ sp @ wx[:, :, None].transpose(-1, -2)        # (B, K, c, S, S) -> (B, K, c, H, W)
        colour, a = look(sprites[:, :, :3]), look(sprites[:, :, 3:])[:, :, 0]            # (B, K, 3, H, W), (B, K, H, W)
        # A hard edge needs alpha logits that jump by ~10 between neighbouring cells. Adam moves every
        # weight at about the same rate whatever its gradient, so un-scaled logits take thousands of
        # steps to grow that steep (the edges stay soft); the gain makes them steep from the start.
        logit = self.cfg.sharpness * a - spread.log().sum(-1)[..., None, None]           # (B, K, H, W) smaller wins
        logit = logit.masked_fill(~token_mask[..., None, None], float('-inf'))
        alpha = logit.softmax(1)                                                         # over tokens
        return (alpha[:, :, None] * colour).sum(1) + 0.5                                 # (B, 3, H, W)

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


# -----------------------------------------------------------------------------
# What train_setok.py trains

class Tokenizer(nn.Module):
    """Everything train_setok.py trains, in one module so that DDP and torch.compile see one graph:
    SeTok, this detokenizer and the concept text encoder, and their loss
        recon_weight * reconstruction + contrast_weight * contrastive + geo_weight * geometry.
    cfg: train_setok.py's settings (text_dim, text_depth, n_head, concept_len and the loss weights);
    pad_id: the text tokenizer's pad id, which the concept ids are padded with."""

    def __init__(self, setok_cfg, detok_cfg, vocab_size, pad_id, cfg):
        super().__init__()
        self.setok = SeTok(setok_cfg)
        self.detok = Detokenizer(detok_cfg)
        self.text = TextEncoder(vocab_size, cfg['text_dim'], cfg['text_depth'], cfg['n_head'], setok_cfg.token_dim,
                                pad_id, max_len=cfg['concept_len'])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # CLIP's init, temperature 0.07
        self.w = (cfg['recon_weight'], cfg['contrast_weight'], cfg['grad_weight'], cfg['geo_weight'])

    def forward(self, img, concept_ids, concept_valid):
        tokens, token_mask, labels = self.setok(img)                        # (B,K,D), (B,K), (B,N)
        recon = self.detok(tokens, token_mask)                              # (B,3,H,W)
        rec_loss, mse = detok_loss(recon.float(), img, self.w[2])
        geo_loss = self.detok.geometry_loss(tokens, token_mask, labels, self.setok.grid)
        B, P, L = concept_ids.shape
        concepts = self.text(concept_ids.view(B * P, L)).view(B, P, -1)     # (B,P,D)
        # in-batch negatives come from every DDP rank (identity on one process)
        con_loss = concept_contrastive_loss(gather_all(tokens), gather_all(token_mask, grad=False),
                                            gather_all(concepts), gather_all(concept_ids, grad=False),
                                            gather_all(concept_valid, grad=False), self.logit_scale)
        loss = self.w[0] * rec_loss + self.w[1] * con_loss + self.w[3] * geo_loss
        return loss, {'mse': mse.detach(), 'contrast': con_loss.detach(), 'geo': geo_loss.detach(), 'tokens': token_mask.sum(1).float().mean()}
