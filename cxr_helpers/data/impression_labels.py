"""Labels from the impression text, the only words the model sees: per finding 1 (named as
present), 0 (named as absent: negated, or "heart size is normal"), -1 (uncertain: "possible",
"cannot exclude", "versus"), or no label (not mentioned). One labeller for every set: a real film
takes its impression's labels, a generated image its prompt's.

A small rule set in the manner of NegEx and the CheXpert labeller (Chapman et al. 2001; Irvin et
al. 2019): mentions are found per sentence, a negation or uncertainty cue before a mention covers
it up to a clause break, one after it ("has resolved", "cannot be excluded") covers the mentions
before it; uncertainty cues are read before negation ones ("not excluded" is uncertain, not
negated). Over a whole impression a positive mention wins over an uncertain one, which wins over
a negated one (CheXpert's aggregation). Text it cannot parse gets no labels, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd

PRESENT, ABSENT, UNCERTAIN = 1, 0, -1

# Finding (torchxrayvision's pathology names, as the MeSH mapping in labels.py) -> how the
# impression names it. Lower-case regular expressions.
MENTIONS = {
    "Cardiomegaly": r"cardiomegaly|\benlarged (?:heart|cardiac)|\b(?:heart|cardiac silhouette|cardiac)(?: size)? "
                    r"(?:is |appears |remains )?(?:(?!not\b)\w+ )?enlarged|\bcardiac enlargement|\benlargement of the "
                    r"(?:heart|cardiac silhouette)",
    "Effusion": r"(?<!pericardial )\beffusions?\b|\bpleural fluid\b|\bhydrothorax",
    "Atelectasis": r"\batelecta\w*",
    "Lung Opacity": r"\bopaci\w*|\bair ?space (?:disease|opacit\w*)|\bdensit(?:y|ies)\b",
    "Consolidation": r"\bconsolidat\w*",
    "Pneumonia": r"\bpneumonia|\bpneumonitis|\binfectious process|\binfection\b",
    "Pneumothorax": r"\bpneumothora(?:x|ces)",
    "Edema": r"\bedema\b|\b(?:vascular|venous) congestion",
    "Emphysema": r"\bemphysema\w*|\bcopd\b|\bchronic obstructive",
    "Nodule": r"\bnodul\w*|\bgranuloma\w*",
    "Mass": r"\bmass(?:es)?\b",
    "Fracture": r"\bfractur\w*",
    "Hernia": r"\bhernia\w*",
    "Fibrosis": r"\bfibros\w*|\bfibrotic",
    "Infiltration": r"\binfiltrat\w*",
}
FINDINGS = tuple(MENTIONS)

# The heart named as normal or as borderline, with no word for cardiomegaly itself.
_HEART = r"\b(?:heart|cardiac|cardiomediastinal)(?: size| silhouette| contours?)?(?: and mediastin\w* contours?)?"
HEART_BORDERLINE = re.compile(_HEART + r"(?: is| are| remains)? (?:at |at the )?(?:upper limits? of normal|top normal"
                              r"|top-normal|borderline|mildly prominent|prominent)|\bborderline (?:cardiomegaly|heart"
                              r" size|enlarged heart)")
HEART_NORMAL = re.compile(_HEART + r"(?: is| are| remains| appears)? (?:within normal limits|normal|unremarkable"
                          r"|not enlarged|stable and normal)|\bnormal (?:heart|cardiac)(?: size| silhouette)"
                          r"|\bheart (?:is )?normal in size|\bno (?:evidence of )?cardiac enlargement")

# Cues. Uncertainty first: its spans are taken before negation cues are looked for.
UNCERTAIN_BEFORE = (r"\b(?:possible|possibly|probable|probably|likely|may|might|could|questionable|question of"
                    r"|suspicious for|suspected|suspect|suggest\w*|concern(?:ing)? for|worrisome for|cannot "
                    r"(?:be )?(?:exclude\w*|ruled out|rule out)|can not (?:be )?exclude\w*|rule out|differential"
                    r"|versus|vs\b|equivocal|indeterminate|borderline|not (?:be )?excluded)")
UNCERTAIN_AFTER = (r"\b(?:cannot be (?:entirely |completely )?(?:excluded|ruled out)|can not be excluded|(?:is |are )?"
                   r"not (?:be )?(?:entirely )?(?:excluded|ruled out)|is (?:possible|suspected|questioned|not "
                   r"certain)|versus|vs\b)")
NEGATED_BEFORE = (r"\b(?:no|not|without|negative for|free of|absence of|resolution of|resolved|clear of|rather than"
                  r"|no longer|removal of)\b")
NEGATED_AFTER = (r"\b(?:(?:has |have |had )?(?:resolved|cleared)|(?:is |are |was |were )?no longer (?:seen|present|"
                 r"visible|identified)|(?:is |are |was |were )(?:not|no longer) (?:seen|identified|present|visualized"
                 r"|evident|appreciated|demonstrated|visible)|(?:is |are )?absent|removed)\b")
# Where a cue's reach ends: a clause break, or a new statement after a comma.
SCOPE_END = re.compile(r"[;:]|\b(?:but|however|although|though|except|whereas|which|apart from|aside from|other "
                       r"than|with(?!out)|there (?:is|are))\b|,\s*(?:mild|moderate|severe|marked|stable|unchanged"
                       r"|persistent|increased|new|again|the|heart|cardiac)\b")

_CUES = [(UNCERTAIN, "before", re.compile(UNCERTAIN_BEFORE)), (UNCERTAIN, "after", re.compile(UNCERTAIN_AFTER)),
         (ABSENT, "before", re.compile(NEGATED_BEFORE)), (ABSENT, "after", re.compile(NEGATED_AFTER))]
_MENTIONS = {finding: re.compile(pattern) for finding, pattern in MENTIONS.items()}
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+|\s(?=\d+[.)]\s)")
_LIST_NUMBER = re.compile(r"^\s*\d+[.)]\s*")


def sentences(text: str) -> list[str]:
    """The impression's sentences, lower case, list numbers removed ("1. Cardiomegaly. 2. ...")."""
    return [s for s in (_LIST_NUMBER.sub("", part).strip().lower() for part in _SENTENCE_BREAK.split(text)) if s]


