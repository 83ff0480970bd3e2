"""What the experts became: word tables, tier mixes, block-level MACs and plots (paper §4.2, App. E.4)."""

from aptp.analysis.words import STOP_WORDS, tier_mix, tokenize, word_table

__all__ = ["STOP_WORDS", "tier_mix", "tokenize", "word_table"]
