"""bench.py at tiny shapes: the table parses, the batched and looped tokenizations agree, the
step rate read from a run's log.jsonl and the peak-memory reading are right, a failed run says why."""
import importlib
import re
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script


def parse_table(stdout):
    """The markdown table bench.py prints -> (header cells, [row cells])."""
    lines = [l for l in stdout.splitlines() if l.startswith('|')]
    cells = [[c.strip() for c in l.strip('|').split('|')] for l in lines]
    assert len(cells) >= 3 and set(cells[1]) == {'---'}
    assert all(len(c) == len(cells[0]) for c in cells), "a cell holds a stray '|'"
    return cells[0], cells[2:]


def test_tiny_bench_table_and_agreement():
    r = run_script('bench.py', 'rows=peak,tokenize,ratio', 'shapes=tiny', 'ratio_shape=tiny', 'repeats=2', 'tokenize_batch=6',
                   'ref_images=3', 'threads=1', 'compile=False', 'dtype=float32')   # float32: the tight agreement below
    assert f'torch {torch.__version__}' in r.stdout and 'cores' in r.stdout   # the machine is named
    head, rows = parse_table(r.stdout)
    assert head == ['row', 'figure', 'target', 'pass', 'check', 'notes']
    assert [c[0] for c in rows] == ['matmul peak, float32', 'matmul peak, bfloat16', 'tokenize, tiny shapes',
                                    'clustering + merger / encoder, tiny shapes']
    f32, bf16, tok, ratio = rows
    assert all(float(re.fullmatch(r'([\d.]+) GFLOP/s', p[1]).group(1)) > 0 for p in (f32, bf16))
    speedup = float(re.fullmatch(r'([\d.]+)x faster', tok[1]).group(1))
    assert speedup > 0 and tok[2] == '>= 10x' and tok[3] == ('pass' if speedup >= 10 else 'FAIL')
    # the looped reference ran on the same inputs and weights and gives the same clusters and tokens
    m = re.fullmatch(r'agree: labels ([\d.]+)% equal, max relative token error ([\d.e+-]+)', tok[4])
    assert m and float(m.group(1)) == 100.0 and float(m.group(2)) < 1e-4
    assert 'timed on 3 of 6 images and scaled x2' in tok[5] and 'median of 2' in tok[5]
    pct = float(re.fullmatch(r'([\d.]+)%', ratio[1]).group(1))
    assert pct > 0 and ratio[3] == ('pass' if pct <= 25 else 'FAIL')


def test_bad_settings_are_one_line_errors():
    for args, says in [(['rows=tokenize,speed'], 'unknown speed'),
                       (['rows=ratio,smoke', 'init_from=pretrained/gpt2'], 'add text_tokenizer=gpt2'),
                       (['rows=smoke', 'gen_head=vae'], 'unknown vae')]:
        r = run_script('bench.py', *args, check=False)                 # the smoke settings fail before any row runs
        assert r.returncode == 2 and says in r.stderr and 'Traceback' not in r.stderr


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['bench.py'])           # bench.py reads its settings on import
    return importlib.import_module('bench')


def test_mfu_is_the_counted_flop_rate_over_the_peak_of_the_runs_dtype(bench, monkeypatch):
    monkeypatch.setattr(bench, 'PEAKS', {torch.float32: (100e9, 2048), torch.bfloat16: (400e9, 2048)})
    log = [{'kind': 'setup', 'step': 0, 'dtype': 'bfloat16'}, {'kind': 'train', 'step': 1, 'flops': 2e9}]
    # 2 GFLOP a step at 10 steps/s: 20 GFLOP/s, 5% of the bf16 peak (20% of float32's)
    assert bench.mfu([{'log': log}], 10.0, 'cpu', 'flops') == \
        '20 GFLOP/s counted (2.00 GFLOP per step): MFU 5% of the bfloat16 matmul peak'
    log = [{'kind': 'setup', 'step': 0}, {'kind': 'train', 'step': 1, 'flops_tok': 1e7}]   # float32 when unsaid
    assert bench.mfu([{'log': log}], 5000.0, 'cpu', 'flops_tok').endswith('MFU 50% of the float32 matmul peak')
    assert bench.mfu([{'log': log[:1]}], 5000.0, 'cpu', 'flops_tok') == 'MFU: no FLOP count in the logs'


