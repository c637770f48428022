"""Pretrained parts from local files: tiktoken's GPT-2 BPE (never downloaded: a clear error instead),
GPT-2 weights into setokim's GPT, CLIP / SigLIP vision weights into setok's ViT, a frozen encoder,
and bench.py's smoke row (both models at a preset's shapes, built with those weights). Every
checkpoint here is written by the test in the Hugging Face layout (random values), and every loaded
model is held to an independent numpy forward written from the raw Hugging Face tensors."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from conftest import run_script
from data.text import GPT2_BPE_FILES, TextTokenizer
from pretrained import gpt2_shape, load_gpt2, load_vit, pretrained_config, pretrained_weights, vit_shape
from setok import ViT
from setokim import GPT, GPTConfig

# -----------------------------------------------------------------------------
# helpers: writing Hugging Face folders, numpy reference forwards


def write_hf(folder, config, sd, fmt='bin'):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f)
    if fmt == 'bin':
        torch.save(sd, os.path.join(folder, 'pytorch_model.bin'))
    else:
        import safetensors.torch
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, 'model.safetensors'))
    return str(folder)


def ln(x, w, b, eps):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(q, k, v, n_head, causal):
    """q, k, v (B, T, C) -> (B, T, C): softmax(q k^T / sqrt(d)) v per head."""
    B, T, C = q.shape
    heads = lambda x: x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)
    s = heads(q) @ heads(k).transpose(0, 1, 3, 2) / math.sqrt(C // n_head)       # (B, h, T, T)
    if causal:
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ heads(v)).transpose(0, 2, 1, 3).reshape(B, T, C)


# -----------------------------------------------------------------------------
# the GPT-2 BPE through tiktoken


def tiny_bpe():
    """A hand-made tiktoken Encoding: the 256 bytes, a few merges, <|endoftext|> last (GPT-2's layout)."""
    import tiktoken
    ranks = {bytes([i]): i for i in range(256)}
    for m in (b'th', b'the', b' the', b'ci', b'cir', b'circ', b'le', b'circle', b' circle', b're', b' re', b' red'):
        ranks[m] = len(ranks)
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name='tiny', pat_str=pat, mergeable_ranks=ranks, special_tokens={'<|endoftext|>': len(ranks)})


def test_tiktoken_specials_are_appended_and_text_round_trips():
    enc = tiny_bpe()
    n = enc.n_vocab                                                   # 256 bytes + 12 merges + <|endoftext|>
    tok = TextTokenizer(enc)
    assert n == 269 and tok.eos == n - 1
    assert [tok.img, tok.img_end, tok.seg, tok.user, tok.assistant, tok.pad] == list(range(n, n + 6))
    assert tok.vocab_size == n + 6
    ids = tok.encode('[USER] [Img][/Img] the red circle? [ASSISTANT] [SEG]')
    assert ids[:3] == [tok.user, tok.img, tok.img_end] and ids[-2:] == [tok.assistant, tok.seg]
    assert enc.encode_single_token(b' red') in ids and enc.encode_single_token(b' circle') in ids   # the merges are used
    assert max(i for i in ids if i < n) < n - 1                       # no special spelling went through the BPE
    for text in ('the red circle is left of the blue square', 'a 3x3 grid, 17 objects!', 'unicode: café ⊂ ∀'):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode('[USER] the circle') + [tok.pad, tok.eos, 5]) == '[USER] the circle'


def no_network(monkeypatch):
    """tiktoken reads every remote file through tiktoken.load.read_file: make any call a failure."""
    import tiktoken.load
    urls = []

    def refuse(blobpath):
        urls.append(blobpath)
        raise AssertionError(f'network access to {blobpath}')
    monkeypatch.setattr(tiktoken.load, 'read_file', refuse)
    return urls


def test_gpt2_bpe_not_cached_is_a_clear_error_and_never_a_download(tmp_path, monkeypatch, capsys):
    urls = no_network(monkeypatch)
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path))
    # the files we look for are the ones tiktoken itself would fetch and cache under sha1(url)
    from tiktoken_ext import openai_public
    with pytest.raises(AssertionError):
        openai_public.gpt2()
    assert urls and set(urls) <= set(GPT2_BPE_FILES.values())
    urls.clear()
    with pytest.raises(SystemExit) as e:
        TextTokenizer('tiktoken:gpt2')
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and not urls and len(err.splitlines()) == 1
    assert str(tmp_path) in err and "tiktoken.get_encoding('gpt2')" in err and 'vocab.bpe' in err
    import hashlib
    for url in GPT2_BPE_FILES.values():
        assert hashlib.sha1(url.encode()).hexdigest() in err        # the cache file names to copy
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')                      # tiktoken's "no cache": it would always download
    with pytest.raises(SystemExit):
        TextTokenizer('tiktoken:gpt2')
    assert 'switched off' in capsys.readouterr().err and not urls


