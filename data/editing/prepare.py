"""
Image-editing triplets (source image, instruction, target image) from InstructPix2Pix or MagicBrush, as
they are distributed -> a world in the format of data/shapes/prepare.py; what real-data worlds add
or leave out is listed in data/world.py.

    python data/editing/prepare.py src=instruct-pix2pix/data/clip-filtered-dataset data_dir=data/ip2p/world
    python data/editing/prepare.py src=MagicBrush data_dir=data/magicbrush/world     # train/, dev/, test/ inside
    python data/editing/prepare.py src=MagicBrush/test data_dir=data/magicbrush_test/world

Two layouts, told apart by what src holds:
  InstructPix2Pix (scripts/download_data.sh of github.com/timothybrooks/instruct-pix2pix):
      seeds.json                 [[name, [seed, ...]], ...]   (without it: every folder with a prompt.json)
      <name>/prompt.json         {"input": caption of the source, "edit": the instruction, "output": caption of the target}
      <name>/<seed>_0.jpg, <seed>_1.jpg    source and target, one pair per seed
    Split as the repo's edit_dataset.py splits it: the first 90% of the prompts are train, the next 5%
    val, the last 5% test. Every seed is one triplet; the captions become the images' captions and
    the conversation's "target_caption".
  MagicBrush (the zip layout of its test set; train/dev in the same layout):
      edit_sessions.json         {img_id: [{"input": "<id>-input.png", "mask": "<id>-mask1.png",
                                            "output": "<id>-output1.png", "instruction": ...}, ...]}
      images/<img_id>/<file>
    src is one such folder (its split: `split`, or the folder's name, dev meaning val) or a folder
    with train/, dev/ (or val/) and test/ ones. Every turn is one triplet; turn k's source is turn
    k-1's target. The turn's mask is kept as "edit_mask" (absolute path).

Every source and target image is a record of the split's manifest (absolute path, width/height from
its header); each triplet is one "edit" conversation "<image>\\n<instruction>" -> "<image>" with
"target_image", placed after its source's record. A triplet whose source or target is missing or
unreadable is left out and counted.
"""
import math
import os
import sys
from collections import OrderedDict

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from common import configure, die  # noqa: E402
from data.world import Skips  # noqa: E402
from data.writer import WorldWriter, converter_settings, image_sizes, load_json, source_path  # noqa: E402
from data.shapes.prepare import gpt, human  # noqa: E402

# -----------------------------------------------------------------------------
# settings
src = ''                   # an InstructPix2Pix folder (seeds.json, <name>/prompt.json) or a MagicBrush one (edit_sessions.json)
split = ''                 # MagicBrush folder with edit_sessions.json: its split ('' = from the folder's name)
data_dir = 'data/editing/world'    # the world to write (relative paths: from the repo root)
vocab_size = 8000          # requested sentencepiece size; capped by what the text supports
workers = 8                # processes reading image headers
# -----------------------------------------------------------------------------

IP2P_SPLITS = (('train', 0.0, 0.9), ('val', 0.9, 0.95), ('test', 0.95, 1.0))   # edit_dataset.py's fractions
MAGICBRUSH_SPLITS = {'train': 'train', 'dev': 'val', 'val': 'val', 'test': 'test'}


def ip2p_seeds(root):
    """[(name, [seeds])] from seeds.json, or from the folders when there is none."""
    path = os.path.join(root, 'seeds.json')
    if os.path.isfile(path):
        seeds = load_json(path, 'InstructPix2Pix seeds.json')
        if not isinstance(seeds, list) or not all(isinstance(s, list) and len(s) == 2 and isinstance(s[1], list)
                                                  for s in seeds):
            die(f"{path} is not InstructPix2Pix's seeds.json: expected [[name, [seed, ...]], ...]")
        return [(str(n), list(s)) for n, s in seeds]
    out = []
    for name in sorted(os.listdir(root)):
        d = os.path.join(root, name)
        if os.path.isfile(os.path.join(d, 'prompt.json')):
            out.append((name, sorted(f[:-6] for f in os.listdir(d) if f.endswith('_0.jpg'))))
    return out


def ip2p_triplets(root):
    """{split: ([(source, target, instruction, source caption, target caption, extra)], skips)}."""
    seeds = ip2p_seeds(root)
    out = {}
    for split, a, b in IP2P_SPLITS:
        part, rows, skips = seeds[math.floor(a * len(seeds)):math.floor(b * len(seeds))], [], Skips()
        for name, ss in part:
            ppath = os.path.join(root, name, 'prompt.json')
            prompt = load_json(ppath, 'InstructPix2Pix prompt.json') if os.path.isfile(ppath) else None
            if not isinstance(prompt, dict) or not isinstance(prompt.get('edit'), str):
                skips.add(f"{ppath}: missing, or no \"edit\" in it")
                continue
            for s in ss:
                rows.append((os.path.join(root, name, f'{s}_0.jpg'), os.path.join(root, name, f'{s}_1.jpg'),
                             prompt['edit'], prompt.get('input'), prompt.get('output'), {}))
        out[split] = rows, skips
    return out


