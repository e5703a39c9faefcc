"""Global-local decoupling of text (DGL-RSIS's GLD module, text side).

An expression ("the white storage tank to the left of the largest building") is split into
*local class nouns* (``target`` = storage tank, anchors = building) and *global modifiers*:
attributes (white), counts/plurality, absolute positions (on the left, in the upper right
corner), superlatives (largest, leftmost) and spatial relations to other nouns (left of the
building). Local alignment classifies mask proposals against the nouns; global alignment
turns the modifiers into spatial priors (:mod:`.globalalign`).

Rule-based, pure Python, no downloaded model: nouns come from a remote-sensing lexicon (the
knowledge table's names plus common RS object words plus any names the caller adds, e.g.
the run's class names), matched longest-first in singular or plural; modifiers from closed
word lists. The first noun not governed by a relation phrase is the target. When no lexicon
noun is present, the target falls back to the longest run of content words left after
removing function, modifier and scene words ("the red solar panel on the left" → solar
panel), or, where a spaCy model is installed and passed in, to the root of spaCy's first
noun chunk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from drseg_cli.model.dglrsis.knowledge import DEFAULT_TABLE, singular

#: RS object words that are not knowledge-table names (nouns the lexicon still recognises).
EXTRA_NOUNS: tuple[str, ...] = (
    "container",
    "crane",
    "tower",
    "court",
    "island",
    "beach",
    "coast",
    "mountain",
    "hill",
    "runway",
    "apron",
    "terminal",
    "greenhouse",
    "factory",
    "warehouse",
    "playground",
    "school",
    "church",
    "solar panel",
    "parking space",
    "intersection",
    "crossroad",
    "path",
    "track",
    "plaza",
    "garden",
    "park",
    "bus",
    "truck",
    "boat",
)

#: Relation phrases → relation kind; a phrase is a relation only when a noun follows it.
RELATIONS: dict[str, str] = {
    "to the left of": "left_of",
    "on the left of": "left_of",
    "on the left side of": "left_of",
    "at the left of": "left_of",
    "left of": "left_of",
    "to the west of": "left_of",
    "west of": "left_of",
    "to the right of": "right_of",
    "on the right of": "right_of",
    "on the right side of": "right_of",
    "at the right of": "right_of",
    "right of": "right_of",
    "to the east of": "right_of",
    "east of": "right_of",
    "above": "above",
    "over": "on",
    "on top of": "above",
    "north of": "above",
    "to the north of": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "underneath": "below",
    "south of": "below",
    "to the south of": "below",
    "next to": "near",
    "beside": "near",
    "besides": "near",
    "adjacent to": "near",
    "alongside": "near",
    "along": "near",
    "close to": "near",
    "near to": "near",
    "near": "near",
    "nearby": "near",
    "around": "near",
    "across": "on",
    "by": "near",
    "closest to": "near",
    "nearest to": "near",
    "far from": "far_from",
    "away from": "far_from",
    "farthest from": "far_from",
    "furthest from": "far_from",
    "between": "between",
    "on": "on",
    "in": "on",
    "inside": "on",
    "within": "on",
    "at": "on",
    "surrounded by": "on",
}

#: Words of absolute position → the image region they name.
POSITIONS: dict[str, str] = {
    "left": "left",
    "west": "left",
    "western": "left",
    "right": "right",
    "east": "right",
    "eastern": "right",
    "top": "top",
    "upper": "top",
    "north": "top",
    "northern": "top",
    "above": "top",
    "bottom": "bottom",
    "lower": "bottom",
    "south": "bottom",
    "southern": "bottom",
    "below": "bottom",
    "middle": "center",
    "center": "center",
    "centre": "center",
    "central": "center",
}

#: Superlatives → normalised form (object-level priors in :mod:`.globalalign`).
SUPERLATIVES: dict[str, str] = {
    "largest": "largest",
    "biggest": "largest",
    "smallest": "smallest",
    "tiniest": "smallest",
    "longest": "largest",
    "shortest": "smallest",
    "widest": "largest",
    "leftmost": "leftmost",
    "westernmost": "leftmost",
    "rightmost": "rightmost",
    "easternmost": "rightmost",
    "topmost": "topmost",
    "uppermost": "topmost",
    "northernmost": "topmost",
    "bottommost": "bottommost",
    "lowermost": "bottommost",
    "lowest": "bottommost",
    "southernmost": "bottommost",
}

COLOURS = frozenset(
    [
        "white",
        "gray",
        "grey",
        "black",
        "red",
        "blue",
        "green",
        "yellow",
        "orange",
        "brown",
        "dark",
        "light",
        "bright",
        "silver",
        "purple",
        "pink",
        "beige",
        "tan",
        "cyan",
        "turquoise",
        "golden",
    ]
)
SHAPES = frozenset(
    [
        "round",
        "circular",
        "square",
        "rectangular",
        "oval",
        "long",
        "narrow",
        "wide",
        "curved",
        "straight",
        "elongated",
        "triangular",
        "irregular",
    ]
)
SIZES = frozenset(
    [
        "large",
        "big",
        "small",
        "little",
        "tiny",
        "huge",
        "giant",
        "medium",
        "tall",
        "short",
        "massive",
    ]
)
STATES = frozenset(["parked", "docked", "moored", "empty", "crowded", "busy", "isolated", "single"])
ATTRIBUTES = COLOURS | SHAPES | SIZES | STATES

NUMBERS: dict[str, int] = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "both": 2,
    "pair": 2,
    "couple": 2,
}
#: Quantifiers that make the target plural without a number.
PLURAL_WORDS = frozenset(
    [
        "all",
        "several",
        "many",
        "multiple",
        "some",
        "these",
        "those",
        "group",
        "groups",
        "row",
        "rows",
    ]
)
#: Words ignored when looking for a fallback noun (function and scene words).
STOP = frozenset(
    [
        "the",
        "a",
        "an",
        "this",
        "that",
        "of",
        "is",
        "are",
        "was",
        "were",
        "which",
        "who",
        "located",
        "situated",
        "lies",
        "lying",
        "sits",
        "sitting",
        "there",
        "it",
        "its",
        "and",
        "or",
        "with",
        "to",
        "side",
        "corner",
        "part",
        "area",
        "region",
        "edge",
        "image",
        "picture",
        "photo",
        "scene",
        "figure",
        "map",
        "view",
        "be",
        "being",
        "one",
    ]
)


@dataclass(frozen=True)
class Relation:
    """A spatial relation of the target to anchor noun(s): ``left_of``, ``near``, ``on``..."""

    kind: str
    anchors: tuple[str, ...]


@dataclass(frozen=True)
class ParsedText:
    """An expression split into local class nouns and global modifiers."""

    text: str
    target: str | None
    attributes: tuple[str, ...] = ()
    count: int | None = None
    plural: bool = False
    positions: tuple[str, ...] = ()
    superlatives: tuple[str, ...] = ()
    relations: tuple[Relation, ...] = ()
    nouns: tuple[str, ...] = field(default=())  # every class noun, target first

    @property
    def anchors(self) -> tuple[str, ...]:
        """The nouns the relations refer to, in order, without repeats."""
        out: list[str] = []
        for rel in self.relations:
            out.extend(a for a in rel.anchors if a not in out)
        return tuple(out)

    @property
    def has_global(self) -> bool:
        """True if any modifier constrains *where* or *which* (not only what)."""
        return bool(self.positions or self.superlatives or self.relations or self.count)


_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case words; hyphens and punctuation split words (top-left → top left)."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=64)
def _lexicon(extra: tuple[str, ...]) -> dict[tuple[str, ...], str]:
    """Noun phrases (as singular word tuples) → the phrase to report."""
    out: dict[tuple[str, ...], str] = {}
    for name in (*DEFAULT_TABLE.names(), *EXTRA_NOUNS, *extra):
        words = tokenize(name)
        if not words:
            continue
        key = (*words[:-1], singular(words[-1]))
        out.setdefault(key, " ".join(key))
    return out


def _phrases(table: dict[str, str]) -> list[tuple[tuple[str, ...], str]]:
    return sorted(((tuple(k.split()), v) for k, v in table.items()), key=lambda p: -len(p[0]))


_RELATION_PHRASES = _phrases(RELATIONS)


def _match_phrase(words: Sequence[str], i: int, phrases) -> tuple[int, str] | None:
    for key, value in phrases:
        if tuple(words[i : i + len(key)]) == key:
            return len(key), value
    return None


@dataclass
class _Noun:
    start: int
    end: int
    name: str
    plural: bool


def _find_nouns(words: list[str], lexicon: dict[tuple[str, ...], str]) -> list[_Noun]:
    longest = max((len(k) for k in lexicon), default=1)
    nouns: list[_Noun] = []
    i = 0
    while i < len(words):
        hit = None
        for n in range(min(longest, len(words) - i), 0, -1):
            span = words[i : i + n]
            key = (*span[:-1], singular(span[-1]))
            if key in lexicon:
                hit = _Noun(i, i + n, lexicon[key], singular(span[-1]) != span[-1])
                break
        if hit is not None:
            nouns.append(hit)
            i = hit.end
        else:
            i += 1
    return nouns


def _skip_modifiers(words: list[str], i: int) -> int:
    """Index past determiners, counts and attributes (what may stand before a noun)."""
    skippable = {"the", "a", "an", "this", "that", "these", "those", *NUMBERS, *PLURAL_WORDS}
    skippable |= ATTRIBUTES | set(SUPERLATIVES) | {"of", "other", "another"}
    while i < len(words) and (words[i] in skippable or words[i].isdigit()):
        i += 1
    return i


def parse_expression(text: str, extra_nouns: Iterable[str] = (), nlp: Any = None) -> ParsedText:
    """Split ``text`` into class nouns and global modifiers (see the module docstring).

    ``extra_nouns``: names to recognise besides the lexicon (e.g. the run's class names);
    ``nlp``: a loaded spaCy pipeline, used only when no lexicon noun is found.
    """
    words = tokenize(text)
    lexicon = _lexicon(tuple(sorted({n.strip().lower() for n in extra_nouns if n.strip()})))
    nouns = _find_nouns(words, lexicon)
    noun_at = {n.start: n for n in nouns}
    in_noun = {i for n in nouns for i in range(n.start, n.end)}

    relations: list[Relation] = []
    anchor_starts: set[int] = set()
    used: set[int] = set()
    i = 0
    while i < len(words):
        if i in in_noun:
            i += 1
            continue
        hit = _match_phrase(words, i, _RELATION_PHRASES)
        if hit is None:
            i += 1
            continue
        length, kind = hit
        j = _skip_modifiers(words, i + length)
        # up to two unknown modifiers may stand before the anchor ("the floating crane")
        anchor = next((noun_at[k] for k in range(j, j + 3) if k in noun_at), None)
        if anchor is None:
            i += 1  # not followed by a noun: maybe an absolute position ("on the left")
            continue
        anchors = [anchor]
        if kind == "between":  # between the X and the Y
            k = _skip_modifiers(words, anchor.end)
            if k < len(words) and words[k] == "and":
                second = noun_at.get(_skip_modifiers(words, k + 1))
                if second is not None:
                    anchors.append(second)
        relations.append(Relation(kind, tuple(a.name for a in anchors)))
        anchor_starts.update(a.start for a in anchors)
        used.update(range(i, i + length))
        i = anchors[-1].end

    target_noun = next((n for n in nouns if n.start not in anchor_starts), None)
    target = target_noun.name if target_noun else None
    if target is None:
        target = _spacy_target(text, nlp) if nlp is not None else None
    fallback_plural = False
    if target is None:
        target, fallback_plural = _fallback_target(words, in_noun | used)

    attributes, positions, superlatives = [], [], []
    count: int | None = None
    quantified = False
    for k, w in enumerate(words):
        if k in in_noun or k in used:
            continue
        if w in SUPERLATIVES:
            superlatives.append(SUPERLATIVES[w])
        elif w in POSITIONS:
            positions.append(POSITIONS[w])
        elif w in ATTRIBUTES:
            attributes.append(w)
        elif w in NUMBERS and count is None:
            count = NUMBERS[w]
        elif w.isdigit() and count is None:
            count = int(w)
        elif w in PLURAL_WORDS:
            quantified = True
    plural = bool(
        (target_noun is not None and target_noun.plural)
        or fallback_plural
        or quantified
        or (count or 0) > 1
    )
    ordered = [target] if target else []
    ordered += [n.name for n in nouns if n.name not in ordered]
    return ParsedText(
        text=text,
        target=target,
        attributes=tuple(dict.fromkeys(attributes)),
        count=count,
        plural=plural,
        positions=tuple(dict.fromkeys(positions)),
        superlatives=tuple(dict.fromkeys(superlatives)),
        relations=tuple(relations),
        nouns=tuple(ordered),
    )


def _fallback_target(words: list[str], taken: set[int]) -> tuple[str | None, bool]:
    """The longest run of content words (ties: the first), last word singular; and whether
    that word was plural."""
    skip = STOP | ATTRIBUTES | set(POSITIONS) | set(SUPERLATIVES) | set(NUMBERS) | PLURAL_WORDS
    skip |= {w for phrase in RELATIONS for w in phrase.split()}
    runs: list[list[str]] = [[]]
    for k, w in enumerate(words):
        if k in taken or w in skip or w.isdigit():
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(w)
    best = max(runs, key=len)
    if not best:
        return None, False
    last = singular(best[-1])
    return " ".join([*best[:-1], last]), last != best[-1]


def _spacy_target(text: str, nlp: Any) -> str | None:
    """The root lemma phrase of spaCy's first noun chunk, if any."""
    doc = nlp(text)
    for chunk in doc.noun_chunks:
        words = [t.text.lower() for t in chunk if t.pos_ in ("NOUN", "PROPN")]
        if words:
            return " ".join([*words[:-1], singular(words[-1])])
    return None


def load_spacy(model: str) -> Any:
    """A spaCy pipeline ``model`` if spaCy and that model are installed, else None."""
    if not model:
        return None
    try:
        import spacy

        return spacy.load(model)
    except Exception:  # noqa: BLE001 - spaCy or its model absent: the rule-based path runs
        return None
