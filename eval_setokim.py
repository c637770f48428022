"""
SETOKIM's evaluation on the test split of the shapes world, greedy and batched, one function per task:

    losses   teacher-forced test losses: text CE per answer token, regression per visual token, mask
             loss per sample, rope2d's position error per visual token (stat_vector / test_losses add
             them up over batches and processes)
    vqa      accuracy per question kind and overall: exact match of the answer after strip/lower; and
             the same questions answered blind (the text-only prior: the commonest train answer to the
             same question), so that what the model reads from the image shows as the difference
    caption  object F1: parse_caption's (size, colour, shape) of the generated caption against the
             image's objects, as multisets, pooled over all captions
    refer    mIoU (mean of per-sample IoUs) and cIoU (total intersection / total union), pixels with
             logit > 0; the answer's [SEG] is forced (the prompt ends in it)
    write    text-to-image and editing: the answer's [Img] is forced and the model writes tokens until
             [/Img] (Eval.draw: the diffusion head's sampling settings, a fixed seed). What the judge
             (data/shapes/judge.py) reads in the image, GenEval-style: for t2i the share of prompts
             with every object of the caption (size, colour, shape, cell) and no other, object recall
             and precision, counts, colour binding, positions; for editing success (the object
             recoloured, removed or moved) and preservation (every other object as it was). Beside
             them PSNR against the true image and per-object colour IoU (pixels within 60/255 of each
             true object's colour, output vs truth). Each next to SeTok's own reconstruction of the
             truth (the ceiling) and a baseline that writes no tokens: for t2i the caption-only guess
             (each object averaged over its 3x3 cell, on the train split's mean background), for
             editing the source image unchanged. The panel shows each prompt's image at three seeds.

evaluate() runs the tasks asked for and draws the picture panel (samples.png); stream_losses() is the
teacher-forced part for streamed real worlds (data_dirs), whose ground truth the other tasks need.
`test` is train_setokim.py's test split: {'P', 'bank', 'convs', 'task', 'kind', 'target', 'images',
'prior', 'records', 'background'}.
"""
from collections import Counter

import numpy as np
import torch

from common import save_panel, to_uint8
from data.batch import collate
from data.conversations import KINDS, TASKS
from data.shapes.judge import EDIT_OPS, edit_target, judge, rates, score_edit, score_t2i
from data.shapes.prepare import COLORS, caption_guess, parse_caption
from detok import psnr
from setokim import visual_tokens


TERMS = ('ce', 'reg', 'mask', 'pos')    # SETOKIM.forward's loss terms; 'pos' is rope2d's position head (else 0)


def stat_vector(st):
    """SETOKIM.forward's stats -> (8,): the sums of the four loss terms, then their counts; add these
    up over batches (and processes) and divide with stat_means."""
    return torch.tensor([float(st[k]) for k in TERMS + ('n_ce', 'n_reg', 'n_seg', 'n_vis')])


def stat_means(sums):
    """Summed stat_vectors -> {term: its mean}: text CE per answer token, regression per written
    visual token, mask loss per [SEG] answer, position error per visual token."""
    return dict(zip(TERMS, (sums[:4] / sums[4:].clamp_min(1)).tolist()))


def test_losses(sums):
    """Summed stat_vectors -> the test losses: test_ce and test_reg, and test_mask where there were
    masks, test_pos where the model has a position head."""
    m = {f'test_{k}': v for k, v in stat_means(sums).items()}
    if sums[6] == 0:
        del m['test_mask']
    if sums[3] == 0:
        del m['test_pos']
    return m


class Eval:
    """What every task needs: the model, the test split, and how to batch it."""

    def __init__(self, model, detok, tok, test, ctx, dev, per_task=200, batch_size=64, pack_rows=True, seed=0, **sampling):
        self.model, self.detok, self.tok, self.test, self.ctx, self.dev = model, detok, tok, test, ctx, dev
        self.per_task, self.batch_size, self.pack_rows, self.seed = per_task, batch_size, pack_rows, seed
        self.sampling = sampling                    # how images are written: img_temperature, diff_steps, cfg_scale

    def rows(self, task):
        """per_task conversations of `task` spread evenly over the split (0: all of them)."""
        rows = (self.test['task'] == TASKS.index(task)).nonzero()[:, 0]
        n = min(len(rows), self.per_task or len(rows))
        return rows[torch.linspace(0, len(rows) - 1, n).round().long()] if n else rows

    def chunks(self, rows):
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def batch(self, rows, prompt_extra=None, pack_rows=False):
        b = collate(self.test['P'], self.test['bank'], rows, self.tok, prompt_extra=prompt_extra, pack_rows=pack_rows)
        return {k: v.to(self.dev) for k, v in b.items()}

    def draw(self, b, K, seed=0):
        """Prompts b that end in [Img] -> the images the model writes (b, 3, H, W) in [0, 1] and their
        token masks (b, K); seed picks the diffusion head's noise."""
        g = torch.Generator(device=self.dev).manual_seed(self.seed + seed)
        ids, vis = self.model.generate(b, max_new_tokens=K + 2, max_image_tokens=K, generator=g, **self.sampling)
        toks, tmask = visual_tokens(ids, vis.float(), self.model.cfg.vis_id, K)
        return self.detok(toks, tmask).float().clamp(0, 1), tmask

    def images(self, i):
        return self.test['images'][i].to(self.dev).permute(0, 3, 1, 2).float() / 255   # (b, 3, H, W) in [0, 1]


