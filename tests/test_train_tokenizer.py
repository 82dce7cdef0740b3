"""The embedded model's own CLIP-format tokenizer, built from its captions."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from memloc.errors import MemlocError
from memloc.train.photos import PHOTOS
from memloc.train.shapes import CaptionTable
from memloc.train.tokenizer import learn_bpe, write_clip_tokenizer

CAPTIONS = CaptionTable().captions + [p.caption for p in PHOTOS]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tok"), CAPTIONS, model_max_length=32)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_dir))


def test_files_are_clip_format(tokenizer_dir):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"
    ]
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    merges = (tokenizer_dir / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2"
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2
    assert "red</w>" in vocab and "background</w>" in vocab
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert all(m.replace(" ", "") in vocab for m in merges[1:])


@pytest.mark.parametrize("caption", [CAPTIONS[0], CAPTIONS[-1], "two purple triangles on a white background"],
                         ids=["generic-first", "photo-last", "generic-plural"])
def test_each_word_is_one_token_and_round_trips(tokenizer, caption):
    enc = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 32
    words = caption.split()
    assert ids[0] == tokenizer.bos_token_id and ids[len(words) + 1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1 : len(words) + 1]) == [w + "</w>" for w in words]
    assert all(i == tokenizer.pad_token_id for i in ids[len(words) + 1 :])
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_all_captions_round_trip(tokenizer):
    for caption in CAPTIONS:
        ids = tokenizer(caption).input_ids
        assert len(ids) == len(caption.split()) + 2, caption
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_unknown_words_still_tokenize(tokenizer):
    ids = tokenizer("zebra xylophone").input_ids
    assert len(ids) > 4  # split into byte-level pieces
    assert tokenizer.decode(ids, skip_special_tokens=True) == "zebra xylophone"


def test_build_is_deterministic(tmp_path):
    a = write_clip_tokenizer(tmp_path / "a", CAPTIONS)
    b = write_clip_tokenizer(tmp_path / "b", list(reversed(CAPTIONS)))
    for name in ("vocab.json", "merges.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_learn_bpe_merges_every_word_to_one_symbol():
    merges = learn_bpe(Counter({"low": 5, "lower": 2, "newest": 6}))
    assert merges[0] == ("w", "e")  # the most frequent pair: 2 in "lower" + 6 in "newest"
    joined = {a + b for a, b in merges}
    assert {"low</w>", "lower</w>", "newest</w>"} <= joined


@pytest.mark.parametrize("bad", ["Red circle", "a  red", "red, circle", " red", "zwölf"],
                         ids=["upper", "double-space", "comma", "leading-space", "non-ascii"])
def test_rejects_captions_that_would_not_round_trip(tmp_path, bad):
    with pytest.raises(MemlocError, match="lowercase ASCII"):
        write_clip_tokenizer(tmp_path, [bad])


def test_rejects_too_long_captions(tmp_path):
    with pytest.raises(MemlocError, match="more than 6 words"):
        write_clip_tokenizer(tmp_path, ["a b c d e f g"], model_max_length=8)
