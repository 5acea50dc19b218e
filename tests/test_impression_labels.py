"""The impression labeller: findings named as present, absent or uncertain, the way the CheXpert
and NegBio labellers read negation and uncertainty; text it cannot parse gets no labels."""

import random

import pandas as pd
import pytest

from cxr_helpers.data.impression_labels import (FINDINGS, LABEL_COLUMNS, finding_truth, impression_label_table,
                                                label_column, label_impression)

PHRASINGS = [
    # the phrasings
    ("No pleural effusion.", {"Effusion": 0}),
    ("No pneumothorax or effusion.", {"Pneumothorax": 0, "Effusion": 0}),
    ("Cardiomegaly without effusion.", {"Cardiomegaly": 1, "Effusion": 0}),
    ("Heart size is normal.", {"Cardiomegaly": 0}),
    ("Possible small left effusion.", {"Effusion": -1}),
    ("Effusion has resolved.", {"Effusion": 0}),
    # the collection's own styles
    ("No acute cardiopulmonary abnormality.", {}),
    ("1. Mild cardiomegaly. 2. Small left pleural effusion.", {"Cardiomegaly": 1, "Effusion": 1}),
    ("Blunting of the left costophrenic angle consistent with small effusion.", {"Effusion": 1}),
    ("Right lower lobe opacity concerning for pneumonia.", {"Lung Opacity": 1, "Pneumonia": -1}),
    ("Bibasilar opacity likely atelectasis.", {"Lung Opacity": 1, "Atelectasis": -1}),
    ("Heart size upper limits of normal. No focal consolidation.", {"Cardiomegaly": -1, "Consolidation": 0}),
    ("Heart size and mediastinal contours are within normal limits.", {"Cardiomegaly": 0}),
    ("The heart is not enlarged.", {"Cardiomegaly": 0}),
    ("No acute disease. The heart is mildly enlarged.", {"Cardiomegaly": 1}),
    ("No pneumothorax, mild cardiomegaly.", {"Pneumothorax": 0, "Cardiomegaly": 1}),
    ("No focal consolidation, pneumothorax, or large pleural effusion.",
     {"Consolidation": 0, "Pneumothorax": 0, "Effusion": 0}),
    ("Pneumothorax is no longer seen.", {"Pneumothorax": 0}),
    ("Interval resolution of right effusion.", {"Effusion": 0}),
    ("Right pleural effusion is not excluded.", {"Effusion": -1}),
    ("Cannot exclude pneumonia.", {"Pneumonia": -1}),
    ("Atelectasis versus pneumonia in the left base.", {"Atelectasis": -1, "Pneumonia": -1}),
    ("Small pericardial effusion.", {}),  # not a pleural effusion
    ("Calcified granuloma in the left upper lobe.", {"Nodule": 1}),
    ("Stable cardiomegaly. No edema.", {"Cardiomegaly": 1, "Edema": 0}),
    # one mention of each kind: positive wins over uncertain, uncertain over negated
    ("No large effusion, though a small effusion cannot be excluded.", {"Effusion": -1}),
    ("No right effusion. Small left pleural effusion.", {"Effusion": 1}),
]


@pytest.mark.parametrize("text, expected", PHRASINGS, ids=[t for t, _ in PHRASINGS])
def test_phrasings(text, expected):
    assert label_impression(text) == expected


@pytest.mark.parametrize("text", [None, float("nan"), "", "XXXX", "...", "1. 2. 3.", "(((", "no no no",
                                  "x" * 5000, "Épanchement pleural droit.", "\n\n\t", 17])
def test_text_it_cannot_parse_gets_no_labels_never_an_exception(text):
    assert isinstance(label_impression(text), dict)


def test_random_text_never_raises():
    words = "no not possible effusion cardiomegaly heart size is normal , . ; 1. without versus resolved".split()
    rng = random.Random(0)
    for _ in range(500):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 20)))
        assert set(label_impression(text)) <= set(FINDINGS)


def test_the_table_has_one_nullable_column_per_finding():
    table = impression_label_table(["Cardiomegaly.", "No effusion.", "Possible pneumonia.", None])
    assert list(table.columns) == list(LABEL_COLUMNS) and label_column("Lung Opacity") == "label_lung_opacity"
    assert table["label_cardiomegaly"].tolist()[:1] == [1] and pd.isna(table["label_cardiomegaly"][1])
    assert table["label_effusion"][1] == 0 and table["label_pneumonia"][2] == -1
    assert table.iloc[3].isna().all()


def test_truth_for_adherence_counts_unmentioned_as_absent_and_leaves_uncertain_out():
    truth = finding_truth(["Cardiomegaly.", "No acute disease.", "Heart size borderline."])
    assert truth["Cardiomegaly"].tolist()[:2] == [True, False] and pd.isna(truth["Cardiomegaly"][2])
    assert truth["Effusion"].tolist() == [False, False, False]