def losses(ev, tasks):
    sums = torch.zeros(8)
    g = torch.Generator(device=ev.dev).manual_seed(ev.seed)   # the diffusion loss's noise: the same at every eval,
    for r in ev.chunks(torch.cat([ev.rows(t) for t in tasks])):   # and the training RNG (which a resume restores) untouched
        with ev.ctx:
            _, st = ev.model(ev.batch(r, pack_rows=ev.pack_rows), cond_drop=0.0, generator=g)
        sums += stat_vector(st)
    return test_losses(sums)


def vqa(ev):
    hit, tot, prior = Counter(), Counter(), Counter()
    test = ev.test
    for r in ev.chunks(ev.rows('vqa')):
        with ev.ctx:
            ids, _ = ev.model.generate(ev.batch(r, prompt_extra=torch.zeros_like(r)), max_new_tokens=8)
        for j, row in enumerate(r.tolist()):                               # string comparison per answer
            kind = KINDS[int(test['kind'][row])]
            answer = test['convs'][row]['answer'].strip().lower()
            hit[kind] += ev.tok.decode(ids[j].tolist()).strip().lower() == answer
            tot[kind] += 1
            prior[kind] += test['prior'][row].strip().lower() == answer    # the text-only baseline
    n = max(1, sum(tot.values()))
    return {'vqa': sum(hit.values()) / n, **{f'vqa_{k}': hit[k] / tot[k] for k in KINDS if tot[k]},
            'vqa_text_prior': sum(prior.values()) / n, **{f'vqa_text_prior_{k}': prior[k] / tot[k] for k in KINDS if tot[k]}}


def caption(ev):
    P, records = ev.test['P'], ev.test['records']
    tp = n_pred = n_true = 0
    rows = ev.rows('caption')
    longest = int(P.n_ce[rows].max()) + 4 if len(rows) else 8
    for r in ev.chunks(rows):
        with ev.ctx:
            ids, _ = ev.model.generate(ev.batch(r, prompt_extra=torch.zeros_like(r)),
                                       max_new_tokens=min(longest, ev.model.cfg.block_size - int(P.prompt_len[r].max())))
        for j, row in enumerate(r.tolist()):
            pred = Counter(parse_caption(ev.tok.decode(ids[j].tolist())))
            true = Counter((o['size'], o['color'], o['shape']) for o in records[int(P.img[row])]['objects'])
            tp, n_pred, n_true = tp + sum((pred & true).values()), n_pred + sum(pred.values()), n_true + sum(true.values())
    return {'caption_f1': 2 * tp / max(1, n_pred + n_true)}                 # pooled over all captions


def refer(ev, panel):
    P, bank = ev.test['P'], ev.test['bank']
    ious, inter, union = [], 0, 0
    for i, r in enumerate(ev.chunks(ev.rows('refer'))):
        b = ev.batch(r, prompt_extra=torch.ones_like(r))                   # prompts end in [SEG]
        assert bool((b['idx'][:, -1] == ev.tok.seg).all())
        img = P.img[r]
        toks, tmask = bank.padded(img)
        with ev.ctx:
            pix = ev.model.segment(b, toks.to(ev.dev), tmask.to(ev.dev), bank.labels[img].long().to(ev.dev))
        pred = pix.float() > 0                                              # (b, H, W)
        gt = (bank.instances[img].long() == P.mask_id[r][:, None, None]).to(ev.dev)
        I, U = (pred & gt).flatten(1).sum(1), (pred | gt).flatten(1).sum(1)
        ious.append(I / U.clamp_min(1))
        inter, union = inter + I.sum().item(), union + U.sum().item()
        if i == 0:                                                          # the panel: masks in red
            n = min(8, len(r))
            src, red = ev.images(img[:n]), torch.tensor([1.0, 0.2, 0.2], device=ev.dev)[:, None, None]
            over = lambda mk: [to_uint8(0.5 * src[j] + 0.5 * mk[j].float() * red, 2) for j in range(n)]
            panel += [(over(gt), ['refer: truth']), (over(pred), ['pred'])]
    return {'refer_miou': torch.cat(ious).mean().item() if ious else 0.0, 'refer_ciou': inter / max(1, union)}


