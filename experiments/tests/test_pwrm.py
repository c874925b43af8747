"""experiments/pwrm.py: the honest preference rules and the written candidates."""
from experiments import pwrm as PW


def test_rule_labels():
    good = dict(correct=True, looping=False, length=6)
    assert PW.rule_label(good, dict(good, correct=False)) == 1.0  # correct beats wrong
    assert PW.rule_label(dict(good, correct=False, length=3), good) == 0.0  # even when shorter
    assert PW.rule_label(dict(good, looping=True), dict(good, correct=False)) == 0.0  # a loop loses
    assert PW.rule_label(good, dict(good, length=9)) == 1.0  # shorter among equally correct
    assert PW.rule_label(good, dict(good)) is None
    wrong = dict(good, correct=False)
    assert PW.rule_label(wrong, dict(wrong, length=9)) is None  # two wrong answers: length does not decide
    assert PW.rule_label(wrong, dict(wrong, length=9), length_rule="equal") == 1.0  # ... unless asked to
    assert PW.rule_label(dict(good, looping=True), dict(good, looping=True)) is None
