"""
SETOKIM: a GPT that reads AND writes SeTok's visual tokens, and a mask decoder for referring
segmentation (section 4 of the paper). Read this file top to bottom; it is the tutorial.

Every conversation becomes ONE token sequence, text and images interleaved (LLaVA's template with
the world's special tokens). K, the number of tokens of an image, is that image's own SeTok count:

    [USER] [Img] v_1 .. v_K [/Img] How many red objects are there? [ASSISTANT] 2 [eos]
    [USER] Generate an image: a large red circle at the top left [ASSISTANT] [Img] v_1 .. v_K [/Img] [eos]
    [USER] [Img] v_1 .. v_K [/Img] Make the red circle blue. [ASSISTANT] [Img] w_1 .. w_J [/Img] [eos]
    [USER] [Img] v_1 .. v_K [/Img] Segment the small green triangle. [ASSISTANT] [SEG] [eos]
                                                                     '------- the answer: the only
                                                                              positions with a loss
  * reading:  each visual token v_k (width D) goes through the input projector (MLP D -> C) and is
              scattered into the embedded sequence at its slot (a boolean mask, no loop);
  * writing:  inside an answer, after [Img], the hidden state at each position conditions a small
              per-token DIFFUSION head (section 4, MAR-style) that samples the NEXT visual token; in
              an edit a COPY head first points at one of the input image's tokens, and the token
              written is that one kept exactly, or that one plus a change the diffusion head samples
              (an edit keeps what it does not touch). gen_head='mse' regresses instead (MSE + cosine), the
              comparison. At the same positions the LM head predicts VIS, an extra vocabulary row
              meaning "a visual token follows", and [/Img] after the last one: the model decides how
              many tokens its image gets. detok.py renders them;
  * segmenting: the hidden state at the [SEG] token queries the input image's tokens (MaskDecoder);
              every token gets a logit and every patch the logit of the token it belongs to: SeTok's
              labels say which (a gather), then upsampling to pixels.

    loss = ce_weight * text CE (answers only)
         + reg_weight * (diffusion loss [or MSE + cos_weight * (1 - cos)] + copy_weight * (pointer CE + keep BCE))
         + mask_weight * (BCE + dice_weight * dice)          each sample uses the terms its data has
         + (rope2d) pos_head's squared error on every visual token's centroid (where a written token sits)

The ids of the special tokens ([Img], [/Img], [SEG], ...) come from the text tokenizer (data/text.py)
through GPTConfig. Sections: 1) GPTConfig, GPT  2) sequences: SeTok tokens in reading order, and the
batch the model reads (data/batch.py builds it)  3) MaskDecoder  4) writing visual tokens: the diffusion
head, the copy head  5) SETOKIM: embedding, loss, generation with a KV cache, segmentation.
Checkpoints load through checkpoint.load_setokim.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from setok import MLP, Block, Linear, cluster_centroids, pos_embed_2d

# -----------------------------------------------------------------------------
# 1) The LLM: a nanoGPT-like decoder, from scratch, built from setok.Block.
#
# Positions (GPTConfig.pos_emb, one of POS_EMBS):
#   'learned'  GPT-2's: a learned absolute embedding per place in the sequence, added to the input. An
#              image's tokens are K places in reading order, so "is A left of B?" must be answered from
#              WHAT the tokens are (SeTok's tokens carry their position inside their features).
#   'rope2d'   rotary positions in 2D for visual tokens (M-RoPE, Qwen2-VL): every position has three
#              coordinates (t, y, x), and each attention head's d/2 rotation pairs are split in three
#              sections (rope_freqs), turned by t, y and x. A query and a key then score by their
#              RELATIVE coordinates only (setok.rotate). Text at place i is (i, i, i): plain 1D RoPE.
#              A visual token at place i, in an image whose first token is at place s, is
#              (i, s + row, s + column) of its cluster's centroid (patch units): t keeps the reading
#              order (the k-th token written knows it is the k-th), y and x lay the image out in the
#              plane, and "left of" is a difference of x that every head can measure directly.
#              Written tokens need a position when they are read back: the model
#              predicts it from the token it wrote (SETOKIM.pos_head, section 5).
#   'learned+rope2d'  both: the table tells every position its place in the sequence (in its residual
#              stream, where the heads that write read it), and the rotation compares positions in attention.
# Either way a position's place is the number of real tokens before it in its conversation, so padding
# (batched generation, left-padded) and packing change nothing, and the KV cache needs no bookkeeping
# beyond the place of the newest token (and, for rope2d, a visual token's centroid and rank in its image).

POS_EMBS = ('learned', 'rope2d', 'learned+rope2d')   # the last: both, the table added and the rotation


def pos_emb_error(pos_emb, gpt2=False):
    """The one-line error for a pos_emb setting (gpt2: GPT-2's weights are loaded), or None."""
    if pos_emb not in POS_EMBS:
        return f"pos_emb={pos_emb}: expected {', '.join(POS_EMBS)}"
    if gpt2 and pos_emb != 'learned':
        return f"pos_emb={pos_emb}: GPT-2's weights come with a learned position table; use pos_emb=learned"
    return None


def rope_freqs(head_dim, base=100.0):
    """rope2d's rotation pairs of one head: which coordinate each pair turns by (0 = t, 1 = y, 2 = x)
    and its frequency, both (head_dim // 2,). Three sections (y and x get a third each, t the rest),
    each geometric from 1 down to 1/base radians per unit: the slowest turns 0.16 rad across the 16
    patches of an image side, so the centroid differences inside an image stay distinct (along t it
    comes round once every 628 places, longer than config=small's sequences)."""
    assert head_dim % 2 == 0 and head_dim >= 6, f"rope2d needs an even head width of at least 6, got {head_dim}"
    n = head_dim // 2 // 3
    sizes = (head_dim // 2 - 2 * n, n, n)                                  # t, y, x
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))    # (d/2,)
    freqs = torch.cat([base ** (-torch.arange(m) / max(1, m - 1)) for m in sizes])
    return axis, freqs


