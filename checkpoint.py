"""
Checkpoints, in one place: every script saves, loads and checks them here, and loads trained models
from them here.

    save_checkpoint(obj, path)              atomic: a kill during the save keeps the previous file
    load_checkpoint(path, kind)             a dict written by save_checkpoint, or a one-line error;
                                            never runs code (see below)
    check_config(path, saved, wanted)       the same model shape, or a one-line error naming the difference
    check_resume(path, ck, config, keys)    a resume goes on with the same run, or a one-line error
    load_weights(module, state, path)       load_state_dict, or a one-line error saying "retrain"
    rng_state() / set_rng_state(state)      everything exact resume needs from the random generators
    RunLock(folder)                         one writer per run folder
    load_setok(path)                        (setok, detok, ckpt) from train_setok.py's ckpt.pt
    load_setokim(path)                      (model, text tokenizer, setok, detok, ckpt) from train_setokim.py's

A checkpoint is data, never code. A .pt file is a pickle, and unpickling can call any function the
file names (os.system included), so every load is torch.load(weights_only=True): only tensors and
plain Python values (dicts, lists, tuples, str, int, float, bool, None) come back, and a file that
names anything else is refused with a one-line error before anything in it runs. Everything our
checkpoints hold is of those kinds: numpy's RNG state is stored as a tensor (rng_state). Checkpoints
written before that hold numpy arrays, which such a load does not build: they are refused with a
line that says to retrain.

A checkpoint is a dict with a 'kind' ('setok' or 'setokim'), the model's state dict and the configs
that rebuild the model; a training checkpoint adds the optimizer, the step, the RNG states, the run's
settings ('config') and, for streamed data, the loader's position ('data').
"""
import atexit
import fcntl
import json
import os
import pickle
import random
import socket
import sys
import time

import numpy as np
import torch

from common import as_list, atomic_save, die, sweep_tmp
from data.text import TextTokenizer
from detok import DetokConfig, Detokenizer
from setok import SeTok, SeTokConfig
from setokim import SETOKIM, GPTConfig


def save_checkpoint(obj, path):
    atomic_save(obj, path)


def load_checkpoint(path, kind=None, what='checkpoint'):
    """Load a checkpoint written by save_checkpoint, or die with a line that says what is wrong. Only
    tensors and plain values are unpickled: a file that would run code is refused, and nothing runs."""
    if not os.path.isfile(path):
        die(f"{what} {path} not found; train one first or pass its path")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((l.strip() for l in str(e).splitlines() if 'GLOBAL' in l or 'Can only build' in l), None)
        if why is None:                                                     # not a pickle of ours at all
            die(f"{path} is not a readable checkpoint (UnpicklingError); pass a file written by nanoSeTok")
        if 'numpy' in why:                                                  # what older nanoSeTok checkpoints hold
            die(f"{path} was written by an older nanoSeTok (it holds numpy arrays, which a safe load does not "
                f"build); retrain it with this code")
        die(f"{path} is refused: it holds more than tensors and plain values, and loading it would run code "
            f"({why[:160]}); load only checkpoints written by nanoSeTok")
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


def check_resume(path, ck, now, keys, ignore=('init_from', 'eval_only')):
    """A resume must go on with the run that `ck` holds: the settings in `keys` (what shapes the run:
    model, data, mix, batch, seed, processes) must be the ones it was made with, else a one-line error
    (exit 2). Any other setting may change on purpose (a longer max_iters, another eval interval or
    learning rate); the changes are said in one line. now: this run's settings, and what the
    checkpoint keeps under 'run' (the number of processes, the data's identity)."""
    norm = lambda v: as_list(v) if isinstance(v, list) else v               # 'a,b' and ['a', 'b'] are one list
    saved = {k: norm(v) for k, v in {**ck.get('config', {}), **ck.get('run', {})}.items()}
    now = {k: norm(v) for k, v in now.items()}
    bad = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in keys if k in saved and k in now and saved[k] != now[k]]
    if bad:
        die(f"cannot resume {path}: it was made with {', '.join(bad)}; resume with the same settings, or start "
            f"a new run in another out_dir")
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in now if k in saved and saved[k] != now[k] and k not in ignore]
    if changed:
        print(f"resuming {path} with changed settings: {', '.join(changed)}", flush=True)


