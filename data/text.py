"""
The text tokenizer: one interface over sentencepiece (the shapes world's tokenizer.model, and the
converted real worlds') and tiktoken's GPT-2 BPE, with the special tokens that lay out SETOKIM's
sequences (setokim.py shows the layout). Every special-token id a script uses comes from here.

    tok = TextTokenizer('data/shapes/world/tokenizer.model')   # or 'tiktoken:gpt2'
    tok.encode('[USER] Describe the image.')   -> [tok.user, ...]
    tok.img, tok.img_end, tok.seg, tok.user, tok.assistant, tok.eos, tok.pad, tok.vocab_size
"""
import hashlib
import os
import re
import tempfile

import sentencepiece as spm
import tiktoken

from common import die

# -----------------------------------------------------------------------------
# One interface over two backends.
#
# sentencepiece: the shapes world's tokenizer.model (ids: unk 0, bos 1, eos 2, pad 3, then the special
#   pieces [Img] [/Img] [SEG] [USER] [ASSISTANT] = 4..8, defined when the model was trained).
# tiktoken:      'tiktoken:gpt2' (or an Encoding object) for real text. GPT-2's BPE has no such
#   pieces, so they are appended after its vocabulary, followed by a pad id; eos is <|endoftext|>.
# Special tokens are never produced by the BPE itself: encode() cuts the text at their spellings and
# maps them straight to their ids, the same way for both backends.
# GPT-2's BPE comes from tiktoken's cache only (tiktoken_gpt2 below).


SPECIAL = ('[Img]', '[/Img]', '[SEG]', '[USER]', '[ASSISTANT]')   # the world's tokenizer.model has them as pieces


class TextTokenizer:
    SPECIAL = SPECIAL

    def __init__(self, model):
        self.model = model if isinstance(model, str) else f'tiktoken:{model.name}'
        if not isinstance(model, str) or model.startswith('tiktoken:'):
            if isinstance(model, str) and model != 'tiktoken:gpt2':
                die(f"text tokenizer {model}: the tiktoken encoding nanoSeTok knows is tiktoken:gpt2")
            enc = tiktoken_gpt2() if isinstance(model, str) else model
            n = enc.n_vocab
            self._encode, self._decode = enc.encode_ordinary, enc.decode
            self.special = {s: n + k for k, s in enumerate(self.SPECIAL)}        # appended after the BPE
            self.eos = self.bos = enc.eot_token
            self.pad = n + len(self.SPECIAL)
            self.vocab_size = n + len(self.SPECIAL) + 1
        else:
            if not os.path.isfile(model):
                die(f"text tokenizer {model} not found; prepare the world first (python data/shapes/prepare.py)")
            sp = spm.SentencePieceProcessor(model_file=model)
            self._encode, self._decode = sp.encode, sp.decode
            self.special = {s: sp.piece_to_id(s) for s in self.SPECIAL}
            if sp.unk_id() in self.special.values():
                die(f"{model} has no pieces for {', '.join(self.SPECIAL)}; use a tokenizer.model from prepare.py")
            self.eos, self.bos, self.pad = sp.eos_id(), sp.bos_id(), sp.pad_id()
            self.vocab_size = sp.get_piece_size()
        self.img, self.img_end, self.seg, self.user, self.assistant = (self.special[s] for s in self.SPECIAL)
        self._names = {v: k for k, v in self.special.items()}
        self._split = re.compile('(' + '|'.join(re.escape(s) for s in self.SPECIAL) + ')')

    def encode(self, text):
        """str -> list of ids; the special spellings anywhere in text become their ids."""
        ids = []
        for part in self._split.split(text):
            if part in self.special:
                ids.append(self.special[part])
            elif part.strip():
                ids += self._encode(part.strip())
        return ids

    def decode(self, ids):
        """ids -> str. Special tokens are spelled out, eos and pad end / are dropped; any id past the
        text vocabulary (SETOKIM's VIS) is written as <v>."""
        words, run = [], []
        for i in ids:                         # one sequence, at most a few hundred ids: not a hot path
            i = int(i)
            if i in (self.eos, self.pad) or i in self._names or i >= self.vocab_size:
                if run:
                    words.append(self._decode(run))
                    run = []
                if i == self.eos:
                    break
                if i != self.pad:
                    words.append(self._names.get(i, '<v>'))
            else:
                run.append(i)
        if run:
            words.append(self._decode(run))
        return ' '.join(w.strip() for w in words if w.strip())


# -----------------------------------------------------------------------------
# GPT-2's BPE. tiktoken downloads it (two files) on first use and keeps each in its cache folder under
# the sha1 of its URL (tiktoken/load.py: read_file_cached). The folder is $TIKTOKEN_CACHE_DIR, else
# $DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache. We look there first: a machine without the files
# gets a line that says how to get them, instead of a download attempt and a traceback.

GPT2_BPE_FILES = {'vocab.bpe': 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe',
                  'encoder.json': 'https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json'}


def tiktoken_gpt2():
    """tiktoken's GPT-2 encoding, from tiktoken's cache only (or a one-line error)."""
    env = next((v for v in ('TIKTOKEN_CACHE_DIR', 'DATA_GYM_CACHE_DIR') if v in os.environ), None)
    cache = os.environ[env] if env else os.path.join(tempfile.gettempdir(), 'data-gym-cache')
    files = {name: os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()) for name, url in GPT2_BPE_FILES.items()}
    missing = [name for name, f in files.items() if not cache or not os.path.isfile(f)]
    how = ("run  python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"  once with internet access (it fills "
           "the cache), or copy the cached files there from a machine that has them: "
           + ', '.join(f"{os.path.basename(f)} ({name})" for name, f in files.items()))
    if not cache:
        die(f"text_tokenizer=gpt2: tiktoken's cache is switched off ({env} is empty); set {env} to a folder and {how}")
    if missing:
        die(f"text_tokenizer=gpt2: GPT-2's BPE vocabulary ({', '.join(missing)}) is not in tiktoken's cache {cache} "
            f"({env or 'the default; TIKTOKEN_CACHE_DIR sets another'}); {how}")
    try:
        return tiktoken.get_encoding('gpt2')
    except Exception as e:                # a damaged cache file: tiktoken tries to download it again
        die(f"text_tokenizer=gpt2: tiktoken could not read its cached GPT-2 vocabulary in {cache} "
            f"({type(e).__name__}); delete {' and '.join(files.values())}, then {how}")
