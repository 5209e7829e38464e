"""B/I/O tags of titles, checked word piece by word piece against hand-written sequences.

The word pieces of each title (MiniLM uncased vocabulary) are written in a comment above the
expected tags; ``test_pieces_are_as_written`` checks that those comments are right.
"""

from __future__ import annotations

import numpy as np
import pytest

from mtrec_dist.data.batch import NER_IGNORE
from mtrec_dist.data.tables import Entity
from mtrec_dist.data.tokenize import entity_spans, title_entity_order, tokenize_titles
from mtrec_dist.hub import load_tokenizer

X = NER_IGNORE
O, B, I = 0, 1, 2  # noqa: E741


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("minilm")


def ent(forms: list[str], offsets: list[int] | None = None, wid: str = "Q1") -> Entity:
    return Entity(forms[0] if forms else "", "P", wid, 1.0, offsets or [], forms)


# (title, entities, word pieces, expected tags over [CLS] pieces [SEP] pad..., title_len 12)
CASES = [
    (  # single-word entity, split into two pieces
        "Nadal wins in Paris",
        [ent(["Nadal"], [0])],
        ["nad", "##al", "wins", "in", "paris"],
        [X, B, I, O, O, O, X, X, X, X, X, X],
    ),
    (  # multi-word entity plus a one-word entity
        "Donald Trump plays golf with Nadal",
        [ent(["Donald Trump"]), ent(["Nadal"])],
        ["donald", "trump", "plays", "golf", "with", "nad", "##al"],
        [X, B, I, O, O, O, B, I, X, X, X, X],
    ),
    (  # entity in four word pieces
        "Zelenskyy meets Macron",
        [ent(["Zelenskyy"])],
        ["ze", "##len", "##sky", "##y", "meets", "macro", "##n"],
        [X, B, I, I, I, O, O, O, X, X, X, X],
    ),
    (  # occurring twice: both occurrences tagged, each starting with B
        "Trump says Trump wins again",
        [ent(["Trump"])],
        ["trump", "says", "trump", "wins", "again"],
        [X, B, O, B, O, O, X, X, X, X, X, X],
    ),
    (  # surface form absent from the title (counted as not found); case-sensitive match
        "Apple unveils new iPhone",
        [ent(["Samsung"]), ent(["apple"])],
        ["apple", "un", "##ve", "##ils", "new", "iphone"],
        [X, O, O, O, O, O, O, X, X, X, X, X],
    ),
    (  # "US" inside "USA" is not a mention; the standalone "US" is
        "Biden visits the USA and US troops",
        [ent(["US"])],
        ["bid", "##en", "visits", "the", "usa", "and", "us", "troops"],
        [X, O, O, O, O, O, O, B, O, X, X, X],
    ),
    (  # unicode: accents stripped by the tokenizer, offsets still point into the raw title
        "Ökonomie: Müller trifft Łukasz in São Paulo",
        [ent(["Müller"]), ent(["Łukasz"]), ent(["São Paulo"])],
        ["ok", "##ono", "##mie", ":", "muller", "tri", "##ff", "##t", "ł", "##uka", "##sz"],
        # truncated at 12: [CLS] + 10 pieces + [SEP]; "##sz" and "São Paulo" are cut off
        [X, O, O, O, O, B, O, O, O, B, I, X],
    ),
    (  # overlapping spans: the longer one wins; the later "New York" stays an entity
        "New York Times praises New York pizza",
        [ent(["New York"]), ent(["New York Times"])],
        ["new", "york", "times", "praises", "new", "york", "pizza"],
        [X, B, I, I, O, B, I, O, X, X, X, X],
    ),
    (  # longer than title_len: truncation keeps [SEP] last; no entities -> all O
        "The quick brown fox jumps over the lazy dog near Berlin today",
        [],
        ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "near"],
        [X, O, O, O, O, O, O, O, O, O, O, X],
    ),
]


def test_pieces_are_as_written(tok):
    for title, _, pieces, _ in CASES:
        got = tok.tokenize(title)
        assert got[: len(pieces)] == pieces, title


def test_tags_token_by_token(tok):
    titles = [c[0] for c in CASES]
    ents = [c[1] for c in CASES]
    tokens, ner, stats = tokenize_titles(titles, ents, tok, title_len=12, batch_size=3)
    assert tokens.dtype == np.int32 and tokens.shape == (len(CASES), 12)
    assert ner.dtype == np.uint8 and ner.shape == (len(CASES), 12)
    for i, (title, _, _, tags) in enumerate(CASES):
        assert ner[i].tolist() == tags, title
        # Tokens are the tokenizer's own ids, truncated to 12 incl. [CLS]/[SEP], padded with 0.
        ids = tok(title, truncation=True, max_length=12)["input_ids"]
        assert tokens[i].tolist() == ids + [0] * (12 - len(ids)), title
    # Surface forms looked for: 1+2+1+1+2+1+3+2 = 13; not found: Samsung, apple, São Paulo (cut
    # by truncation but present in the text, so found). Titles with entities: 8 of 9.
    assert stats == {
        "titles_with_entities": 8,
        "entity_mentions": 13,
        "mentions_matched": 11,
        "mentions_not_found": 2,
    }


def test_truncation_row(tok):
    tokens, _, _ = tokenize_titles([CASES[-1][0]], [[]], tok, title_len=12)
    expected = [tok.cls_token_id] + tok.convert_tokens_to_ids(CASES[-1][2]) + [tok.sep_token_id]
    assert tokens[0].tolist() == expected


def test_occurrence_offsets_and_spans():
    title = "Trump says Trump wins"
    # Offsets that point at the form add nothing new; one that does not is ignored.
    spans, mentions, matched = entity_spans(title, [ent(["Trump"], [0, 11, 3])])
    assert spans == [(0, 5, 0), (11, 16, 0)] and (mentions, matched) == (1, 1)
    # An offset pointing at the form inside a longer word still counts (the source says so).
    spans, _, matched = entity_spans("USA today", [ent(["US"], [0])])
    assert spans == [(0, 2, 0)] and matched == 1
    spans, _, matched = entity_spans("USA today", [ent(["US"])])
    assert spans == [] and matched == 0


def test_title_entity_order():
    title = "Donald Trump plays golf with Nadal"
    ents = [ent(["Nadal"]), ent(["golfing"]), ent(["Donald Trump"])]
    assert title_entity_order(title, ents) == [2, 0, 1]


def test_empty_title_and_pad_check(tok):
    tokens, ner, stats = tokenize_titles([""], [[]], tok, title_len=5)
    assert tokens[0].tolist() == [tok.cls_token_id, tok.sep_token_id, 0, 0, 0]
    assert ner[0].tolist() == [X] * 5
    assert stats["titles_with_entities"] == 0

    class BadPad:
        pad_token_id = 1
        is_fast = True

    with pytest.raises(ValueError, match="pad_token_id=1"):
        tokenize_titles(["a"], [[]], BadPad(), title_len=5)
