"""CLIP tokenizer vs transformers' CLIPTokenizer built from the same BPE file (open_clip's vocab -> HF files)."""
import json

import numpy as np
import pytest

from marval_jax.rewards import clip_tokenizer as ct

PROMPTS = [
    "a photo of a cat",
    "A Photo of  a DOG,   on the beach!!",
    "Don't stop: we're 100% sure it'll rain; they've said I'd",
    "an astronaut riding a horse in 4k, trending on artstation",
    "café crème brûlée — naïve façade",
    "日本語のテキスト and 中文 mixed with English",
    "emoji 🐱🐶 and symbols #$%&*()[]{}<>",
    "numbers 3.14159 and 2024-05-09, x_y_z",
    "  leading and trailing whitespace\tand\ttabs\nnewlines  ",
    "O'Neil's dog's bone",
    "",
    "a golden retriever " * 40,  # truncated to 77
]


def _hf_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    merges = ct.load_merges()
    vocab = ct.build_vocab(merges)
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return cls.from_pretrained(str(tmp_path))


@pytest.fixture(scope="module")
def tokenizer():
    return ct.CLIPTokenizer(use_ftfy=False)


def test_vocab_layout(tokenizer):
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)
    # known OpenAI CLIP ids
    np.testing.assert_array_equal(tokenizer("a photo of a cat")[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])


def test_matches_transformers(tokenizer, tmp_path):
    hf = _hf_tokenizer(tmp_path)
    ours = tokenizer(PROMPTS)
    assert ours.shape == (len(PROMPTS), 77) and ours.dtype == np.int32
    ref = hf(PROMPTS, truncation=True, max_length=77)["input_ids"]
    for row, ids, text in zip(ours, ref, PROMPTS):
        assert list(row[:len(ids)]) == list(ids), text
        assert not row[len(ids):].any(), text  # zero padding, as open_clip
    assert ours[-1, -1] == 49407  # truncated rows end with EOT


def test_truncation_and_context_length(tokenizer):
    ids = tokenizer("one two three four five", context_length=4)
    assert ids.shape == (1, 4) and ids[0, 0] == 49406 and ids[0, -1] == 49407
    with pytest.raises(ValueError, match="context_length"):
        tokenizer("x", context_length=1)


def test_fallback_scanner_matches_regex(tokenizer):
    regex = pytest.importorskip("regex")
    pat = regex.compile(ct._PATTERN, regex.IGNORECASE)
    for text in PROMPTS + ["<|startoftext|>hi<|endoftext|>", "x'S 'LL 'ss '' a1b2 ²½ ⅷ"]:
        cleaned = tokenizer.clean(text)
        assert ct._scan_pieces(cleaned) == pat.findall(cleaned), text


def test_decode_roundtrip(tokenizer):
    assert tokenizer.decode(tokenizer.encode("a photo of a cat")).strip() == "a photo of a cat"


def test_missing_vocab_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="package_files fetch"):
        ct.CLIPTokenizer(bpe_path=str(tmp_path / "nope.txt.gz"))
