"""SETOKIM (setokim.py, train_setokim.py): the sequence format, the loss masks, generation (stopping at
[/Img], KV cache == no cache, padding-invariance), the mask decoder and SeTok's labels, and real tiny
training runs: exact resume, 2-process DDP == 1 process, a clear error without a SeTok checkpoint."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import run_script

from data.batch import Bank, collate, encode_conversation, loss_counts, pack
from data.text import TextTokenizer
from setok import rotate
from setokim import (SETOKIM, GPTConfig, MaskDecoder, copy_candidates, copy_targets, image_offsets, mask_loss,
                     reading_order, rope_angles, rope_freqs, tokens_to_patches, visual_tokens)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SETOK = ['image_size=32', 'patch_size=4', 'dim=32', 'depth=1', 'n_head=4', 'token_dim=32', 'intra_depth=1',
              'inter_depth=1', 'max_tokens=6', 'cluster_threshold=0.5', 'dec_sprite_size=8', 'dec_dim=32',
              'text_dim=32', 'text_depth=1', 'eval_images=8', 'threads=1', 'max_iters=2',
              'eval_interval=2', 'batch_size=8']
TINY_LM = ['llm_n_layer=1', 'llm_n_head=2', 'llm_n_embd=32', 'block_size=128', 'mask_dim=16', 'mask_depth=1',
           'mask_n_head=2', 'eval_per_task=2', 'eval_batch_size=8', 'log_interval=1', 'llm_warmup_iters=1',
           'threads=1', 'llm_learning_rate=3e-3', 'diff_steps=4']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from data.shapes.prepare import prepare
    return prepare(data_dir=str(tmp_path_factory.mktemp('w') / 'world'), image_size=32, n_train=24, n_val=8, n_test=8,
                   workers=1)


@pytest.fixture(scope='module')
def tok(world):
    return TextTokenizer(os.path.join(world, 'tokenizer.model'))


@pytest.fixture(scope='module')
def setok_dir(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('setok'))
    r = subprocess.run([sys.executable, 'train_setok.py', *TINY_SETOK, f'data_dir={world}', f'out_dir={out}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def tiny_cfg(tok, **kw):
    return GPTConfig(**{**dict(vocab_size=tok.vocab_size + 1, block_size=64, n_layer=2, n_head=2, n_embd=32, token_dim=8,
                               grid=4, image_size=16, mask_dim=16, mask_depth=1, mask_n_head=2, img_id=tok.img,
                               img_end_id=tok.img_end, seg_id=tok.seg, eos_id=tok.eos, pad_id=tok.pad), **kw})


def tiny_bank(ntok=(2, 5, 1, 3), D=8, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ntok = torch.tensor(ntok)
    labels = torch.stack([torch.randint(0, int(k), (grid * grid,), generator=g) for k in ntok]).short()
    inst = torch.randint(0, 3, (len(ntok), 16, 16), generator=g).to(torch.uint8)
    return Bank(tokens=torch.randn(int(ntok.sum()), D, generator=g).half(), off=ntok.cumsum(0) - ntok, ntok=ntok,
                labels=labels, instances=inst)


# conversations in the world's format: (turns, input image, output image, mask id)
CONVS = [
    ([{'from': 'human', 'value': '<image>\nDescribe the image.'}, {'from': 'gpt', 'value': 'a small red circle at the top'}], 0, None, 0),
    ([{'from': 'human', 'value': 'Generate an image: a large blue square'}, {'from': 'gpt', 'value': '<image>'}], None, 1, 0),
    ([{'from': 'human', 'value': '<image>\nMake the red circle blue.'}, {'from': 'gpt', 'value': '<image>'}], 2, 1, 0),
    ([{'from': 'human', 'value': '<image>\nSegment the red circle.'}, {'from': 'gpt', 'value': '[SEG]'}], 3, None, 2),
    ([{'from': 'human', 'value': '<image>\nHow many objects are there?'}, {'from': 'gpt', 'value': '2'}], 1, None, 0),
]


def packed(tok, bank, vis_id, convs=CONVS):
    off, ntok = bank.off.tolist(), bank.ntok.tolist()
    enc = [encode_conversation(tok, turns, lambda o, s=src, t=tgt: (off[t], ntok[t]) if o else (off[s], ntok[s]), vis_id)
           for turns, src, tgt, _ in convs]
    return pack(enc, [-1 if s is None else s for _, s, _, _ in convs], [m for *_, m in convs], tok.seg)


# -----------------------------------------------------------------------------
# the tokenizer

def test_tokenizer_special_ids_both_backends(tok):
    assert (tok.img, tok.img_end, tok.seg, tok.user, tok.assistant, tok.eos, tok.pad) == (4, 5, 6, 7, 8, 2, 3)
    ids = tok.encode('[USER] Segment the red circle. [ASSISTANT] [SEG]')
    assert ids[0] == tok.user and ids[-2:] == [tok.assistant, tok.seg] and ids.count(tok.seg) == 1
    assert tok.decode(tok.encode('a small red circle') + [tok.eos, 17]) == 'a small red circle'
    # tiktoken: the special tokens and a pad id are appended after the BPE vocabulary
    import tiktoken
    enc = tiktoken.Encoding(name='bytes', pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={'<|endoftext|>': 256})
    tt = TextTokenizer(enc)
    assert (tt.img, tt.img_end, tt.seg, tt.user, tt.assistant, tt.pad, tt.eos, tt.vocab_size) == (257, 258, 259, 260, 261, 262, 256, 263)
    ids = tt.encode('[USER] hi [Img]')
    assert ids == [260, ord('h'), ord('i'), 257]
    assert tt.decode(ids) == '[USER] hi [Img]'


# -----------------------------------------------------------------------------
# sequences and loss masks

def test_visual_tokens_land_exactly_between_img_markers(tok):
    bank = tiny_bank()
    cfg = tiny_cfg(tok)
    P = packed(tok, bank, cfg.vis_id)
    b = collate(P, bank, torch.arange(len(CONVS)), tok)
    model = SETOKIM(cfg)
    model.tok_mean.normal_()
    model.tok_std.uniform_(0.5, 2)
    x = model.embed(b['idx'], b['vis_mask'], b['vis'])
    row_of_vis = 0                                                        # walks b['vis'] in row-major order
    for i, (turns, src, tgt, _) in enumerate(CONVS):
        idx, vm = b['idx'][i], b['vis_mask'][i]
        opens = (idx == tok.img).nonzero()[:, 0].tolist()
        closes = (idx == tok.img_end).nonzero()[:, 0].tolist()
        images = [k for k in (src, tgt) if k is not None]
        assert len(opens) == len(closes) == len(images)
        inside = torch.zeros_like(vm)
        for o, c, k in zip(opens, closes, images):
            assert c - o - 1 == int(bank.ntok[k])                         # exactly the image's real token count
            inside[o + 1:c] = True
            want = bank.tokens[bank.off[k]:bank.off[k] + bank.ntok[k]].float()
            got = b['vis'][row_of_vis:row_of_vis + c - o - 1]
            assert torch.equal(got, want)                                 # its tokens, in order
            proj = model.in_proj(model.normalize(want))
            assert torch.allclose(x[i, o + 1:c], proj, atol=1e-6)         # scattered into the embedding
            row_of_vis += c - o - 1
        assert torch.equal(vm, inside)                                    # and nowhere else
        assert (idx[vm] == cfg.vis_id).all()
        text = b['real'][i] & ~vm
        assert torch.allclose(x[i][text], model.gpt.wte(idx[text]))
    assert row_of_vis == len(b['vis'])


def test_rope2d_turns_each_pair_by_its_coordinate_and_images_sit_at_their_centroids(tok):
    """rope2d, exactly: (1) a visual slot at place i has the coordinates (i, s + row, s + column) of its
    token's centroid, s the place of its image's first token, and text's are (i, i, i); (2) each rotation
    pair of a head is turned by its own coordinate times its frequency (a 2 x 2 rotation, looped)."""
    bank, cfg = tiny_bank(), tiny_cfg(tok)
    P = packed(tok, bank, cfg.vis_id)
    b = collate(P, bank, torch.arange(len(CONVS)), tok, pack_rows=True)   # packed: places restart per conversation
    place = torch.zeros_like(b['doc'])
    for r in range(len(place)):
        for t in range(1, place.shape[1]):
            place[r, t] = 0 if b['doc'][r, t] != b['doc'][r, t - 1] else place[r, t - 1] + 1
    coords = place[..., None].float() + image_offsets(b['vis_mask'], b['vis_pos'])   # (B, T, 3)
    m = 0
    for r in range(len(place)):
        for t in range(place.shape[1]):
            i = float(place[r, t])
            if not b['vis_mask'][r, t]:
                assert coords[r, t].tolist() == [i, i, i]
                continue
            s = t
            while s > 0 and b['vis_mask'][r, s - 1]:
                s -= 1
            s = float(place[r, s])                                        # the image's first place
            row, col = b['vis_pos'][m].tolist()
            assert torch.allclose(coords[r, t], torch.tensor([i, s + row, s + col]), atol=1e-5)
            m += 1
    assert m == len(b['vis_pos'])
    # (2) the rotation: head width 12, six pairs, two per coordinate
    axis, freqs = rope_freqs(12)
    assert axis.tolist() == [0, 0, 1, 1, 2, 2]
    c = torch.randn(1, 5, 3) * 7
    cos, sin = rope_angles(c, axis, freqs)
    x = torch.randn(1, 1, 5, 12)
    y = rotate(x, cos, sin)
    for t in range(5):
        for i in range(6):
            a = float(c[0, t, axis[i]] * freqs[i])
            R = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            want = R @ torch.stack([x[0, 0, t, i], x[0, 0, t, i + 6]])
            assert torch.allclose(torch.stack([y[0, 0, t, i], y[0, 0, t, i + 6]]), want, atol=1e-5)


def test_rope2d_attention_scores_depend_only_on_relative_positions(tok):
    """A query and a key scored after rope2d depend only on the difference of their (t, y, x): moving
    both by the same vector changes nothing. So the scores among an image's tokens do not change when
    the whole image moves (its centroids shift together), while those between text and the image do;
    and moving one token alone changes its scores."""
    torch.manual_seed(0)
    axis, freqs = rope_freqs(24)
    q, k = torch.randn(1, 1, 6, 24, dtype=torch.double), torch.randn(1, 1, 6, 24, dtype=torch.double)
    def scores(c):
        cos, sin = rope_angles(c.double(), axis, freqs.double())
        return rotate(q, cos, sin) @ rotate(k, cos, sin).transpose(-1, -2)   # (1, 1, 6, 6)
    c = torch.randn(1, 6, 3) * 10
    assert torch.allclose(scores(c), scores(c + torch.tensor([3.0, -5.0, 11.0])), atol=1e-10)
    # an image of four tokens after two text positions: shift its centroids by (2, -3) patches
    vis_mask = torch.tensor([[False, False, True, True, True, True]])
    pos = torch.rand(4, 2) * 15
    place = torch.arange(6)[None].float()[..., None]
    a = scores(place + image_offsets(vis_mask, pos))
    b = scores(place + image_offsets(vis_mask, pos + torch.tensor([2.0, -3.0])))
    img = vis_mask[0]
    assert torch.allclose(a[0, 0][img][:, img], b[0, 0][img][:, img], atol=1e-4)     # image <-> image: the same
    assert not torch.allclose(a[0, 0][~img][:, img], b[0, 0][~img][:, img])          # text -> image: moved
    one = pos.clone()
    one[0] += torch.tensor([0.0, 4.0])                                                # one token moves right
    d = scores(place + image_offsets(vis_mask, one))
    assert not torch.allclose(a[0, 0, 2, 3:], d[0, 0, 2, 3:])
    assert torch.allclose(a[0, 0, 3:][:, 3:], d[0, 0, 3:][:, 3:], atol=1e-4)          # the others among themselves


def test_loss_masks_cover_only_answers(tok):
    bank = tiny_bank()
    cfg = tiny_cfg(tok)
    P = packed(tok, bank, cfg.vis_id)
    rows = torch.tensor([0, 1, 2, 3, 4])
    b = collate(P, bank, rows, tok)
    for i, (turns, src, tgt, _) in enumerate(CONVS):
        idx, targets = b['idx'][i], b['targets'][i]
        a = (idx == tok.assistant).nonzero()[0, 0].item()
        has = (targets >= 0).nonzero()[:, 0]
        L = int(b['real'][i].sum())
        assert has.tolist() == list(range(a, L - 1))                      # from [ASSISTANT] to before [eos]
        assert torch.equal(targets[has], idx[has + 1])                    # = the next token
        answer = turns[1]['value']
        if answer == '<image>':
            K = int(bank.ntok[tgt])
            want = [tok.img] + [cfg.vis_id] * K + [tok.img_end, tok.eos]
            assert targets[has].tolist() == want                          # VIS K times, then [/Img]
        else:
            assert targets[has].tolist() == tok.encode(answer) + [tok.eos]
    # regression: from each position whose NEXT token is a written visual token, to that token
    want = torch.cat([bank.tokens[bank.off[t]:bank.off[t] + bank.ntok[t]].float() for _, _, t, _ in CONVS if t is not None])
    assert torch.equal(b['reg_target'], want)
    assert torch.equal(b['reg_mask'][:, :-1], (b['idx'][:, 1:] == cfg.vis_id) & (b['targets'][:, :-1] >= 0))
    # [SEG]: the row, the position and the mask of the referred object
    assert b['seg_rows'].tolist() == [3]
    assert b['idx'][3, b['seg_pos'][0]] == tok.seg
    assert torch.equal(b['seg_gt'][0], (bank.instances[3] == 2).float())
    assert torch.equal(b['seg_labels'][0], bank.labels[3].long())
    # each visual slot's centroid: the mean (row, column) of the patches its image's labels give it
    cen = [[sum(divmod(n, 4)[a] for n in range(16) if bank.labels[i, n] == k) / max(1, int((bank.labels[i] == k).sum()))
            for a in (0, 1)] for i in range(len(bank.ntok)) for k in range(int(bank.ntok[i]))]
    ref = torch.cat([P.ref[P.off[r]:P.off[r] + P.length[r]] for r in rows])     # bank row of every position
    assert torch.equal(b['vis_pos'], torch.tensor(cen)[ref[ref >= 0]])
    assert loss_counts(P, rows) == (int((b['targets'] >= 0).sum()), len(b['reg_target']), 1, len(b['vis']))
    _, st = SETOKIM(cfg)(b)
    assert (st['n_ce'], st['n_reg'], st['n_seg'], st['n_vis']) == loss_counts(P, rows)


@pytest.mark.parametrize('pos_emb', ['learned', 'rope2d'])
def test_packed_rows_compute_exactly_what_one_conversation_per_row_does(tok, pos_emb):
    """pack_rows puts several conversations into one row; the loss, every term's sum and count, and
    every gradient must equal the one-per-row batch's, and a packed conversation's hidden states must
    not depend on its neighbours in the row."""
    bank, cfg = tiny_bank(), tiny_cfg(tok, gen_head='mse', pos_emb=pos_emb)   # regression: a loss without noise draws
    long = ([{'from': 'human', 'value': '<image>\nDescribe the image.'},
             {'from': 'gpt', 'value': 'a small red circle at the top, a large blue square at the bottom left'}], 1, None, 0)
    P = packed(tok, bank, cfg.vis_id, CONVS * 3 + [long])                 # 16 conversations, three [SEG] among them
    rows = torch.tensor([3, 0, 4, 15, 9, 1, 14, 2, 8, 13, 5])
    plain, pk = collate(P, bank, rows, tok), collate(P, bank, rows, tok, pack_rows=True)
    assert len(pk['idx']) < len(plain['idx']) and pk['idx'].shape[1] == plain['idx'].shape[1]
    assert int(pk['real'].sum()) == int(plain['real'].sum()) == int(P.length[rows].sum())
    assert len(pk['seg_rows']) == len(plain['seg_rows']) == 3
    assert (pk['idx'][pk['seg_rows'], pk['seg_pos']] == tok.seg).all()
    torch.manual_seed(0)
    model = SETOKIM(cfg)
    grads = []
    for b in (plain, pk):
        model.zero_grad()
        loss, st = model(b, norm=loss_counts(P, rows))
        loss.backward()
        grads.append((loss.detach(), st, [p.grad.clone() for p in model.parameters()]))
    (l0, s0, g0), (l1, s1, g1) = grads
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    for k in ('ce', 'reg', 'mask', 'pos'):
        assert torch.allclose(s0[k], s1[k], rtol=1e-5, atol=1e-5), k
    assert [s0[k] for k in ('n_ce', 'n_reg', 'n_seg', 'n_vis')] == [s1[k] for k in ('n_ce', 'n_reg', 'n_seg', 'n_vis')]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g0, g1))
    # each conversation's hidden states, found in both batches by its doc id, are the same
    with torch.no_grad():
        h0, h1 = model.hidden(plain), model.hidden(pk)
    for c in range(len(rows)):
        assert torch.allclose(h0[plain['doc'] == c], h1[pk['doc'] == c], atol=1e-5)


def test_every_parameter_gets_a_gradient_even_without_seg_or_images(tok):
    bank, cfg = tiny_bank(), tiny_cfg(tok)
    P = packed(tok, bank, cfg.vis_id)
    model = SETOKIM(cfg)
    loss, st = model(collate(P, bank, torch.tensor([4]), tok))           # a VQA sample: no [SEG], no output image
    assert st['n_seg'] == 0 and st['n_reg'] == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# -----------------------------------------------------------------------------
# generation

class Scripted(nn.Module):
    """An LM head that prefers the listed ids, one per call (eos second best, for text steps)."""
    def __init__(self, script, V, eos):
        super().__init__()
        self.script, self.V, self.eos, self.calls = script, V, eos, 0

    def forward(self, h):
        logits = torch.zeros(h.shape[0], self.V)
        logits[:, self.eos] = 5
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 10
        self.calls += 1
        return logits


def prompts(tok, bank, cfg, rows, convs=CONVS):
    P = packed(tok, bank, cfg.vis_id, convs)
    rows = torch.as_tensor(rows)
    extra = torch.tensor([int(convs[r][0][1]['value'] == '<image>') for r in rows.tolist()])
    return collate(P, bank, rows, tok, prompt_extra=extra)                # t2i / edit prompts end in [Img]


def test_generation_stops_at_img_end_and_caps_the_image(tok):
    bank, cfg = tiny_bank(), tiny_cfg(tok)
    model = SETOKIM(cfg).eval()
    b = prompts(tok, bank, cfg, [1])
    assert b['idx'][0, -1] == tok.img
    V, vis, end, eos = cfg.vocab_size, cfg.vis_id, tok.img_end, tok.eos
    model.gpt.lm_head = Scripted([vis, vis, vis, end, vis], V, eos)
    ids, v = model.generate(b, max_new_tokens=20, max_image_tokens=16)
    assert ids[0].tolist() == [vis, vis, vis, end, eos]                   # the model said [/Img] after 3
    assert (v[0, :3].abs().sum(-1) > 0).all() and (v[0, 3:] == 0).all()
    model.gpt.lm_head = Scripted([vis] * 10, V, eos)
    ids, _ = model.generate(b, max_new_tokens=20, max_image_tokens=2)
    assert ids[0].tolist() == [vis, vis, end, eos]                        # capped at max_image_tokens
    model.gpt.lm_head = Scripted([end, end, vis], V, eos)
    ids, _ = model.generate(b, max_new_tokens=20)
    assert ids[0].tolist() == [vis, end, eos]                             # at least one token; text never VIS
    toks, mask = visual_tokens(ids, torch.randn(1, 4, cfg.token_dim), vis, 3)
    assert mask.tolist() == [[True, False, False]]


@pytest.mark.parametrize('gen_head,pos_emb', [('mse', 'rope2d'), ('diffusion', 'rope2d'), ('diffusion+mean', 'rope2d'),
                                              ('mse', 'learned'), ('diffusion+mean', 'learned'),
                                              ('diffusion+mean', 'learned+rope2d')])
def test_kv_cache_and_padding_do_not_change_generation(tok, gen_head, pos_emb):
    """Generation with the KV cache equals recomputing the whole sequence at every step, with either
    positions: under rope2d every written token's 2D position (pos_head's) goes into the cache with it."""
    torch.manual_seed(0)
    bank = tiny_bank(ntok=(2, 5, 1, 3))
    cfg = tiny_cfg(tok, gen_head=gen_head.split('+')[0], diff_mean=gen_head.endswith('+mean'), pos_emb=pos_emb)
    model = SETOKIM(cfg).double().eval()
    model.tok_std.fill_(1.0)
    # lean towards writing visual tokens so that images of several tokens are generated
    u = torch.randn(cfg.n_embd, dtype=torch.double)
    with torch.no_grad():
        model.gpt.ln_f.bias.copy_(u / u.norm() * 2)
        model.gpt.wte.weight[cfg.vis_id] = u / u.norm() * 2
    seeded = lambda: dict(generator=torch.Generator().manual_seed(7), diff_steps=4)   # the diffusion head's noise
    b = prompts(tok, bank, cfg, [0, 1, 2, 4])                             # different lengths: left padding
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}
    ids, vis = model.generate(b, max_new_tokens=12, max_image_tokens=4, use_cache=True, **seeded())
    ids2, vis2 = model.generate(b, max_new_tokens=12, max_image_tokens=4, use_cache=False, **seeded())
    assert torch.equal(ids, ids2)
    assert torch.allclose(vis, vis2, atol=1e-9)
    assert int((ids == cfg.vis_id).sum()) >= 4
    if cfg.rope:       # the uncached run's last step saw every position where image_offsets puts it, over the
        seen, forward = [], model.gpt.forward                             # whole sequence and pos_head's places
        model.gpt.forward = lambda *a, **k: seen.append(k['offsets']) or forward(*a, **k)
        model.generate(b, max_new_tokens=12, max_image_tokens=4, use_cache=False, **seeded())
        del model.gpt.forward
        Tp, T = b['idx'].shape[1], seen[-1].shape[1]                      # the prompt, then all but the last token
        vm = torch.cat([b['vis_mask'], ids2 == cfg.vis_id], 1)[:, :T]
        yx = torch.zeros(*vm.shape, 2, dtype=torch.double)
        yx[:, :Tp][b['vis_mask']] = b['vis_pos'].double()
        yx[:, Tp:] = model.written_pos(model.normalize(vis2)).double()[:, :T - Tp]
        assert torch.allclose(seen[-1].double(), image_offsets(vm, yx[vm]).double(), atol=1e-5)
    if gen_head != 'mse':                                                 # the diffusion noise depends on the batch's rows
        return
    for i, r in enumerate([0, 1, 2, 4]):                                  # each prompt alone, unpadded
        one = prompts(tok, bank, cfg, [r])
        one = {k: (v.double() if v.is_floating_point() else v) for k, v in one.items()}
        ids1, vis1 = model.generate(one, max_new_tokens=12, max_image_tokens=4)
        n = ids1.shape[1]
        assert torch.equal(ids1[0], ids[i, :n])
        assert torch.allclose(vis1[0], vis[i, :n], atol=1e-9)


def test_a_trained_model_writes_its_image_and_stops(tok):
    """Overfit two conversations; greedy generation then writes exactly the target's number of visual
    tokens, close to the targets, stops at [/Img], and answers the question."""
    torch.manual_seed(0)
    bank, cfg = tiny_bank(ntok=(2, 3, 1, 3)), tiny_cfg(tok, n_layer=2, n_embd=64, gen_head='mse', pos_emb='rope2d')
    P = packed(tok, bank, cfg.vis_id)
    model = SETOKIM(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    b = collate(P, bank, torch.tensor([1, 4]), tok)
    for _ in range(100):
        loss, _ = model(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids, vis = model.generate(prompts(tok, bank, cfg, [1]), max_new_tokens=10)
    assert ids[0].tolist() == [cfg.vis_id] * 3 + [tok.img_end, tok.eos]
    target = bank.tokens[bank.off[1]:bank.off[1] + 3].float()
    assert torch.nn.functional.cosine_similarity(vis[0, :3], target, dim=-1).min() > 0.9
    # rope2d: the position head puts each written token near its cluster's centroid (patch units)
    err = (model.written_pos(model.normalize(vis[0, :3])) - bank.pos[bank.off[1]:bank.off[1] + 3]).abs().max()
    assert err < 0.25
    ids, _ = model.generate(prompts(tok, bank, cfg, [4]), max_new_tokens=5)
    assert tok.decode(ids[0].tolist()) == '2'


def test_an_edit_keeps_the_tokens_it_does_not_touch_and_changes_the_one_it_does(tok):
    """An edit's target is its source with the middle token changed. The copy head's targets point every
    written token at its source token and keep all but the changed one (copy_targets); after a short
    overfit, generation writes the kept tokens as exact copies and the changed one near its target."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    src = torch.randn(3, 8, generator=g)
    tgt = src.clone()
    tgt[1] += 1.5 * torch.randn(8, generator=g)                          # the edited object
    bank = Bank(tokens=torch.cat([src, tgt]).half(), off=torch.tensor([0, 3]), ntok=torch.tensor([3, 3]),
                labels=torch.zeros(2, 16, dtype=torch.short), instances=torch.zeros(2, 16, 16, dtype=torch.uint8))
    cfg = tiny_cfg(tok, n_layer=2, n_embd=64, diff_width=64, diff_depth=2)
    edit = [(CONVS[2][0], 0, 1, 0)]
    P = packed(tok, bank, cfg.vis_id, edit)
    b = collate(P, bank, torch.tensor([0]), tok)
    model = SETOKIM(cfg)
    src_n, tgt_n = bank.tokens[:3].float(), bank.tokens[3:].float()         # tok_std = 1, tok_mean = 0
    slot, base, keep = copy_targets(b, b['vis'].float(), tgt_n, copy_candidates(b), tau=0.1)
    assert torch.equal(base, src_n) and keep.tolist() == [True, False, True]
    assert torch.equal(b['vis_mask'][0].nonzero()[:3, 0], slot)            # each points at its own source slot
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = model(b, cond_drop=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    ids, vis = model.generate(prompts(tok, bank, cfg, [0], edit), max_new_tokens=6, img_temperature=0.0, diff_steps=10,
                              generator=gen)
    assert ids[0].tolist() == [cfg.vis_id] * 3 + [tok.img_end, tok.eos]
    written = vis[0, :3].float()
    assert torch.equal(written[[0, 2]], src_n[[0, 2]])                   # kept: the source's tokens, exactly
    assert not torch.equal(written[1], src_n[1])
    assert (written[1] - tgt_n[1]).norm() < 0.3 * (src_n[1] - tgt_n[1]).norm()   # changed: near the edit's token


# -----------------------------------------------------------------------------
# the mask decoder and SeTok's labels

def test_labels_gather_maps_token_logits_to_patches_exactly():
    g = torch.Generator().manual_seed(0)
    B, K, N = 3, 5, 16
    logits = torch.randn(B, K, generator=g)
    labels = torch.randint(0, K, (B, N), generator=g)
    got = tokens_to_patches(logits, labels)
    for b in range(B):
        for n in range(N):
            assert got[b, n] == logits[b, labels[b, n]]
    # without refinement (and with it, at init) the decoder's patch logits ARE the gathered token logits
    for refine in (False, True):
        dec = MaskDecoder(8, 12, 16, 1, 2, grid=4, image_size=16, refine=refine)
        mask = torch.arange(K)[None] < torch.tensor([[5], [3], [4]])
        lab = torch.minimum(labels, mask.sum(1, keepdim=True) - 1)
        pix, patch, tok_logits = dec(torch.randn(B, K, 8, generator=g), mask, lab, torch.randn(B, 12, generator=g))
        assert torch.equal(patch, tok_logits.gather(1, lab))
        assert pix.shape == (B, 16, 16)


def test_reading_order_keeps_every_patch_on_its_token():
    g = torch.Generator().manual_seed(1)
    B, K, D, grid = 4, 6, 8, 6
    ntok = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(K)[None] < ntok[:, None]
    labels = torch.stack([torch.randperm(grid * grid, generator=g) % int(n) for n in ntok])   # every token has patches
    tokens = torch.randn(B, K, D, generator=g)
    t2, m2, l2 = reading_order(tokens, mask, labels, grid)
    assert torch.equal(m2, mask)
    per_patch = lambda t, l: t.gather(1, l[..., None].expand(-1, -1, D))
    assert torch.equal(per_patch(t2, l2), per_patch(tokens, labels))      # patch n keeps its token
    # reading order: the ground (a token with more than half of the patches) first, then band by band
    # (top to bottom), left to right inside a band
    ys, xs = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    labels[0] = torch.where(torch.arange(grid * grid) < 20, 2, labels[0] % 2 * 3)   # image 0: token 2 holds 20 of 36
    t2, m2, l2 = reading_order(tokens, mask, labels, grid)
    for b in range(B):
        keys = []
        for k in range(int(ntok[b])):
            sel = l2[b] == k
            if not sel.any():
                continue
            cy, cx = ys[sel].float().mean(), xs[sel].float().mean()
            keys.append((-1, 0) if 2 * int(sel.sum()) > grid * grid else (min(2, int(cy * 3 / grid)), cx.item()))
        assert keys == sorted(keys)
    assert (l2[0] == 0).sum() == 20 and (l2[1] == 0).sum() < 18                 # the ground is token 0 of image 0 only
    # a grid tokenizer's raster order is left as it is
    from setok import grid_labels
    gl = grid_labels(1, grid, 3)
    _, _, l3 = reading_order(torch.randn(1, 9, D), torch.ones(1, 9, dtype=torch.bool), gl, grid)
    assert torch.equal(l3, gl)


def test_the_text_only_vqa_prior_never_reads_the_image():
    from data.conversations import answer_prior
    vqa = lambda q, a, kind: {'task': 'vqa', 'kind': kind, 'answer': a,
                              'conversations': [{'from': 'human', 'value': f'<image>\n{q}'}, {'from': 'gpt', 'value': a}]}
    train = [vqa('Is there a cat?', 'no', 'existence'), vqa('Is there a cat?', 'yes', 'existence'),
             vqa('Is there a cat?', 'yes', 'existence'), vqa('Is there a dog?', 'no', 'existence'),
             vqa('Is there a dog?', 'no', 'existence'), vqa('How many?', '3', 'count'), {'task': 'caption'}]
    test = [vqa('Is there a cat?', 'no', 'existence'), vqa('Is there a dog?', 'no', 'existence'),
            vqa('Is there an owl?', 'yes', 'existence'), vqa('How many dogs?', '1', 'count'), {'task': 'refer'}]
    # the commonest train answer to the same question; an unseen question gets its kind's commonest answer
    assert answer_prior(train, test) == ['yes', 'no', 'no', '3', None]


def test_stage_rows_takes_the_stage_tasks_and_repeats_as_told():
    from data.conversations import KINDS, TASKS, parse_repeat, stage_rows
    data = {'task': torch.tensor([TASKS.index(t) for t in ('caption', 'vqa', 'refer', 't2i', 'vqa', 'edit')]),
            'kind': torch.tensor([-1, KINDS.index('relation'), -1, -1, KINDS.index('count'), -1])}
    assert stage_rows(data, ('caption', 't2i')).tolist() == [0, 3]
    assert stage_rows(data, TASKS).tolist() == [0, 1, 2, 3, 4, 5]
    repeat = parse_repeat('vqa:3,edit:2')
    assert repeat == {'vqa': 3, 'edit': 2} and parse_repeat(['vqa:3', 'edit:2']) == repeat
    assert stage_rows(data, TASKS, repeat).tolist() == [0, 1, 1, 1, 2, 3, 4, 4, 4, 5, 5]
    assert stage_rows(data, ('caption', 't2i'), repeat).tolist() == [0, 3]
    # a VQA kind: only the questions of that kind, times their task's repeat
    assert stage_rows(data, TASKS, parse_repeat('relation:2')).tolist() == [0, 1, 1, 2, 3, 4, 5]
    assert stage_rows(data, TASKS, parse_repeat('vqa:2,relation:3')).tolist() == [0] + [1] * 6 + [2, 3, 4, 4, 5]


def test_mask_decoder_learns_a_tiny_problem():
    """Four images of 4x4 patches; the referred token is named by a one-hot query; a few Adam steps
    must lower BCE + dice clearly."""
    g = torch.Generator().manual_seed(0)
    B, K, grid = 8, 4, 4
    labels = torch.stack([torch.randperm(16, generator=g) % K for _ in range(B)])
    tokens = torch.randn(B, K, 8, generator=g)
    which = torch.randint(0, K, (B,), generator=g)
    query = torch.zeros(B, K)
    query[torch.arange(B), which] = 1
    tokens[..., :K] += 3 * torch.eye(K)                                   # token k carries its id
    patch_gt = (labels == which[:, None]).float().view(B, 1, grid, grid)
    gt = torch.nn.functional.interpolate(patch_gt, size=(16, 16), mode='nearest')[:, 0]
    torch.manual_seed(0)
    dec = MaskDecoder(8, K, 32, 2, 2, grid=grid, image_size=16)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    mask = torch.ones(B, K, dtype=torch.bool)
    losses = []
    for _ in range(40):
        loss = mask_loss(dec(tokens, mask, labels, query)[0], gt).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# -----------------------------------------------------------------------------
# real (tiny) runs of train_setokim.py

def run(world, setok_dir, out_name, *args, torchrun=False, check=True):
    return run_script('train_setokim.py', *TINY_LM, f'data_dir={world}', f'out_dir={setok_dir}', f'run_name={out_name}',
                      *args, torchrun=torchrun, port=29527, check=check)


def params(setok_dir, name, stage=2):
    ck = torch.load(os.path.join(setok_dir, name, f'stage{stage}.pt'), weights_only=False)
    assert ck['kind'] == 'setokim' and ck['stage'] == stage
    return ck['model']


COMMON = ['stage1_max_iters=2', 'llm_lr_decay_iters=4', 'llm_eval_interval=2']


@pytest.fixture(scope='module')
def straight(world, setok_dir):
    """4 steps of stage 2 after 2 of stage 1, in one go, 8 conversations per step."""
    r = run(world, setok_dir, 'straight', 'stage2_max_iters=4', 'llm_batch_size=8', *COMMON)
    assert 'VQA' in r.stdout + r.stderr and 'refer mIoU' in r.stdout + r.stderr
    # log.jsonl: a train record per step of each stage (what bench.py times), evals, the setup record (MFU)
    with open(os.path.join(setok_dir, 'straight', 'log.jsonl')) as f:
        recs = [json.loads(line) for line in f]
    assert [(x['stage'], x['step']) for x in recs if x['kind'] == 'train'] == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert all(x['llm_tokens'] > 0 and x['time'] >= 0 for x in recs if x['kind'] == 'train')
    assert recs[0]['kind'] == 'setup' and recs[0]['gpt_params'] > 0 and 'vqa' in recs[-1]
    assert os.path.exists(os.path.join(setok_dir, 'straight', 'curves.png'))
    return params(setok_dir, 'straight')


def test_resume_is_bit_identical(world, setok_dir, straight):
    run(world, setok_dir, 'split', 'stage2_max_iters=2', 'llm_batch_size=8', *COMMON)
    r = run(world, setok_dir, 'split', 'stage2_max_iters=4', 'llm_batch_size=8', 'init_from=resume', *COMMON)
    assert 'with changed settings: stage2_max_iters 2 -> 4' in r.stdout      # allowed, and said
    b = params(setok_dir, 'split')
    for k in straight:
        assert torch.equal(straight[k], b[k]), k
    # the checkpoint holds what sample.py needs to rebuild everything
    from checkpoint import load_setokim
    model, tk, setok, detok, ck = load_setokim(os.path.join(setok_dir, 'straight', 'stage2.pt'))
    assert ck['step'] == 4 and ck['setok_overrides'] == {'tokenizer': 'setok'} and tk.vocab_size + 1 == model.cfg.vocab_size
    # the SeTok checkpoint is found relative to the SETOKIM one, so the out folder can move as a whole
    import shutil
    moved = shutil.copytree(setok_dir, os.path.join(os.path.dirname(setok_dir), 'moved_out'))
    os.rename(os.path.join(setok_dir, 'ckpt.pt'), os.path.join(setok_dir, 'ckpt.pt.away'))
    try:
        _, _, setok2, _, _ = load_setokim(os.path.join(moved, 'straight', 'stage2.pt'))
        assert all(torch.equal(a, b) for a, b in zip(setok.state_dict().values(), setok2.state_dict().values()))
    finally:
        os.rename(os.path.join(setok_dir, 'ckpt.pt.away'), os.path.join(setok_dir, 'ckpt.pt'))
    # a checkpoint written before pos_emb existed (it had learned positions) loads and evaluates
    old = shutil.copytree(os.path.join(setok_dir, 'split'), os.path.join(setok_dir, 'old'))
    for s in (1, 2):
        ck = torch.load(os.path.join(old, f'stage{s}.pt'), weights_only=True)
        assert ck['gpt_config'].pop('pos_emb') == 'learned'
        torch.save(ck, os.path.join(old, f'stage{s}.pt'))
    assert load_setokim(os.path.join(old, 'stage2.pt'))[0].cfg.pos_emb == 'learned'
    r = run(world, setok_dir, 'old', 'stage2_max_iters=4', 'llm_batch_size=8', 'eval_only=True', *COMMON)
    assert 'VQA' in r.stdout


def test_ddp_two_processes_match_one(world, setok_dir):
    # the regression head: the diffusion loss draws its noise in each process, so with it two processes
    # are another (equally valid) draw than one. float32: under bf16 autocast each process rounds its own
    # half-batch's activations. rope2d: its position head's loss is normalised by the global batch too
    same = ('stage2_max_iters=4', 'gen_head=mse', 'dtype=float32', 'pos_emb=rope2d', *COMMON)
    run(world, setok_dir, 'one', 'llm_batch_size=8', *same)
    run(world, setok_dir, 'two', 'llm_batch_size=4', *same, torchrun=True)
    a, b = params(setok_dir, 'one'), params(setok_dir, 'two')
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k


def test_missing_setok_checkpoint_and_bad_settings_are_one_line_errors(world, tmp_path):
    r = run(world, str(tmp_path), 'x', check=False)
    assert r.returncode == 2 and 'SeTok checkpoint' in r.stderr and 'not found' in r.stderr
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr
    for bad in ('gen_head=gan', 'diff_draws=0', 'cond_drop=1', 'copy_tau=0', 'pos_emb=sinusoid'):   # before any work
        # (diff_steps, img_temperature and cfg_scale go through the same check; sample.py's tests try them)
        r = run(world, str(tmp_path), 'x', bad, check=False)
        assert r.returncode == 2 and r.stderr.startswith(f'error: {bad}') and r.stderr.count('\n') == 1, (bad, r.stderr)
