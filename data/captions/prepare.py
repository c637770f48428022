"""
Image-caption pairs (CC3M / CC12M as downloaded, COCO captions) -> a world in the format of
data/shapes/prepare.py; what real-data worlds add or leave out is listed in data/world.py.

    python data/captions/prepare.py train=cc3m/Train_GCC-training.tsv val=cc3m/Validation_GCC-1.1.0-Validation.tsv \\
        images=cc3m/images data_dir=data/cc3m/world
    python data/captions/prepare.py train=cc12m/images data_dir=data/cc12m/world        # an img2dataset folder
    python data/captions/prepare.py train=coco/annotations/captions_train2014.json \\
        val=coco/annotations/captions_val2014.json images=coco data_dir=data/coco/world

One source per split (train=, val=, test=; leave a split out and it is not written):
  *.tsv     one pair per line, in either order: CC3M's files are caption<TAB>url, CC12M's url<TAB>caption.
            The column that holds an http(s) URL, or a file name with an image extension, is the image;
            the first other column is the caption; a first line without one is a header. A file
            name is looked up under `images`. A URL is looked up through the .json that img2dataset
            writes next to every image it downloaded ({"url": ..., "key": ...}) anywhere under `images`.
  *.jsonl   one object per line: the image under "image", "file_name", "file", "path" or "url", the
            caption under "caption" or "text"; names and URLs are looked up as for a TSV.
  *.json    COCO captions (captions_train2014.json, captions_val2017.json, ...): "images" (id,
            file_name, width, height) and "annotations" (image_id, caption). file_name is looked up
            under `images`, images/<train2014> and annotations/../<train2014> (the COCO layout; the
            folder name is the json's name after "captions_").
  a folder  img2dataset's "files" output: every image under it (any depth) with a caption in the
            .txt file of the same name.
`images` defaults to the folder of the source file (of the folder, for img2dataset).

The images stay where they are: records name them by absolute path, with width/height read from
their headers (COCO: from the json). An image that is missing (a failed download) or has no readable
header is left out and counted (meta.json "skipped", and a warning line with the first few). Each
distinct image is one record ("caption": its first caption, "captions": all of them when it has
several) and gets one caption and one t2i conversation per caption, as in the shapes world.
"""
import os
import re
import sys
from collections import OrderedDict

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
from common import configure, die  # noqa: E402
from data.world import IMAGE_EXTS, Skips, iter_jsonl  # noqa: E402
from data.writer import WorldWriter, converter_settings, image_sizes, load_json, split_sources  # noqa: E402
from data.shapes.prepare import gpt, human  # noqa: E402

# -----------------------------------------------------------------------------
# settings
train = ''                 # source of the train split: .tsv, .jsonl, COCO captions .json, or an img2dataset folder
val = ''                   # the same for val ('' = no val split)
test = ''                  # the same for test
images = ''                # where image names and downloaded URLs are looked up ('' = the source's folder)
data_dir = 'data/captions/world'   # the world to write (relative paths: from the repo root)
vocab_size = 8000          # requested sentencepiece size; capped by what the text supports
workers = 8                # processes reading image headers
# -----------------------------------------------------------------------------

IMAGE_KEYS = ('image', 'file_name', 'file', 'path', 'url')
CAPTION_KEYS = ('caption', 'text')


def is_url(s):
    return s.startswith(('http://', 'https://'))


def looks_like_image(s):
    return is_url(s) or s.lower().endswith(IMAGE_EXTS)


def clean(caption):
    return ' '.join(str(caption).split())


def url_map(root):
    """{url: image file} from the .json files img2dataset writes next to each downloaded image."""
    found = {}
    for d, _, files in os.walk(root):
        stems = {os.path.splitext(f)[0]: f for f in files if f.lower().endswith(IMAGE_EXTS)}
        for f in files:
            stem = os.path.splitext(f)[0]
            if f.endswith('.json') and stem in stems:
                meta = load_json(os.path.join(d, f), 'img2dataset metadata file')
                if isinstance(meta, dict) and meta.get('url'):
                    found[meta['url']] = os.path.join(d, stems[stem])
    return found


def read_tsv(path):
    """[(image name or URL, caption)] of a CC3M/CC12M-style TSV."""
    pairs = []
    with open(path, encoding='utf-8', errors='replace') as f:
        for k, line in enumerate(f, 1):
            cols = [c.strip() for c in line.rstrip('\n').split('\t')]
            img = next((c for c in cols if is_url(c)), None) or next((c for c in cols if looks_like_image(c)), None)
            cap = next((c for c in cols if c and c is not img), None) if img is not None else None
            if img is None or cap is None:
                if k == 1 and len(cols) >= 2:
                    continue                                    # a header line
                if line.strip():
                    die(f"{path} line {k} is not caption<TAB>image (or image<TAB>caption); "
                        f"the image column must be a URL or a file name ending in {', '.join(IMAGE_EXTS)}")
                continue
            pairs.append((img, cap))
    return pairs


def read_jsonl(path):
    """[(image name or URL, caption)] of a JSONL file of {image: ..., caption: ...} objects."""
    pairs = []
    for k, r in iter_jsonl(path, 'caption file', fix='pass a JSONL file with one object per line'):
        img = next((r[key] for key in IMAGE_KEYS if isinstance(r, dict) and isinstance(r.get(key), str)), None)
        cap = next((r[key] for key in CAPTION_KEYS if isinstance(r, dict) and isinstance(r.get(key), str)), None)
        if img is None or cap is None:
            die(f"{path} line {k} has no image ({'/'.join(IMAGE_KEYS)}) or no caption ({'/'.join(CAPTION_KEYS)})")
        pairs.append((img, cap))
    return pairs


