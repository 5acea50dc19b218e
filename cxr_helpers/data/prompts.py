"""Report text -> prompt: the seed's rule (the impression with whitespace collapsed), the
optional cleaning of de-identification marks, and the CLIP token count that decides whether a
prompt fits SD1.5's 77 positions."""

from __future__ import annotations

import re


def collapse_whitespace(text: str) -> str:
    return " ".join(str(text).split())


_XXXX = re.compile(r"\b[xX]*XXXX[xX]*\b(?:[-,]\s*)?")
_LIST_NUMBER = re.compile(r"(?:(?<=\s)|^)\d{1,2}[.)]\s+(?=\S)")


def clean_prompt(text: str) -> str:
    """Optional cleaning: drop XXXX de-identification marks, list numbering and the stray
    punctuation they leave. "x-XXXX" becomes "x-ray": the de-identifier masked the word "ray"."""
    text = collapse_whitespace(text)
    text = re.sub(r"\b([xX])-XXXX\b", r"\1-ray", text)
    text = _XXXX.sub("", text)
    text = _LIST_NUMBER.sub("", text)
    text = re.sub(r"\s+([.,;:])", r"\1", text)  # space before punctuation
    text = re.sub(r"([.,;:])(?:\s*[.,;:])+", r"\1", text)  # runs of punctuation
    text = re.sub(r"-(?=[\s.,;:]|$)", "", text)  # a hyphen left dangling by a removed XXXX
    text = re.sub(r"^[\s.,;:]+", "", text)
    return collapse_whitespace(text)


def count_tokens(prompts, tokenizer) -> dict[str, int]:
    """Number of CLIP ids per distinct prompt, start and end tokens included, not truncated."""
    distinct = sorted({p for p in prompts if p})
    if not distinct:
        return {}
    ids = tokenizer(distinct, truncation=False, add_special_tokens=True)["input_ids"]
    return {p: len(i) for p, i in zip(distinct, ids, strict=True)}