def test_train_setokim_text_tokenizer_gpt2_without_cache_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', str(tmp_path / 'cache'))
    r = run_script('train_setokim.py', 'text_tokenizer=gpt2', f'out_dir={tmp_path}', check=False)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'not in tiktoken' in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# GPT-2 weights

def tiny_gpt2(V=269, P=24, C=16, L=2, H=2, seed=0, prefix='transformer.'):
    """A random GPT-2 in Hugging Face's layout: Conv1D weights are (in, out); GPT2LMHeadModel's names
    (prefix 'transformer.', a tied lm_head.weight and the causal-mask buffers older files carry)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    sd = {'wte.weight': r(V, C), 'wpe.weight': r(P, C), 'ln_f.weight': 1 + r(C), 'ln_f.bias': r(C)}
    for i in range(L):
        h = f'h.{i}.'
        sd.update({h + 'ln_1.weight': 1 + r(C), h + 'ln_1.bias': r(C), h + 'ln_2.weight': 1 + r(C), h + 'ln_2.bias': r(C),
                   h + 'attn.c_attn.weight': r(C, 3 * C), h + 'attn.c_attn.bias': r(3 * C),   # k and v biases too
                   h + 'attn.c_proj.weight': r(C, C), h + 'attn.c_proj.bias': r(C),
                   h + 'mlp.c_fc.weight': r(C, 4 * C), h + 'mlp.c_fc.bias': r(4 * C),
                   h + 'mlp.c_proj.weight': r(4 * C, C), h + 'mlp.c_proj.bias': r(C),
                   h + 'attn.bias': torch.tril(torch.ones(1, 1, P, P)), h + 'attn.masked_bias': torch.tensor(-1e4)})
    sd = {prefix + k: v for k, v in sd.items()}
    if prefix:
        sd['lm_head.weight'] = sd[prefix + 'wte.weight']
    cfg = {'model_type': 'gpt2', 'vocab_size': V, 'n_positions': P, 'n_embd': C, 'n_layer': L, 'n_head': H,
           'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5}
    return cfg, sd


def gpt2_reference(sd, ids, n_layer, n_head, prefix='transformer.'):
    """GPT-2's forward in numpy (float64), straight from the Hugging Face tensors: x @ W + b with the
    Conv1D (in, out) weights as they are, the fused c_attn split into q, k, v, gelu_new -> logits."""
    g = lambda k: sd[prefix + k].double().numpy()
    T = ids.shape[1]
    x = g('wte.weight')[ids] + g('wpe.weight')[:T]
    for i in range(n_layer):
        h = f'h.{i}.'
        a = ln(x, g(h + 'ln_1.weight'), g(h + 'ln_1.bias'), 1e-5) @ g(h + 'attn.c_attn.weight') + g(h + 'attn.c_attn.bias')
        q, k, v = np.split(a, 3, axis=-1)
        x = x + attention(q, k, v, n_head, causal=True) @ g(h + 'attn.c_proj.weight') + g(h + 'attn.c_proj.bias')
        m = ln(x, g(h + 'ln_2.weight'), g(h + 'ln_2.bias'), 1e-5) @ g(h + 'mlp.c_fc.weight') + g(h + 'mlp.c_fc.bias')
        m = gelu_tanh(m)
        x = x + m @ g(h + 'mlp.c_proj.weight') + g(h + 'mlp.c_proj.bias')
    return ln(x, g('ln_f.weight'), g('ln_f.bias'), 1e-5) @ g('wte.weight').T      # (B, T, V) tied head


def check_gpt2_folder(folder, sd, prefix):
    """Load the folder into a GPT whose vocabulary is the tiny BPE's + specials + pad + VIS, and whose
    block_size is past GPT-2's positions; compare logits with the reference on BPE ids."""
    tok = TextTokenizer(tiny_bpe())
    hf = pretrained_config(folder)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size + 1, block_size=32, **gpt2_shape(hf)))
    wpe_random = gpt.wpe.weight[24:].detach().clone()
    assert load_gpt2(gpt, pretrained_weights(folder), folder) == 24
    a = tok.encode('the red circle is at the top left of the blue square')
    b = tok.encode('a large red circle, centred at the bottom')
    ids = torch.tensor([a[:20], b[:20]])                              # (2, 20) BPE ids, merges included
    with torch.no_grad():
        logits = gpt.lm_head(gpt(gpt.wte(ids), torch.ones_like(ids, dtype=torch.bool))).double()
    ref = gpt2_reference(sd, ids.numpy(), hf['n_layer'], hf['n_head'], prefix)
    V0 = ref.shape[-1]
    np.testing.assert_allclose(logits[..., :V0].numpy(), ref, rtol=1e-4, atol=1e-4)
    wte = sd[prefix + 'wte.weight']
    new_rows = gpt.wte.weight[V0:].detach()                           # specials, pad, VIS: the mean embedding
    assert len(new_rows) == tok.vocab_size + 1 - V0 == 7
    assert torch.allclose(new_rows, wte.mean(0).expand_as(new_rows), atol=1e-6)
    assert gpt.lm_head.weight is gpt.wte.weight                       # still tied
    assert torch.equal(gpt.wpe.weight[24:], wpe_random)               # past GPT-2's positions: our init


