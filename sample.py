"""
What SeTok (and SETOKIM) make of any image.

    python sample.py --image photo.jpg                            # samples/tokens.png, samples/recon.png
    python sample.py config=small --image a.jpg b.png --out runs/ab   # a_tokens.png, a_recon.png, b_...
    python sample.py config=small --image some/folder             # every image in it, sorted by name
    python sample.py --image x.png --setok_ckpt out/run1/ckpt.pt  # any SeTok checkpoint
    python sample.py config=small --image x.png threshold=0.4     # re-cluster: more tokens
    python sample.py config=small --image x.png --prompt "How many red objects are there?"
    python sample.py config=small --image x.png --refer "the red circle"            # mask.png
    python sample.py config=small --generate "a large red circle in the center"     # generated.png
    python sample.py config=small --generate "a small blue star on the left" --num_samples 4   # four of them
    python sample.py config=small --image x.png --edit "Make the red circle blue."  # edited.png

What it writes into the folder `out` (created if needed; use one folder per run), printing each path:
  tokens.png     the image, upscaled `scale` times (default: to about 256 px; nearest neighbour, so
                 every model pixel stays visible), with one colour per SeTok token blended over the
                 patches of its cluster, the cluster boundaries drawn in white and the number of
                 tokens written on it.
  recon.png      the input beside its reconstruction by the detokenizer from those tokens alone
                 (with the PSNR of the reconstruction).
  With a SETOKIM checkpoint (`ckpt`; by default train_setokim.py's <out_dir>/setokim/stage2.pt, or
  stage1.pt, used when it exists and was trained on the SeTok checkpoint in use; ckpt=none: never):
    the answer to --prompt on stdout, as 'Q: ...' and 'A: ...' lines (with neither --prompt nor
                   --refer/--edit, the model is asked "Describe the image."),
    mask.png       --refer "the red circle": the predicted mask of the referred object over the image
    edited.png     --edit "make the circle blue": the input beside the edited image (num_samples of them)
    generated.png  --generate "a caption": images written by SETOKIM (no --image needed), num_samples
                   side by side: the diffusion head's noise differs, so where the caption leaves room
                   (where in its cell an object sits, the background) the samples differ; seed fixes them
  With one image the names are exactly these; with several, each is prefixed by the image's file
  stem (a_tokens.png, b_tokens.png, ...; two inputs with the same stem get their extension too).
  Pictures have a 2-pixel dark frame: tokens.png is (S*scale+4) pixels square, recon.png and
  edited.png are (2*S*scale+6) x (S*scale+4), where S is the model's image_size.

How any image becomes the model's input (load_image)
  * formats: whatever PIL reads (JPEG, PNG, WebP, BMP, GIF, TIFF, ...); a folder given to --image
    means every file in it with one of the extensions in IMAGE_EXTS (not recursive, hidden files
    skipped), sorted by name. An animated GIF/WebP/PNG contributes its first frame.
  * orientation: the EXIF orientation tag is applied first (a phone photo taken in portrait comes
    out upright, as every image viewer shows it).
  * colour: everything becomes 8-bit RGB. Greyscale is repeated on the three channels; palette
    images are looked up; 16-bit images ('I;16' PNGs, 'I' 32-bit integers) are scaled to 8 bits
    (value / 257; an 'I' image whose values all fit in 0..255 is taken as 8-bit); float ('F')
    images are taken as [0, 1] when their maximum is <= 1, else as [0, 255]; CMYK and YCbCr are
    converted by PIL. Transparency (RGBA, LA, palette with a transparent index) is composited
    on WHITE, the way a browser or an image viewer shows such a picture on a page.
  * size and aspect ratio: the largest centred square is cropped and resized (bicubic, antialiased
    when shrinking) to the model's image_size. This is the same as "resize the shorter side to
    image_size, then centre-crop": a 640x480 photo loses 80 columns on each side; a very wide
    panorama keeps only its middle; a tiny 3x5 image is upscaled (it will look blurry).
  * bad files (missing, empty, truncated, not an image) are a one-line error (exit code 2), never a
    traceback: load_image raises ImageError (a ValueError) and the command line turns it into die().

Settings are module-level values (override with key=value or --key value; config=NAME loads a
preset, which also sets out_dir, so the default checkpoints are the preset's). The model-shape
settings (image_size, dim, ...) are 0 by default, meaning "whatever the checkpoint says"; a preset
sets them, and a checkpoint of another shape is then refused with a line that names the difference.
"""
import glob
import os
import signal

