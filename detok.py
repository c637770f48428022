"""
The detokenizer: from a variable-length set of SeTok tokens back to pixels.

    tokens (B, K, D), token_mask (B, K)
      -> one learnable query per output patch, plus a 2D position embedding   q (B, M, C)
      -> blocks of [self-attention among queries, cross-attention to the real tokens, MLP]
      -> linear head to p*p*3 pixel values per query                         (B, M, p*p*3)
      -> unpatchify                                                          (B, 3, H, W)

The queries cannot see the clustering, only the tokens: everything about an object's shape, size,
colour and place must be carried by its token. That is what makes the reconstruction loss a
training signal for SeTok.

Loss (detok_loss): mean squared error on pixels (what PSNR measures) plus an L1 loss on the
horizontal and vertical finite differences of the image. The gradient term is free (no pretrained
network such as LPIPS, which we cannot download here) and penalises blurred edges much more than
flat regions, which is exactly where a pure L2 loss is content with a blurry average.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from setok import Block, pos_embed_2d


@dataclass
class DetokConfig:
    image_size: int = 64
    patch_size: int = 4       # output patch size (independent of the encoder's)
    token_dim: int = 128      # D, the width of SeTok's tokens
    dim: int = 128
    depth: int = 4
    n_head: int = 4


class Detokenizer(nn.Module):
    def __init__(self, cfg: DetokConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.queries = nn.Parameter(torch.randn(self.grid ** 2, cfg.dim) * 0.02)
        self.register_buffer('pos', pos_embed_2d(self.grid, self.grid, cfg.dim), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.n_head, ctx_dim=cfg.token_dim) for _ in range(cfg.depth)])
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.patch_size ** 2 * 3)

    def forward(self, tokens, token_mask):
        B, p, g = tokens.shape[0], self.cfg.patch_size, self.grid
        q = (self.queries + self.pos).expand(B, -1, -1)                      # (B, M, C), M = g*g
        for blk in self.blocks:
            q = blk(q, ctx=tokens, ctx_mask=token_mask[:, None, None, :])   # real tokens only
        x = self.head(self.ln(q))                                           # (B, M, p*p*3)
        x = x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)              # (B, 3, g, p, g, p)
        return x.reshape(B, 3, g * p, g * p) + 0.5                          # (B, 3, H, W)


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
    from common import load_checkpoint
    from setok import SeTok, SeTokConfig
    ck = load_checkpoint(path, kind='setok', what='SeTok checkpoint')
    setok = SeTok(SeTokConfig(**{**ck['setok_config'], **overrides}))
    detok = Detokenizer(DetokConfig(**ck['detok_config']))
    sd = ck['model']
    setok.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith('setok.')})
    detok.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith('detok.')})
    return setok.to(device).eval(), detok.to(device).eval(), ck
