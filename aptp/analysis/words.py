"""Which prompts go to which expert: word tables (the paper's Tables 2 and 4) and tier mixes.

A word counts **once per prompt** by default (``count="prompt"``): the table says in how many of
an expert's prompts a word appears, so one caption that repeats a word ("a red square and a red
circle") does not outweigh two captions that use it once. ``count="occurrence"`` counts every
occurrence instead. Words are lowercased, split on anything that is not a letter or digit
(apostrophes inside a word are kept, a trailing possessive ``'s`` is dropped), and tokens that
are stop words, shorter than two characters or only digits are left out. Ties in count are
broken alphabetically, so the table is a pure function of its inputs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import pandas as pd

# A small English stop-word list of our own: articles, pronouns, prepositions, conjunctions,
# auxiliaries and the filler words of captions ("image", "photo" are content: kept).
STOP_WORDS: frozenset[str] = frozenset("""
a about above after again against all also am an and any are around as at be been before being
below beneath beside between both but by can could did do does doing down during each either
few for from further had has have having he her here hers herself him himself his how i if in
into is it its itself just me more most my myself near neither next no nor not of off on once
only onto or other our ours ourselves out over own same she should so some such than that
the their theirs them themselves then there these they this those through to too toward towards
under until up upon very was we were what when where which while who whom whose why will with
within without would you your yours yourself yourselves
""".split())

CountMode = Literal["prompt", "occurrence"]

_TOKEN = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of ``text``; punctuation dropped, possessive ``'s`` removed.

    >>> tokenize("A dog's ball, on the GRASS!")
    ['a', 'dog', 'ball', 'on', 'the', 'grass']
    """
    words = []
    for tok in _TOKEN.findall(text.lower()):
        tok = tok.replace("’", "'")
        if tok.endswith("'s"):
            tok = tok[:-2]
        words.append(tok)
    return words


def content_words(text: str, stop_words: Iterable[str] = STOP_WORDS) -> list[str]:
    """The tokens of ``text`` that the word table counts (no stop words, digits or 1-letter tokens)."""
    stop = stop_words if isinstance(stop_words, (set, frozenset)) else set(stop_words)
    return [w for w in tokenize(text) if len(w) > 1 and not w.isdigit() and w not in stop]


def _check_lengths(prompts: Sequence, experts: Sequence[int], what: str = "prompts") -> None:
    if len(prompts) != len(experts):
        raise ValueError(f"{len(prompts)} {what} but {len(experts)} expert indices; expected one per prompt")


def _expert_ids(experts: Sequence[int], num_experts: int | None) -> list[int]:
    ids = sorted({int(e) for e in experts})
    if num_experts is not None:
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            raise ValueError(f"expert indices {bad} outside 0..{num_experts - 1}")
        ids = list(range(num_experts))
    return ids


def word_table(prompts: Sequence[str], experts: Sequence[int], top_k: int = 5,
               stop_words: Iterable[str] = STOP_WORDS, extra_stop_words: Iterable[str] = (),
               count: CountMode = "prompt", num_experts: int | None = None) -> pd.DataFrame:
    """The most frequent words in the prompts routed to each expert.

    Args:
        prompts: the prompts.
        experts: the expert each prompt was routed to, one per prompt.
        top_k: words listed per expert (fewer when an expert's prompts have fewer distinct words).
        stop_words: the stop-word list (default :data:`STOP_WORDS`).
        extra_stop_words: words to drop in addition (compared lowercased), e.g. a data set's
            boilerplate such as ``background``.
        count: ``"prompt"`` counts a word once per prompt that contains it; ``"occurrence"``
            counts every occurrence.
        num_experts: list experts ``0..num_experts-1`` even if no prompt reached them;
            default: only the experts that occur.

    Returns:
        One row per expert, indexed by expert: ``prompts`` (int), ``share`` (fraction of all
        prompts), ``words`` (list of str, most frequent first, ties alphabetical) and ``counts``
        (list of int, aligned with ``words``).

    Raises:
        ValueError: lengths differ, ``top_k`` < 1, an unknown ``count`` or an expert outside
            ``num_experts``.
    """
    _check_lengths(prompts, experts)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if count not in ("prompt", "occurrence"):
        raise ValueError(f"count must be 'prompt' or 'occurrence', got {count!r}")
    stop = set(stop_words) | {w.lower() for w in extra_stop_words}
    counters: dict[int, Counter] = {}
    sizes: Counter = Counter()
    for text, e in zip(prompts, experts):
        e = int(e)
        words = content_words(text, stop)
        counters.setdefault(e, Counter()).update(set(words) if count == "prompt" else words)
        sizes[e] += 1
    total = len(prompts)
    rows = []
    for e in _expert_ids(experts, num_experts):
        top = sorted(counters.get(e, Counter()).items(), key=lambda wc: (-wc[1], wc[0]))[:top_k]
        rows.append({"expert": e, "prompts": sizes[e], "share": sizes[e] / total if total else 0.0,
                     "words": [w for w, _ in top], "counts": [c for _, c in top]})
    df = pd.DataFrame(rows, columns=["expert", "prompts", "share", "words", "counts"])
    return df.set_index("expert")


def tier_mix(tiers: Sequence[str], experts: Sequence[int], order: Sequence[str] | None = None,
             num_experts: int | None = None) -> pd.DataFrame:
    """Fraction of each difficulty tier among the prompts routed to each expert (shapes world).

    Args:
        tiers: the tier of each prompt.
        experts: the expert of each prompt.
        order: column order; default :data:`aptp.data.shapes.TIERS`, then any other tier
            alphabetically.
        num_experts: as in :func:`word_table`.

    Returns:
        One row per expert, indexed by expert, one column per tier; each row sums to 1 (an expert
        without prompts has a row of zeros).
    """
    from aptp.data.shapes import TIERS

    _check_lengths(tiers, experts, "tiers")
    base = list(order) if order is not None else list(TIERS)
    cols = base + sorted(set(tiers) - set(base))
    ids = _expert_ids(experts, num_experts)
    pairs = Counter((int(e), t) for t, e in zip(tiers, experts))
    counts = pd.DataFrame([[float(pairs[(e, t)]) for t in cols] for e in ids],
                          index=pd.Index(ids, name="expert"), columns=cols)
    totals = counts.sum(axis=1)
    return counts.div(totals.where(totals > 0, 1.0), axis=0)
