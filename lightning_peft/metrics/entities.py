"""Entity spans from tag sequences, with conlleval's (and seqeval's default mode's) chunking rules.

Tags are ``O`` or ``<prefix>-<TYPE>`` with prefix ``B``, ``I``, ``E`` or ``S``, so IOB1, IOB2 and BIOES
sequences all decode; ill-formed sequences (``I-`` after ``O``, a type change inside a chunk) are decoded the
lenient conlleval way: such an ``I-`` starts a new entity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

OUTSIDE = "O"


class Entity(NamedTuple):
    """A typed span of words, ``start`` and ``end`` inclusive."""

    type: str
    start: int
    end: int


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` → ``("B", "PER")``; ``"O"`` → ``("O", "")``."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix, _, entity_type = tag.partition("-")
    return prefix, entity_type


def _chunk_ends(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", OUTSIDE):
        return True
    return prev_prefix != OUTSIDE and prev_type != entity_type


def _chunk_starts(prev_prefix: str, prefix: str, prev_type: str, entity_type: str) -> bool:
    if prefix in ("B", "S"):
        return True
    if prev_prefix in ("E", "S", OUTSIDE) and prefix in ("E", "I"):
        return True
    return prefix != OUTSIDE and prev_type != entity_type


def extract_entities(tags: Sequence[str]) -> list[Entity]:
    """Entities of one sentence's tag sequence.

    Example::

        extract_entities(["B-PER", "I-PER", "O", "B-LOC"])  # [Entity('PER', 0, 1), Entity('LOC', 3, 3)]
    """
    entities: list[Entity] = []
    prev_prefix, prev_type, begin = OUTSIDE, "", 0
    for i, tag in enumerate([*tags, OUTSIDE]):
        prefix, entity_type = split_tag(tag)
        if _chunk_ends(prev_prefix, prefix, prev_type, entity_type):
            entities.append(Entity(prev_type, begin, i - 1))
        if _chunk_starts(prev_prefix, prefix, prev_type, entity_type):
            begin = i
        prev_prefix, prev_type = prefix, entity_type
    return entities


def is_prefixed(tag: str) -> bool:
    """Whether ``tag`` is ``O`` or ``<B|I|E|S>-<TYPE>``: a tag the entity decoder understands."""
    prefix, entity_type = split_tag(tag)
    return tag == OUTSIDE or (prefix in ("B", "I", "E", "S") and bool(entity_type))


def io_to_iob2(tags: Sequence[str]) -> list[str]:
    """IO tagging (bare types: ``PER PER O LOC``) → IOB2: consecutive words of one type form one entity.

    Example::

        io_to_iob2(["PER", "PER", "O", "LOC"])  # ['B-PER', 'I-PER', 'O', 'B-LOC']
    """
    converted, previous = [], OUTSIDE
    for tag in tags:
        converted.append(tag if tag == OUTSIDE else f"{'I' if tag == previous else 'B'}-{tag}")
        previous = tag
    return converted


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """IOB1 (``I-`` opens an entity unless it continues one of its type) → IOB2 (entities open with ``B-``)."""
    converted = []
    previous = OUTSIDE
    for tag in tags:
        prefix, entity_type = split_tag(tag)
        if prefix == "I" and split_tag(previous)[1] != entity_type:
            tag = f"B-{entity_type}"
        converted.append(tag)
        previous = tag
    return converted


def sentence_record(words: Sequence[str], tags: Sequence[str]) -> dict[str, Any]:
    """A tagged sentence as ``predict`` writes it and the server answers: its ``words``, ``tags`` and ``entities``
    (type, first and last word index, text)."""
    entities = [{"type": e.type, "start": e.start, "end": e.end, "text": " ".join(words[e.start : e.end + 1])}
                for e in extract_entities(tags)]
    return {"words": list(words), "tags": list(tags), "entities": entities}
