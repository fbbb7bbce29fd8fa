"""BERT's uncased WordPiece tokenizer (transformers' `BertTokenizer(do_lower_case=True)`), for ImageReward's prompts.

ImageReward tokenizes with bert-base-uncased's vocabulary, `padding="max_length", truncation=True, max_length=35`:
`[CLS] pieces [SEP]` then `[PAD]` (id 0) to 35 ids, and an attention mask of 1 on the real tokens. The vocabulary
(`vocab.txt`, one token per line, the line number is the id) ships in no installable package here, so it is read
from a file: the converted ImageReward checkpoint directory holds a copy (`convert_image_reward --vocab`).

Text pipeline, as BERT's BasicTokenizer + WordpieceTokenizer: drop NUL, U+FFFD and control characters, map
whitespace to spaces, put spaces around CJK ideographs, split on whitespace, lowercase, strip accents (NFD, drop
combining marks), split off every punctuation character, then greedy longest-match WordPiece per word with `##`
continuations (a word longer than 100 characters, or one with no complete split, becomes `[UNK]`).
Not handled: special-token strings typed in a prompt ("[MASK]") are tokenized as text, not as the special token.
"""
from __future__ import annotations

import functools
import os
import unicodedata
from collections.abc import Sequence

import numpy as np

from marval_jax.user_errors import UserError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
MAX_CHARS_PER_WORD = 100

_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def basic_tokenize(text: str) -> list[str]:
    """Cleaned, lowercased, accent-stripped words and punctuation characters."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            chars.append(" ")
        elif _is_cjk(cp):
            chars.extend((" ", ch, " "))
        else:
            chars.append(ch)
    out = []
    for word in "".join(chars).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    out.append(current)
                out.append(ch)
                current = ""
            else:
                current += ch
        if current:
            out.append(current)
    return out


class BertTokenizer:
    """`tokenizer(prompts, max_length) -> (ids, mask)`, int32 arrays (N, max_length)."""

    def __init__(self, vocab: Sequence[str]):
        self.vocab = {tok: i for i, tok in enumerate(vocab)}
        missing = [t for t in SPECIALS if t not in self.vocab]
        if missing:
            raise UserError(f"BERT vocabulary lacks the special tokens {missing}: not a bert-base-uncased vocab.txt")
        self.pad, self.unk, self.cls, self.sep = (self.vocab[t] for t in SPECIALS)

    @classmethod
    def from_file(cls, path: str) -> BertTokenizer:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"BERT vocabulary not found: {path} (bert-base-uncased's vocab.txt; "
                                    "python -m marval_jax.checkpoints.convert_image_reward --vocab copies it)")
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f])

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > MAX_CHARS_PER_WORD:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without [CLS] / [SEP]."""
        return [i for word in basic_tokenize(text) for i in self.wordpiece(word)]

    def __call__(self, prompts: str | Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        ids = np.full((len(prompts), max_length), self.pad, np.int32)
        mask = np.zeros((len(prompts), max_length), np.int32)
        for row, text in enumerate(prompts):
            toks = [self.cls, *self.encode(text)[: max_length - 2], self.sep]
            ids[row, :len(toks)], mask[row, :len(toks)] = toks, 1
        return ids, mask


@functools.lru_cache(maxsize=4)
def get_tokenizer(path: str) -> BertTokenizer:
    return BertTokenizer.from_file(path)