import torch

from checkpoint import check_config, load_checkpoint, load_setok, load_setokim, setok_ckpt_of
from common import HERE, cluster_overlay, configure, die, mask_overlay, pick_device, save_panel, to_uint8
from data.batch import encode_conversation
from data.world import IMAGE_EXTS, ImageError
from data.world import load_image as load_image_uint8
from detok import psnr
from setok import cluster_centroids
from setokim import reading_order, sampling_error, visual_tokens

# -----------------------------------------------------------------------------
# settings
image = []                 # image files and/or folders: --image a.jpg b.png photos/
out = 'samples'            # output folder (one per run)
out_dir = ''               # where the training scripts wrote their checkpoints; '' = the run folder under out/
                           # with the newest SeTok checkpoint (config=small sets out/small)
setok_ckpt = ''            # SeTok checkpoint; '' = <out_dir>/ckpt.pt
ckpt = ''                  # SETOKIM checkpoint; '' = <out_dir>/setokim/stage2.pt (or stage1.pt) if it exists;
                           # 'none' = no SETOKIM
prompt = ''                # a question about the image for SETOKIM; '' = describe the image
refer = ''                 # a referring expression -> mask.png
generate = ''              # a caption -> generated.png
edit = ''                  # an edit instruction -> edited.png
batch_size = 16            # images per SeTok forward pass
scale = 0                  # upscaling of the pictures; 0 = enough for about 256 pixels
threshold = -1.0           # override the checkpoint's cluster_threshold (lower: more tokens); < 0 keeps it
device = 'auto'            # auto | cpu | cuda | cuda:1 | mps
dtype = 'auto'             # auto | float32 | bfloat16 | float16
threads = 0                # CPU threads (0: torch's default)
seed = 1337
temperature = 0.0          # SETOKIM sampling: 0 = greedy (the most likely answer)
top_k = 0                  # SETOKIM sampling: keep the k most likely tokens (0 = all)
max_new_tokens = 64        # SETOKIM: the longest answer, in tokens
num_samples = 1            # --generate / --edit: this many images of the same prompt, side by side (seeds differ)
img_temperature = 0.25     # the diffusion head's starting noise scale (1: a plain draw; lower: less variety, surer)
diff_steps = 50            # the diffusion head: denoising steps per token
cfg_scale = 1.0            # the diffusion head: classifier-free guidance (1: none)
# model shape, checked against the checkpoints; 0 = whatever the checkpoint says (a preset sets them)
image_size = 0
patch_size = 0
dim = 0
depth = 0
n_head = 0
token_dim = 0
intra_depth = 0
inter_depth = 0
dec_sprite_size = 0
dec_dim = 0
llm_n_layer = 0            # the SETOKIM shape (train_setokim.py's names)
llm_n_head = 0
llm_n_embd = 0
block_size = 0
mask_dim = 0
mask_depth = 0
mask_n_head = 0
# -----------------------------------------------------------------------------

ARCH_KEYS = ('image_size', 'patch_size', 'dim', 'depth', 'n_head', 'token_dim', 'intra_depth', 'inter_depth')
DEC_KEYS = ('sprite_size', 'dim')           # DetokConfig fields, dec_ prefixed here
LLM_KEYS = {'llm_n_layer': 'n_layer', 'llm_n_head': 'n_head', 'llm_n_embd': 'n_embd', 'block_size': 'block_size',
            'mask_dim': 'mask_dim', 'mask_depth': 'mask_depth', 'mask_n_head': 'mask_n_head'}   # -> GPTConfig
