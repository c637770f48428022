"""train_setok.py on real (tiny) runs: the loss falls, resume is exact, 2-process DDP == 1 process,
a non-finite loss stops the run and keeps the last good checkpoint, eval writes its panel, and every
run writes log.jsonl and curves.png."""
import json
import os

import pytest
import torch

from conftest import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['image_size=32', 'patch_size=4', 'dim=32', 'depth=1', 'n_head=4', 'token_dim=32', 'intra_depth=1',
        'inter_depth=1', 'max_tokens=6', 'cluster_threshold=0.5', 'dec_sprite_size=8', 'dec_dim=32',
        'text_dim=32', 'text_depth=1', 'eval_images=8', 'log_interval=1', 'warmup_iters=2',
        'learning_rate=3e-3', 'threads=1']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from data.shapes.prepare import prepare
    return prepare(data_dir=str(tmp_path_factory.mktemp('w') / 'world'), image_size=32, n_train=48, n_val=8, n_test=8,
                   workers=1)


def run(world, out, *args, torchrun=False, check=True):
    return run_script('train_setok.py', *TINY, f'data_dir={world}', f'out_dir={out}', *args, torchrun=torchrun, check=check)


def params(out):
    return torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)['model']


def log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_a_few_steps_lower_the_loss(world, tmp_path):
    r = run(world, tmp_path / 'a', 'max_iters=30', 'eval_interval=30', 'batch_size=8')
    recs = log(tmp_path / 'a')
    train = [x for x in recs if x['kind'] == 'train']
    assert [x['step'] for x in train] == list(range(1, 31))
    assert train[-1]['loss'] < 0.8 * train[0]['loss'], train
    # the FLOPs of a step (forward + backward, attention included) are counted once, for bench.py's MFU
    assert recs[0]['kind'] == 'setup' and recs[0]['dtype'] in ('float32', 'bfloat16')
    assert all(x['flops'] == train[0]['flops'] > 1e7 for x in train)
    assert [x['kind'] for x in recs][-1] == 'eval' and recs[-1]['step'] == 30 and 'fg_ari' in recs[-1] and 'excess' in recs[-1]
    assert os.path.exists(tmp_path / 'a' / 'eval.png') and os.path.exists(tmp_path / 'a' / 'curves.png')
    assert all(name in r.stdout for name in ('FG-ARI', 'mBO', 'excess'))
    # piped output: a plain line every log_interval steps, no progress bar redrawn at every step
    assert r.stdout.count('train_setok ') == 30 and '\r' not in r.stdout + r.stderr


def test_resume_is_bit_identical(world, tmp_path):
    common = ['batch_size=4', 'lr_decay_iters=8', 'eval_interval=4']
    run(world, tmp_path / 'straight', 'max_iters=8', *common)
    run(world, tmp_path / 'split', 'max_iters=4', *common)
    r = run(world, tmp_path / 'split', 'max_iters=8', 'init_from=resume', *common)
    assert 'with changed settings: max_iters 4 -> 8' in r.stdout                # allowed, and said
    a, b = params(tmp_path / 'straight'), params(tmp_path / 'split')
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run's log reads as one straight run: the same steps and losses
    strip = lambda recs: [(x['kind'], x['step'], x.get('loss')) for x in recs if x['kind'] != 'setup']
    assert strip(log(tmp_path / 'straight')) == strip(log(tmp_path / 'split'))


def test_ddp_two_processes_match_one(world, tmp_path):
    # float32: under bf16 autocast (dtype=bfloat16) each process rounds its own
    # half-batch's activations, and Adam magnifies those roundings on near-zero gradients
    common = ['max_iters=3', 'eval_interval=3', 'lr_decay_iters=3', 'dtype=float32']
    run(world, tmp_path / 'one', 'batch_size=8', *common)
    run(world, tmp_path / 'two', 'batch_size=4', *common, torchrun=True)
    a, b = params(tmp_path / 'one'), params(tmp_path / 'two')
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k


def test_non_finite_loss_stops_and_keeps_the_checkpoint(world, tmp_path):
    out = tmp_path / 'nan'
    run(world, out, 'max_iters=2', 'eval_interval=2', 'batch_size=4')
    before = params(out)
    r = run(world, out, 'max_iters=6', 'eval_interval=2', 'batch_size=4', 'init_from=resume', 'learning_rate=1e30',
            check=False)
    assert r.returncode == 1 and 'loss is' in r.stderr and 'Traceback' not in r.stderr
    after = params(out)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert all(torch.equal(before[k], after[k]) for k in before)                # the step-2 checkpoint is intact


def test_bad_resume_and_shape_mismatch_are_one_line_errors(world, tmp_path):
    r = run(world, tmp_path / 'none', 'init_from=resume', check=False)
    assert r.returncode == 2 and 'not found' in r.stderr and r.stderr.count('\n') == 1
    run(world, tmp_path / 'm', 'max_iters=1', 'eval_interval=1', 'batch_size=4')
    r = run(world, tmp_path / 'm', 'eval_only=True', 'dim=64', check=False)
    assert r.returncode == 2 and 'dim=32' in r.stderr and 'Traceback' not in r.stderr
    # a resume checks what it resumes: another batch size would be another run
    r = run(world, tmp_path / 'm', 'max_iters=2', 'init_from=resume', 'batch_size=8', check=False)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'cannot resume' in r.stderr and 'batch_size=4 (now 8)' in r.stderr
