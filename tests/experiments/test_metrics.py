"""LongBench metric definitions on hand-worked examples, edge cases included."""

from __future__ import annotations

import pytest

from experiments import metrics as M


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert M.normalize_answer("  The Cat, sat on  a mat! ") == "cat sat on mat"


@pytest.mark.parametrize("pred, gold, expected", [
    ("G. Stanley Hall", "G. Stanley Hall", 1.0),
    # pred tokens {g, stanley, hall, psychologist}, gold {g, stanley, hall}: P=3/4, R=1 -> 6/7
    ("G. Stanley Hall, psychologist", "G. Stanley Hall", 6 / 7),
    # one common token of 2 and 4: P=1/2, R=1/4 -> F1 = 2*(1/8)/(3/4) = 1/3
    ("Paris France", "the capital is Paris city", 1 / 3),
    ("", "Paris", 0.0),
    ("Paris", "", 0.0),
    ("the", "a", 0.0),  # both normalize to nothing
])
def test_qa_f1(pred, gold, expected):
    assert M.qa_f1_score(pred, gold) == pytest.approx(expected)


def test_rouge_l_hand_worked():
    # LCS of "the cat sat" (pred) and "the cat was sat" (gold) is 3: P=3/3, R=3/4 -> F = 6/7
    assert M.rouge_l_score("the cat sat", "the cat was sat") == pytest.approx(6 / 7)
    assert M.rouge_l_score("", "the cat") == 0.0
    assert M.rouge_l_score("The Cat!", "the cat") == pytest.approx(1.0)  # rouge_score lowercases, drops punctuation


def test_classification_score_as_longbench():
    classes = ["Date", "Individual", "Other location", "Location"]
    assert M.classification_score("Individual", "Individual", all_classes=classes) == 1.0
    # two classes named, gold among them -> 1/2
    assert M.classification_score("Date or Individual", "Individual", all_classes=classes) == 0.5
    assert M.classification_score("Location", "Location", all_classes=classes) == 1.0
    # matching is case-sensitive: "Location" is not inside the gold "Other location", so both count -> 1/2
    assert M.classification_score("Other location. Location", "Other location", all_classes=classes) == 0.5
    assert M.classification_score("", "Date", all_classes=classes) == 0.0
    assert M.classification_score("Date", "Individual", all_classes=classes) == 0.0


def test_classification_drops_class_inside_gold():
    # "Date" is a strict substring of the gold "Date of birth": removed, leaving the gold alone -> 1.0
    classes = ["Date", "Date of birth"]
    assert M.classification_score("Date of birth", "Date of birth", all_classes=classes) == 1.0


def test_retrieval_score():
    assert M.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert M.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert M.retrieval_score("Paragraph 121", "Paragraph 12") == 0.0  # whole numbers only
    assert M.retrieval_score("", "Paragraph 12") == 0.0
    assert M.retrieval_score("no idea", "Paragraph 12") == 0.0


def test_count_score():
    assert M.count_score("7", "7") == 1.0
    assert M.count_score("There are 7 unique paragraphs out of 9", "7") == 0.5
    assert M.count_score("", "7") == 0.0


def test_choice_score():
    assert M.choice_score("C", "C") == 1.0
    assert M.choice_score(" (B) because ...", "(B) Their subconscious knew") == 1.0
    assert M.choice_score("A", "(B) Their subconscious knew") == 0.0
    assert M.choice_score("Based on the text, D.", "D") == 1.0
    assert M.choice_score("", "A") == 0.0


def test_score_item_max_over_answers_and_first_line():
    assert M.score_item("qa_f1", "Bob Dylan", ["George Harrison", "Bob Dylan"]) == 1.0
    # LongBench keeps only the first line for few-shot tasks
    assert M.score_item("qa_f1", "\nParis\nQuestion: ...", ["Paris"], first_line=True) == 1.0
    assert M.score_item("qa_f1", "\nParis\nQuestion: ...", ["Paris"]) < 1.0
    assert M.score_item("qa_f1", "", []) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        M.score_item("bleu", "x", ["x"])


def test_task_score_is_mean_times_100():
    assert M.task_score([1.0, 0.0, 0.5]) == pytest.approx(50.0)