def rope_angles(coords, axis, freqs):
    """coords (B, T, 3) float (t, y, x) -> (cos, sin), each (B, 1, T, d/2): pair i turns by coordinate
    axis[i] times freqs[i]."""
    ang = (coords[..., axis] * freqs)[:, None]                              # (B, 1, T, d/2)
    return ang.cos(), ang.sin()


def since_start(start):
    """start (B, T) bool, True where a run begins -> (B, T) long: each position's distance from the
    last start at or before it (from column 0 before the first): a running max of the starts' columns."""
    j = torch.arange(start.shape[1], device=start.device).expand_as(start)
    return j - torch.where(start, j, 0).cummax(1).values


def image_offsets(vis_mask, vis_pos):
    """What rope2d adds to the place i of every position (GPT.forward): vis_mask (B, T) visual slots,
    vis_pos (M, 2) their centroids (row, column; row-major order over the slots) -> (B, T, 3) float.
    Text: (0, 0, 0), so (i, i, i). The k-th token of an image (k = 0, 1, ..): (0, row - k, column - k),
    so (i, s + row, s + column) with s = i - k the place of its image's first token."""
    B, T = vis_mask.shape
    first = vis_mask & ~F.pad(vis_mask[:, :-1], (1, 0), value=False)       # (B, T) an image's first token
    k = since_start(first).float()                                          # (B, T) rank inside its image
    yx = torch.zeros(B, T, 2, device=vis_mask.device).index_put((vis_mask,), vis_pos.float())
    off = F.pad(yx - k[..., None], (1, 0))                                  # (B, T, 3)
    return torch.where(vis_mask[..., None], off, 0.0)