def read_folder(root):
    """[(image file, caption)] of an img2dataset "files" folder: images with a same-named .txt."""
    pairs = []
    for d, subdirs, files in os.walk(root):
        subdirs.sort()
        names = set(files)
        for f in sorted(files):
            txt = os.path.splitext(f)[0] + '.txt'
            if f.lower().endswith(IMAGE_EXTS) and txt in names:
                with open(os.path.join(d, txt), encoding='utf-8', errors='replace') as fh:
                    pairs.append((os.path.join(d, f), fh.read()))
    if not pairs:
        die(f"{root} holds no image with a caption .txt of the same name (img2dataset's \"files\" layout)")
    return pairs


def read_coco(path, data):
    """[(image file, caption, (width, height))] of a COCO captions json, in image id order."""
    if not (isinstance(data, dict) and isinstance(data.get('images'), list) and isinstance(data.get('annotations'), list)):
        die(f"{path} is not a COCO captions file: expected an object with 'images' and 'annotations' lists")
    try:
        caps = {}
        for a in sorted(data['annotations'], key=lambda a: a.get('id', 0)):
            caps.setdefault(a['image_id'], []).append(a['caption'])
        return [(im['file_name'], c, (im['width'], im['height']))
                for im in sorted(data['images'], key=lambda im: im['id']) for c in caps.get(im['id'], [])]
    except (KeyError, TypeError) as e:
        die(f"{path} is not a COCO captions file: an image or annotation lacks {e}")


def locate(name, roots, urls):
    """An image named in a source -> its file (absolute), or None when it is not there."""
    if is_url(name):
        return urls.get(name)
    for path in [name] if os.path.isabs(name) else [os.path.join(r, name) for r in roots]:
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


def read_source(src, image_root):
    """A split's source -> ({image path: [captions]} in first-seen order, {path: (w, h)} known sizes, skips)."""
    skips, sizes = Skips(), {}
    if os.path.isdir(src):
        pairs, roots = read_folder(src), []
    elif src.endswith('.json'):
        triples = read_coco(src, load_json(src, 'COCO captions file'))
        m = re.match(r'captions_(.+)\.json$', os.path.basename(src))          # captions_train2014.json -> train2014
        tag = [os.path.join(image_root, m.group(1)), os.path.join(os.path.dirname(os.path.dirname(src)), m.group(1))] if m else []
        roots = [image_root] + tag
        pairs = [(f, c) for f, c, _ in triples]
        sizes = {f: wh for f, _, wh in triples}
    elif src.endswith('.jsonl'):
        pairs, roots = read_jsonl(src), [image_root]
    elif src.endswith(('.tsv', '.txt', '.csv')):
        pairs, roots = read_tsv(src), [image_root]
    else:
        die(f"{src}: expected a .tsv, .jsonl, COCO captions .json or an img2dataset folder")
    urls = url_map(image_root) if any(is_url(p) for p, _ in pairs) else {}
    grouped, where = OrderedDict(), {}
    for name, cap in pairs:
        if name not in where:
            where[name] = locate(name, roots, urls)
        path, cap = where[name], clean(cap)
        if path is None:
            skips.add(f"{name}: {'not downloaded' if is_url(name) else 'no such file under ' + image_root}")
        elif cap:
            grouped.setdefault(path, []).append(cap)
    return grouped, {where[f]: wh for f, wh in sizes.items() if where.get(f)}, skips


def caption_conversations(iid, image, captions):
    """One caption and one text-to-image conversation per caption, as the shapes world has them."""
    out = []
    for k, cap in enumerate(captions):
        out.append({'id': f'{iid}_caption{k}', 'task': 'caption', 'image_id': iid, 'image': image,
                    'conversations': [human('<image>\nDescribe the image.'), gpt(cap)]})
        out.append({'id': f'{iid}_t2i{k}', 'task': 't2i', 'image_id': iid, 'image': None,
                    'conversations': [human(f'Generate an image: {cap}'), gpt('<image>')], 'target_image': image})
    return out


def split_items(split, grouped, sizes, skips, workers):
    """(record, conversations) of every image of a split whose size is known or readable, and their count."""
    sizes = image_sizes(grouped, workers, f'{split} image headers', skips, known=sizes)   # before writing starts

    def items():
        for k, path in enumerate(sizes):
            iid, caps = f'{split}_{k:07d}', grouped[path]
            rec = {'id': iid, 'image': path, 'width': sizes[path][0], 'height': sizes[path][1], 'caption': caps[0]}
            if len(caps) > 1:
                rec['captions'] = caps
            yield rec, caption_conversations(iid, path, caps)
    return items(), len(sizes)


def prepare(**settings):
    """Convert the sources named in `settings` (defaults: this module's values); returns data_dir."""
    cfg = converter_settings(globals(), settings, 'data/captions/prepare.py')
    sources = split_sources(cfg, 'FILE (a .tsv, .jsonl, COCO captions .json or an img2dataset folder)')
    parsed = [(split, *read_source(src, root)) for split, src, root in sources]     # every input checked first
    writer = WorldWriter(cfg['data_dir'], 'captions', cfg)
    for split, grouped, sizes, skips in parsed:
        items, n = split_items(split, grouped, sizes, skips, cfg['workers'])
        writer.write_split(split, items, skips, total=n)
    return writer.finish(cfg['vocab_size'])


if __name__ == '__main__':
    prepare(**configure(globals(), script='data/captions/prepare.py'))
