"""
Pretrained weights and vocabularies from local files (nothing here downloads anything).

    vit_init=DIR (train_setok.py)      CLIP / SigLIP vision towers (Hugging Face layout) -> setok.ViT
    init_from=gpt2-local|DIR           GPT-2 (Hugging Face layout) -> setokim.GPT

A Hugging Face model folder is config.json + model.safetensors (read when the safetensors package is
installed) or pytorch_model.bin, possibly sharded (*.index.json). The weights map onto our modules
exactly: Block.pretrained_state (setok.py) folds the attention's key/value biases away without
changing any output, and setok.VIT_STYLES holds the details in which CLIP and SigLIP differ from our ViT.
"""
import json
import os

import torch
import torch.nn.functional as F

from common import die
from setok import Block

# -----------------------------------------------------------------------------
# Hugging Face model folders


def pretrained_config(path):
    """config.json of a Hugging Face model folder, as a dict (a one-line error when it is missing)."""
    if not os.path.isdir(path):
        die(f"pretrained weights {path}: no such folder; it should hold config.json and model.safetensors "
            f"or pytorch_model.bin (e.g. huggingface-cli download MODEL --local-dir {path})")
    try:
        with open(os.path.join(path, 'config.json')) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        die(f"{path}/config.json is missing or unreadable ({type(e).__name__}); download the whole model folder")


def pretrained_weights(path):
    """The weights of a Hugging Face model folder -> {name: float32 tensor}: model.safetensors (when
    the safetensors package is installed) or pytorch_model.bin, sharded ones (*.index.json) too."""
    try:
        import safetensors.torch
    except ImportError:
        safetensors = None
    files = None
    for name, ok in (('model.safetensors', safetensors is not None), ('pytorch_model.bin', True)):
        index = os.path.join(path, name + '.index.json')
        if ok and os.path.isfile(os.path.join(path, name)):
            files = [name]
        elif ok and os.path.isfile(index):
            files = sorted(set(json.load(open(index))['weight_map'].values()))
        if files:
            break
    if not files:
        hint = (" (model.safetensors is there: pip install safetensors)" if safetensors is None
                and os.path.isfile(os.path.join(path, 'model.safetensors')) else "")
        die(f"{path} has no pytorch_model.bin or model.safetensors{hint}")
    sd = {}
    for name in files:
        try:
            sd.update(safetensors.torch.load_file(os.path.join(path, name)) if name.endswith('.safetensors')
                      else torch.load(os.path.join(path, name), map_location='cpu', weights_only=True))
        except Exception as e:
            die(f"{path}/{name} is not a readable checkpoint ({type(e).__name__}); download it again")
    return {k: v.float() for k, v in sd.items() if torch.is_tensor(v)}


def pretrained_tensor(sd, key, path):
    """sd[key], or a one-line error naming the checkpoint: it is not in the layout we read."""
    if key not in sd:
        die(f"{path} has no tensor {key}; is it the right kind of model?")
    return sd[key]


# -----------------------------------------------------------------------------
# CLIP / SigLIP vision towers -> setok.ViT


def vit_shape(cfg, path=''):
    """config.json of a CLIP / SigLIP model (the vision tower, or the whole two-tower model) -> the
    SeTokConfig fields that fix the encoder: vit_style, dim, depth, n_head, patch_size, vit_mlp, vit_act.
    Keys that config.json leaves out have Hugging Face's defaults."""
    style = {'clip': 'clip', 'clip_vision_model': 'clip', 'siglip': 'siglip',
             'siglip_vision_model': 'siglip'}.get(cfg.get('model_type'))
    if style is None:
        die(f"{path}/config.json: model_type {cfg.get('model_type')!r} is not a CLIP or SigLIP vision model")
    v = cfg.get('vision_config', cfg)
    act = {'quick_gelu': 'quick_gelu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh'}.get(
        v.get('hidden_act', 'quick_gelu' if style == 'clip' else 'gelu_pytorch_tanh'))
    if act is None:
        die(f"{path}/config.json: hidden_act {v['hidden_act']!r} is not one of quick_gelu, gelu, gelu_pytorch_tanh")
    return {'vit_style': style, 'dim': v.get('hidden_size', 768), 'depth': v.get('num_hidden_layers', 12),
            'n_head': v.get('num_attention_heads', 12), 'patch_size': v.get('patch_size', 32 if style == 'clip' else 16),
            'vit_mlp': v.get('intermediate_size', 3072), 'vit_act': act}


@torch.no_grad()
def load_vit(vit, sd, path=''):
    """CLIP / SigLIP vision weights (Hugging Face names, from pretrained_weights) into a ViT built with
    their vit_shape. The learned positions are resized (bicubic) to our patch grid when the image
    size differs from the one they were trained at."""
    sd = {k.split('vision_model.', 1)[1]: v for k, v in sd.items() if 'vision_model.' in k}   # no text tower
    t = lambda k: pretrained_tensor(sd, k, path)
    pair = lambda k: (t(k + '.weight'), t(k + '.bias'))
    pos = t('embeddings.position_embedding.weight')                          # ((1 +) g0*g0, C)
    head, pos = pos[:vit.pos.shape[0] - vit.grid ** 2], pos[vit.pos.shape[0] - vit.grid ** 2:]   # class row, grid rows
    g0, C = int(round(pos.shape[0] ** 0.5)), pos.shape[1]
    if g0 != vit.grid:
        pos = F.interpolate(pos.T.reshape(1, C, g0, g0), size=(vit.grid, vit.grid), mode='bicubic',
                            align_corners=False).reshape(C, -1).T           # (g*g, C)
    out = {'patch.weight': t('embeddings.patch_embedding.weight'), 'pos': torch.cat([head, pos]),
           'ln.weight': t('post_layernorm.weight'), 'ln.bias': t('post_layernorm.bias')}
    if vit.patch.bias is not None:
        out['patch.bias'] = t('embeddings.patch_embedding.bias')
    if vit.cls is not None:
        out['cls'] = t('embeddings.class_embedding')
        out['ln_pre.weight'], out['ln_pre.bias'] = pair('pre_layrnorm')      # (sic: Hugging Face's spelling)
    for i in range(len(vit.blocks)):
        L = f'encoder.layers.{i}.'
        blk = Block.pretrained_state(pair(L + 'layer_norm1'), pair(L + 'self_attn.q_proj'), pair(L + 'self_attn.k_proj'),
                                     pair(L + 'self_attn.v_proj'), pair(L + 'self_attn.out_proj'),
                                     pair(L + 'layer_norm2'), pair(L + 'mlp.fc1'), pair(L + 'mlp.fc2'))
        out.update({f'blocks.{i}.{k}': v for k, v in blk.items()})
    try:
        vit.load_state_dict(out)                                            # strict: every weight is set
    except RuntimeError as e:
        die(f"{path} does not fit the encoder its config.json describes ({str(e).splitlines()[-1].strip()})")


