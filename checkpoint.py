"""
Checkpoints, in one place: every script saves, loads and checks them here, and loads trained models
from them here.

    save_checkpoint(obj, path)              atomic: a kill during the save keeps the previous file
    load_checkpoint(path, kind)             a dict written by save_checkpoint, or a one-line error
    check_config(path, saved, wanted)       the same model shape, or a one-line error naming the difference
    load_weights(module, state, path)       load_state_dict, or a one-line error saying "retrain"
    rng_state() / set_rng_state(state)      everything exact resume needs from the random generators
    load_setok(path)                        (setok, detok, ckpt) from train_setok.py's ckpt.pt
    load_setokim(path)                      (model, text tokenizer, setok, detok, ckpt) from train_setokim.py's

A checkpoint is a dict with a 'kind' ('setok' or 'setokim'), the model's state dict and the configs
that rebuild the model; a training checkpoint adds the optimizer, the step, the RNG states, the run's
settings ('config') and, for streamed data, the loader's position ('data').
"""
import os
import random

import numpy as np
import torch

from common import atomic_save, die
from data.text import TextTokenizer
from detok import DetokConfig, Detokenizer
from setok import SeTok, SeTokConfig
from setokim import SETOKIM, GPTConfig


def save_checkpoint(obj, path):
    atomic_save(obj, path)


def load_checkpoint(path, kind=None, what='checkpoint'):
    """Load a checkpoint written by save_checkpoint, or die with a line that says what is wrong."""
    if not os.path.isfile(path):
        die(f"{what} {path} not found; train one first or pass its path")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        die(f"{path} is not a readable checkpoint ({type(e).__name__}); pass a file written by nanoSeTok")
    if not isinstance(ckpt, dict) or 'kind' not in ckpt:
        die(f"{path} is not a nanoSeTok checkpoint; pass a file written by train_setok.py or train_setokim.py")
    if kind is not None and ckpt['kind'] != kind:
        die(f"{path} is a {ckpt['kind']} checkpoint, but a {kind} checkpoint is needed here")
    return ckpt


def check_config(path, saved, wanted, fix="use the settings it was trained with"):
    """Die if a checkpoint's config `saved` differs from `wanted` ({key: value}) on any key whose wanted
    value is not None (None: anything goes)."""
    diff = [f"{k}={saved.get(k)!r} (here {v!r})" for k, v in wanted.items() if v is not None and saved.get(k) != v]
    if diff:
        die(f"{path} has another model shape: {', '.join(diff)}; {fix}")


def load_weights(module, state, path):
    """module.load_state_dict(state), or die saying the checkpoint is from another version of the model."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(e)
        die(f"{path} does not fit this version of the model ({first[:160]}); retrain it with this code")


def rng_state():
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# -----------------------------------------------------------------------------
# the trained models

def _config(cls, saved, path, key):
    if not isinstance(saved, dict) or set(saved) != set(cls.__dataclass_fields__):
        die(f"{path} is from another version of nanoSeTok ({key} has other fields); retrain it with this code")
    return saved


def load_setok(path, device='cpu', **overrides):
    """A trained SeTok and its detokenizer from a train_setok.py checkpoint, in eval mode.
    overrides: SeTokConfig fields to change that do not touch the weights (the clustering settings,
    tokenizer='grid'|'patch'). Returns (setok, detok, checkpoint dict)."""
    ck = load_checkpoint(path, kind='setok', what='SeTok checkpoint')
    setok = SeTok(SeTokConfig(**{**_config(SeTokConfig, ck.get('setok_config'), path, 'setok_config'), **overrides}))
    detok = Detokenizer(DetokConfig(**_config(DetokConfig, ck.get('detok_config'), path, 'detok_config')))
    sd = ck.get('model', {})
    load_weights(setok, {k[6:]: v for k, v in sd.items() if k.startswith('setok.')}, path)
    load_weights(detok, {k[6:]: v for k, v in sd.items() if k.startswith('detok.')}, path)
    return setok.to(device).eval(), detok.to(device).eval(), ck


def setok_ckpt_of(ck, path):
    """The SeTok checkpoint a SETOKIM checkpoint (ck, read from path) was trained on; it is stored
    relative to the SETOKIM checkpoint's folder."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), ck['setok_ckpt']))


def load_setokim(path, device='cpu', ck=None):
    """-> (model, text tokenizer, setok, detok, checkpoint dict), models in eval mode: a SETOKIM and
    the frozen SeTok + detokenizer it was trained with (the same tokenizer override)."""
    ck = ck or load_checkpoint(path, kind='setokim', what='SETOKIM checkpoint')
    model = SETOKIM(GPTConfig(**_config(GPTConfig, ck.get('gpt_config'), path, 'gpt_config')))
    load_weights(model, ck.get('model', {}), path)
    if 'text_tokenizer' not in ck or 'setok_ckpt' not in ck:
        die(f"{path} is from another version of nanoSeTok (no text tokenizer or SeTok checkpoint named); retrain it")
    tok = TextTokenizer(ck['text_tokenizer'])
    setok_path = setok_ckpt_of(ck, path)
    if not os.path.isfile(setok_path):
        die(f"{path} was trained on the SeTok checkpoint {setok_path}, which is gone")
    setok, detok, _ = load_setok(setok_path, device, **ck.get('setok_overrides', {}))
    return model.to(device).eval(), tok, setok, detok, ck