def colour_iou(pred, target, colours, valid, tau=60 / 255):
    """Per object: IoU between the pixels within tau (RGB distance) of its colour in pred and in
    target. pred, target (B,3,H,W) in [0,1]; colours (B,O,3) in [0,1]; valid (B,O) -> (B,O)."""
    near = lambda im: (im[:, None] - colours[..., None, None]).norm(dim=2) < tau    # (B, O, H, W)
    p, t = near(pred), near(target)
    iou = (p & t).flatten(2).sum(-1) / (p | t).flatten(2).sum(-1).clamp_min(1)
    return iou[valid]


def write(ev, task, K, panel):
    """t2i or edit: the model writes up to K tokens after a forced [Img]; the detokenizer draws them;
    the judge (data/shapes/judge.py) reads them. Rows: the model, a baseline that writes nothing (t2i:
    the caption-only guess; edit: the source copied) and SeTok's own reconstruction of the truth (the
    ceiling)."""
    test, P, bank, records, S = ev.test, ev.test['P'], ev.test['bank'], ev.test['records'], ev.model.cfg.image_size
    got = {k: [] for k in ('psnr', 'colour_iou', 'tokens', 'oracle_psnr', 'oracle_colour_iou', 'base')}
    judged = {who: Counter() for who in ('', 'base_', 'oracle_')}
    for i, r in enumerate(ev.chunks(ev.rows(task))):
        b = ev.batch(r, prompt_extra=torch.ones_like(r))                   # prompts end in [Img]
        assert bool((b['idx'][:, -1] == ev.tok.img).all())
        with ev.ctx:
            out, tmask = ev.draw(b, K)                                      # (b, 3, H, W), (b, K)
            ttoks, ttmask = bank.padded(test['target'][r])
            recon = ev.detok(ttoks.to(ev.dev), ttmask.to(ev.dev)).float().clamp(0, 1)
        target = ev.images(test['target'][r])
        convs = [test['convs'][row] for row in r.tolist()]
        if task == 't2i':                                                   # no image written: the baselines
            truth = [records[int(test['target'][row])]['objects'] for row in r.tolist()]
            guess = np.stack([caption_guess(t, test['background'], S) for t in truth])      # (b, H, W, 3)
            base = torch.from_numpy(guess).permute(0, 3, 1, 2).float()
        else:
            source = [records[int(P.img[row])]['objects'] for row in r.tolist()]
            truth = [edit_target(o, c['edit'], S)[0] for o, c in zip(source, convs)]
            base = ev.images(P.img[r])
        for who, im in (('', out), ('base_', base), ('oracle_', recon)):    # what the judge sees in each
            for j, pred in enumerate(judge(im.cpu())):
                judged[who].update(score_t2i(pred, truth[j]) if task == 't2i' else
                                   score_edit(pred, source[j], convs[j]['edit'], S))
        cols = [[o['color'] for o in t] for t in truth]                    # the target's object colours
        O = max(len(c) for c in cols)
        colours = torch.tensor([[COLORS[x] for x in c] + [(0, 0, 0)] * (O - len(c)) for c in cols], device=ev.dev) / 255
        valid = torch.tensor([[True] * len(c) + [False] * (O - len(c)) for c in cols], device=ev.dev)
        for k, v in (('psnr', psnr(out, target)), ('base', psnr(base, target.to(base.device))), ('oracle_psnr', psnr(recon, target)),
                     ('tokens', tmask.sum(1).float()), ('colour_iou', colour_iou(out, target, colours, valid)),
                     ('oracle_colour_iou', colour_iou(recon, target, colours, valid))):
            got[k].append(v.cpu())
        if i == 0:
            n = min(8, len(r))
            if task == 'edit':
                src = ev.images(P.img[r][:n])
                panel.append(([to_uint8(src[j], 2) for j in range(n)], ['edit: source']))
            panel.append(([to_uint8(target[j], 2) for j in range(n)], [f'{task}: truth']))
            panel.append(([to_uint8(out[j], 2) for j in range(n)], [f'{int(tmask[j].sum())} tok' for j in range(n)]))
            for seed in (1, 2):                                             # more samples of the same prompts
                more, _ = ev.draw(ev.batch(r[:n], prompt_extra=torch.ones_like(r[:n])), K, seed)
                panel.append(([to_uint8(more[j], 2) for j in range(n)], [f'seed {seed}']))
    m = {f'{task}_{k}': torch.cat(v).mean().item() for k, v in got.items() if k != 'base'}
    m['t2i_guess_psnr' if task == 't2i' else 'edit_copy_psnr'] = torch.cat(got['base']).mean().item()
    for who, c in judged.items():
        name = {'': task, 'base_': 't2i_guess' if task == 't2i' else 'edit_copy', 'oracle_': f'{task}_oracle'}[who]
        m.update({f'{name}_{k}': v for k, v in rates(c).items()})
    return m