def test_agreement_catches_a_wrong_token_or_label(bench):
    s = bench.SHAPES['tiny']
    merger, pos = bench.merger_for(s, 'cpu')
    x, _ = bench.voronoi_features(4, s, 'cpu')
    with torch.no_grad():
        fast, ref = bench.batched(merger, pos, x, s), bench.looped(merger, pos, x[:2], s)
    assert bench.agreement(fast, ref)[0]
    tokens, labels, num = fast
    bad = tokens.clone()
    bad[1, 0] += 1e-2 * tokens.abs().max()
    assert not bench.agreement((bad, labels, num), ref)[0]
    moved = labels.clone()
    moved[0, 0] = (moved[0, 0] + 1) % num[0]
    assert not bench.agreement((tokens, moved, num), ref)[0]


# A stand-in for a training script: it holds ~300 MB and writes a RunLog (common.py) as train_setok.py
# does with log_interval=1: a setup record, then one train record per step, the final one after an eval.
FAKE = """
import sys, time, numpy as np
sys.path.insert(0, {root!r})
from common import RunLog
hold = np.ones(300 * 2 ** 20 // 8)                          # ~300 MB resident
log = RunLog(sys.argv[1])
log.write('setup', 0, params=1000)
for step in range(1, 13):
    time.sleep(0.5 if step <= 2 else 0.125)                 # two slow warm-up steps, then 8 steps/s
    if step == 12:
        time.sleep(1.0)                                     # the final eval, before the last step's record
    log.write('train', step, loss=1.0 / step, tokens=3.0)
print('done')
"""


def test_step_rate_from_the_log_and_peak_memory(bench, tmp_path):
    script, path = tmp_path / 'fake_train.py', tmp_path / 'run' / 'log.jsonl'
    script.write_text(FAKE.format(root=ROOT))
    r = bench.run([sys.executable, str(script), str(path)])
    assert r['rc'] == 0 and r['text'].strip() == 'done'
    records = bench.read_log(str(path), 'fake')
    assert [n for n, _ in bench.train_records(records)] == list(range(1, 13))
    rate = bench.steps_per_s(records, 2, 12)                 # from step 2 to 11: the last record before 12
    assert 6 < rate < 8.1, rate
    assert bench.steps_per_s(records, 0, 13) < 0.8 * rate    # with the warm-up steps and the final eval: slower
    with pytest.raises(bench.RunFailed, match='too few'):
        bench.steps_per_s(records, 11, 12)                   # one record to time from
    assert 300 * 2 ** 20 < r['maxrss'] < 2 ** 30


def test_stage_records_and_llm_tokens_per_step(bench, tmp_path):
    """train_setokim.py's log: each stage's train records alone, LLM tokens per step = llm_tokens / step."""
    log, t = bench.RunLog(str(tmp_path / 'log.jsonl')), 0.0
    log.write('setup', 0, params=2000, gpt_params=1500)
    for stage, dt, per_step in ((1, 0.5, 100), (2, 0.1, 300)):           # stage 1: 2 steps/s, stage 2: 10 steps/s
        for step in range(1, 9):
            t += dt
            log.t0 = time.time() - t                                     # the record's time is t (known)
            log.write('train', step, stage=stage, llm_tokens=per_step * step)
        log.write('eval', 8, stage=stage, test_ce=1.0)
    records = bench.read_log(str(tmp_path / 'log.jsonl'), 'fake')
    assert bench.steps_per_s(records, 2, 9, stage=1) == pytest.approx(2.0, rel=0.01)
    assert bench.steps_per_s(records, 2, 9, stage=2) == pytest.approx(10.0, rel=0.01)
    assert bench.llm_tokens_per_step(records, 1) == 100 and bench.llm_tokens_per_step(records, 2) == 300


def test_a_failed_run_says_what_failed(bench, tmp_path):
    script = tmp_path / 'broken.py'
    script.write_text("print('loading')\nraise SystemExit('error: no world here')\n")
    r = bench.run([sys.executable, str(script)])
    with pytest.raises(bench.RunFailed, match=r'broken.py exited 1: error: no world here'):
        bench.check_run(r, 'broken.py')
    with pytest.raises(bench.RunFailed, match='wrote no train records'):
        bench.read_log(str(tmp_path / 'missing.jsonl'), 'broken.py')