SETOKIM_RUN = ('setokim/stage2.pt', 'setokim/stage1.pt')   # what train_setokim.py writes into out_dir


# -----------------------------------------------------------------------------
# images in: any file a user may have -> (3, size, size) float tensor in [0, 1]

def load_image(path, size):
    """An image file -> (3, size, size) float tensor in [0, 1], decoded as the header above says by
    data/world.py's load_image (which the streaming training loader uses too). Raises ImageError."""
    return load_image_uint8(path, size).float() / 255


def expand_images(paths):
    """--image values -> a list of image files: folders become their image files, sorted by name.
    Dies on a path that does not exist or a folder without images."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(f for f in os.listdir(p) if not f.startswith('.') and f.lower().endswith(IMAGE_EXTS)
                           and os.path.isfile(os.path.join(p, f)))
            if not found:
                die(f"{p} is a folder with no images in it (looked for {' '.join(IMAGE_EXTS)})")
            files += [os.path.join(p, f) for f in found]
        elif os.path.exists(p):
            files.append(p)
        else:
            die(f"{p}: no such file or folder")
    return files


def output_names(files):
    """A prefix for each input's output files: '' for a single image, else 'stem_' (the extension is
    added for inputs that share a stem, and a counter if they still collide)."""
    if len(files) == 1:
        return ['']
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    names = [os.path.basename(f).replace('.', '_') if stems.count(s) > 1 else s for f, s in zip(files, stems)]
    names = [f'{i:04d}_{n}' if names.count(n) > 1 else n for i, n in enumerate(names)]
    return [n + '_' for n in names]


# -----------------------------------------------------------------------------
# pictures out

def save_strip(pictures, texts, path):
    """Equally sized uint8 pictures side by side, each with its text (common.save_panel), and say so."""
    save_panel([pictures], path, [texts])
    print(f"wrote {path}", flush=True)
    return path


# -----------------------------------------------------------------------------
# checkpoints

def resolve(path):
    """A relative path is taken from the current folder, else from the repo root."""
    if os.path.isabs(path) or os.path.exists(path) or not os.path.exists(os.path.join(HERE, path)):
        return path
    return os.path.join(HERE, path)


def same_file(a, b):
    return os.path.realpath(resolve(a)) == os.path.realpath(resolve(b))


def run_folder(settings):
    """out_dir, or when it is '' the run folder under out/ whose SeTok checkpoint (ckpt.pt) is the newest:
    right after `python train_setok.py config=small` that is out/small. With setok_ckpt given: its folder."""
    if settings['out_dir']:
        return settings['out_dir']
    if settings['setok_ckpt']:
        return os.path.dirname(resolve(settings['setok_ckpt']))
    found = sorted(glob.glob(os.path.join(HERE, 'out', '*', 'ckpt.pt')), key=os.path.getmtime)
    if not found and settings['ckpt'].lower() in ('', 'none'):
        die("no checkpoints under out/: train SeTok first (python train_setok.py config=small), or pass "
            "setok_ckpt=PATH or out_dir=FOLDER")
    if not found:
        return os.path.join(HERE, 'out')
    print(f"using the checkpoints in {os.path.relpath(os.path.dirname(found[-1]))} (the newest run under out/; "
          f"out_dir=... picks another)", flush=True)
    return os.path.dirname(found[-1])


def load_models(settings, dev, wants_llm):
    """-> (setok, detok, llm) where llm is None or (SETOKIM model, text tokenizer, checkpoint dict).
    A SETOKIM checkpoint names the SeTok checkpoint it was trained on, and that SeTok is used: the LLM
    only understands the tokens of its own tokenizer."""
    folder = run_folder(settings)
    setok_path = resolve(settings['setok_ckpt'] or os.path.join(folder, 'ckpt.pt'))
    runs = [resolve(os.path.join(folder, r)) for r in SETOKIM_RUN]
    llm_path = resolve(settings['ckpt']) if settings['ckpt'] else next((r for r in runs if os.path.exists(r)), runs[0])
    if wants_llm and settings['ckpt'].lower() == 'none':
        modes = ', '.join(f'--{k}' for k in ('prompt', 'refer', 'generate', 'edit') if settings[k])
        die(f"{modes} needs a SETOKIM checkpoint, but ckpt=none")
    explicit = wants_llm or (settings['ckpt'] and settings['ckpt'].lower() != 'none')
    llm = None
    if explicit or (not settings['ckpt'] and os.path.exists(llm_path)):
        ck = load_checkpoint(llm_path, kind='setokim', what='SETOKIM checkpoint')   # kind checked first
        trained_on = setok_ckpt_of(ck, llm_path)
        if settings['setok_ckpt'] and not same_file(setok_path, trained_on):
            if explicit:
                die(f"{llm_path} was trained on the SeTok checkpoint {trained_on}, not setok_ckpt={settings['setok_ckpt']}; "
                    f"leave setok_ckpt out (the SETOKIM checkpoint brings its own)")
            print(f"note: not using the SETOKIM checkpoint {llm_path}: it was trained on another SeTok "
                  f"checkpoint ({trained_on}); pass ckpt=... to use it", flush=True)
        else:
            model, tok, setok, detok, ck = load_setokim(llm_path, dev, ck)
            setok_path, llm = trained_on, (model, tok, ck)
    if llm is None:
        setok, detok, _ = load_setok(setok_path, dev)
    # the preset's shape settings (0: anything) against the checkpoint's
    shape = {**{k: getattr(setok.cfg, k) for k in ARCH_KEYS}, **{f'dec_{k}': getattr(detok.cfg, k) for k in DEC_KEYS}}
    if llm:
        shape.update({k: getattr(llm[0].cfg, v) for k, v in LLM_KEYS.items()})
    check_config(llm_path if llm else setok_path, shape, {k: settings[k] or None for k in shape},
                 fix="pass the config it was trained with, or no config")
    if settings['threshold'] >= 0:
        setok.cfg.cluster_threshold = settings['threshold']         # read at every forward: more/fewer tokens
    return setok, detok, llm


# -----------------------------------------------------------------------------
# SeTok on every image

@torch.no_grad()
def tokenize_images(files, prefixes, setok, detok, settings, ctx, dev):
    """Run the images through SeTok + detokenizer in batches of batch_size; write tokens.png and
    recon.png for each. Yields (file, prefix, img (3,S,S), tokens (K,D), token_mask (K,), labels (N,))."""
    S, sc, bs = setok.cfg.image_size, settings['scale'], max(1, settings['batch_size'])
    for i in range(0, len(files), bs):
        batch = []
        for f in files[i:i + bs]:
            try:
                batch.append(load_image(f, S))
            except ImageError as e:
                die(str(e))
        img = torch.stack(batch).to(dev)                                   # (B, 3, S, S)
        with ctx:
            tokens, token_mask, labels = setok(img)                        # (B, K, D), (B, K), (B, N)
            recon = detok(tokens, token_mask).float().clamp(0, 1)          # (B, 3, S, S)
        db = psnr(recon, img)
        for j, (f, pre) in enumerate(zip(files[i:i + bs], prefixes[i:i + bs])):
            n = int(token_mask[j].sum())
            print(f"{f}: {n} tokens, reconstruction {db[j]:.1f} dB PSNR", flush=True)
            save_strip([cluster_overlay(img[j], labels[j], sc)], [f"{n} token{'s' * (n != 1)}"],
                       os.path.join(settings['out'], f'{pre}tokens.png'))
            save_strip([to_uint8(img[j], sc), to_uint8(recon[j], sc)], ['input', f'reconstruction {db[j]:.1f} dB'],
                       os.path.join(settings['out'], f'{pre}recon.png'))
            yield f, pre, img[j], tokens[j].float(), token_mask[j], labels[j]


# -----------------------------------------------------------------------------
# SETOKIM: a conversation in the training template, the model continues it. See setokim.py:
#   [USER] [Img] v_1 .. v_K [/Img] <text> [ASSISTANT]   then the answer, or a forced [SEG] / [Img]

def sentence(text, end='.'):
    """'make the circle blue' -> 'Make the circle blue.' (the world's instructions are capitalised
    and punctuated; the tiny text tokenizer sees them that way)."""
    text = ' '.join(text.split())
    text = text[:1].upper() + text[1:]
    return text if not end or text[-1:] in '.?!' else text + end


class Conversation:
    """One prompt for SETOKIM -> the batch dict setokim.py's generate/segment take (batch of 1)."""

    def __init__(self, llm, setok, settings, dev):
        self.model, self.tok, _ = llm
        self.setok, self.settings, self.dev = setok, settings, dev
        self.vis_id = self.model.cfg.vis_id

    def image_tokens(self, tokens, token_mask, labels):
        """One image's SeTok output -> the same in reading order (the order SETOKIM was trained on),
        batch of 1: tokens (1,K,D), token_mask (1,K), labels (1,N)."""
        return reading_order(tokens[None], token_mask[None], labels[None].long(), self.setok.grid)

    def prompt(self, text, image=None, extra=()):
        """text: the user's turn; image: (tokens (1,K,D), token_mask (1,K), labels (1,N)) in reading order
        (image_tokens) or None; extra: ids forced after [ASSISTANT] ([SEG] to segment, [Img] to write an image)."""
        k = int(image[1].sum()) if image is not None else 0
        value = f'<image>\n{text}' if image is not None else text
        ids, ref, _, _ = encode_conversation(self.tok, [{'from': 'human', 'value': value}], lambda out: (0, k),
                                             self.vis_id)
        ids = ids + [self.tok.assistant] + list(extra)
        ref = ref + [-1] * (1 + len(extra))
        if len(ids) >= self.model.cfg.block_size:
            die(f"the prompt is {len(ids)} tokens long, but this SETOKIM reads at most "
                f"{self.model.cfg.block_size}; shorten it")
        idx = torch.tensor([ids], device=self.dev)
        vis = image[0][image[1]].float() if image is not None else torch.zeros(0, self.model.cfg.token_dim)
        pos = (cluster_centroids(image[2], self.setok.grid, image[1].shape[1])[0][image[1]] if image is not None
               else torch.zeros(0, 2))                                      # (k, 2) each token's centroid
        return {'idx': idx, 'real': torch.ones_like(idx, dtype=torch.bool),
                'vis_mask': torch.tensor([ref], device=self.dev) >= 0, 'vis': vis.to(self.dev), 'vis_pos': pos.to(self.dev)}

    def generate(self, b, new_tokens):
        s = self.settings
        new_tokens = min(new_tokens, self.model.cfg.block_size - b['idx'].shape[1])
        g = torch.Generator(device=self.dev).manual_seed(s['seed'])
        return self.model.generate(b, new_tokens, temperature=s['temperature'], top_k=s['top_k'] or None,
                                   max_image_tokens=self.setok.max_tokens, img_temperature=s['img_temperature'],
                                   diff_steps=s['diff_steps'], cfg_scale=s['cfg_scale'], generator=g)

    def answer(self, text, image):
        ids, _ = self.generate(self.prompt(text, image), self.settings['max_new_tokens'])
        return self.tok.decode(ids[0].tolist())

    def write_image(self, text, image, detok):
        """num_samples images written after a forced [Img] (one batch: each row its own noise) ->
        (n, 3, S, S) in [0, 1] and each one's number of tokens."""
        K, n = self.setok.max_tokens, self.settings['num_samples']
        b = self.prompt(text, image, extra=[self.tok.img])
        b = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in b.items()}   # n copies of the prompt
        ids, vis = self.generate(b, max(self.settings['max_new_tokens'], K + 2))
        tokens, token_mask = visual_tokens(ids, vis, self.vis_id, K)
        return detok(tokens, token_mask).float().clamp(0, 1), token_mask.sum(1).tolist()

    def segment(self, text, image):
        """Mask probabilities (H, W) of the object the text refers to."""
        b = self.prompt(text, image, extra=[self.tok.seg])
        return torch.sigmoid(self.model.segment(b, *image)[0].float())


