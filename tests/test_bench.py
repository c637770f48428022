"""bench.py at tiny shapes: the table parses, the batched and looped tokenizations agree, the
timing of a script's progress bar and the peak-memory reading are right."""
import importlib
import re
import sys

import pytest
import torch

from conftest import run_script


def parse_table(stdout):
    """The markdown table bench.py prints -> (header cells, [row cells])."""
    lines = [l for l in stdout.splitlines() if l.startswith('|')]
    cells = [[c.strip() for c in l.strip('|').split('|')] for l in lines]
    assert len(cells) >= 3 and set(cells[1]) == {'---'}
    assert all(len(c) == len(cells[0]) for c in cells), "a cell holds a stray '|'"
    return cells[0], cells[2:]


def test_tiny_bench_table_and_agreement():
    r = run_script('bench.py', 'rows=tokenize,ratio', 'shapes=tiny', 'ratio_shape=tiny', 'repeats=2', 'batch_size=6',
                   'ref_images=3', 'threads=1', 'compile=False')
    assert f'torch {torch.__version__}' in r.stdout and 'cores' in r.stdout   # the machine is named
    head, rows = parse_table(r.stdout)
    assert head == ['row', 'figure', 'target', 'pass', 'check', 'notes']
    assert [c[0] for c in rows] == ['tokenize, tiny shapes', 'clustering + merger / encoder, tiny shapes']
    tok, ratio = rows
    speedup = float(re.fullmatch(r'([\d.]+)x faster', tok[1]).group(1))
    assert speedup > 0 and tok[2] == '>= 10x' and tok[3] == ('pass' if speedup >= 10 else 'FAIL')
    # the looped reference ran on the same inputs and weights and gives the same clusters and tokens
    m = re.fullmatch(r'agree: labels ([\d.]+)% equal, max relative token error ([\d.e+-]+)', tok[4])
    assert m and float(m.group(1)) == 100.0 and float(m.group(2)) < 1e-4
    assert 'timed on 3 of 6 images and scaled x2' in tok[5] and 'median of 2' in tok[5]
    pct = float(re.fullmatch(r'([\d.]+)%', ratio[1]).group(1))
    assert pct > 0 and ratio[3] == ('pass' if pct <= 25 else 'FAIL')


def test_bad_settings_are_one_line_errors():
    for arg, says in [('rows=tokenize,speed', 'unknown speed'), ('repeats=many', 'expected an int')]:
        r = run_script('bench.py', arg, check=False)
        assert r.returncode == 2 and says in r.stderr and 'Traceback' not in r.stderr


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['bench.py'])           # bench.py reads its settings on import
    return importlib.import_module('bench')


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


FAKE = """
import sys, time, numpy as np
from tqdm import tqdm
hold = np.ones(300 * 2 ** 20 // 8)                          # ~300 MB resident
bar = tqdm(total=12, desc='train_setok')
for i in range(12):
    time.sleep(0.5 if i < 2 else 0.125)                     # two slow warm-up steps, then 8 steps/s
    bar.update(1)
bar.close()
"""


def test_progress_bar_timing_and_peak_memory(bench, tmp_path):
    script = tmp_path / 'fake_train.py'
    script.write_text(FAKE)
    r = bench.run_timed([sys.executable, str(script)], 'train_setok')
    assert r['rc'] == 0 and set(r['steps']) >= {0, 2, 12}
    rate = bench.steps_per_s(r, 2, 12)                       # from step 2 to the last shown before 12
    assert 6 < rate < 8.1, rate
    assert bench.steps_per_s(r, 0, 12) < rate                # the warm-up steps are slower
    assert 300 * 2 ** 20 < r['maxrss'] < 2 ** 30
