"""
LLaVA instruction data (LLaVA-Instruct-150K, llava_v1_5_mix665k, ...) -> a world in the format of
data/shapes/prepare.py; what real-data worlds add or leave out is listed in data/world.py.

    python data/llava/prepare.py train=LLaVA-Instruct-150K/llava_instruct_150k.json images=coco/train2017 \\
        data_dir=data/llava/world
    python data/llava/prepare.py train=llava_v1_5_mix665k.json images=playground/data data_dir=data/llava665k/world

A source (one per split: train=, val=, test=) is LLaVA's JSON: a list of
    {"id": ..., "image": "000000033471.jpg" (or "coco/train2017/..."; absent for text-only entries),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": ...}, ...]}
which already is the world's conversation format. "image" is looked up under `images`. An entry whose
image is missing or unreadable, or that is not a list of human/gpt turns, is left out and counted.

Each distinct image becomes one record (absolute path, width/height from its header; no caption) and
its entries become "chat" conversations right after it, turns as they are ("<image>" is put in front
of the first human turn when an entry with an image has none, as LLaVA's own preprocessing does).
Text-only entries come last, with "image": null.
"""
import os
import sys
from collections import OrderedDict

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from common import configure, die  # noqa: E402
from data.world import Skips  # noqa: E402
from data.writer import WorldWriter, converter_settings, image_sizes, load_json, split_sources  # noqa: E402

# -----------------------------------------------------------------------------
# settings
train = ''                 # LLaVA json of the train split
val = ''                   # the same for val ('' = no val split)
test = ''                  # the same for test
images = ''                # where the entries' "image" names are looked up ('' = the json's folder)
data_dir = 'data/llava/world'      # the world to write (relative paths: from the repo root)
vocab_size = 8000          # requested sentencepiece size; capped by what the text supports
workers = 8                # processes reading image headers
# -----------------------------------------------------------------------------


def turns_of(entry):
    """The entry's turns as [{'from', 'value'}], or None when it is not LLaVA-shaped."""
    turns = entry.get('conversations') if isinstance(entry, dict) else None
    if not isinstance(turns, list) or not turns:
        return None
    if not all(isinstance(t, dict) and t.get('from') in ('human', 'gpt') and isinstance(t.get('value'), str)
               for t in turns):
        return None
    return [{'from': t['from'], 'value': t['value']} for t in turns]


def read_source(path, root, workers, split):
    """-> (OrderedDict image path -> [(source id, turns)], [text-only (source id, turns)], sizes, skips)."""
    data = load_json(path, 'LLaVA json')
    if not isinstance(data, list):
        die(f"{path} is not LLaVA instruction data: expected a list of {{'image', 'conversations'}} objects")
    skips, by_image, text_only = Skips(), OrderedDict(), []
    for k, e in enumerate(data):
        turns = turns_of(e)
        if turns is None:
            skips.add(f"{path} entry {k}: no list of human/gpt turns under 'conversations'")
            continue
        sid = e.get('id', k)
        if not e.get('image'):
            text_only.append((sid, turns))
            continue
        if not isinstance(e['image'], str):
            skips.add(f"{path} entry {k}: 'image' is not one file name")
            continue
        humans = [t for t in turns if t['from'] == 'human']
        if not humans:
            skips.add(f"{path} entry {k}: an image but no human turn to show it in")
            continue
        if not any('<image>' in t['value'] for t in humans):
            humans[0]['value'] = '<image>\n' + humans[0]['value']
        by_image.setdefault(os.path.abspath(os.path.join(root, e['image'])), []).append((sid, turns))
    sizes = image_sizes(by_image, workers, f'{split} image headers', skips)
    for p in list(by_image):
        if p not in sizes:
            del by_image[p]
    return by_image, text_only, sizes, skips


def split_items(split, by_image, text_only, sizes):
    """(record, its chat conversations) per image, then (None, text-only conversations)."""
    def chat(cid, iid, image, sid, turns):
        return {'id': cid, 'task': 'chat', 'image_id': iid, 'image': image, 'conversations': turns, 'source_id': sid}

    for k, (path, entries) in enumerate(by_image.items()):
        iid = f'{split}_{k:07d}'
        rec = {'id': iid, 'image': path, 'width': sizes[path][0], 'height': sizes[path][1]}
        yield rec, [chat(f'{iid}_chat{j}', iid, path, sid, turns) for j, (sid, turns) in enumerate(entries)]
    if text_only:
        yield None, [chat(f'{split}_text{j:07d}_chat0', None, None, sid, turns) for j, (sid, turns) in enumerate(text_only)]


def prepare(**settings):
    """Convert the LLaVA json files named in `settings` (defaults: this module's values); returns data_dir."""
    cfg = converter_settings(globals(), settings, 'data/llava/prepare.py')
    sources = split_sources(cfg, 'FILE.json (LLaVA instruction data) and images=FOLDER')
    parsed = [(split, *read_source(src, root, cfg['workers'], split)) for split, src, root in sources]
    writer = WorldWriter(cfg['data_dir'], 'llava', cfg)                            # every input checked first
    for split, by_image, text_only, sizes, skips in parsed:
        writer.write_split(split, split_items(split, by_image, text_only, sizes), skips, total=len(by_image))
    return writer.finish(cfg['vocab_size'])


if __name__ == '__main__':
    prepare(**configure(globals(), script='data/llava/prepare.py'))