@torch.no_grad()
def setokim_on_image(conv, detok, f, pre, img, tokens, token_mask, labels, settings, ctx):
    """The SETOKIM modes that take an image: answer (--prompt, or describe), --refer, --edit."""
    sc, out = settings['scale'], settings['out']
    image = conv.image_tokens(tokens, token_mask, labels)                   # tokens, token_mask, labels
    with ctx:
        q = sentence(settings['prompt'], end='') if settings['prompt'] else 'Describe the image.'
        if settings['prompt'] or not (settings['refer'] or settings['edit']):
            print(f"Q: {q}\nA: {conv.answer(q, image)}", flush=True)
        if settings['refer']:
            expr = ' '.join(settings['refer'].split()).rstrip('.')
            text = sentence(expr if expr.lower().startswith('segment') else f'Segment {expr}')
            mask = conv.segment(text, image)
            if mask.shape[-1] != img.shape[-1]:
                mask = torch.nn.functional.interpolate(mask[None, None], size=img.shape[-2:], mode='bilinear')[0, 0]
            print(f"{text} -> {100 * float((mask > 0.5).float().mean()):.1f}% of the image", flush=True)
            save_strip([mask_overlay(img, (mask > 0.5).float(), sc)], [text], os.path.join(out, f'{pre}mask.png'))
        if settings['edit']:
            text = sentence(settings['edit'])
            edited, n = conv.write_image(text, image, detok)
            save_strip([to_uint8(img, sc)] + [to_uint8(e, sc) for e in edited], ['input'] + [f'{text} ({k} tokens)' for k in n],
                       os.path.join(out, f'{pre}edited.png'))


