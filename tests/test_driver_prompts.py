"""Prompt files: the three formats, the shared data files, and every malformed file refused."""

from __future__ import annotations

import json

import pytest

from memloc.errors import MemlocError
from memloc.prompts import read_prompts

PROMPTS = ["a photo of a cat", "Mothers influence, on her young hippo", 'a "quoted" title']
CSV_QUOTED = ['"' + p.replace('"', '""') + '"' for p in PROMPTS]


def _write(tmp_path, name: str, text: str, encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("p.txt", "\n".join(PROMPTS) + "\n\n"),
        ("p.jsonl", "\n".join(json.dumps({"caption": p, "index": i}) for i, p in enumerate(PROMPTS)) + "\n"),
        ("p.csv", "id,Caption\n" + "\n".join(f"{i},{q}" for i, q in enumerate(CSV_QUOTED))),
        ("p.csv", "prompt\n" + "\n".join(CSV_QUOTED) + "\n"),
    ],
    ids=["txt", "jsonl", "csv-caption", "csv-prompt"],
)
def test_formats_give_the_prompts_in_order(tmp_path, name, text):
    assert read_prompts(_write(tmp_path, name, text)) == PROMPTS


def test_shared_data_files(shared_data):
    prompts = read_prompts(shared_data / "sdv1_500_memorized.jsonl")
    assert len(prompts) == 500 and prompts[0] == "The No Limits Business Woman Podcast"
    subset = read_prompts(shared_data / "memorized_prompt_subsets" / "memorize_0.txt")
    assert len(subset) == 10 and set(subset) <= set(prompts)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.txt", "", "holds no prompts"),
        ("blank.txt", "\n  \n\t\n", "holds no prompts"),
        ("empty.jsonl", "\n", "holds no prompts"),
        ("header-only.csv", "caption\n", "holds no prompts"),
        ("dup.txt", "a cat\na dog\n a cat \n", "line 3 repeats the prompt of line 1"),
        ("dup.jsonl", '{"caption": "x"}\n{"caption": "x"}\n', "line 2 repeats the prompt of line 1"),
        ("bad.jsonl", '{"caption": "ok"}\nnot json\n', "line 2 is not JSON"),
        ("nocaption.jsonl", '{"text": "ok"}\n', 'line 1 has no string "caption" field'),
        ("emptycaption.jsonl", '{"caption": "  "}\n', "line 1 has an empty caption"),
        ("list.jsonl", '["a cat"]\n', 'no string "caption" field'),
        ("nocolumn.csv", "id,url\n1,http://x\n", "has no caption column"),
        ("emptycell.csv", "caption,id\na cat,1\n,2\n", "has an empty 'caption' value"),
        ("p.parquet", "x", "unknown type '.parquet'"),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v and len(v) < 20 else None,
)
def test_malformed_files_are_refused(tmp_path, name, text, message):
    with pytest.raises(MemlocError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_prompts(_write(tmp_path, name, text))


def test_missing_folder_and_non_utf8_are_refused(tmp_path):
    with pytest.raises(MemlocError, match="does not exist"):
        read_prompts(tmp_path / "none.txt")
    with pytest.raises(MemlocError, match="is not a file"):
        read_prompts(tmp_path)
    with pytest.raises(MemlocError, match="not UTF-8"):
        read_prompts(_write(tmp_path, "latin.txt", "caf\xe9 au lait\n", encoding="latin-1"))


def test_duplicates_allowed_when_asked(tmp_path):
    assert read_prompts(_write(tmp_path, "d.txt", "a\na\n"), allow_duplicates=True) == ["a", "a"]


def test_sampled_subsets_are_distinct():
    import math

    from memloc.localize import resolve_subsets

    prompts = [f"p{i}" for i in range(8)]
    subsets = resolve_subsets(prompts, n_subsets=20, subset_size=4, seed=0)
    assert len(subsets) == 20 and len({tuple(s) for s in subsets}) == 20
    assert all(len(s) == 4 and s == sorted(s) for s in subsets)
    every = resolve_subsets(prompts, n_subsets=math.comb(8, 2), subset_size=2, seed=1)
    assert len({tuple(s) for s in every}) == 28  # all pairs
    assert resolve_subsets(prompts, n_subsets=20, subset_size=4, seed=0) == subsets  # the seed decides
    with pytest.raises(MemlocError, match="only 28 distinct subsets of 2 of the 8 prompts"):
        resolve_subsets(prompts, n_subsets=29, subset_size=2, seed=0)
