"""sample.py: pictures of what SeTok and SETOKIM make of any image, every image format a user may
have, and a one-line error (exit code 2, no traceback) for every bad input.

The checkpoints are real ones: one step of train_setok.py at the tiny shape its own tests use, on a
tiny shapes world, and one step of each stage of train_setokim.py on top of it. To stay well under a
minute on 2 cores, sample.py runs as a real subprocess for the main paths and a sample of the
errors; everything else goes through the same configure() + main() in-process (an unexpected
exception there fails the test with its traceback, exactly as it would reach a user).
"""
import concurrent.futures
import contextlib
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sample  # noqa: E402
from common import configure  # noqa: E402
from test_setokim import TINY_LM  # noqa: E402  the tiny SETOKIM of train_setokim.py's tests
from test_train_setok import TINY  # noqa: E402  the tiny SeTok of train_setok.py's tests

S = 32           # image_size of the tiny world and model
SCALE = 8        # sample.py's automatic upscaling for 32 px pictures: ceil(256 / 32)
FRAME = 2        # the dark frame around pictures, in pixels


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    from data.shapes.prepare import prepare
    return prepare(data_dir=str(tmp_path_factory.mktemp('w') / 'world'), image_size=S, n_train=16, n_val=4,
                   n_test=4, workers=1)


