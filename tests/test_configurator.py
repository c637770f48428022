"""The configurator: overrides, types, presets and each error (one line, exit code 2)."""
import os
import subprocess
import sys

import pytest

from common import configure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def settings():
    return {'lr': 1e-3, 'steps': 100, 'compile': False, 'name': 'x', 'images': [], 'np': None, 'HERE': '/'}


def test_overrides_and_types():
    ns = settings()
    cfg = configure(ns, ['lr=0.5', '--steps=7', '--name', 'hello', 'compile=true', '--images', 'a.png', 'b.png'], 'test')
    assert cfg == {'lr': 0.5, 'steps': 7, 'compile': True, 'name': 'hello', 'images': ['a.png', 'b.png']}
    assert ns['steps'] == 7 and isinstance(ns['lr'], float)
    assert configure(settings(), ['lr=2', 'steps=1e3'], 'test')['steps'] == 1000
    assert isinstance(configure(settings(), ['lr=2'], 'test')['lr'], float)


def test_preset_then_overrides_whatever_the_order():
    ns = {'image_size': 1, 'max_iters': 1, 'only_here': 'a'}
    cfg = configure(ns, ['max_iters=3', 'config=small'], 'test')
    assert cfg['max_iters'] == 3                       # the command line wins over the preset
    assert cfg['image_size'] == 64                     # from config/small.py
    assert cfg['only_here'] == 'a'                     # preset keys this script lacks are skipped


@pytest.mark.parametrize('argv, words', [
    (['nonsense=1'], ['nonsense', 'valid settings', 'steps']),
    (['stpes=3'], ['stpes', 'did you mean steps']),
    (['steps=abc'], ['steps=abc', 'int']),
    (['lr=fast'], ['lr=fast', 'float']),
    (['compile=maybe'], ['compile=maybe', 'bool']),
    (['config=nope'], ["no preset 'nope'", 'small', 'full']),
    (['bare'], ['bare', 'key=value']),
])
def test_errors_are_one_line_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        configure(settings(), argv, 'test')
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: ')
    for w in words:
        assert w in err


@pytest.mark.parametrize('script', ['train_setok.py', 'data/shapes/prepare.py'])
def test_scripts_reject_unknown_keys(script):
    r = subprocess.run([sys.executable, script, 'config=small', 'nonsense=1'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count('\n') == 1 and 'nonsense' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('arg', ['cluster_merge=-0.5', 'cluster_min_size=-1'])
def test_train_setok_rejects_bad_clustering_values(arg):
    r = subprocess.run([sys.executable, 'train_setok.py', 'config=small', arg], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count('\n') == 1 and arg in r.stderr and 'Traceback' not in r.stderr, r.stderr


def test_every_preset_key_is_a_setting_of_some_script():
    """A typo in a preset would be skipped silently by every script; this catches it."""
    from common import load_preset
    import ast
    known = set()
    for script in ['train_setok.py', 'train_setokim.py', 'sample.py', 'data/shapes/prepare.py']:
        path = os.path.join(ROOT, script)
        if os.path.exists(path):
            tree = ast.parse(open(path).read())
            known |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    for name in ['small', 'full']:
        unknown = set(load_preset(name)) - known
        assert not unknown, f"config/{name}.py sets {unknown}, which no script has"
