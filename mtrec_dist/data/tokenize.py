"""Titles -> word pieces and B/I/O entity tags for the NER auxiliary task (MTRec §2.3).

MTRec §2.3: "we locate the given entities in the news title according to exact match and use
B to indicate the beginning word of an entity, I to indicate the internal words. The other
non-entity words in the title are denoted as O." Here the "words" are the encoder's word
pieces, because the NER head predicts one tag per word piece:

1. For every title entity, every SurfaceForm is searched in the title text, case-sensitively;
   every occurrence that starts and ends on a word boundary is a character span (a surface form
   found only inside a longer word, such as "US" in "USA", is not a mention of the entity).
   An ``OccurrenceOffsets`` entry whose text is exactly the surface form is a span too.
2. Overlapping spans: the longer one wins (then the earlier one), so "New York Times" beats
   "New York" and every character belongs to at most one span.
3. The tokenizer's ``offset_mapping`` (from one batched call) maps word pieces to characters:
   the first word piece overlapping a span gets B, later word pieces of the same span get I,
   every other piece O. [CLS], [SEP] and padding get ``NER_IGNORE`` (no loss there).

A SurfaceForm found nowhere in its title is counted in ``mentions_not_found`` (MIND's entity
linker sometimes reports forms that differ from the title text); nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtrec_dist.data.batch import NER_IGNORE
from mtrec_dist.data.tables import Entity

NER_O, NER_B, NER_I = 0, 1, 2


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _on_word_boundary(title: str, start: int, end: int) -> bool:
    """True when ``title[start:end]`` is not glued to a letter/digit on either side."""
    if start > 0 and _is_word_char(title[start - 1]) and _is_word_char(title[start]):
        return False
    if end < len(title) and _is_word_char(title[end]) and _is_word_char(title[end - 1]):
        return False
    return True


def entity_spans(
    title: str, entities: Sequence[Entity]
) -> tuple[list[tuple[int, int, int]], int, int]:
    """Locate the title entities in ``title``.

    Returns ``(spans, mentions, matched)``: non-overlapping ``(start, end, entity_index)``
    character spans sorted by start, the number of surface forms looked for, and how many of them
    were found at least once. An entity without surface forms is looked for by its label.
    """
    candidates: set[tuple[int, int, int]] = set()
    mentions = matched = 0
    for ei, ent in enumerate(entities):
        forms = [f for f in ent.surface_forms if f] or ([ent.label] if ent.label else [])
        for form in forms:
            mentions += 1
            found = False
            n = len(form)
            pos = title.find(form)
            while pos >= 0:
                if _on_word_boundary(title, pos, pos + n):
                    candidates.add((pos, pos + n, ei))
                    found = True
                pos = title.find(form, pos + 1)
            for off in ent.offsets:
                if 0 <= off and title[off : off + n] == form:
                    candidates.add((off, off + n, ei))
                    found = True
            matched += found
    # Longer span first, then earlier, then lower entity index: a deterministic greedy choice.
    taken: list[tuple[int, int, int]] = []
    for s, e, ei in sorted(candidates, key=lambda t: (-(t[1] - t[0]), t[0], t[2])):
        if all(e <= ts or s >= te for ts, te, _ in taken):
            taken.append((s, e, ei))
    taken.sort()
    return taken, mentions, matched


def title_entity_order(title: str, entities: Sequence[Entity]) -> list[int]:
    """Indices into ``entities`` in order of first appearance in the title (for entities.npy).

    Entities located in the title come first, by first character position; entities that were
    not located follow in their list order. Each index appears once.
    """
    spans, _, _ = entity_spans(title, entities)
    first: dict[int, int] = {}
    for s, _, ei in spans:
        first.setdefault(ei, s)
    located = sorted(first, key=lambda ei: (first[ei], ei))
    return located + [ei for ei in range(len(entities)) if ei not in first]


def _tag_row(
    spans: list[tuple[int, int, int]], offsets: np.ndarray, special: np.ndarray, out: np.ndarray
) -> None:
    """Fill one row of B/I/O tags from character spans and word-piece offsets ([L, 2])."""
    if not spans:
        return
    k = 0  # index of the first span that may still overlap a later word piece
    prev_span = -1
    for t in range(offsets.shape[0]):
        if special[t]:
            continue
        s, e = int(offsets[t, 0]), int(offsets[t, 1])
        if e <= s:
            continue
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        if spans[k][0] < e:  # this piece overlaps span k
            out[t] = NER_I if prev_span == k else NER_B
            prev_span = k


def tokenize_titles(
    titles: list[str],
    entities: list[list[Entity]],
    tokenizer,
    title_len: int,
    batch_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Word pieces and NER tags of every title.

    Returns ``tokens`` int32 [n, title_len] (``[CLS] ... [SEP]`` truncated to title_len, then 0),
    ``ner`` uint8 [n, title_len] (0=O, 1=B, 2=I, NER_IGNORE at special tokens and padding) and
    NER counts ``{"titles_with_entities", "entity_mentions", "mentions_matched",
    "mentions_not_found"}``. The tokenizer is called once per ``batch_size`` titles (the fast
    tokenizer parallelises a batch internally); tags are computed only for titles that have
    located entities, everything else is vectorised.
    """
    if len(titles) != len(entities):
        raise ValueError(f"{len(titles)} titles but {len(entities)} entity lists")
    if tokenizer.pad_token_id != 0:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has pad_token_id={tokenizer.pad_token_id}; "
            "the news table uses 0 as padding (attention mask = tokens != 0): expected 0"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {type(tokenizer).__name__}: a fast tokenizer is required")
    n = len(titles)
    tokens = np.zeros((n, title_len), dtype=np.int32)
    ner = np.full((n, title_len), NER_IGNORE, dtype=np.uint8)
    stats = {
        "titles_with_entities": 0,
        "entity_mentions": 0,
        "mentions_matched": 0,
        "mentions_not_found": 0,
    }
    for b0 in range(0, n, batch_size):
        batch = titles[b0 : b0 + batch_size]
        enc = tokenizer(
            batch,
            max_length=title_len,
            truncation=True,
            padding="max_length",
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="np",
        )
        ids = enc["input_ids"]  # [b, L]
        special = enc["special_tokens_mask"].astype(bool) | (enc["attention_mask"] == 0)
        offsets = enc["offset_mapping"]  # [b, L, 2]
        tokens[b0 : b0 + len(batch)] = ids
        tags = np.where(special, NER_IGNORE, NER_O).astype(np.uint8)  # [b, L]
        for j, title in enumerate(batch):
            ents = entities[b0 + j]
            if not ents:
                continue
            spans, mentions, matched = entity_spans(title, ents)
            stats["titles_with_entities"] += 1
            stats["entity_mentions"] += mentions
            stats["mentions_matched"] += matched
            _tag_row(spans, offsets[j], special[j], tags[j])
        ner[b0 : b0 + len(batch)] = tags
    stats["mentions_not_found"] = stats["entity_mentions"] - stats["mentions_matched"]
    return tokens, ner, stats