def magicbrush_triplets(folder):
    """([(source, target, instruction, None, None, {'edit_mask', 'turn'})], skips) of one MagicBrush split folder."""
    path, skips = os.path.join(folder, 'edit_sessions.json'), Skips()
    sessions = load_json(path, 'MagicBrush edit_sessions.json')
    if not isinstance(sessions, dict):
        die(f"{path} is not MagicBrush's edit_sessions.json: expected {{img_id: [turn, ...]}}")
    rows = []
    for img_id in sorted(sessions, key=lambda k: (len(str(k)), str(k))):
        for t, turn in enumerate(sessions[img_id]):
            if not (isinstance(turn, dict) and all(isinstance(turn.get(k), str) for k in ('input', 'output', 'instruction'))):
                skips.add(f"{path}: session {img_id} turn {t + 1} lacks input/output/instruction")
                continue
            at = lambda f: os.path.join(folder, 'images', str(img_id), f)       # noqa: E731
            extra = {'turn': t + 1, **({'edit_mask': at(turn['mask'])} if isinstance(turn.get('mask'), str) else {})}
            rows.append((at(turn['input']), at(turn['output']), turn['instruction'], None, None, extra))
    return rows, skips


def find_triplets(root, split_name):
    """({split: (triplets, skips)}, layout name) for whichever layout root is in."""
    if os.path.isfile(os.path.join(root, 'seeds.json')) or any(
            os.path.isfile(os.path.join(root, d, 'prompt.json')) for d in os.listdir(root)):
        return ip2p_triplets(root), 'instructpix2pix'
    if os.path.isfile(os.path.join(root, 'edit_sessions.json')):
        name = split_name or MAGICBRUSH_SPLITS.get(os.path.basename(os.path.normpath(root)), 'train')
        return {name: magicbrush_triplets(root)}, 'magicbrush'
    subs = [(d, s) for d, s in MAGICBRUSH_SPLITS.items() if os.path.isfile(os.path.join(root, d, 'edit_sessions.json'))]
    if subs:
        return {s: magicbrush_triplets(os.path.join(root, d)) for d, s in subs}, 'magicbrush'
    die(f"{root} is neither an InstructPix2Pix folder (seeds.json, <name>/prompt.json) nor a MagicBrush one "
        f"(edit_sessions.json, or train/ dev/ test/ folders with one)")


def split_items(split, rows, skips, workers):
    """(record, its edit conversations) of every image, sources and targets, in first-seen order."""
    sizes = image_sizes([p for r in rows for p in r[:2]], workers, f'{split} image headers', skips)
    images, convs = OrderedDict(), {}
    for source, target, instruction, src_cap, tgt_cap, extra in rows:
        if source not in sizes or target not in sizes:
            continue                                          # its reason is already in skips
        for path, cap in ((source, src_cap), (target, tgt_cap)):
            if path not in images:
                images[path] = {'id': f'{split}_{len(images):07d}', 'image': path, 'width': sizes[path][0],
                                'height': sizes[path][1], **({'caption': ' '.join(cap.split())} if cap else {})}
        sid = images[source]['id']
        mine = convs.setdefault(source, [])
        text = ' '.join(instruction.split())
        mine.append({'id': f'{sid}_edit{len(mine)}', 'task': 'edit', 'image_id': sid, 'image': source,
                     'conversations': [human(f'<image>\n{text}'), gpt('<image>')], 'target_image': target,
                     **({'target_caption': ' '.join(tgt_cap.split())} if tgt_cap else {}), **extra})
    return ((rec, convs.get(path, [])) for path, rec in images.items()), len(images)


def prepare(**settings):
    """Convert the editing folder named in `settings` (defaults: this module's values); returns data_dir."""
    cfg = converter_settings(globals(), settings, 'data/editing/prepare.py')
    root = source_path(cfg['src'], 'editing dataset folder', 'src=FOLDER (InstructPix2Pix or MagicBrush)')
    if not os.path.isdir(root):
        die(f"{root} is a file; pass the dataset's folder as src=FOLDER")
    splits, source = find_triplets(root, cfg['split'])
    writer = WorldWriter(cfg['data_dir'], source, cfg)
    for split, (rows, skips) in splits.items():
        if rows:                                  # (a tiny InstructPix2Pix folder may have no val/test prompts)
            items, n = split_items(split, rows, skips, cfg['workers'])
            writer.write_split(split, items, skips, total=n)
    if not writer.splits:
        die(f"{root} holds no editing triplets")
    return writer.finish(cfg['vocab_size'])


if __name__ == '__main__':
    prepare(**configure(globals(), script='data/editing/prepare.py'))