@dataclass
class GPTConfig:
    vocab_size: int = 257      # text vocabulary + 1: the last row is VIS ("a visual token follows")
    block_size: int = 256      # the longest sequence (and the rows of the learned position table)
    pos_emb: str = 'learned'   # one of POS_EMBS (section 1)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 192          # C
    # the multimodal parts
    token_dim: int = 128       # D, the width of SeTok's tokens
    grid: int = 16             # SeTok's patch grid side: labels are (B, grid*grid)
    image_size: int = 64
    mask_dim: int = 128        # mask decoder width
    mask_depth: int = 2        # mask decoder layers
    mask_n_head: int = 4
    mask_refine: bool = True   # a per-patch correction on top of the exact label gather
    # writing images (section 5): how each written visual token is made
    gen_head: str = 'diffusion'  # 'diffusion': sampled by the per-token diffusion head | 'mse': regressed
    diff_width: int = 256      # the diffusion head's MLP width
    diff_depth: int = 3        # its residual blocks
    diff_mean: bool = True     # diffuse the residual around a regressed mean (DiffusionHead)
    copy_head: bool = True     # an edit's written token is an input token, kept or changed (section 4b)
    # ids of the text tokenizer's special tokens, used while generating: always set from the tokenizer
    # (GPTConfig.for_tokenizer); -1 = not set
    img_id: int = -1
    img_end_id: int = -1
    seg_id: int = -1
    eos_id: int = -1
    pad_id: int = -1

    @property
    def rope(self):
        return 'rope2d' in self.pos_emb

    @property
    def learned_pos(self):
        return 'learned' in self.pos_emb

    @property
    def vis_id(self):
        return self.vocab_size - 1

    @classmethod
    def for_tokenizer(cls, tok, **fields):
        """A GPTConfig whose vocabulary and special-token ids are the text tokenizer's (data/text.py),
        plus one row for VIS."""
        return cls(vocab_size=tok.vocab_size + 1, img_id=tok.img, img_end_id=tok.img_end, seg_id=tok.seg,
                   eos_id=tok.eos, pad_id=tok.pad, **fields)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        assert cfg.pos_emb in POS_EMBS, f"GPTConfig: pos_emb={cfg.pos_emb!r}, expected one of {', '.join(POS_EMBS)}"
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.learned_pos:
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.rope:
            axis, freqs = rope_freqs(cfg.n_embd // cfg.n_head)
            self.register_buffer('rope_axis', axis, persistent=False)
            self.register_buffer('rope_freqs', freqs, persistent=False)
        self.blocks = nn.ModuleList([Block(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight                  # weight tying (GPT-2, nanoGPT)
        # GPT-2's init: N(0, 0.02), and the residual projections scaled by 1/sqrt(2 * n_layer)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith('attn.proj.weight') or name.endswith('mlp.out.weight'):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, x, real, caches=None, doc=None, offsets=None):
        """x (B, T, C): input embeddings of the T newest positions (text ids embedded, visual tokens
        scattered in: SETOKIM.embed). real (B, Ta) bool over ALL positions so far, cached ones first
        (Ta = T without a cache): True for real tokens, False for padding.
        caches: one dict per block (setok.Attention's KV cache), filled and extended in place.
        doc (B, T) long, training batches only (collate; no cache): which conversation each position
        belongs to (-1: padding). A position then sees only its own conversation, and positions count
        from each conversation's first token, so several conversations may share a row (pack_rows).
        offsets (B, T, 3): rope2d's coordinates minus the place (image_offsets); None: text only.
        Returns the final hidden states (B, T, C) (after ln_f; lm_head turns them into logits)."""
        B, T, _ = x.shape
        Ta = real.shape[1]
        qi = torch.arange(Ta - T, Ta, device=x.device)[:, None]             # (T, 1) query positions
        kj = torch.arange(Ta, device=x.device)[None, :]                     # (1, Ta) key positions
        if doc is None:
            pos = (real.long().cumsum(1) - 1).clamp(min=0)[:, Ta - T:]      # (B, T) real tokens before
            # causal + padding: query i may see key j <= i that is a real token; every query also sees
            # itself, so a padding row is never all-masked (that would give NaNs that leak into the sums)
            mask = (kj <= qi) & (real[:, None, :] | (kj == qi))             # (B, T, Ta)
        else:
            new = F.pad(doc[:, 1:] != doc[:, :-1], (1, 0), value=True)      # (B, T) a conversation starts
            pos = since_start(new)                                          # (B, T) places since its start
            mask = (kj <= qi) & (doc[:, None, :] == doc[:, :, None])        # (B, T, T) causal, same conversation
        if Ta > self.cfg.block_size:       # (only then can a position overflow; no device sync otherwise)
            assert int(pos.max()) < self.cfg.block_size, f"sequence longer than block_size={self.cfg.block_size}"
        rope = None
        if self.cfg.learned_pos:
            x = x + self.wpe(pos)
        if self.cfg.rope:
            coords = pos[..., None].float() + (0.0 if offsets is None else offsets)     # (B, T, 3) t, y, x
            rope = rope_angles(coords, self.rope_axis, self.rope_freqs)
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask=mask[:, None], cache=None if caches is None else caches[i], rope=rope)
        return self.ln_f(x)                                                 # (B, T, C)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.cfg.learned_pos else n

    def estimate_mfu(self, tokens_per_sec, seq_len, peak_flops=312e12):
        """Model flops utilisation (nanoGPT's estimate, from the PaLM paper's appendix B): 6N flops per
        token for the weights (forward + backward) plus 12 * L * H * Q * T for attention.
        peak_flops: the device's bf16 peak (A100: 312e12)."""
        c = self.cfg
        flops_per_token = 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * seq_len
        return flops_per_token * tokens_per_sec / peak_flops


# GPT-2's weights load into this GPT through pretrained.py (train_setokim.py init_from=gpt2-local).

# -----------------------------------------------------------------------------
# 2) Sequences.
#
# 2a) SeTok's tokens are a SET: the merger's inter-cluster transformer has no token positions and
# the detokenizer draws each as its own sprite, so their order is free, but an LLM reads and writes
# a SEQUENCE. We put every image's tokens in READING ORDER: by the centroid of each token's cluster,
# top to bottom in `bands` horizontal bands, left to right inside a band (the order the world's
# captions list objects in), after the GROUND: a token whose cluster holds more than half of the
# patches (the background, when it is one piece) is read first, so the k-th object of a caption is the
# (k+1)-th token wherever the background's centroid falls. The labels are renumbered with the same
# permutation, so "patch n belongs to token labels[n]" stays true. Grid tokens keep their raster order.

def reading_order(tokens, token_mask, labels, grid, bands=3):
    """tokens (B,K,D), token_mask (B,K), labels (B,N) -> the same three, tokens permuted per image
    into reading order (padding slots stay last) and labels renumbered to match."""
    B, K, D = tokens.shape
    cen, count = cluster_centroids(labels, grid, K)                         # (B, K, 2) row, column; (B, K)
    cy, cx = cen.unbind(-1)
    band = (cy * bands / grid).floor().clamp(max=bands - 1)
    key = torch.where(2 * count > grid * grid, -1.0, band * grid + cx)     # the ground first
    key = torch.where(token_mask, key, float('inf'))
    order = torch.sort(key, dim=1, stable=True).indices                     # (B, K) new slot -> old
    new_of_old = torch.empty_like(order).scatter_(1, order, torch.arange(K, device=tokens.device).expand(B, K))
    return (tokens.gather(1, order[..., None].expand(B, K, D)), token_mask.gather(1, order),
            new_of_old.gather(1, labels.long()))                            # labels: old id -> new id


@torch.no_grad()
def setok_tokens(setok, img, ctx):
    """SeTok on images (b, 3, H, W) in [0, 1] -> what SETOKIM reads, on the CPU: the real tokens in
    reading order, image after image (sum of counts, D) float, each image's token count (b,), and the
    patch labels (b, N) int16. The token cache and the streamed batches of train_setokim.py call it."""
    with ctx:
        t, m, lab = setok(img)                                              # (b,K,D), (b,K), (b,N)
    t, m, lab = reading_order(t.float(), m, lab, setok.grid)
    return t[m].cpu(), m.sum(1).cpu(), lab.short().cpu()


# 2b) From conversations to batches (data/batch.py). Tokenising is string work, done once per run for
# the whole dataset: data.batch.encode_conversation writes each conversation as flat per-position
# lists (ids with VIS at visual slots, the bank row of each visual slot, answer and written-image
# flags), pack() puts a split's conversations end to end in flat arrays, and collate() gathers a
# batch from them, vectorised. What the model reads is a dict of tensors (B' rows of T positions):
#   idx (B',T) ids, pad on padding         real (B',T) bool
#   doc (B',T) the conversation of each position (-1 padding): several may share a row (packing)
#   vis_mask (B',T) visual slots           vis (M, D) their SeTok tokens, in row-major order
#   vis_pos (M, 2) their centroids (row, column) in patch units: rope2d's positions
#   targets (B',T) next id where it is an answer token, else -1
#   reg_mask (B',T) positions whose NEXT token is a written visual token, reg_target (R, D) that token
#   seg_rows, seg_pos (S,) where each [SEG] answer is; seg_tokens (S,K,D), seg_token_mask (S,K),
#   seg_labels (S,N), seg_gt (S,H,W): the input image of each, for the mask decoder
# Generation prompts (collate(..., prompt_extra=...)) carry idx, real, vis_mask, vis and vis_pos only,
# LEFT-padded.


# -----------------------------------------------------------------------------
# 3) The mask decoder (referring segmentation).
#
# The tokens know WHERE their concepts are (SeTok's position embedding goes in before pooling), the
# [SEG] hidden state knows WHICH concept is asked for. A few transformer layers over [query, tokens]
# let the query read the tokens and the tokens read the query and each other; then a dot product of
# each token with the query gives one logit per token.
# SeTok's labels map them back to patches EXACTLY: labels[b, n] is the token that patch n was merged
# into, so patch n gets that token's logit (tokens_to_patches: a gather). A cluster is all in or all
# out; the optional refinement adds a per-patch term (from the patch's position and its token,
# zero at init) that can trim a cluster that spills over its object. Bilinear upsampling to pixels.

def tokens_to_patches(token_logits, labels):
    """token_logits (B, K), labels (B, N) long -> (B, N): patch n gets the logit of token labels[n]."""
    return token_logits.gather(1, labels)


class MaskDecoder(nn.Module):
    def __init__(self, token_dim, query_dim, dim, depth, n_head, grid, image_size, refine=True):
        super().__init__()
        self.grid, self.image_size, self.dim = grid, image_size, dim
        self.tok_in, self.q_in = Linear(token_dim, dim), Linear(query_dim, dim)
        self.blocks = nn.ModuleList([Block(dim, n_head) for _ in range(depth)])
        self.ln_t, self.ln_q = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.refine = MLP(dim) if refine else None
        if refine:
            self.register_buffer('pos', pos_embed_2d(grid, grid, dim), persistent=False)
            nn.init.zeros_(self.refine.out.weight)                          # starts as the exact gather
            nn.init.zeros_(self.refine.out.bias)

    def forward(self, tokens, token_mask, labels, query):
        """tokens (B,K,D) of the input image, token_mask (B,K), labels (B,N) long, query (B,C) the LLM
        hidden state at [SEG] -> pixel logits (B,H,W), patch logits (B,N), token logits (B,K)."""
        B, g = tokens.shape[0], self.grid
        # one sequence [query, token_1 .. token_K]: the query reads the tokens, the tokens read the
        # query and each other (SAM's two-way attention, folded into plain self-attention)
        x = torch.cat([self.q_in(query)[:, None], self.tok_in(tokens)], 1)  # (B, 1+K, c)
        keys = F.pad(token_mask, (1, 0), value=True)[:, None, None, :]      # (B, 1, 1, 1+K) real keys
        for blk in self.blocks:
            x = blk(x, mask=keys)
        q, t = self.ln_q(x[:, :1]), self.ln_t(x[:, 1:])                     # (B,1,c), (B,K,c)
        token_logits = (t @ q.transpose(1, 2))[..., 0] / math.sqrt(self.dim)    # (B, K)
        patch_logits = tokens_to_patches(token_logits, labels)              # (B, N) exact
        if self.refine is not None:
            f = t.gather(1, labels[..., None].expand(-1, -1, t.shape[-1])) + self.pos  # (B, N, c)
            patch_logits = patch_logits + (self.refine(f) @ q.transpose(1, 2))[..., 0] / math.sqrt(self.dim)
        pix = F.interpolate(patch_logits.view(B, 1, g, g).float(), size=(self.image_size, self.image_size),
                            mode='bilinear', align_corners=False)[:, 0]     # (B, H, W)
        return pix, patch_logits, token_logits


def mask_loss(pix_logits, gt, dice_weight=1.0):
    """Per sample (S,): pixel BCE + dice_weight * soft dice. pix_logits, gt (S, H, W)."""
    bce = F.binary_cross_entropy_with_logits(pix_logits, gt, reduction='none').flatten(1).mean(1)
    p, g = torch.sigmoid(pix_logits).flatten(1), gt.flatten(1)
    dice = 1 - (2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)
    return bce + dice_weight * dice


# -----------------------------------------------------------------------------
# 4) Writing visual tokens: a per-token diffusion head (MAR: Li et al. 2024, "Autoregressive Image
# Generation without Vector Quantization"), and a copy head for editing.
#
# Why not regression. A caption leaves freedom: where in its cell an object sits, what the background
# is. So the token that comes next is a DISTRIBUTION, and squared error is minimised by its MEAN: a
# blend of every plausible token, which the detokenizer draws as a soft blob where each candidate
# object would be (gen_head='mse' keeps that head for the comparison). The diffusion head instead
# learns to SAMPLE one token from p(token | hidden state), with a small MLP that removes noise:
#
#   noise   continuous time t in [0, 1] with the cosine schedule abar(t) = cos^2(pi t / 2):
#           x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps,  x_0 the clean (normalised) token, eps ~ N(0, I);
#           t = 0 is the token itself, t = 1 pure noise
#   target  v = sqrt(abar) eps - sqrt(1 - abar) x_0 ("v-prediction"). From v and x_t both follow:
#           x_0 = sqrt(abar) x_t - sqrt(1 - abar) v,  eps = sqrt(1 - abar) x_t + sqrt(abar) v,
#           and unlike predicting eps it stays well posed at t = 1, where x_t holds nothing of x_0
#   network an MLP over x_t whose every block is modulated (AdaLN: a shift, a scale and a gate from
#           the condition) by the LLM's hidden state at the written position plus an embedding of t
#   loss    ||v_hat - v||^2 per token, averaged over `draws` draws of (t, eps) of the same token: the
#           GPT runs once per token, the cheap head several times (MAR's diffusion_batch_mul)
#   sample  DDIM over `steps` evenly spaced times from 1 to 0 (deterministic: each step moves x_t along
#           the predicted noise to t' < t), from x_1 ~ N(0, temperature^2 I). temperature 1 is a draw
#           from what the head learned; below 1 it starts nearer the centre of the noise, the
#           diffusion analogue of a lower softmax temperature (fewer rare tokens, less variety); the
#           starting noise is all that makes two samples differ
#   mean    diff_mean (the default): the head diffuses the RESIDUAL x_0 - mu(c) around a mean mu(c)
#           regressed by MSE, and a sample is mu(c) + the sampled residual. The mean learns what the
#           condition says (which object, roughly where) as fast as regression does; the diffusion adds
#           only what the condition leaves open, and sharpens. Without it (MAR's head) the head must
#           learn to read its condition through the noise, which takes far more steps than the toy has
#   guidance for `cond_drop` of the training tokens the condition is replaced by a learned null vector,
#           so the same head also knows p(token) with no prompt; sampling then follows
#           v = v_null + cfg * (v_cond - v_null) (classifier-free guidance; cfg = 1: none)

def time_features(t, dim=64):
    """t (R,) in [0, 1] -> (R, dim) sinusoidal features (the transformer's position code, of 1000 t)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = 1000 * t.float()[:, None] * freqs[None]
    return torch.cat([a.sin(), a.cos()], -1)


class AdaLNBlock(nn.Module):
    """x + gate * mlp(ln(x) * (1 + scale) + shift), with (shift, scale, gate) from the condition e.
    The modulation starts at zero, so every block starts as the identity (DiT's adaLN-zero)."""

    def __init__(self, width):
        super().__init__()
        self.ln = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = MLP(width, width, width)
        self.mod = Linear(width, 3 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x, e):
        shift, scale, gate = self.mod(F.silu(e)).chunk(3, -1)
        return x + gate * self.mlp(self.ln(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """mean=True: the head diffuses the token's RESIDUAL around a regressed mean mu(c) (an MLP trained
    by MSE, gen_head='mse''s projector), and a sample is mu(c) + the sampled residual. The mean carries
    what the condition says (which object, roughly where), the diffusion only what it leaves open, so a
    head that has not yet learned to read its condition still writes near the right object."""

    def __init__(self, token_dim, cond_dim, width, depth, mean=False):
        super().__init__()
        self.mean = MLP(cond_dim, cond_dim, token_dim) if mean else None
        self.x_in = Linear(token_dim, width)
        self.t_in = MLP(64, width, width)
        self.c_in = Linear(cond_dim, width)
        self.null = nn.Parameter(torch.zeros(cond_dim))                    # "no condition" (guidance)
        self.blocks = nn.ModuleList([AdaLNBlock(width) for _ in range(depth)])
        self.ln_out = nn.LayerNorm(width, elementwise_affine=False)
        self.mod_out = Linear(width, 2 * width)
        self.out = Linear(width, token_dim)
        for m in (self.mod_out, self.out):                                 # predicts v = 0 at init
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x_t, t, c):
        """x_t (R, D) noisy tokens, t (R,) their times, c (R, C) conditions -> v_hat (R, D)."""
        dt = self.x_in.weight.dtype
        e = self.c_in(c.to(dt)) + self.t_in(time_features(t).to(dt))      # (R, w)
        h = self.x_in(x_t.to(dt))                                          # (R, w)
        for blk in self.blocks:
            h = blk(h, e)
        shift, scale = self.mod_out(F.silu(e)).chunk(2, -1)
        return self.out(self.ln_out(h) * (1 + scale) + shift)              # (R, D)

    def loss(self, x0, c, draws=4, cond_drop=0.1, generator=None):
        """x0 (R, D) clean tokens, c (R, C) -> (R,) the v-loss of each token, averaged over its draws.
        generator: where the noise comes from (None: the global RNG, which checkpoints save)."""
        R, D = x0.shape
        reg = 0.0
        if self.mean is not None:                                          # the mean by MSE, the rest by diffusion
            mu = self.mean(c).float()                                      # (R, D)
            reg = (mu - x0).pow(2).mean(-1)
            x0 = x0 - mu.detach()
        x0, c = x0.repeat(draws, 1), c.repeat(draws, 1)                    # (draws*R, ...)
        drop = torch.rand(len(c), 1, device=c.device, generator=generator) < cond_drop
        c = torch.where(drop, self.null.to(c.dtype), c)
        t = torch.rand(len(x0), device=x0.device, generator=generator)
        a, s = alpha_sigma(t)                                              # (draws*R, 1) each
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        v_hat = self(a * x0 + s * eps, t, c).float()
        return (v_hat - (a * eps - s * x0)).pow(2).mean(-1).view(draws, R).mean(0) + reg

    @torch.no_grad()
    def sample(self, c, steps=50, temperature=1.0, cfg=1.0, generator=None):
        """c (R, C) conditions -> (R, D) sampled tokens (normalised space). generator: a torch.Generator
        on c's device for reproducible samples (None: the global one)."""
        R = len(c)
        x = temperature * torch.randn(R, self.out.out_features, device=c.device, generator=generator)   # x_1
        guide = cfg != 1.0
        if guide:                                                          # conditioned and null, one pass
            c = torch.cat([c, self.null.to(c.dtype).expand(R, -1)])
        ts = torch.linspace(1, 0, steps + 1, device=c.device)
        for i in range(steps):
            t = ts[i].expand(R)
            v = self(x.repeat(2, 1), t.repeat(2), c).float() if guide else self(x, t, c).float()
            if guide:
                v = v[R:] + cfg * (v[:R] - v[R:])
            a, s = alpha_sigma(ts[i])                                      # now: t
            a1, s1 = alpha_sigma(ts[i + 1])                                # next: t' < t
            x0, eps = a * x - s * v, s * x + a * v
            x = a1 * x0 + s1 * eps                                         # DDIM's step to t'
        return x if self.mean is None else x + self.mean(c[:R]).float()


def sampling_error(diff_steps, img_temperature, cfg_scale):
    """The first bad sampling setting of the diffusion head as 'name=value: expected ...', or ''
    (train_setokim.py and sample.py turn it into their one-line error)."""
    for name, value, ok, want in (('diff_steps', diff_steps, diff_steps >= 1, 'an integer >= 1'),
                                  ('img_temperature', img_temperature, img_temperature >= 0, '>= 0'),
                                  ('cfg_scale', cfg_scale, cfg_scale >= 0, '>= 0')):
        if not ok:
            return f"{name}={value}: expected {want}"
    return ''


def alpha_sigma(t):
    """The cosine schedule: sqrt(abar(t)) = cos(pi t / 2) and sqrt(1 - abar(t)) = sin(pi t / 2), as
    (..., 1) columns when t is a vector."""
    t = t[..., None] if t.dim() else t
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


# 4b) Copying and changing. An edit changes one object; every other token of the target is (nearly) a
# token of the source: the same object, drawn again. Sampling it anew would redraw it, a little off.
# And the edited object's new token is its old one with one thing changed: its colour, or its place.
# So in an edit every written token starts from a token of the input image (a pointer network,
# Vinyals et al. 2015): the hidden state at the written position scores every input visual slot of
# the same conversation (a query-key dot product), and the token written is
#     the pointed token b, exactly,           when the KEEP gate says so (a logit of h + copy_in(b))
#     b + the sampled change x_0,              otherwise: the writing head (diffusion or mse) writes
#                                             x_0 = token - b, conditioned on h + copy_in(b)
# Targets: the pointer's is the input token nearest the true one (mean squared difference per
# channel, normalised space); the gate's is "within copy_tau of it". A removed object is a slot the
# pointer never picks. Text-to-image has nothing to point at: b = 0 and the head writes the token.

def copy_candidates(b):
    """-> br, tr (R,): the row and position of each written token's hidden state (reg_mask), and cand
    (R, T) bool: the slots it may copy (visual slots that are read, not written, earlier in the same
    conversation)."""
    T = b['idx'].shape[1]
    written = F.pad(b['reg_mask'][:, :-1], (1, 0))                          # (B, T) slots of written tokens
    read = b['vis_mask'] & ~written                                         # (B, T) slots of input tokens
    br, tr = b['reg_mask'].nonzero(as_tuple=True)                           # (R,), (R,)
    cand = read[br] & (torch.arange(T, device=br.device)[None] < tr[:, None])   # (R, T)
    if b.get('doc') is not None:                                            # packed rows: own conversation only
        cand = cand & (b['doc'][br] == b['doc'][br, tr][:, None])
    return br, tr, cand


def copy_targets(b, vn, tgt, cands, tau):
    """vn (M, D) the batch's visual tokens (normalised, row-major slots), tgt (R, D) the written ones ->
    slot (R,): the nearest candidate slot (-1 where there is none: text-to-image), base (R, D): its
    token (0 where none), keep (R,) bool: within tau of it."""
    br, _, cand = cands
    R, T = cand.shape
    row = (b['vis_mask'].flatten().cumsum(0) - 1).view(b['vis_mask'].shape)   # (B, T) slot -> row of vn
    r, j = cand.nonzero(as_tuple=True)                                      # (P,) candidate pairs
    d = (tgt[r] - vn[row[br[r], j]]).pow(2).mean(-1)                        # (P,)
    dist = torch.full((R, T), float('inf'), device=tgt.device).index_put((r, j), d.float())
    best, slot = dist.min(1)                                                # (R,)
    has = cand.any(1)
    base = torch.where(has[:, None], vn[row[br, slot]].to(tgt.dtype), 0.0)   # (R, D)
    return torch.where(has, slot, -1), base, has & (best < tau)


# -----------------------------------------------------------------------------
# 5) SETOKIM: the GPT, the input projector, the writing heads, the mask decoder.

def sample_next(logits, temperature=0.0, top_k=None):
    """logits (B, V) -> ids (B,). temperature <= 0: greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        v = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < v, float('-inf'))
    return torch.multinomial(F.softmax(logits, -1), 1)[:, 0]


class SETOKIM(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        unset = [k for k in ('img_id', 'img_end_id', 'seg_id', 'eos_id', 'pad_id') if getattr(cfg, k) < 0]
        assert not unset, f"GPTConfig: {', '.join(unset)} not set; take them from the text tokenizer"
        assert cfg.gen_head in ('diffusion', 'mse'), f"GPTConfig: gen_head={cfg.gen_head!r}, expected diffusion or mse"
        self.cfg = cfg
        C, D = cfg.n_embd, cfg.token_dim
        self.gpt = GPT(cfg)
        self.in_proj = MLP(D, C, C)          # D -> C: SeTok tokens into the LLM (2 layers, GELU)
        if cfg.gen_head == 'diffusion':      # C -> D: the LLM's next visual token, sampled ...
            self.diff_head = DiffusionHead(D, C, cfg.diff_width, cfg.diff_depth, cfg.diff_mean)
        else:                                # ... or regressed
            self.out_proj = MLP(C, C, D)
        if cfg.copy_head:                    # pointing at an input token: query, keys; the pointed token
            # (no key bias: it would add the same score to every slot, which the softmax ignores)
            self.copy_q, self.copy_k = Linear(C, C), Linear(C, C, bias=False)
            self.copy_in, self.copy_keep = Linear(D, C), Linear(C, 1)
            nn.init.zeros_(self.copy_in.weight)   # into the head's condition; then keep it, or change it
        if cfg.rope:                         # D -> 2: where a token sits (its centroid / grid), for the
            self.pos_head = MLP(D, C, 2)     # tokens SETOKIM writes: they need a 2D position when read back
        self.mask_decoder = MaskDecoder(D, C, cfg.mask_dim, cfg.mask_depth, cfg.mask_n_head, cfg.grid,
                                        cfg.image_size, cfg.mask_refine)
        # SeTok's tokens are standardised per channel (statistics of the training images, set once by
        # train_setokim.py) so the regression works on a fixed scale whatever the SeTok checkpoint
        self.register_buffer('tok_mean', torch.zeros(D))
        self.register_buffer('tok_std', torch.ones(D))

    def normalize(self, v):
        return (v - self.tok_mean) / self.tok_std

    def denormalize(self, v):
        return v * self.tok_std + self.tok_mean

    def embed(self, idx, vis_mask, vis):
        """idx (B,T) ids, vis_mask (B,T) bool, vis (M,D) SeTok tokens of the M visual slots (row-major
        order) -> (B,T,C): text ids embedded, each visual slot replaced by in_proj(its token)."""
        x = self.gpt.wte(idx)                                               # (B, T, C)
        v = self.in_proj(self.normalize(vis))                               # (M, C)
        return x.index_put((vis_mask,), v.to(x.dtype))                      # scatter by the mask

    def offsets(self, b):
        """rope2d: the coordinates of b's positions minus their places (image_offsets), from the
        centroids of its visual tokens b['vis_pos'] (M, 2); learned positions: None."""
        return image_offsets(b['vis_mask'], b['vis_pos']) if self.cfg.rope else None

    def written_pos(self, v):
        """Normalised tokens v (..., D) -> the centroid (row, column) in patch units that pos_head
        predicts for them: the 2D position of a token SETOKIM wrote (its cluster is unknown)."""
        return self.pos_head(v).float() * self.cfg.grid

    def hidden(self, b, caches=None):
        return self.gpt(self.embed(b['idx'], b['vis_mask'], b['vis']), b['real'], caches, b.get('doc'), self.offsets(b))

    def copy_scores(self, h, hr, cands):
        """h (B,T,C) hidden states, hr (R,C) those of the written positions, cands (copy_candidates) ->
        (R, T) pointer logits: one per candidate slot, -inf elsewhere."""
        br, _, cand = cands
        r, j = cand.nonzero(as_tuple=True)
        s = (self.copy_q(hr)[r] * self.copy_k(h[br[r], j])).sum(-1) / math.sqrt(h.shape[-1])     # (P,)
        return torch.full(cand.shape, float('-inf'), device=h.device).index_put((r, j), s.float())

    def forward(self, b, norm=None, ce_weight=1.0, reg_weight=1.0, mask_weight=1.0, cos_weight=1.0, dice_weight=1.0,
                draws=4, cond_drop=0.1, copy_weight=1.0, copy_tau=0.1, generator=None):
        """b: a batch from collate. norm: (n_ce, n_reg, n_seg, n_vis) the counts each loss SUM is divided by
        (default: this batch's own, i.e. plain means; train_setokim.py passes the global batch's).
        draws, cond_drop, generator: the diffusion loss's (DiffusionHead.loss); copy_tau: the keep gate's
        target (copy_targets). Returns (loss, stats): the sums and counts of each term, detached."""
        h = self.hidden(b)                                                  # (B, T, C)
        # 1) text CE on answer tokens only; the LM head runs only where there is a target
        tm = b['targets'] >= 0
        ce = F.cross_entropy(self.gpt.lm_head(h[tm]).float(), b['targets'][tm], reduction='sum')
        # 2) writing: hidden at t -> the written visual token at t+1, in normalised space
        hr, tgt = h[b['reg_mask']], self.normalize(b['reg_target'])        # (R, C), (R, D)
        if self.cfg.copy_head:                                              # edits: point, then keep or change
            cands = copy_candidates(b)
            logits = self.copy_scores(h, hr, cands)                         # (R, T)
            slot, base, keep = copy_targets(b, self.normalize(b['vis']), tgt, cands, copy_tau)
            has = slot >= 0                                                 # (R,) an edit's token
            hr = hr + self.copy_in(base.to(hr.dtype))                       # the condition knows the pointed token
            tgt = tgt - base                                                # the head writes the change
            logits = torch.where(has[:, None], logits, 0.0)                # finite where there is nothing to point at
            copy = (F.cross_entropy(logits, slot.clamp_min(0), reduction='none') +
                    F.binary_cross_entropy_with_logits(self.copy_keep(hr)[:, 0].float(), keep.float(), reduction='none'))
        if self.cfg.gen_head == 'diffusion':
            per = self.diff_head.loss(tgt, hr, draws, cond_drop, generator)     # (R,)
        else:
            pred = self.out_proj(hr).float()                                # (R, D)
            cos = 1 - F.cosine_similarity(pred, tgt, dim=-1)                # no direction to a kept token's zero change
            per = (pred - tgt).pow(2).mean(-1) + cos_weight * (torch.where(keep, 0.0, cos) if self.cfg.copy_head else cos)
        if self.cfg.copy_head:
            per = per + copy_weight * torch.where(has, copy, 0.0)
        reg = per.sum()
        # 3) referring masks, from the [SEG] hidden state and the input image's tokens
        S = len(b['seg_rows'])
        if S:
            pix, _, _ = self.mask_decoder(self.normalize(b['seg_tokens']), b['seg_token_mask'], b['seg_labels'],
                                          h[b['seg_rows'], b['seg_pos']])
            msk = mask_loss(pix, b['seg_gt'], dice_weight).sum()
        else:
            msk = h.new_zeros((), dtype=torch.float32)
        # 4) rope2d: where each visual token sits (its centroid, in image sides), for every visual slot
        pos_loss = h.new_zeros((), dtype=torch.float32)
        if self.cfg.rope:
            err = (self.written_pos(self.normalize(b['vis'])) - b['vis_pos']) / self.cfg.grid   # (M, 2)
            pos_loss = err.pow(2).sum()                                     # () a sum, like the others
        counts = (int(tm.sum()), len(hr), S, len(b['vis']))
        n_ce, n_reg, n_seg, n_vis = norm if norm is not None else (max(1, n) for n in counts)
        loss = ce_weight * ce / n_ce + reg_weight * reg / n_reg + mask_weight * msk / n_seg + pos_loss / n_vis
        # every parameter takes part in every step, even when a term is absent from this batch (no
        # [SEG], no written image): DDP needs it, and AdamW then treats every step alike
        loss = loss + 0.0 * sum(p.view(-1)[0] for p in self.parameters())
        stats = {'ce': ce.detach(), 'reg': reg.detach(), 'mask': msk.detach(), 'pos': pos_loss.detach(),
                 'n_ce': counts[0], 'n_reg': counts[1], 'n_seg': counts[2], 'n_vis': counts[3]}
        return loss, stats

    @torch.no_grad()
    def generate(self, b, max_new_tokens, temperature=0.0, top_k=None, max_image_tokens=16, use_cache=True,
                 img_temperature=1.0, diff_steps=50, cfg_scale=1.0, generator=None):
        """Continue LEFT-padded prompts b (collate(..., prompt_extra=...)) for up to max_new_tokens.
        Text steps sample any id but VIS; after [Img] every step is either another visual token or
        [/Img]: the LM head decides, restricted to {VIS, [/Img]}, with at least 1 and at most
        max_image_tokens tokens. A visual token is sampled by the diffusion head (img_temperature,
        diff_steps, cfg_scale; generator: a torch.Generator for reproducible images) or regressed
        (gen_head='mse'); when the prompt holds an image, it is the copy head's pick among that image's
        tokens, kept or plus that sampled change (section 4b). It is fed back through in_proj (and under
        rope2d at the centroid pos_head predicts for it: written_pos). A
        prompt that ends in [Img] starts writing an image at once. Rows stop at [eos] (then pad).
        Returns ids (B, S) (VIS at visual tokens) and vis (B, S, D): the SeTok-space token at every
        step where ids == VIS (zeros elsewhere). use_cache=False recomputes the whole
        sequence each step (the reference the KV cache is tested against)."""
        c = self.cfg
        x, real, off = self.embed(b['idx'], b['vis_mask'], b['vis']), b['real'], self.offsets(b)
        B, Tp, _ = x.shape
        if max_new_tokens <= 0:
            return b['idx'][:, :0], x.new_zeros(B, 0, c.token_dim)
        caches = [dict() for _ in self.gpt.blocks] if use_cache else None
        hp = self.gpt(x, real, caches, offsets=off)                         # (B, Tp, C) the prompt
        h = hp[:, -1]                                                       # (B, C) last prompt position
        if c.copy_head:                                                     # what a written token may copy
            keys = self.copy_k(hp)                                          # (B, Tp, C)
            src = hp.new_zeros(B, Tp, c.token_dim).index_put((b['vis_mask'],), self.normalize(b['vis']).to(hp.dtype))
            has = b['vis_mask'].any(1)[:, None]                             # (B, 1) an edit: there is a source
        in_img = b['idx'][:, -1] == c.img_id                                # (B,) inside an image
        n_vis = torch.zeros(B, dtype=torch.long, device=x.device)           # tokens of the current image
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        ids, vis = [], []
        for _ in range(max_new_tokens):
            logits = self.gpt.lm_head(h).float()                            # (B, V)
            text = sample_next(logits.index_fill(1, torch.tensor([c.vis_id], device=x.device), float('-inf')),
                               temperature, top_k)
            more = sample_next(logits[:, [c.vis_id, c.img_end_id]], temperature) == 0   # VIS beats [/Img]
            more = (more | (n_vis == 0)) & (n_vis < max_image_tokens)
            nxt = torch.where(in_img, torch.where(more, c.vis_id, c.img_end_id), text)
            nxt = torch.where(done, c.pad_id, nxt)                          # (B,)
            is_vis = nxt == c.vis_id
            e = self.gpt.wte(nxt)                                           # (B, C)
            v = torch.zeros(B, c.token_dim, device=x.device)                # (B, D) normalised space
            if bool(is_vis.any()):
                hc, base, keep = h, 0.0, torch.zeros(B, 1, dtype=torch.bool, device=x.device)
                if c.copy_head:                                             # the pointer picks a source token
                    score = torch.einsum('bc,btc->bt', self.copy_q(h), keys).float() / math.sqrt(h.shape[-1])
                    pick = score.masked_fill(~b['vis_mask'], float('-inf')).argmax(1)                # (B,)
                    base = torch.where(has, src[torch.arange(B, device=x.device), pick].float(), 0.0)  # (B, D)
                    hc = h + self.copy_in(base.to(h.dtype))
                    keep = has & (self.copy_keep(hc) > 0)                   # (B, 1) kept exactly, or changed
                if c.gen_head == 'diffusion':
                    v = self.diff_head.sample(hc, diff_steps, img_temperature, cfg_scale, generator)
                else:
                    v = self.out_proj(hc).float()
                v = torch.where(keep, base, base + v)
                e = torch.where(is_vis[:, None], self.in_proj(v.to(x.dtype)).to(e.dtype), e)
            if off is not None:                                             # rope2d: where the new token sits
                yx = self.written_pos(v.to(x.dtype))                        # (B, 2) (v is 0 on text rows)
                o = F.pad(yx - n_vis[:, None].float(), (1, 0))             # (B, 3): (0, row - k, column - k)
                o = torch.where(is_vis[:, None], o, 0.0)[:, None]          # (B, 1, 3): text (0, 0, 0)
            ids.append(nxt)
            vis.append(torch.where(is_vis[:, None], self.denormalize(v), 0.0))
            n_vis = torch.where(is_vis, n_vis + 1, 0)
            in_img = is_vis | (nxt == c.img_id)
            done = done | (nxt == c.eos_id)
            if bool(done.all()):
                break
            real = F.pad(real, (0, 1), value=True)                          # (B, Ta + 1)
            if use_cache:
                h = self.gpt(e[:, None], real, caches, offsets=None if off is None else o)[:, -1]
            else:
                x = torch.cat([x, e[:, None]], 1)
                off = None if off is None else torch.cat([off, o], 1)
                h = self.gpt(x, real, offsets=off)[:, -1]
        return torch.stack(ids, 1), torch.stack(vis, 1)

    @torch.no_grad()
    def segment(self, b, img_tokens, token_mask, labels):
        """Prompts b that end in [SEG] (left-padded), the input images' tokens (S,K,D), token_mask
        (S,K), labels (S,N) -> pixel logits (S, H, W)."""
        h = self.hidden(b)[:, -1]                                           # (S, C) at [SEG]
        return self.mask_decoder(self.normalize(img_tokens), token_mask, labels, h)[0]


def visual_tokens(ids, vis, vis_id, K):
    """The first K generated visual tokens of every row -> tokens (B, K, D), token_mask (B, K), for
    the detokenizer. Vectorised: each visual step's slot is its rank among the row's visual steps."""
    B, S, D = vis.shape
    is_vis = ids == vis_id                                                  # (B, S)
    slot = is_vis.long().cumsum(1) - 1                                      # (B, S)
    keep = is_vis & (slot < K)
    r, s = keep.nonzero(as_tuple=True)
    tokens = vis.new_zeros(B, K, D).index_put((r, slot[r, s]), vis[r, s])
    mask = torch.zeros(B, K, dtype=torch.bool, device=ids.device).index_put((r, slot[r, s]), torch.tensor(True, device=ids.device))
    return tokens, mask