def test_gpt2_bin_gives_the_reference_logits(tmp_path):
    cfg, sd = tiny_gpt2()
    check_gpt2_folder(write_hf(tmp_path / 'gpt2', cfg, sd), sd, 'transformer.')


def test_gpt2_safetensors_gives_the_reference_logits(tmp_path):
    pytest.importorskip('safetensors')
    cfg, sd = tiny_gpt2(seed=1, prefix='')                            # GPT2Model's names, no lm_head
    sd = {k: v for k, v in sd.items() if not k.endswith(('.attn.bias', '.masked_bias'))}
    check_gpt2_folder(write_hf(tmp_path / 'gpt2', cfg, sd, fmt='safetensors'), sd, '')


def test_gpt2_bad_folders_are_one_line_errors(tmp_path, capsys):
    cfg, sd = tiny_gpt2()
    gpt = GPT(GPTConfig(vocab_size=100, block_size=8, **gpt2_shape(cfg)))
    cases = {'no such folder': lambda: pretrained_config(str(tmp_path / 'missing')),
             'config.json': lambda: pretrained_config(str(tmp_path)),
             'no pytorch_model.bin': lambda: pretrained_weights(str(tmp_path)),
             'use text_tokenizer=gpt2': lambda: load_gpt2(gpt, sd, 'x')}         # 269 ids > 100
    (tmp_path / 'broken').mkdir()
    (tmp_path / 'broken' / 'pytorch_model.bin').write_bytes(b'not a checkpoint')
    cases['not a readable checkpoint'] = lambda: pretrained_weights(str(tmp_path / 'broken'))
    cases['no tensor h.1.ln_2.weight'] = lambda: load_gpt2(GPT(GPTConfig(vocab_size=300, block_size=8, **gpt2_shape(cfg))),
                                                           {k: v for k, v in sd.items() if 'h.1.ln_2.weight' not in k})
    for want, call in cases.items():
        with pytest.raises(SystemExit) as e:
            call()
        err = capsys.readouterr().err
        assert e.value.code == 2 and want in err and len(err.strip().splitlines()) == 1, (want, err)


# -----------------------------------------------------------------------------
# CLIP / SigLIP vision weights