# -----------------------------------------------------------------------------
# GPT-2 -> setokim.GPT. Hugging Face's GPT-2 keeps nn.Linear weights TRANSPOSED ("Conv1D": (in, out),
# y = x @ W + b) and fuses q, k, v into one c_attn. The vocabulary grows by the rows GPT-2 lacks (the
# special tokens, pad, VIS), each started at the mean of GPT-2's embeddings; the LM head stays tied.


def gpt2_shape(hf):
    """config.json of a GPT-2 -> the GPTConfig fields it fixes (n_layer, n_head, n_embd)."""
    if hf.get('model_type', 'gpt2') != 'gpt2':
        die(f"init_from: model_type {hf.get('model_type')!r} is not gpt2")
    act, eps, C = hf.get('activation_function', 'gelu_new'), hf.get('layer_norm_epsilon', 1e-5), hf.get('n_embd', 768)
    if act not in ('gelu_new', 'gelu_pytorch_tanh') or eps != 1e-5 or hf.get('n_inner') not in (None, 4 * C):
        die(f"init_from: this GPT-2 has activation {act}, eps {eps}, n_inner {hf.get('n_inner')}; ours has gelu_new, "
            f"1e-5 and 4 * n_embd")
    return {'n_layer': hf.get('n_layer', 12), 'n_head': hf.get('n_head', 12), 'n_embd': C}


@torch.no_grad()
def init_gpt2(gpt, folder):
    """GPT-2's weights from a Hugging Face folder into `gpt` -> the one line that says so."""
    n_pos = load_gpt2(gpt, pretrained_weights(folder), folder)
    block = gpt.cfg.block_size
    return f"GPT-2 weights from {folder}" + (f"; positions {n_pos}..{block - 1} start random (GPT-2 has {n_pos})"
                                             if block > n_pos else '')


def init_vit(vit, folder, freeze=False):
    """A ViT's weights from a CLIP / SigLIP folder ('' = keep them as they are), then frozen if asked
    (the paper's frozen encoder)."""
    if folder:
        load_vit(vit, pretrained_weights(folder), folder)
    if freeze:
        vit.freeze()


def load_gpt2(gpt, sd, path=''):
    """Hugging Face GPT-2 weights `sd` (pretrained_weights) into `gpt`, built with gpt2_shape.
    Returns GPT-2's number of positions; block_size rows past it keep their random init."""
    c = gpt.cfg
    sd = {k.removeprefix('transformer.'): v for k, v in sd.items()}             # GPT2LMHeadModel -> GPT2Model names
    t = lambda k: pretrained_tensor(sd, k, path)
    pair = lambda k, conv1d=False: (t(k + '.weight').T if conv1d else t(k + '.weight'), t(k + '.bias'))
    wte, wpe = t('wte.weight'), t('wpe.weight')                                 # (V0, C), (P0, C)
    V0, P0 = len(wte), len(wpe)
    if V0 > c.vocab_size:
        die(f"{path}: GPT-2's vocabulary has {V0} ids, the text tokenizer fewer ({c.vocab_size - 1}); "
            f"use text_tokenizer=gpt2")
    wte = torch.cat([wte, wte.mean(0).expand(c.vocab_size - V0, -1)])          # (V, C) specials, pad, VIS appended
    pos = gpt.wpe.weight.detach().cpu().clone()                                 # (block_size, C)
    pos[:min(P0, c.block_size)] = wpe[:c.block_size]
    out = {'wte.weight': wte, 'lm_head.weight': wte, 'wpe.weight': pos, 'ln_f.weight': t('ln_f.weight'),
           'ln_f.bias': t('ln_f.bias')}
    for i in range(c.n_layer):
        h = f'h.{i}.'
        w, b = pair(h + 'attn.c_attn', conv1d=True)                             # (3C, C), (3C,)
        (wq, wk, wv), (bq, bk, bv) = w.chunk(3), b.chunk(3)                     # q, k, v in this order
        blk = Block.pretrained_state(pair(h + 'ln_1'), (wq, bq), (wk, bk), (wv, bv), pair(h + 'attn.c_proj', True),
                                     pair(h + 'ln_2'), pair(h + 'mlp.c_fc', True), pair(h + 'mlp.c_proj', True))
        out.update({f'blocks.{i}.{k}': v for k, v in blk.items()})
    try:
        gpt.load_state_dict(out)                                                # strict: every weight is set
    except RuntimeError as e:
        die(f"{path} does not fit the GPT its config.json describes ({str(e).splitlines()[-1].strip()})")
    return P0
