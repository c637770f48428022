"""
Writing a real-data world: what the converters (data/captions, data/llava, data/refcoco,
data/editing) share. Their settings, their input paths checked before anything is written, image
headers probed in a pool of processes, and WorldWriter, which writes the manifests, the tokenizer
and meta.json (last: a folder without it is unfinished).
"""
import json
import multiprocessing
import os
from collections import Counter

from PIL import Image
from tqdm import tqdm

from common import config_keys, die
from data.shapes.prepare import FORMAT_VERSION, resolve, train_tokenizer, vocab_meta

def converter_settings(namespace, overrides, script):
    """A converter's settings: its module-level values (common.config_keys) with `overrides` on top."""
    cfg = {k: namespace[k] for k in config_keys(namespace)}
    for k, v in overrides.items():
        if k not in cfg:
            die(f"unknown setting '{k}' for {script}; valid settings: {', '.join(cfg)}")
        cfg[k] = v
    return cfg


def source_path(path, what, example):
    """An input file or folder that must exist -> its absolute path, or die saying what to pass."""
    if not path:
        die(f"no {what} given; pass {example}")
    if not os.path.exists(path):
        die(f"{what} {path} not found; pass {example}")
    return os.path.abspath(path)


def split_sources(cfg, example):
    """[(split, source, image folder)] of a converter with train/val/test/images settings, all checked
    before anything is written; the image folder defaults to the source's own folder."""
    named = [(split, cfg[split]) for split in ('train', 'val', 'test') if cfg[split]]
    if not named:
        die(f"no source given; pass train={example}")
    out = []
    for split, src in named:
        src = source_path(src, f'{split} source', f'{split}={example}')
        root = source_path(cfg['images'], 'image folder', 'images=FOLDER') if cfg['images'] else \
            src if os.path.isdir(src) else os.path.dirname(src)
        out.append((split, src, root))
    return out


def load_json(path, what):
    """A JSON file, or die with a line that says what is wrong with it."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        die(f"{path} is not a readable {what} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")


def _probe(path):
    """(width, height) of an image file as stored, from its header alone; or why it cannot be used."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        return f"{path}: no such file"
    except Exception as e:
        return f"{path} is not a readable image ({type(e).__name__})"


def probe_images(paths, workers, desc):
    """The stored size of every image (only headers are read; a pool of `workers` processes for many):
    a list, in order, of (width, height) or the reason the image cannot be used. A file truncated
    after its header passes here; the streaming loader skips it later."""
    bar = dict(total=len(paths), desc=desc, unit='img', dynamic_ncols=True, mininterval=0.5)
    if workers > 1 and len(paths) > 512:
        with multiprocessing.get_context('fork').Pool(workers) as pool:
            return list(tqdm(pool.imap(_probe, paths, chunksize=256), **bar))
    return list(tqdm(map(_probe, paths), **bar))


def image_sizes(paths, workers, desc, skips, known=None):
    """{path: (width, height)} of the images among `paths` whose header is readable (sizes in `known`
    are taken as they are); every other one is added to `skips` with its reason."""
    paths, known = list(dict.fromkeys(paths)), dict(known or {})
    todo = [p for p in paths if p not in known]
    known.update(zip(todo, probe_images(todo, workers, desc)))
    for p in paths:
        if isinstance(known[p], str):
            skips.add(known[p])
    return {p: tuple(int(v) for v in known[p]) for p in paths if not isinstance(known[p], str)}


TOKENIZER_SENTENCES = 2_000_000   # the tokenizer trains on at most this many sentences (an even subsample)


class WorldWriter:
    """Writes one real-data world: split after split, {split}.jsonl and {split}_instruct.jsonl; then the
    tokenizer on all the text written, and meta.json last (a folder without it is unfinished).

        w = WorldWriter(data_dir, source='coco-captions', settings=cfg)
        w.write_split('train', items, skips)   # items: (image record or None, [its conversations]) pairs
        w.finish(vocab_size)
    """

    def __init__(self, data_dir, source, settings):
        self.out, self.source, self.settings = resolve(data_dir), source, settings
        os.makedirs(self.out, exist_ok=True)
        self.meta_path = os.path.join(self.out, 'meta.json')
        if os.path.exists(self.meta_path):
            os.remove(self.meta_path)                 # unfinished until meta.json is written again
        self.text, self.tasks, self.splits, self.skipped = [], Counter(), {}, {}

    def _collect(self, rec, convs):
        """The sentences the tokenizer trains on: captions, concepts, every turn ("<image>" taken out)."""
        if rec is not None:
            self.text += [rec['caption']] if 'caption' in rec else []
            self.text += rec.get('captions', [])[1:] + rec.get('concepts', [])
        for c in convs:
            values = [t['value'].replace('<image>', ' ') for t in c['conversations']] + [c.get('target_caption', '')]
            self.text += [line.strip() for v in values for line in v.split('\n') if line.strip()]

    def write_split(self, split, items, skips, total=None):
        """Write one split from (record or None, [conversations]) pairs, in that order; report skips."""
        n_img = n_conv = 0
        with open(os.path.join(self.out, f'{split}.jsonl'), 'w', encoding='utf-8') as fm, \
                open(os.path.join(self.out, f'{split}_instruct.jsonl'), 'w', encoding='utf-8') as fi:
            for rec, convs in tqdm(items, total=total, desc=f'{self.source} {split}', unit='img',
                                   dynamic_ncols=True, mininterval=0.5):
                if rec is not None:
                    fm.write(json.dumps(rec) + '\n')
                    n_img += 1
                for c in convs:
                    fi.write(json.dumps(c) + '\n')
                    self.tasks[c['task']] += 1
                n_conv += len(convs)
                self._collect(rec, convs)
        skips.report(f"{split} input{'s' * (skips.count != 1)} (left out of the world)")
        if n_img + n_conv == 0:
            die(f"nothing of the {split} split could be converted ({skips.count} inputs skipped); "
                f"check the image folder setting")
        self.splits[split] = {'images': n_img, 'instruct': n_conv}
        self.skipped[split] = skips.count

    def finish(self, vocab_size):
        """The tokenizer (the shapes world's: the same special tokens) and meta.json, written last."""
        if type(vocab_size) is not int or vocab_size < 32:
            die(f"vocab_size={vocab_size!r}: expected an int >= 32")
        text = sorted(t for t in self.text if t)
        if len(text) > TOKENIZER_SENTENCES:
            text = text[::-(-len(text) // TOKENIZER_SENTENCES)]
        print(f"training the tokenizer on {len(text)} sentences ...", flush=True)
        sp = train_tokenizer(text, self.out, vocab_size)
        meta = {'format': 'nanosetok-world', 'format_version': FORMAT_VERSION, 'source': self.source,
                'settings': self.settings, 'splits': self.splits, 'tasks': dict(sorted(self.tasks.items())),
                'vocab': vocab_meta(sp, vocab_size), 'skipped': self.skipped}
        tmp = self.meta_path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(meta, f, indent=2)
            f.write('\n')
        os.replace(tmp, self.meta_path)
        print(f"wrote the {self.source} world to {self.out}:")
        for split, c in self.splits.items():
            print(f"  {split}: {c['images']} images in {split}.jsonl, {c['instruct']} conversations in "
                  f"{split}_instruct.jsonl; skipped: {self.skipped[split]}")
        print(f"  tasks: {', '.join(f'{k} {v}' for k, v in meta['tasks'].items())}")
        print(f"  tokenizer.model / tokenizer.vocab: {sp.get_piece_size()} pieces; meta.json")
        return self.out