def tiny_vision(style, C=16, L=2, H=2, I=40, p=4, image=16, seed=0, whole_model=False):
    """A random CLIPVisionModel / SiglipVisionModel in Hugging Face's layout (MLP width I != 4C).
    whole_model: the two-tower CLIPModel / SiglipModel (config nested, text tower and head present)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    n = (image // p) ** 2 + (style == 'clip')
    e = 'vision_model.embeddings.'
    sd = {e + 'patch_embedding.weight': r(C, 3, p, p), e + 'position_embedding.weight': r(n, C),
          e + 'position_ids': torch.arange(n)[None],
          'vision_model.post_layernorm.weight': 1 + r(C), 'vision_model.post_layernorm.bias': r(C)}
    if style == 'clip':
        sd.update({e + 'class_embedding': r(C), 'vision_model.pre_layrnorm.weight': 1 + r(C),
                   'vision_model.pre_layrnorm.bias': r(C)})
    else:
        sd[e + 'patch_embedding.bias'] = r(C)
    for i in range(L):
        h = f'vision_model.encoder.layers.{i}.'
        for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
            sd.update({h + f'self_attn.{proj}.weight': r(C, C), h + f'self_attn.{proj}.bias': r(C)})
        sd.update({h + 'layer_norm1.weight': 1 + r(C), h + 'layer_norm1.bias': r(C), h + 'layer_norm2.weight': 1 + r(C),
                   h + 'layer_norm2.bias': r(C), h + 'mlp.fc1.weight': r(I, C), h + 'mlp.fc1.bias': r(I),
                   h + 'mlp.fc2.weight': r(C, I), h + 'mlp.fc2.bias': r(C)})
    vcfg = {'hidden_size': C, 'intermediate_size': I, 'num_hidden_layers': L, 'num_attention_heads': H,
            'patch_size': p, 'image_size': image,
            'hidden_act': 'quick_gelu' if style == 'clip' else 'gelu_pytorch_tanh',
            'layer_norm_eps': 1e-5 if style == 'clip' else 1e-6}
    if not whole_model:
        return {'model_type': f'{style}_vision_model', **vcfg}, sd
    sd.update({'text_model.embeddings.token_embedding.weight': r(10, C), 'logit_scale': torch.tensor(2.0),
               'vision_model.head.probe': r(1, 1, C)})
    return {'model_type': style, 'vision_config': vcfg, 'text_config': {'hidden_size': C}}, sd


def vision_reference(sd, cfg, img, style, pos_grid=None):
    """The CLIP / SigLIP vision forward in numpy from the Hugging Face tensors (patch features after
    post_layernorm, class token dropped). pos_grid: position rows to use instead (resized ones)."""
    v = cfg.get('vision_config', cfg)
    g = lambda k: sd['vision_model.' + k].double().numpy()
    C, p, H, eps = v['hidden_size'], v['patch_size'], v['num_attention_heads'], v['layer_norm_eps']
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)    # OpenAI CLIP's
    if style == 'siglip':
        mean, std = (0.5,) * 3, (0.5,) * 3
    x = (img.double().numpy() - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    B, _, S, _ = x.shape
    gs = S // p
    patches = x.reshape(B, 3, gs, p, gs, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, gs * gs, 3 * p * p)
    x = patches @ g('embeddings.patch_embedding.weight').reshape(C, -1).T          # (B, N, C): the conv
    if style == 'siglip':
        x = x + g('embeddings.patch_embedding.bias')
    pos = g('embeddings.position_embedding.weight')
    if style == 'clip':
        x = np.concatenate([np.broadcast_to(g('embeddings.class_embedding'), (B, 1, C)), x], 1)
    if pos_grid is not None:
        pos = np.concatenate([pos[:1], pos_grid]) if style == 'clip' else pos_grid
    x = x + pos
    if style == 'clip':
        x = ln(x, g('pre_layrnorm.weight'), g('pre_layrnorm.bias'), eps)
    act = (lambda u: u / (1 + np.exp(-1.702 * u))) if style == 'clip' else gelu_tanh
    for i in range(v['num_hidden_layers']):
        h = f'encoder.layers.{i}.'
        lin = lambda t, name: t @ g(h + name + '.weight').T + g(h + name + '.bias')
        a = ln(x, g(h + 'layer_norm1.weight'), g(h + 'layer_norm1.bias'), eps)
        y = attention(lin(a, 'self_attn.q_proj'), lin(a, 'self_attn.k_proj'), lin(a, 'self_attn.v_proj'), H, causal=False)
        x = x + lin(y, 'self_attn.out_proj')
        x = x + lin(act(lin(ln(x, g(h + 'layer_norm2.weight'), g(h + 'layer_norm2.bias'), eps), 'mlp.fc1')), 'mlp.fc2')
    x = ln(x, g('post_layernorm.weight'), g('post_layernorm.bias'), eps)
    return x[:, 1:] if style == 'clip' else x


def build_vit(cfg, image_size):
    s = vit_shape(cfg)
    return ViT(image_size, s['patch_size'], s['dim'], s['depth'], s['n_head'], s['vit_style'], s['vit_mlp'], s['vit_act'])


@pytest.mark.parametrize('style,whole_model', [('clip', False), ('siglip', True)])
def test_vision_weights_give_the_reference_features(tmp_path, style, whole_model):
    cfg, sd = tiny_vision(style, whole_model=whole_model)
    folder = write_hf(tmp_path / style, cfg, sd)
    vit = build_vit(pretrained_config(folder), 16)
    load_vit(vit, pretrained_weights(folder), folder)
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = vit(img)
    assert out.shape == (2, 16, 16)
    np.testing.assert_allclose(out.double().numpy(), vision_reference(sd, cfg, img, style), rtol=1e-4, atol=1e-4)


def test_vision_positions_are_resized_to_our_grid(tmp_path):
    cfg, sd = tiny_vision('clip', image=16)                           # trained at a 4 x 4 grid
    folder = write_hf(tmp_path / 'clip', cfg, sd)
    vit = build_vit(cfg, 24)                                          # ours: 6 x 6
    load_vit(vit, pretrained_weights(folder), folder)
    pos = sd['vision_model.embeddings.position_embedding.weight']
    assert torch.equal(vit.pos[0], pos[0])                            # the class token's row is kept as it is
    grid = pos[1:].T.reshape(1, 16, 4, 4)
    resized = torch.nn.functional.interpolate(grid, size=(6, 6), mode='bicubic', align_corners=False)[0].reshape(16, 36).T
    assert torch.allclose(vit.pos[1:], resized, atol=1e-6)
    img = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = vit(img)
    np.testing.assert_allclose(out.double().numpy(), vision_reference(sd, cfg, img, 'clip', resized.double().numpy()),
                               rtol=1e-4, atol=1e-4)


def test_frozen_encoder_stays_in_eval_mode_and_out_of_autograd():
    vit = ViT(16, 4, 16, 1, 2, 'clip')
    parent = torch.nn.Sequential(vit, torch.nn.Linear(16, 1))
    vit.freeze()
    parent.train()
    assert not vit.training and parent[1].training
    assert not any(p.requires_grad for p in vit.parameters())
    parent[1](vit(torch.rand(1, 3, 16, 16))).sum().backward()
    assert all(p.grad is None for p in vit.parameters()) and parent[1].weight.grad is not None


# -----------------------------------------------------------------------------
# the training scripts: vit_init + freeze_encoder; bench.py rows=smoke: vit_init, init_from=<GPT-2 folder>

TINY = ['image_size=32', 'token_dim=32', 'intra_depth=1', 'inter_depth=1', 'max_tokens=6', 'cluster_threshold=0.5',
        'dec_sprite_size=8', 'dec_dim=32', 'text_dim=32', 'text_depth=1', 'eval_images=8',
        'threads=1', 'batch_size=4', 'max_iters=2', 'eval_interval=2', 'warmup_iters=1', 'learning_rate=1e-2']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from data.shapes.prepare import prepare
    return prepare(data_dir=str(tmp_path_factory.mktemp('w') / 'world'), image_size=32, n_train=16, n_val=8, n_test=8,
                   workers=1)


def test_train_setok_with_a_frozen_pretrained_clip_encoder(world, tmp_path):
    cfg, sd = tiny_vision('clip', C=32, L=1, H=4, I=48, p=4, image=16)     # 4 x 4 grid, resized to our 8 x 8
    folder = write_hf(tmp_path / 'clip', cfg, sd)
    out = tmp_path / 'run'
    r = run_script('train_setok.py', *TINY, f'data_dir={world}', f'out_dir={out}', f'vit_init={folder}', 'freeze_encoder=True')
    assert 'vit_style=clip' in r.stdout
    ck = torch.load(out / 'ckpt.pt', weights_only=False)
    assert ck['setok_config']['vit_style'] == 'clip' and ck['setok_config']['vit_mlp'] == 48
    # the encoder holds the pretrained weights, untouched by training; everything else moved
    vit = build_vit(cfg, 32)
    load_vit(vit, sd)
    enc = {k[len('setok.encoder.'):]: v for k, v in ck['model'].items() if k.startswith('setok.encoder.')}
    assert enc.keys() == vit.state_dict().keys()
    for k, v in vit.state_dict().items():
        assert torch.equal(enc[k], v), k
    # the optimizer holds exactly the trainable parameters, everything but the encoder, and they were stepped
    n_opt = sum(len(g['params']) for g in ck['optimizer']['param_groups'])
    assert n_opt == len(ck['model']) - len(enc) and ck['step'] == 2
    assert len(ck['optimizer']['state']) == n_opt
    assert all(int(s['step']) == 2 for s in ck['optimizer']['state'].values())
    # resuming without vit_init is a one-line error (the encoder would be another one)
    r = run_script('train_setok.py', *TINY, f'data_dir={world}', f'out_dir={out}', 'init_from=resume', 'max_iters=4',
                   'depth=1', 'dim=32', 'n_head=4', 'patch_size=4', check=False)
    assert r.returncode == 2 and "vit_style='clip'" in r.stderr.strip().splitlines()[-1], r.stderr


def test_bench_smoke_setok_on_the_full_preset_shrunk_with_a_frozen_siglip(tmp_path):
    C, I = 32, 48
    cfg, sd = tiny_vision('siglip', C=C, L=1, H=4, I=I, p=16, image=64)   # 4 x 4 grid, resized to our 8 x 8
    folder = write_hf(tmp_path / 'siglip', cfg, sd)
    r = run_script('bench.py', 'rows=smoke', 'scripts=setok', 'config=full', 'threads=1', 'image_size=128', 'token_dim=32',
                   'dec_dim=16', 'text_dim=32', 'text_depth=1', 'max_tokens=8', f'vit_init={folder}', 'freeze_encoder=True')
    assert 'vit_style=siglip' in r.stdout and 'encoder siglip, frozen' in r.stdout
    # the encoder's parameters, counted independently: patches (weight + bias), learned positions (8 x 8),
    # one block (2 LayerNorms, q + bias, kv, proj + bias, MLP C -> I -> C with biases), post_layernorm
    enc = (3 * 16 * 16 * C + C) + 64 * C + (4 * C + C * C + C + 2 * C * C + C * C + C + C * I + I + I * C + C) + 2 * C
    assert f'encoder {enc / 1e6:.2f}M' in r.stdout, r.stdout
    total, trainable = map(float, re.search(r'total ([\d.]+)M, trainable ([\d.]+)M', r.stdout).groups())
    assert abs(total - trainable - enc / 1e6) < 0.006                 # the frozen encoder is all that is not trained
    m = re.search(r'\| smoke SeTok: one optimizer step \| ([\d.]+) s \|.*\| 1 random 128px image '
                  r'\(([\d.]+) tokens each\): loss ([\d.]+)', r.stdout)
    assert m and float(m.group(1)) > 0 and 1 <= float(m.group(2)) <= 8 and math.isfinite(float(m.group(3))), r.stdout
    assert 'SETOKIM' not in r.stdout                                   # scripts=setok: that model alone


def test_bench_smoke_setokim_from_a_gpt2_folder(tmp_path):
    cfg, sd = tiny_gpt2(V=300, P=64, C=32, L=2, H=4)
    folder = write_hf(tmp_path / 'gpt2', cfg, sd)
    small = ['rows=smoke', 'scripts=setokim', 'config=full', 'threads=1', 'mask_dim=16', 'mask_depth=1', 'mask_n_head=2',
             'block_size=256']
    r = run_script('bench.py', *small, f'init_from={folder}', 'text_tokenizer=gpt2')
    assert f'GPT-2 weights from {folder}; positions 64..255 start random' in r.stdout
    # the GPT takes GPT-2's shape (2 x 32) and GPT-2's vocabulary + 7 rows; counted here independently
    C, V = 32, 50257 + 7
    gpt = V * C + 256 * C + 2 * (4 * C + (C * C + C) + 2 * C * C + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)) + 2 * C
    assert f'GPT {gpt / 1e6:.2f}M' in r.stdout, r.stdout
    # one step of each stage, one conversation per task; config=full's SeTok: 64 tokens per image, and
    # each written image (t2i in stage 1, t2i and edit in stage 2) is 64 visual targets
    for s, n, written in ((1, 2, 1), (2, 5, 2)):
        m = re.search(rf'\| smoke SETOKIM stage {s} \([a-z0-9, ]+\): one optimizer step \| ([\d.]+) s \|.*\| {n} random '
                      rf'conversations of up to (\d+) tokens \(64 per image; (\d+) text, (\d+) visual and (\d+) mask '
                      rf'targets\): loss ([\d.]+)', r.stdout)
        assert m and math.isfinite(float(m.group(6))), r.stdout
        assert int(m.group(2)) <= 256 and int(m.group(3)) > 0 and int(m.group(4)) == 64 * written
        assert int(m.group(5)) == (s == 2)                                # stage 2's refer conversation: one mask
    assert 'smoke SeTok' not in r.stdout                                  # scripts=setokim: that model alone
