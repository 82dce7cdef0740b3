"""Build a small CLIP-format BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) from our captions."""

# The vocabulary follows CLIP's layout: the 256 byte symbols, the same with the end-of-word
# marker ``</w>``, then one entry per learned merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
# BPE is learned on the caption words until every word is a single token, so each caption word
# is one token and any other text still tokenizes (into byte symbols). Captions must be lowercase
# ASCII words separated by single spaces, which makes decoding return the caption exactly.

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..errors import MemlocError
from ..tiny import _bytes_to_unicode

CAPTION_RE = re.compile(r"[a-z]+( [a-z]+)*")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def check_caption(caption: str, model_max_length: int) -> None:
    """Raise if ``caption`` is not lowercase words separated by single spaces, or is too long."""
    if not CAPTION_RE.fullmatch(caption):
        raise MemlocError(f"caption {caption!r} must be lowercase ASCII words separated by single spaces")
    if len(caption.split()) > model_max_length - 2:
        raise MemlocError(f"caption {caption!r} has more than {model_max_length - 2} words")


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_bpe(word_counts: Counter) -> list[tuple[str, str]]:
    """Sennrich BPE on ``word_counts`` until every word is one symbol; ties go to the smaller pair."""
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(word_counts)}
    merges = []
    while True:
        pairs: Counter = Counter()
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += word_counts[w]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {w: _merge_pair(s, best) for w, s in words.items()}


def write_clip_tokenizer(path: str | Path, captions: Iterable[str], model_max_length: int = 32) -> Path:
    """Write a CLIPTokenizer-loadable tokenizer for ``captions`` into the folder ``path``."""
    captions = list(captions)
    for caption in captions:
        check_caption(caption, model_max_length)
    merges = learn_bpe(Counter(w for c in captions for w in c.split()))
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "model_max_length": model_max_length,
        **special,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "CLIPTokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    return path
