"""Classification metrics are scikit-learn's (macro-F1 over the classes present, as the SuperGLUE CB
metric); degenerate inputs score 0.0, never NaN."""

import numpy as np
import pytest

from ptv2_kernels.tasks import metrics as M


def test_macro_f1_with_a_class_absent_from_gold_is_sklearn():
    from sklearn.metrics import f1_score

    gold, pred = [0, 1, 1, 0], [0, 1, 0, 0]  # 3 labels, class 2 neither gold nor predicted
    assert M.f1_macro(pred, gold, 3) == pytest.approx(f1_score(gold, pred, average="macro"))
    assert M.f1_macro(pred, gold, 3) == pytest.approx((0.8 + 2 / 3) / 2)  # not divided by 3
    with pytest.raises(ValueError, match=r"range\(2\)"):
        M.f1_macro([0, 2], [0, 1], 2)


def test_random_labels_match_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert M.accuracy(pred, gold) == pytest.approx(accuracy_score(gold, pred))
    assert M.matthews(pred, gold) == pytest.approx(matthews_corrcoef(gold, pred))
    assert M.f1_binary(pred, gold, 2) == pytest.approx(f1_score(gold == 2, pred == 2))
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert M.pearson(x, y) == pytest.approx(pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(spearmanr(x, y)[0])


def test_degenerate_inputs_score_zero():
    assert M.accuracy([], []) == 0.0 and M.f1_macro([], [], 2) == 0.0 and M.matthews([], []) == 0.0
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0 and M.spearman([1], [2]) == 0.0
    assert M.f1_binary([0, 0], [0, 0]) == 0.0
