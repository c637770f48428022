"""A checkpoint is data, never code (checkpoint.py), on real tiny train_setok.py runs: a checkpoint whose
pickle would run code is refused before anything in it runs; one writer per run folder; SIGKILL during
saves, repeated, always leaves a whole checkpoint; a run killed while saving at every step resumes, and
the next run takes over its lock and clears its temporary files. (What a resume checks:
test_train_setok.py and test_setokim.py.)"""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from checkpoint import load_checkpoint
from conftest import ROOT, run_script
from test_train_setok import TINY


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from data.shapes.prepare import prepare
    return prepare(data_dir=str(tmp_path_factory.mktemp('w') / 'world'), image_size=32, n_train=32, n_val=8, n_test=8,
                   workers=1)


def run(world, out, *args, check=True):
    return run_script('train_setok.py', *TINY, f'data_dir={world}', f'out_dir={out}', 'batch_size=4', *args, check=check)


def start(world, out, *args):
    """train_setok.py in the background (for the kill and lock tests)."""
    return subprocess.Popen([sys.executable, 'train_setok.py', *TINY, f'data_dir={world}', f'out_dir={out}', 'batch_size=4',
                             *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(path, p, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert p.poll() is None and time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


class WritesAFile:
    """Unpickling this calls open(marker, 'w'): what a malicious checkpoint could do with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def one_line_error(r, *fragments):
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr, r.stderr
    for f in fragments:
        assert f in r.stderr, r.stderr


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(world, tmp_path):
    marker = tmp_path / 'ran'
    out = tmp_path / 'run'
    out.mkdir()
    torch.save({'kind': 'setok', 'model': {}, 'payload': WritesAFile(str(marker))}, out / 'ckpt.pt')
    torch.load(out / 'ckpt.pt', weights_only=False)  # the payload is real: an unsafe load writes the file
    assert marker.exists()
    marker.unlink()
    img = tmp_path / 'x.png'
    from PIL import Image
    Image.new('RGB', (32, 32), (200, 30, 30)).save(img)
    for r in (run(world, out, 'init_from=resume', 'max_iters=2', check=False),
              run_script('sample.py', '--image', str(img), f'setok_ckpt={out / "ckpt.pt"}', f'out={tmp_path / "s"}', check=False)):
        one_line_error(r, 'is refused', 'would run code')
        assert not marker.exists()


def test_a_checkpoint_of_the_older_format_is_refused_with_a_line_that_says_retrain(tmp_path, capsys):
    """Before rng_state stored numpy's state as a tensor, checkpoints held numpy arrays, which a
    weights_only load does not build (numpy's array constructor is no safe global to allow)."""
    np.random.seed(3)
    torch.save({'kind': 'setok', 'rng': {'numpy': np.random.get_state()}}, tmp_path / 'old.pt')
    with pytest.raises(SystemExit) as e:
        load_checkpoint(str(tmp_path / 'old.pt'))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and 'older nanoSeTok' in err and 'retrain' in err


def test_one_writer_per_run_folder_and_a_stale_lock_is_taken_over(world, tmp_path):
    out = tmp_path / 'lock'
    p = start(world, out, 'max_iters=100000', 'eval_interval=100000')
    try:
        wait_for(out / '.lock', p)
        r = run(world, out, 'max_iters=1', check=False)
        one_line_error(r, 'is in use by another run', f'pid {p.pid}')
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (out / '.lock').exists()                 # a killed run cannot remove its lock (the kill test takes one over)


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from common import atomic_save
big = torch.arange(4_000_000, dtype=torch.float32)  # 16 MB: most of the loop's time is inside the save
i = 0
while True:
    atomic_save({{'kind': 'setok', 'step': i, 'x': big + i}}, sys.argv[1])
    i += 1
    if i == 1:
        open(sys.argv[1] + '.started', 'w').close()
"""


def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path):
    """A process that does nothing but save, killed at random moments (most of them inside a save):
    the checkpoint is always a whole one."""
    rng = random.Random(1)
    path = tmp_path / 'ckpt.pt'
    for _ in range(3):
        p = subprocess.Popen([sys.executable, '-c', SAVER.format(root=ROOT), str(path)])
        wait_for(str(path) + '.started', p)
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        ck = load_checkpoint(str(path), kind='setok')
        assert torch.equal(ck['x'], torch.arange(4_000_000, dtype=torch.float32) + ck['step'])   # whole, and one save's
        os.remove(str(path) + '.started')


def test_a_run_killed_while_saving_at_every_step_resumes(world, tmp_path):
    """SIGKILL at a random moment of a real run that saves at every step: its checkpoint loads, and the
    next run takes over the killed run's lock, clears its temporary files and resumes."""
    out = tmp_path / 'kill'
    p = start(world, out, 'max_iters=100000', 'eval_interval=1', 'eval_images=4')     # a save at every step
    wait_for(out / 'ckpt.pt', p)
    time.sleep(random.Random(0).uniform(0.2, 1.5))
    p.send_signal(signal.SIGKILL)
    p.wait()
    last = load_checkpoint(str(out / 'ckpt.pt'), kind='setok')['step']
    r = run(world, out, f'max_iters={last + 1}', 'eval_interval=1', 'init_from=resume')
    assert f'taking over {out / ".lock"}' in r.stdout                           # the killed run's lock
    assert load_checkpoint(str(out / 'ckpt.pt'))['step'] == last + 1
    assert not [f for f in os.listdir(out) if f.endswith('.tmp')], os.listdir(out)
    assert (out / '.lock').read_text() == ''                                     # released at exit