@torch.no_grad()
def setokim_generate(conv, detok, settings, ctx):
    cap = ' '.join(settings['generate'].split())
    text = cap if cap.lower().startswith('generate an image') else f'Generate an image: {cap}'
    with ctx:
        images, n = conv.write_image(text, None, detok)
    save_strip([to_uint8(im, settings['scale']) for im in images], [f'{cap} ({k} tokens)' for k in n],
               os.path.join(settings['out'], 'generated.png'))


# -----------------------------------------------------------------------------

def main(settings):
    dev, _, ctx = pick_device(settings['device'], settings['dtype'])
    if settings['threads']:
        torch.set_num_threads(settings['threads'])
    torch.manual_seed(settings['seed'])
    if settings['num_samples'] < 1:
        die(f"num_samples={settings['num_samples']}: expected an integer >= 1")
    if err := sampling_error(settings['diff_steps'], settings['img_temperature'], settings['cfg_scale']):
        die(err)
    files = expand_images(settings['image'])
    for mode in ('prompt', 'refer', 'edit'):
        if settings[mode] and not files:
            die(f"--{mode} needs an image: pass --image FILE")
    if not files and not settings['generate']:
        die("nothing to do: pass --image FILE [FILE ...] (files or folders), or --generate 'a caption'")
    wants_llm = any(settings[k] for k in ('prompt', 'refer', 'generate', 'edit'))
    setok, detok, llm = load_models(settings, dev, wants_llm)
    if settings['scale'] <= 0:
        settings['scale'] = max(1, -(-256 // setok.cfg.image_size))         # ceil(256 / S)
    conv = Conversation(llm, setok, settings, dev) if llm is not None else None
    for f, pre, img, tokens, token_mask, labels in tokenize_images(files, output_names(files), setok, detok,
                                                                  settings, ctx, dev):
        if conv is not None:
            setokim_on_image(conv, detok, f, pre, img, tokens, token_mask, labels, settings, ctx)
    if settings['generate']:
        setokim_generate(conv, detok, settings, ctx)


if __name__ == '__main__':
    if hasattr(signal, 'SIGPIPE'):                  # `python sample.py ... | head`: stop quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main(configure(globals()))
