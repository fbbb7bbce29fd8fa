"""CLIP byte-level BPE tokenizer (OpenAI's `simple_tokenizer`), numpy only.

Same algorithm and ids as OpenAI CLIP / open_clip's `SimpleTokenizer` and transformers' `CLIPTokenizer`:

* cleaning: `ftfy.fix_text` when ftfy is installed (as OpenAI), otherwise Unicode NFC normalisation (which is
  what ftfy's default does to well-formed text and what transformers' fast tokenizer does; ftfy additionally
  repairs mojibake and straightens curly quotes). Then `html.unescape` twice, whitespace runs collapsed to one
  space, stripped, lower-cased. transformers' fast tokenizer does not html-unescape, so text containing HTML
  entities (`&amp;`) is the one known case where the two differ.
* pre-tokenisation with CLIP's pattern
  `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (IGNORECASE).
  The third-party `regex` package is used when installed; otherwise an equivalent hand-written scanner over
  `unicodedata` categories (letters = categories L*, numbers = N*, whitespace = `str.isspace`).
* each piece is utf-8 encoded, bytes mapped through `bytes_to_unicode`, then BPE-merged with `</w>` marking the
  end of a word.
* a batch is `[<|startoftext|>] + ids + [<|endoftext|>]`, padded with 0 to `context_length` (77) as open_clip
  does; longer texts are truncated to `context_length` with the last id replaced by `<|endoftext|>`.

The vocabulary is `bpe_simple_vocab_16e6.txt.gz` from the open-clip-torch wheel, unpacked by
`python -m marval_jax.package_files fetch` (the package itself is never imported here).
"""
from __future__ import annotations

import functools
import gzip
import html
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from marval_jax import package_files

try:  # optional: identical results, faster pre-tokenisation
    import regex as _regex
except ImportError:  # pragma: no cover - exercised through `_scan_pieces` directly in the tests
    _regex = None

try:  # optional: OpenAI's cleaning
    import ftfy as _ftfy
except ImportError:
    _ftfy = None

DEFAULT_CONTEXT_LENGTH = 77
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP (the file holds more)
INSTALL_HINT = "python -m marval_jax.package_files fetch"
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map utf-8 byte -> printable unicode character (GPT-2 / CLIP)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def default_bpe_path() -> str:
    """Path of open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip."""
    return package_files.find("open_clip", BPE_FILENAME)


def load_merges(bpe_path: str | None = None) -> list[tuple[str, str]]:
    """The 48894 BPE merges CLIP uses, read from the gzipped vocabulary file (header line skipped)."""
    path = bpe_path or default_bpe_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}; install it with `{INSTALL_HINT}`")
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    lines = lines[1:NUM_MERGES + 1]
    if len(lines) != NUM_MERGES:
        raise ValueError(f"{path}: expected {NUM_MERGES} merge lines after the header, found {len(lines)}")
    return [tuple(line.split()) for line in lines]


def build_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
    """Token strings in id order: 256 byte chars, the same with `</w>`, the merges, then SOT / EOT."""
    base = list(bytes_to_unicode().values())
    return base + [v + "</w>" for v in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]


def get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


def _is_letter(c: str) -> bool:
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:
    return unicodedata.category(c)[0] == "N"


def _scan_pieces(text: str) -> list[str]:
    """`re.findall` of CLIP's pattern without the `regex` package (same alternation order, IGNORECASE)."""
    pieces, i, n = [], 0, len(text)
    lower = text.lower()
    while i < n:
        c = text[i]
        matched = None
        for special in (SOT_TOKEN, EOT_TOKEN):
            if lower.startswith(special, i):
                matched = text[i:i + len(special)]
                break
        if matched is None and c == "'":
            for con in _CONTRACTIONS:
                if lower.startswith(con, i):
                    matched = text[i:i + len(con)]
                    break
        if matched is None:
            if _is_letter(c):
                j = i + 1
                while j < n and _is_letter(text[j]):
                    j += 1
                matched = text[i:j]
            elif _is_number(c):
                matched = c
            elif not c.isspace():
                j = i + 1
                while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
                    j += 1
                matched = text[i:j]
        if matched is None:  # whitespace: findall skips it
            i += 1
        else:
            pieces.append(matched)
            i += len(matched)
    return pieces


_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>" + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def split_pieces(text: str) -> list[str]:
    """Pre-tokenise cleaned text with CLIP's pattern."""
    if _regex is not None:
        return _compiled_pattern().findall(text)
    return _scan_pieces(text)


@functools.lru_cache()
def _compiled_pattern():
    return _regex.compile(_PATTERN, _regex.IGNORECASE)


def basic_clean(text: str, use_ftfy: bool | None = None) -> str:
    """ftfy (if `use_ftfy`, default: when installed) or NFC; html-unescape twice; strip."""
    if use_ftfy is None:
        use_ftfy = _ftfy is not None
    if use_ftfy:
        if _ftfy is None:
            raise ImportError("use_ftfy=True needs the ftfy package (pip install ftfy)")
        text = _ftfy.fix_text(text)
    else:
        text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


class CLIPTokenizer:
    """OpenAI CLIP tokenizer. `tokenizer(["a photo of a cat"])` -> int32 array (1, 77)."""

    def __init__(self, bpe_path: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 use_ftfy: bool | None = None):
        merges = load_merges(bpe_path)
        vocab = build_vocab(merges)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self.use_ftfy = use_ftfy

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def clean(self, text: str) -> str:
        return whitespace_clean(basic_clean(text, self.use_ftfy)).lower()

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without start / end tokens."""
        ids = []
        for piece in split_pieces(self.clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """(N, context_length) int32: SOT + ids + EOT, zero padded; truncated ending with EOT."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end token), got {length}")
        out = np.zeros((len(texts), length), np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, :len(ids)] = ids
        return out


@functools.lru_cache(maxsize=4)
def get_tokenizer(bpe_path: str | None = None) -> CLIPTokenizer:
    """A cached tokenizer (reading the merge table takes a fraction of a second)."""
    return CLIPTokenizer(bpe_path)


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    return get_tokenizer()(texts, context_length)