def _cues(sentence: str) -> list[tuple[int, str, int, int]]:
    """(kind, direction, start, end) of every cue; a negation cue inside an uncertainty cue is
    not one ("cannot be excluded" holds "not")."""
    found = []
    for kind, direction, pattern in _CUES:
        for m in pattern.finditer(sentence):
            if any(m.start() < end and start < m.end() for other, _, start, end in found if other != kind):
                continue  # inside a cue of the kind read first (uncertainty)
            found.append((kind, direction, m.start(), m.end()))
    return found


def _clear_between(sentence: str, start: int, end: int) -> bool:
    return SCOPE_END.search(sentence, start, end) is None


def _mention_label(sentence: str, start: int, end: int, cues: list[tuple[int, str, int, int]]) -> int:
    """A mention's label from the cues that reach it: uncertainty over negation, else present."""
    reaching = [kind for kind, direction, c_start, c_end in cues
                if (direction == "before" and c_end <= start and _clear_between(sentence, c_end, start))
                or (direction == "after" and c_start >= end and _clear_between(sentence, end, c_start))]
    if UNCERTAIN in reaching:
        return UNCERTAIN
    return ABSENT if ABSENT in reaching else PRESENT


def _sentence_labels(sentence: str) -> dict[str, list[int]]:
    cues = _cues(sentence)
    labels: dict[str, list[int]] = {}
    for finding, pattern in _MENTIONS.items():
        for m in pattern.finditer(sentence):
            labels.setdefault(finding, []).append(_mention_label(sentence, m.start(), m.end(), cues))
    if "Cardiomegaly" not in labels:  # the heart described without the word for its enlargement
        if HEART_BORDERLINE.search(sentence):
            labels["Cardiomegaly"] = [UNCERTAIN]
        elif HEART_NORMAL.search(sentence):
            labels["Cardiomegaly"] = [ABSENT]
    return labels


def label_impression(text) -> dict[str, int]:
    """{finding: 1, 0 or -1} for the findings the impression mentions (empty for none, or for
    text that is not a string)."""
    if not isinstance(text, str):
        return {}
    mentions: dict[str, list[int]] = {}
    for sentence in sentences(text):
        for finding, found in _sentence_labels(sentence).items():
            mentions.setdefault(finding, []).extend(found)
    # CheXpert's aggregation: any positive mention, else any uncertain one, else negated.
    return {f: PRESENT if PRESENT in found else UNCERTAIN if UNCERTAIN in found else ABSENT
            for f, found in mentions.items()}


def label_column(finding: str) -> str:
    """pairs.csv's column for a finding: label_cardiomegaly, label_lung_opacity, ..."""
    return "label_" + finding.lower().replace(" ", "_")


LABEL_COLUMNS = tuple(label_column(f) for f in FINDINGS)


def impression_label_table(texts: Iterable[str]) -> pd.DataFrame:
    """One row per text, one nullable integer column per finding (label_column's names): 1, 0,
    -1, or <NA> where the text does not mention the finding."""
    rows = [label_impression(text) for text in texts]
    table = pd.DataFrame({label_column(f): [row.get(f) for row in rows] for f in FINDINGS})
    return table.astype("Int8")


def finding_truth(texts: Iterable[str]) -> pd.DataFrame:
    """For adherence: per text and finding, True (present), False (absent or not mentioned) or
    <NA> (uncertain: left out of that finding's comparison). Columns are the findings' names."""
    table = impression_label_table(texts)
    truth = pd.DataFrame({f: (table[label_column(f)].fillna(ABSENT) == PRESENT).astype("boolean") for f in FINDINGS})
    for f in FINDINGS:
        truth.loc[table[label_column(f)].eq(UNCERTAIN).fillna(False).to_numpy(), f] = pd.NA
    return truth
