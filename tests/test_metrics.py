"""Metrics on hand-computed accuracy matrices."""

import numpy as np
import pytest

from strata.models import metrics as M

# After task 0: 0.9 on task 0. After task 1: 0.6 on task 0, 0.8 on task 1.
# After task 2: 0.5, 0.7, 0.9. Test sizes 10, 30, 20.
R = M.accuracy_matrix([[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]])
SIZES = np.array([10, 30, 20])


def test_matrix_shape_and_nan_above_diagonal():
    assert R.shape == (3, 3)
    assert np.isnan(R[0, 1]) and np.isnan(R[1, 2])
    with pytest.raises(ValueError, match="row 1"):
        M.accuracy_matrix([[0.5], [0.5]])


def test_sample_weighted_average_accuracy():
    A = M.average_accuracy(R, SIZES)
    assert A[0] == pytest.approx(0.9)
    assert A[1] == pytest.approx((0.6 * 10 + 0.8 * 30) / 40)  # 0.75
    assert A[2] == pytest.approx((0.5 * 10 + 0.7 * 30 + 0.9 * 20) / 60)  # 0.7333
    assert M.average_incremental_accuracy(R, SIZES) == pytest.approx((0.9 + 0.75 + 44 / 60) / 3)


def test_task_averaged_accuracy_is_unweighted():
    assert M.task_averaged_accuracy(R).tolist() == pytest.approx([0.9, 0.7, 0.7])


def test_forgetting_uses_best_earlier_accuracy():
    # t=1: task0 best 0.9 -> 0.6: 0.3. t=2: task0 max(0.9,0.6)-0.5=0.4, task1 0.8-0.7=0.1 -> 0.25
    assert M.forgetting(R).tolist() == pytest.approx([0.0, 0.3, 0.25])


def test_backward_transfer():
    # t=2: (0.5-0.9 + 0.7-0.8)/2 = -0.25
    assert M.backward_transfer(R).tolist() == pytest.approx([0.0, -0.3, -0.25])


def test_old_and_new_accuracy():
    old, new = M.old_new_accuracy(R, SIZES)
    assert np.isnan(old[0])
    assert old[1:].tolist() == pytest.approx([0.6, (0.5 * 10 + 0.7 * 30) / 40])
    assert new.tolist() == pytest.approx([0.9, 0.8, 0.9])


def test_confusion_matrix_counts():
    counts = M.confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_summary_is_json_ready():
    import json

    summary = M.summarize(R, SIZES)
    json.dumps(summary)
    assert summary["accuracy_matrix"][0][1] is None
    assert summary["final_forgetting"] == pytest.approx(0.25)
    assert summary["old_accuracy"][0] is None
