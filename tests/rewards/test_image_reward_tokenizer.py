"""The BERT WordPiece tokenizer of ImageReward's prompts vs transformers' BertTokenizer built from the same
vocabulary file (written here: bert-base-uncased's ships in no installable package)."""
import numpy as np
import pytest

from marval_jax.rewards.bert_tokenizer import BertTokenizer, basic_tokenize, get_tokenizer
from marval_jax.user_errors import UserError

transformers = pytest.importorskip("transformers")

VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
         "—", "a", "photo", "of", "cat", "the", "red", "sports", "car", "astronaut", "riding", "horse", "high", "-",
         "quality", "and", "harmon", "##ious", "picture", "##s", "un", "##want", "##ed", "runn", "##ing", "cafe",
         "naive", "中", "国", "l", "oiseau", "100", "real", "hello", "world", "x", "##y", "##z", "is", "very",
         "long", "prompt", "that", "goes", "on", "tabs", "newlines", "b"]
PROMPTS = [
    "A photo of a CAT.", "an astronaut riding a horse!!", "a high-quality and harmonious picture of sports cars",
    "unwanted running", "Café naïve", "中国 cat", "tabs\tand\nnewlines", "xyzzy unknownword", "hello—world",
    "a\u0000b", "l'oiseau", "100% real", "", "   ",
    "a very long prompt that goes on and on and on and on and on and on and on and on and on and on and on and on",
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("max_length", [35, 8])
def test_matches_transformers_bert_tokenizer(vocab_file, max_length):
    """padding="max_length", truncation=True, as the release calls its tokenizer (max_length 35), and a short
    length that truncates."""
    ref = transformers.BertTokenizer(vocab=vocab_file, do_lower_case=True)
    expected = ref(PROMPTS, padding="max_length", truncation=True, max_length=max_length)
    ids, mask = get_tokenizer(vocab_file)(PROMPTS, max_length)
    for row, prompt in enumerate(PROMPTS):
        assert ids[row].tolist() == expected["input_ids"][row], prompt
        assert mask[row].tolist() == expected["attention_mask"][row], prompt
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), max_length)


def test_pieces_and_unknowns(vocab_file):
    tok = BertTokenizer.from_file(vocab_file)
    v = {t: i for i, t in enumerate(VOCAB)}
    assert tok.encode("harmonious unwanted") == [v["harmon"], v["##ious"], v["un"], v["##want"], v["##ed"]]
    assert tok.encode("xyzq") == [v["[UNK]"]]           # no complete split: the whole word is unknown
    assert tok.encode("x" * 101) == [v["[UNK]"]]         # over 100 characters
    assert basic_tokenize("Café, naïve!") == ["cafe", ",", "naive", "!"]
    ids, mask = tok("a cat", 6)
    assert ids.tolist() == [[v["[CLS]"], v["a"], v["cat"], v["[SEP]"], 0, 0]] and mask.tolist() == [[1, 1, 1, 1, 0, 0]]


def test_bad_vocabulary(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        BertTokenizer.from_file(str(tmp_path / "vocab.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(UserError, match=r"\[PAD\]"):
        BertTokenizer.from_file(str(bad))