@torch.no_grad()
def evaluate(ev, tasks, max_image_tokens, panel_path=None):
    """The metrics of `tasks` (a subset of TASKS) on the test split, and the picture panel."""
    ev.model.eval()
    panel = []
    m = losses(ev, tasks)
    if 'vqa' in tasks:
        m.update(vqa(ev))
    if 'caption' in tasks:
        m.update(caption(ev))
    if 'refer' in tasks:
        m.update(refer(ev, panel))
    for task in ('t2i', 'edit'):
        if task in tasks:
            m.update(write(ev, task, max_image_tokens, panel))
    if panel_path and panel:
        width = max(len(row) for row, _ in panel)
        rows = [row + [np.zeros_like(row[0])] * (width - len(row)) for row, _ in panel]
        save_panel(rows, panel_path, [lab + [''] * (width - len(lab)) for _, lab in panel])
    ev.model.train()
    return m


@torch.no_grad()
def stream_losses(model, batches, loader, want, ctx, dev, split):
    """data_dirs: the teacher-forced test losses of the first `want` conversations of a held-out loader
    (0: all); batches is the training StreamedBatches, whose to_batch tokenises a streamed batch."""
    model.eval()
    sums, n = torch.zeros(8), 0
    want = want or len(loader.dataset)
    g = torch.Generator(device=dev).manual_seed(0)                         # as in losses()
    for b in loader:
        bb, _, _ = batches.to_batch(b, dev)
        with ctx:
            _, st = model({k: v.to(dev) for k, v in bb.items()}, cond_drop=0.0, generator=g)
        sums += stat_vector(st)
        n += len(b['length'])
        if n >= want:
            break
    model.train()
    return dict(test_losses(sums), split=split, conversations=n)


def fmt(m):
    """The metrics as one line."""
    if not m:
        return 'no held-out conversations of these tasks: eval skipped'
    parts = [f"test ce {m['test_ce']:.3f} reg {m['test_reg']:.3f}" + (f" mask {m['test_mask']:.3f}" if 'test_mask' in m else '')
             + (f" pos {m['test_pos']:.2e}" if 'test_pos' in m else '')]
    if 'vqa' in m:
        parts.append(f"VQA {m['vqa']:.3f} (" + ' '.join(f"{k} {m[f'vqa_{k}']:.2f}" for k in KINDS if f'vqa_{k}' in m)
                     + f"; text-only prior {m['vqa_text_prior']:.3f})")
    if 'caption_f1' in m:
        parts.append(f"caption F1 {m['caption_f1']:.3f}")
    if 'refer_miou' in m:
        parts.append(f"refer mIoU {m['refer_miou']:.3f} cIoU {m['refer_ciou']:.3f}")
    for t in ('t2i', 'edit'):
        if f'{t}_psnr' in m:
            base = (f"caption-only guess {m['t2i_guess_psnr']:.2f} dB" if t == 't2i' else
                    f"source copied {m['edit_copy_psnr']:.2f} dB")
            parts.append(f"{t} PSNR {m[f'{t}_psnr']:.2f} dB colour IoU {m[f'{t}_colour_iou']:.3f} tok {m[f'{t}_tokens']:.1f} "
                         f"({base}; SeTok recon {m[f'{t}_oracle_psnr']:.2f} dB, {m[f'{t}_oracle_colour_iou']:.3f})")
    if 't2i_exact' in m:
        js = lambda p: ' '.join(f"{k} {m[f'{p}_{k}']:.3f}" for k in ('exact', 'recall', 'precision', 'count', 'binding', 'position'))
        parts.append(f"t2i judged: {js('t2i')} (caption-only guess: {js('t2i_guess')}; SeTok recon: {js('t2i_oracle')})")
    if 'edit_success' in m:
        js = lambda p: f"success {m[f'{p}_success']:.3f} preserved {m[f'{p}_preserved']:.3f}"
        ops = ' '.join(f"{op} {m[f'edit_{op}']:.2f}" for op in EDIT_OPS if f'edit_{op}' in m)
        parts.append(f"edit judged: {js('edit')} (success by op: {ops}; source copied: {js('edit_copy')}; "
                     f"SeTok recon: {js('edit_oracle')})")
    return ' | '.join(parts)
