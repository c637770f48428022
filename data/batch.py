"""
SETOKIM's sequences as data: conversations -> flat per-position arrays -> batches. setokim.py explains
the layout ([USER] [Img] v_1 .. v_K [/Img] question [ASSISTANT] answer [eos]) and what a batch holds;
this file builds them, vectorised (no Python loop over positions or conversations in collate).

    enc = encode_conversation(tok, turns, image_ref, vis_id)  # one conversation -> lists over positions
    P = pack([enc, ...], img, mask_id, tok.seg)                # a split's conversations, end to end
    b = collate(P, bank, rows, tok, pack_rows=True)            # a training batch: a dict of tensors
    n_ce, n_reg, n_seg, n_vis = loss_counts(P, rows)           # the global batch's loss counts

tok is the text tokenizer (data/text.py): its special-token ids lay out the sequences.
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from setok import cluster_centroids


# The token bank: every image's real SeTok tokens, one image after another (ragged, no padding),
# so an image that has 3 tokens takes 3 rows. Computed once (SeTok is frozen): data/conversations.py.

@dataclass
class Bank:
    tokens: torch.Tensor       # (M, D) float16: the real tokens of all images, image after image
    off: torch.Tensor          # (n_img,) long: first row of each image
    ntok: torch.Tensor         # (n_img,) long: its number of tokens
    labels: torch.Tensor       # (n_img, N) int16: its patches' token ids (in reading order)
    instances: torch.Tensor    # (n_src, H, W) uint8: instance maps of the source images (refer masks)
    pos: torch.Tensor = None   # (M, 2) float: each token's centroid (row, column) in patch units, from labels

    def __post_init__(self):
        if self.pos is None:
            N, K = self.labels.shape[1], max(1, int(self.ntok.max())) if len(self.ntok) else 1
            cen, _ = cluster_centroids(self.labels, math.isqrt(N), K)      # (n_img, K, 2)
            self.pos = cen[torch.arange(K)[None] < self.ntok[:, None]]     # (M, 2) image after image

    def padded(self, img, K=None):
        """Images img (b,) -> tokens (b, K, D) float, token_mask (b, K): a gather, no loop."""
        K = K or int(self.ntok[img].max())
        k = torch.arange(K)
        mask = k[None] < self.ntok[img][:, None]                            # (b, K)
        rows = torch.where(mask, self.off[img][:, None] + k[None], 0)       # (b, K)
        return self.tokens[rows].float() * mask[..., None], mask


# One conversation -> flat per-position lists. Tokenising is string work, done once per run at
# startup for the whole dataset (never per step).

def encode_conversation(tok, turns, image_ref, vis_id):
    """turns: LLaVA-style [{'from': 'human'|'gpt', 'value': str}]. '<image>' inside a human turn is the
    input image; a gpt turn whose whole value is '<image>' is an image the model writes.
    image_ref(is_output) -> (first bank row, number of tokens) of that image.
    Returns lists over positions: ids (VIS at visual slots), ref (bank row of a visual slot, else -1),
    ans (position belongs to an answer: gpt turns and their [eos]), out (visual slot of a written image)."""
    ids, ref, ans, out = [], [], [], []

    def put(new_ids, is_ans, rows=None, is_out=False):
        ids.extend(new_ids)
        ref.extend(rows if rows is not None else [-1] * len(new_ids))
        ans.extend([is_ans] * len(new_ids))
        out.extend([is_out] * len(new_ids))

    def image(is_ans, is_out):
        row, k = image_ref(is_out)
        put([tok.img], is_ans)
        put([vis_id] * k, is_ans, list(range(row, row + k)), is_out)
        put([tok.img_end], is_ans)

    for turn in turns:
        if turn['from'] == 'human':
            put([tok.user], False)
            for j, text in enumerate(turn['value'].split('<image>')):
                if j > 0:
                    image(False, False)
                put(tok.encode(text), False)
        else:
            put([tok.assistant], False)
            if turn['value'].strip() == '<image>':
                image(True, True)
            else:
                put(tok.encode(turn['value']), True)
            put([tok.eos], True)
    return ids, ref, ans, out


@dataclass
class Packed:
    """All conversations of a split in flat arrays (conversation after conversation) + per-conversation
    fields. Batching is a gather at offsets (collate)."""
    ids: torch.Tensor          # (L,) long
    ref: torch.Tensor          # (L,) long, bank row of visual slots, -1 elsewhere
    ans: torch.Tensor          # (L,) bool
    out: torch.Tensor          # (L,) bool
    off: torch.Tensor          # (n,) long: first position of each conversation
    length: torch.Tensor       # (n,) long
    prompt_len: torch.Tensor   # (n,) long: positions up to and including the first [ASSISTANT]
    img: torch.Tensor          # (n,) long: the input image (bank index), -1 when none
    mask_id: torch.Tensor      # (n,) long: instance id of the referred object, 0 when none
    n_ce: torch.Tensor         # (n,) long: answer tokens to predict (text CE terms)
    n_reg: torch.Tensor        # (n,) long: visual tokens to regress
    n_vis: torch.Tensor        # (n,) long: visual slots (read and written: the rope2d position head's terms)
    has_seg: torch.Tensor      # (n,) bool: a [SEG] in the answer (mask loss)


def pack(encoded, img, mask_id, seg_id):
    """encoded: [(ids, ref, ans, out)] from encode_conversation; img, mask_id: per conversation."""
    length = torch.tensor([len(e[0]) for e in encoded])
    cat = lambda k, dt: torch.from_numpy(np.fromiter(itertools.chain.from_iterable(e[k] for e in encoded), dt,
                                                     count=int(length.sum())))
    ids, ref, ans, out = cat(0, np.int64), cat(1, np.int64), cat(2, np.bool_), cat(3, np.bool_)
    off = length.cumsum(0) - length
    conv = torch.arange(len(encoded)).repeat_interleave(length)             # (L,) owner of each position
    first = off[conv] == torch.arange(len(ids))                             # first position of its conversation
    per_conv = lambda x: torch.zeros(len(encoded), dtype=torch.long).index_add_(0, conv, x.long())
    # the first answer position of each conversation (answers never start a conversation)
    pos_in = torch.arange(len(ids)) - off[conv]
    first_ans = torch.full((len(encoded),), 1 << 30).scatter_reduce(0, conv, torch.where(ans, pos_in, 1 << 30), 'amin')
    return Packed(ids=ids, ref=ref, ans=ans, out=out, off=off, length=length, prompt_len=first_ans,
                  img=torch.as_tensor(img, dtype=torch.long), mask_id=torch.as_tensor(mask_id, dtype=torch.long),
                  n_ce=per_conv(ans & ~first), n_reg=per_conv(out), n_vis=per_conv(ref >= 0), has_seg=per_conv(ans & (ids == seg_id)) > 0)


def row_slots(length, cap):
    """Packing: conversations of these lengths (B,) into as few rows of `cap` positions as first-fit
    decreasing finds (longest first, each into the first row it fits). -> row (B,), start (B,) long.
    A loop over at most a batch's B integers (bookkeeping, no tensor work); collate does the rest
    vectorised. With cap = the longest conversation, no row is wider than the padded batch."""
    fill, row, start = [], [0] * len(length), [0] * len(length)
    for i in sorted(range(len(length)), key=lambda i: -length[i]):
        r = next((r for r, f in enumerate(fill) if f + length[i] <= cap), len(fill))
        if r == len(fill):
            fill.append(0)
        row[i], start[i] = r, fill[r]
        fill[r] += length[i]
    return torch.tensor(row, dtype=torch.long), torch.tensor(start, dtype=torch.long)


def collate(P, bank, rows, tok, prompt_extra=None, pack_rows=False):
    """Conversations `rows` (B,) of P -> a padded batch (dict of tensors), vectorised.
    Training batches are right-padded, one conversation per row; with pack_rows, several
    conversations share a row (row_slots) and `doc` keeps them apart: the GPT lets a position attend
    only within its own conversation and restarts the positions at each, so a packed batch computes
    what the one-per-row batch does, on fewer padded positions (config=small: about half).
    With prompt_extra (B,) (0 or 1) the batch holds only the prompts (up to [ASSISTANT], plus
    prompt_extra answer tokens, e.g. a forced [Img] or [SEG]), one per row, LEFT-padded so that every
    prompt ends in the last column (for generation). Rows: B' (= B unless packed).
      idx (B',T) ids, pad where padding     real (B',T) bool
      doc (B',T) long: the conversation (0..B-1) of each position, -1 on padding (training batches)
      vis_mask (B',T) visual slots          vis (M, D) their SeTok tokens, in row-major order
      vis_pos (M, 2) their centroids (row, column) in patch units (rope2d positions)
      targets (B',T) next id where it is an answer token, else -1
      reg_mask (B',T) positions whose NEXT token is a written visual token, reg_target (R, D) that token
      seg_rows (S,), seg_pos (S,) the row and position of each conversation's [SEG] answer,
      seg_tokens (S,K,D), seg_token_mask (S,K), seg_labels (S,N) long, seg_gt (S,H,W) float: the input
      image of each"""
    rows = torch.as_tensor(rows, dtype=torch.long)
    L = P.length[rows] if prompt_extra is None else P.prompt_len[rows] + torch.as_tensor(prompt_extra)
    T = int(L.max())
    if prompt_extra is None:
        row, start = row_slots(L.tolist(), T) if pack_rows else (torch.arange(len(rows)), torch.zeros_like(rows))
        conv = torch.arange(len(rows)).repeat_interleave(L)                 # (n,) conversation of each real position
        within = torch.arange(len(conv)) - (L.cumsum(0) - L)[conv]          # (n,) its place in the conversation
        dest = row[conv] * T + start[conv] + within                         # (n,) its place in the batch, flat
        shape = (int(row.max()) + 1, T)
        src = torch.zeros(shape[0] * T, dtype=torch.long).index_put_((dest,), P.off[rows][conv] + within).view(shape)
        doc = torch.full((shape[0] * T,), -1).index_put_((dest,), conv).view(shape)   # (B', T)
        real = doc >= 0
    else:
        t = torch.arange(T)
        start = T - L                                                       # left padding
        real = t[None] >= start[:, None]
        src = torch.where(real, P.off[rows][:, None] + t[None] - start[:, None], 0)   # (B, T) flat position
    idx = torch.where(real, P.ids[src], tok.pad)
    ref = torch.where(real, P.ref[src], -1)
    ans, out = real & P.ans[src], real & P.out[src]
    vis_mask = ref >= 0
    b = {'idx': idx, 'real': real, 'vis_mask': vis_mask, 'vis': bank.tokens[ref[vis_mask]].float(),
         'vis_pos': bank.pos[ref[vis_mask]]}
    if prompt_extra is not None:
        return b
    b['doc'] = doc
    # the target at t is the token at t+1 when that token is part of an answer (a conversation's first
    # token never is, so no target crosses from one packed conversation into the next)
    b['targets'] = F.pad(torch.where(ans[:, 1:], idx[:, 1:], -1), (0, 1), value=-1)       # (B', T)
    b['reg_mask'] = F.pad(out[:, 1:], (0, 1), value=False)                               # (B', T)
    b['reg_target'] = bank.tokens[ref[:, 1:][out[:, 1:]]].float()                        # (R, D)
    seg_r, seg_t = (ans & (idx == tok.seg)).nonzero(as_tuple=True)                    # every [SEG] answer
    seg_c = doc[seg_r, seg_t]
    first = torch.ones_like(seg_c, dtype=torch.bool)
    first[1:] = seg_c[1:] != seg_c[:-1]                                                  # each conversation's first
    b['seg_rows'], b['seg_pos'], seg_c = seg_r[first], seg_t[first], seg_c[first]        # (S,)
    img = P.img[rows[seg_c]]
    b['seg_tokens'], b['seg_token_mask'] = bank.padded(img, K=max(1, int(bank.ntok[img].max())) if len(img) else 1)
    b['seg_labels'] = bank.labels[img].long()
    b['seg_gt'] = (bank.instances[img].long() == P.mask_id[rows[seg_c]][:, None, None]).float()
    return b


def loss_counts(P, rows):
    """The number of terms of each loss over conversations `rows`: (n_ce, n_reg, n_seg, n_vis). Every
    process computes them for the GLOBAL batch (the data order is known), so the loss is the same mean
    whatever the batch is split into (processes, micro-steps)."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    return (int(P.n_ce[rows].sum()), int(P.n_reg[rows].sum()), int(P.has_seg[rows].sum()), int(P.n_vis[rows].sum()))