def rng_state():
    """The state of every random generator, as tensors and plain values (numpy's keys as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    name, keys, *rest = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        for i, s in enumerate(state['cuda'][:torch.cuda.device_count()]):   # as many GPUs as are visible now
            torch.cuda.set_rng_state(s, i)


# -----------------------------------------------------------------------------
# one writer per run folder

class RunLock:
    """One writer per run folder: an exclusive flock on folder/.lock, held for the life of the process.
    The kernel drops it when the process ends, however it ends (SIGKILL included), so a killed run never
    blocks the next one; the file also names its holder (pid, host, start, command) for the message a
    second run meets. A record left in the file by a run that did not exit cleanly is reported as taken
    over. Taking the lock also removes the temporary files of saves that killed runs left (sweep_tmp)."""

    def __init__(self, folder):
        self.path = os.path.join(folder, '.lock')
        try:
            os.makedirs(folder, exist_ok=True)
            self.file = open(self.path, 'a+')
        except OSError as e:
            die(f"cannot write into {folder} ({e.strerror}); choose an out_dir you can write to")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = self._record()
            die(f"{folder} is in use by another run (pid {other.get('pid')} on {other.get('host')}, since "
                f"{other.get('time')}: {other.get('command', '')}); wait for it or use another out_dir")
        other = self._record()
        if other.get('pid') not in (None, os.getpid()):
            print(f"note: taking over {self.path}, left by a run that ended without releasing it (pid {other['pid']})",
                  flush=True)
        self.file.seek(0)
        self.file.truncate()
        json.dump({'pid': os.getpid(), 'host': socket.gethostname(), 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
                   'command': ' '.join(sys.argv)[:200]}, self.file)
        self.file.flush()
        sweep_tmp(folder)
        atexit.register(self.release)

    def _record(self):
        try:
            self.file.seek(0)
            rec = json.loads(self.file.read() or '{}')
            return rec if isinstance(rec, dict) else {}
        except ValueError:
            return {}

    def release(self):
        """A clean exit empties the record (the kernel drops the flock itself)."""
        if not self.file.closed and self._record().get('pid') == os.getpid():
            self.file.seek(0)
            self.file.truncate()
            self.file.flush()


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
    if 'text_tokenizer' not in ck or 'setok_ckpt' not in ck:
        die(f"{path} is from another version of nanoSeTok (no text tokenizer or SeTok checkpoint named); retrain it")
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), ck['setok_ckpt']))


def gpt_config_of(ck):
    """A SETOKIM checkpoint's saved GPTConfig fields; those written before GPTConfig.pos_emb existed had
    learned positions."""
    saved = ck.get('gpt_config')
    return {'pos_emb': 'learned', **saved} if isinstance(saved, dict) else saved


def load_setokim(path, device='cpu', ck=None):
    """-> (model, text tokenizer, setok, detok, checkpoint dict), models in eval mode: a SETOKIM and
    the frozen SeTok + detokenizer it was trained with (the same tokenizer override)."""
    ck = ck or load_checkpoint(path, kind='setokim', what='SETOKIM checkpoint')
    model = SETOKIM(GPTConfig(**_config(GPTConfig, gpt_config_of(ck), path, 'gpt_config')))
    load_weights(model, ck.get('model', {}), path)
    setok_path = setok_ckpt_of(ck, path)
    tok = TextTokenizer(ck['text_tokenizer'])
    if not os.path.isfile(setok_path):
        die(f"{path} was trained on the SeTok checkpoint {setok_path}, which is gone")
    setok, detok, _ = load_setok(setok_path, device, **ck.get('setok_overrides', {}))
    return model.to(device).eval(), tok, setok, detok, ck