@pytest.fixture(scope='module')
def setok_ckpt(world, tmp_path_factory):
    out = tmp_path_factory.mktemp('setok')
    r = subprocess.run([sys.executable, 'train_setok.py', *TINY, f'data_dir={world}', f'out_dir={out}', 'max_iters=1',
                        'eval_interval=1', 'batch_size=4', 'eval_images=4'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out / 'ckpt.pt')


# a tiny SETOKIM on top of it: the tiny shape of train_setokim.py's tests, one step of each stage
TINY_LLM = [*TINY_LM, 'llm_batch_size=4', 'stage1_max_iters=1', 'stage2_max_iters=1', 'llm_eval_interval=1']


@pytest.fixture(scope='module')
def setokim_ckpt(world, setok_ckpt):
    """Written next to the SeTok checkpoint, as train_setokim.py does: <out_dir>/setokim/stage2.pt."""
    out = os.path.dirname(setok_ckpt)
    r = subprocess.run([sys.executable, 'train_setokim.py', *TINY_LLM, f'data_dir={world}', f'out_dir={out}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    path = os.path.join(out, 'setokim', 'stage2.pt')
    assert os.path.isfile(path), os.listdir(out)
    return path


def val_image(world, i=0):
    return os.path.join(world, 'images', 'val', f'val_{i:06d}.png')


NOWHERE = 'out_dir=/nonexistent/nanosetok-test'   # so no default checkpoint of the repo is picked up
ONE = 'threads=1'


def cli(*args):
    """sample.py as a user runs it."""
    return subprocess.run([sys.executable, 'sample.py', NOWHERE, ONE, *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def inproc(*args):
    """The same configure() + main() as the command line, in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            sample.main(configure(dict(vars(sample)), [NOWHERE, *map(str, args)], script='sample.py'))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def png_size(path):
    with Image.open(path) as im:
        assert im.format == 'PNG'
        im.load()                                   # a complete, decodable file
        return im.size


def written(stdout):
    return [line[len('wrote '):] for line in stdout.splitlines() if line.startswith('wrote ')]


# -----------------------------------------------------------------------------
# the main path

def test_one_image_writes_tokens_and_recon(world, setok_ckpt, tmp_path):
    out = tmp_path / 'o'
    r = cli('--image', val_image(world), '--setok_ckpt', setok_ckpt, '--out', out)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ['recon.png', 'tokens.png']
    assert sorted(written(r.stdout)) == sorted(str(out / f) for f in ('recon.png', 'tokens.png'))
    side = S * SCALE + 2 * FRAME
    assert png_size(out / 'tokens.png') == (side, side)
    assert png_size(out / 'recon.png') == (2 * S * SCALE + 3 * FRAME, side)
    n = int(r.stdout.split(': ')[1].split(' tokens')[0])
    assert 1 <= n <= 6                              # max_tokens=6 in TINY
    # the overlay is coloured by cluster, so it is not the plain upscaled input
    over = np.asarray(Image.open(out / 'tokens.png'))[FRAME:-FRAME, FRAME:-FRAME]
    plain = np.asarray(Image.open(out / 'recon.png'))[FRAME:-FRAME, FRAME:FRAME + S * SCALE]
    assert over.shape == plain.shape and (over != plain).any()


def test_several_images_and_a_folder(world, setok_ckpt, tmp_path):
    d = tmp_path / 'imgs'
    d.mkdir()
    for i in range(3):
        shutil.copy(val_image(world, i), d / f'im{i}.png')
    (d / 'notes.txt').write_text('not an image, and not picked up from a folder')
    (d / '._im0.png').write_bytes(b'macOS resource fork: hidden files are skipped')
    (d / 'sub').mkdir()
    other = tmp_path / 'other'
    other.mkdir()
    Image.open(val_image(world, 3)).save(other / 'im0.jpg', quality=95)     # same stem as imgs/im0.png
    out = tmp_path / 'o'
    r = cli('--image', d, other / 'im0.jpg', '--setok_ckpt', setok_ckpt, '--out', out, 'batch_size=2')
    assert r.returncode == 0, r.stderr
    names = ['im0_png', 'im1', 'im2', 'im0_jpg']
    assert sorted(os.listdir(out)) == sorted(f'{n}_{k}.png' for n in names for k in ('tokens', 'recon'))
    for n in names:
        assert png_size(out / f'{n}_tokens.png') == (S * SCALE + 2 * FRAME,) * 2
    # batching changes nothing: the same token counts and PSNRs one image at a time
    code, stdout, _ = inproc('--image', d, other / 'im0.jpg', '--setok_ckpt', setok_ckpt, '--out', tmp_path / 'o1',
                             'batch_size=1')
    assert code == 0
    summary = lambda s: [l.split(': ', 1)[1] for l in s.splitlines() if 'tokens, reconstruction' in l]
    assert summary(stdout) == summary(r.stdout) and len(summary(stdout)) == 4


# -----------------------------------------------------------------------------
# every image a user may have

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def make_formats(d):
    """One file per format/mode/shape, and what load_image must make of it."""
    checks = {}
    # JPEG stored landscape (left red, right blue) with EXIF orientation 6 (rotate 90 degrees clockwise
    # to display): upright it is portrait with red on TOP; without the rotation red would be on the left
    im = Image.new('RGB', (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(d / 'exif.jpg', exif=exif, quality=95)
    checks['exif.jpg'] = lambda t: near(t[:, 3, S // 2], RED, 0.15) and near(t[:, S - 4, S // 2], BLUE, 0.15) \
        and near(t[:, 3, 2], RED, 0.15) and near(t[:, 3, S - 3], RED, 0.15)
    Image.new('RGB', (24, 24), (10, 200, 30)).save(d / 'photo.webp', lossless=True)
    checks['photo.webp'] = lambda t: near(t, (10, 200, 30))
    Image.new('RGB', (20, 30), (200, 100, 50)).save(d / 'paint.bmp')
    checks['paint.bmp'] = lambda t: near(t, (200, 100, 50))
    frames = [Image.new('RGB', (16, 16), RED), Image.new('RGB', (16, 16), (0, 255, 0))]
    frames[0].save(d / 'anim.gif', save_all=True, append_images=frames[1:], duration=100)
    checks['anim.gif'] = lambda t: near(t, RED)                                 # the first frame
    Image.new('L', (20, 20), 128).save(d / 'grey.png')
    checks['grey.png'] = lambda t: near(t, (128, 128, 128))
    im = Image.new('RGBA', (S, S), (0, 0, 0, 0))                               # left: fully transparent
    im.paste((255, 0, 0, 255), (S // 2, 0, S, S))                              # right: opaque red
    im.save(d / 'rgba.png')
    checks['rgba.png'] = lambda t: near(t[:, :, :S // 2 - 2], WHITE) and near(t[:, :, S // 2 + 2:], RED)
    im = Image.new('LA', (S, S), (0, 0))
    im.save(d / 'la.png')
    checks['la.png'] = lambda t: near(t, WHITE)
    im = Image.new('P', (S, S), 0)
    im.putpalette([0, 0, 0] + list(BLUE) + [0] * 762)
    im.paste(1, (0, S // 2, S, S))                                             # bottom: index 1 = blue
    im.save(d / 'pal.png', transparency=0)                                     # top: index 0 = transparent
    checks['pal.png'] = lambda t: near(t[:, :S // 2 - 2], WHITE) and near(t[:, S // 2 + 2:], BLUE)
    im = Image.new('P', (S, S), 1)
    im.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    im.save(d / 'pal.bmp')
    checks['pal.bmp'] = lambda t: near(t, (200, 100, 50))
    a = np.full((S, S), 65535, np.uint16)
    a[:, S // 2:] = 32896                                                      # 32896 / 257 = 128
    Image.fromarray(a).save(d / 'g16.png')                                     # a 16-bit greyscale PNG
    checks['g16.png'] = lambda t: near(t[:, :, :S // 2 - 2], WHITE) and near(t[:, :, S // 2 + 2:], (128, 128, 128))
    Image.new('RGB', (3, 5), RED).save(d / 'tiny.png')
    checks['tiny.png'] = lambda t: near(t, RED)
    im = Image.new('RGB', (600, 10), BLUE)                                     # only the middle survives
    im.paste(RED, (295, 0, 305, 10))
    im.save(d / 'wide.png')
    checks['wide.png'] = lambda t: near(t, RED)
    Image.new('CMYK', (20, 20), (0, 255, 255, 0)).save(d / 'cmyk.jpg', quality=95)   # red in CMYK
    checks['cmyk.jpg'] = lambda t: near(t, RED, 0.1)
    return checks


def near(t, rgb, tol=2 / 255):
    """Every pixel of t (3, ...) within tol of the colour rgb (0..255)."""
    c = torch.tensor(rgb, dtype=torch.float32).view(3, *[1] * (t.dim() - 1)) / 255
    return bool(((t - c).abs() <= tol).all())


def test_every_format_loads(setok_ckpt, tmp_path):
    d = tmp_path / 'formats'
    d.mkdir()
    checks = make_formats(d)
    for name, check in checks.items():
        t = sample.load_image(str(d / name), S)
        assert t.shape == (3, S, S) and t.dtype == torch.float32, name
        assert 0 <= t.min() and t.max() <= 1, name
        assert check(t), (name, t.mean((1, 2)))
    # and through the command line's code, all of them in one folder
    out = tmp_path / 'o'
    code, _, stderr = inproc('--image', d, '--setok_ckpt', setok_ckpt, '--out', out)
    assert code == 0, stderr
    got = {f[:-len('_tokens.png')] for f in os.listdir(out) if f.endswith('_tokens.png')}
    # pal.png and pal.bmp share a stem, so their outputs keep the extension
    assert got == {n.replace('.', '_') if n.startswith('pal.') else os.path.splitext(n)[0] for n in checks}, got


def test_exif_orientation_is_what_a_viewer_shows(tmp_path):
    """Without the EXIF rotation the stored landscape would give red on the left, blue on the right."""
    im = Image.new('RGB', (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))
    im.save(tmp_path / 'plain.jpg', quality=95)
    t = sample.load_image(str(tmp_path / 'plain.jpg'), S)
    assert near(t[:, S // 2, 3], RED, 0.15) and near(t[:, S // 2, S - 4], BLUE, 0.15)
    for orientation, top in ((3, None), (6, RED), (8, BLUE)):       # 3: 180 degrees, 6: 90 cw, 8: 90 ccw
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(tmp_path / f'o{orientation}.jpg', exif=exif, quality=95)
        t = sample.load_image(str(tmp_path / f'o{orientation}.jpg'), S)
        if top is None:                                             # upside down: blue now on the left
            assert near(t[:, S // 2, 3], BLUE, 0.15) and near(t[:, S // 2, S - 4], RED, 0.15)
        else:
            assert near(t[:, 3, S // 2], top, 0.15), orientation


# -----------------------------------------------------------------------------
# SETOKIM modes

def test_setokim_modes(world, setokim_ckpt, tmp_path):
    out = tmp_path / 'o'
    code, stdout, stderr = inproc('--image', val_image(world), '--ckpt', setokim_ckpt, '--out', out, '--prompt',
                                  'how many red objects are there?', '--refer', 'the red circle', '--edit',
                                  'make the circle blue', '--generate', 'a large red circle')
    assert code == 0, stderr
    side = S * SCALE + 2 * FRAME
    sizes = {'tokens.png': (side, side), 'recon.png': (2 * S * SCALE + 3 * FRAME, side), 'mask.png': (side, side),
             'edited.png': (2 * S * SCALE + 3 * FRAME, side), 'generated.png': (side, side)}
    assert sorted(os.listdir(out)) == sorted(sizes)
    for name, size in sizes.items():
        assert png_size(out / name) == size, name
    assert sorted(written(stdout)) == sorted(str(out / n) for n in sizes)
    lines = stdout.splitlines()
    assert 'Q: How many red objects are there?' in lines                  # the question, as the model read it
    assert any(l.startswith('A: ') for l in lines)
    assert any(l.startswith('Segment the red circle. -> ') for l in lines)


def test_generate_needs_no_image_and_describe_is_the_default(world, setok_ckpt, setokim_ckpt, tmp_path):
    code, stdout, stderr = inproc('--generate', 'a small blue star', '--ckpt', setokim_ckpt, '--out', tmp_path / 'g')
    assert code == 0, stderr
    assert os.listdir(tmp_path / 'g') == ['generated.png']
    # the SETOKIM checkpoint of out_dir (setokim/stage2.pt) is used without being asked for: it describes
    d = os.path.dirname(setok_ckpt)                                     # the image
    code, stdout, stderr = inproc(f'out_dir={d}', '--image', val_image(world), '--out', tmp_path / 'o')
    assert code == 0, stderr
    assert 'Q: Describe the image.' in stdout.splitlines() and sorted(os.listdir(tmp_path / 'o')) == ['recon.png', 'tokens.png']
    # ... unless it was trained on another SeTok than the one asked for (a note, not an error), or ckpt=none
    shutil.copy(setok_ckpt, tmp_path / 'other.pt')
    code, stdout, stderr = inproc(f'out_dir={d}', '--image', val_image(world), '--setok_ckpt', tmp_path / 'other.pt',
                                  '--out', tmp_path / 'o2')
    assert code == 0 and 'note: not using' in stdout and 'Q: ' not in stdout, stdout + stderr
    code, stdout, stderr = inproc(f'out_dir={d}', '--image', val_image(world), 'ckpt=none', '--out', tmp_path / 'o3')
    assert code == 0 and 'Q: ' not in stdout and 'note' not in stdout, stdout + stderr


# -----------------------------------------------------------------------------
# bad input: exit code 2, one line on stderr, no traceback

def bad_inputs(world, setok_ckpt, setokim_ckpt, d):
    """(name, argv, a fragment the error line must contain)"""
    (d / 'empty_dir').mkdir()
    (d / 'text_dir').mkdir()
    (d / 'text_dir' / 'notes.txt').write_text('hello')
    (d / 'notes.png').write_text('this is text, not a PNG')
    (d / 'notes.txt').write_text('this is text')
    (d / 'empty.png').write_bytes(b'')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / 'full.jpg', quality=90)
    data = (d / 'full.jpg').read_bytes()
    (d / 'truncated.jpg').write_bytes(data[:len(data) // 2])
    shutil.copy(setok_ckpt, d / 'other_setok.pt')                               # same weights, another file
    orphan = torch.load(setokim_ckpt, weights_only=False)
    orphan['setok_ckpt'] = str(d / 'deleted_setok.pt')
    torch.save(orphan, d / 'orphan.pt')
    (d / 'not_a_ckpt.pt').write_text('not a checkpoint')
    torch.save({'some': 'dict'}, d / 'foreign.pt')
    img, ck = val_image(world), ['--setok_ckpt', setok_ckpt]
    return [
        ('missing file', ['--image', d / 'nope.png', *ck], 'nope.png'),
        ('empty folder', ['--image', d / 'empty_dir', *ck], 'no images'),
        ('folder without images', ['--image', d / 'text_dir', *ck], 'no images'),
        ('text named .png', ['--image', d / 'notes.png', *ck], 'not an image'),
        ('text file', ['--image', d / 'notes.txt', *ck], 'not an image'),
        ('truncated JPEG', ['--image', d / 'truncated.jpg', *ck], 'truncated'),
        ('empty file', ['--image', d / 'empty.png', *ck], 'empty'),
        ('missing checkpoint', ['--image', img, '--setok_ckpt', d / 'nope.pt'], 'not found'),
        ('not a checkpoint', ['--image', img, '--setok_ckpt', d / 'not_a_ckpt.pt'], 'not a readable checkpoint'),
        ('foreign pickle', ['--image', img, '--setok_ckpt', d / 'foreign.pt'], 'not a nanoSeTok checkpoint'),
        ('SETOKIM where SeTok is needed', ['--image', img, '--setok_ckpt', setokim_ckpt], 'setokim checkpoint'),
        ('SeTok where SETOKIM is needed', ['--image', img, *ck, '--ckpt', setok_ckpt, '--prompt', 'hi'],
         'setok checkpoint'),
        ('another preset', ['config=small', '--image', img, *ck], 'image_size=32'),
        ('nothing to do', [*ck], 'nothing to do'),
        ('no samples', [*ck, '--generate', 'a red circle', '--num_samples', '0'], 'num_samples=0: expected'),
        ('no denoising steps', [*ck, '--generate', 'a red circle', 'diff_steps=0'], 'diff_steps=0: expected'),
        ('negative guidance', [*ck, '--generate', 'a red circle', 'cfg_scale=-1'], 'cfg_scale=-1'),
        ('refer without image', [*ck, '--refer', 'the red circle'], 'needs an image'),
        ('missing SETOKIM checkpoint', ['--image', img, *ck, '--ckpt', d / 'nope.pt'], 'not found'),
        ('generate without SETOKIM', [*ck, '--generate', 'a red circle'], 'not found'),
        ('a SETOKIM mode with ckpt=none', ['--image', img, *ck, '--edit', 'make it blue', 'ckpt=none'], 'ckpt=none'),
        ('SETOKIM over another SeTok', ['--image', img, '--setok_ckpt', d / 'other_setok.pt', '--ckpt', setokim_ckpt,
                                        '--prompt', 'hi'], 'trained on the SeTok checkpoint'),
        ('SETOKIM whose SeTok is gone', ['--image', img, '--ckpt', d / 'orphan.pt', '--prompt', 'hi'], 'is gone'),
        ('SETOKIM of another preset', ['config=small', '--image', img, '--ckpt', setokim_ckpt], 'image_size=32'),
    ]


def one_line_error(code, stderr, fragment):
    assert code == 2, stderr
    assert 'Traceback' not in stderr, stderr
    assert stderr.count('\n') == 1 and stderr.startswith('error: '), stderr
    assert fragment in stderr, stderr


def test_bad_inputs_are_one_line_errors(world, setok_ckpt, setokim_ckpt, tmp_path):
    cases = bad_inputs(world, setok_ckpt, setokim_ckpt, tmp_path)
    for name, argv, fragment in cases:
        code, _, stderr = inproc(*argv, '--out', tmp_path / 'o')
        try:
            one_line_error(code, stderr, fragment)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert not (tmp_path / 'o').exists() or not os.listdir(tmp_path / 'o')
    # a sample of them as real processes, two at a time
    real = [c for c in cases if c[0] in ('truncated JPEG', 'SETOKIM where SeTok is needed')]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: cli(*c[1], '--out', tmp_path / 'o'), real))
    for (name, _, fragment), r in zip(real, results):
        try:
            one_line_error(r.returncode, r.stderr, fragment)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
