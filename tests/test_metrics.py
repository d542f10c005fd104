"""ClassificationMetrics against hand-computed values, scikit-learn, and a simulated all_reduce."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from visiontune.metrics import ClassificationMetrics


def one_hot_logits(predicted: list[int], num_classes: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(predicted), num_classes).float() * 5.0


def test_hand_computed_three_classes():
    # true:      a a a b b c
    # predicted: a a b b a a
    metrics = ClassificationMetrics(["a", "b", "c"])
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    metrics.update(one_hot_logits([0, 0, 1, 1, 0, 0], 3), targets, loss_sum=3.0)
    result = metrics.compute()

    assert result["num_images"] == 6
    assert result["loss"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["top5"] is None  # only 3 classes
    assert result["confusion"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    a, b, c = (result["per_class"][name] for name in "abc")
    assert a == pytest.approx({"precision": 2 / 4, "recall": 2 / 3, "f1": 4 / 7, "support": 3})
    assert b == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    # c is never predicted: precision 0/0 and F1 are defined as 0, not NaN.
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["macro_f1"] == pytest.approx((4 / 7 + 1 / 2 + 0) / 3)


def test_loss_defaults_to_cross_entropy_and_batches_accumulate():
    torch.manual_seed(0)
    logits = torch.randn(10, 4)
    targets = torch.randint(0, 4, (10,))
    metrics = ClassificationMetrics(4)
    metrics.update(logits[:3], targets[:3])
    metrics.update(logits[3:], targets[3:])
    result = metrics.compute()
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert list(result["per_class"]) == ["0", "1", "2", "3"]


def test_top5_with_more_than_five_classes():
    metrics = ClassificationMetrics([f"c{i}" for i in range(7)])
    # Scores rank classes 0 > 1 > ... > 6 for every image.
    logits = torch.arange(7, 0, -1).float().repeat(3, 1)
    metrics.update(logits, torch.tensor([0, 4, 6]))  # rank 1, rank 5, rank 7
    result = metrics.compute()
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["top5"] == pytest.approx(2 / 3)


def test_absent_classes_are_zero_and_left_out_of_macro_f1():
    metrics = ClassificationMetrics(["a", "b", "c", "d"])
    metrics.update(one_hot_logits([0, 1], 4), torch.tensor([0, 1]))
    result = metrics.compute()
    assert result["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["macro_f1"] == pytest.approx(1.0)  # c and d neither occur nor are predicted
    assert not any(math.isnan(v) for row in result["per_class"].values() for v in row.values())


def test_empty_metrics_are_zero_not_nan():
    result = ClassificationMetrics(["a", "b"]).compute()
    assert result["num_images"] == 0
    assert result["loss"] == 0.0 and result["accuracy"] == 0.0 and result["macro_f1"] == 0.0


def test_soft_targets_count_as_their_argmax():
    metrics = ClassificationMetrics(["a", "b"])
    soft = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    metrics.update(one_hot_logits([0, 0], 2), soft, loss_sum=1.0)
    assert metrics.compute()["confusion"] == [[1, 0], [1, 0]]


def test_matches_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 8, generator=generator)
    targets = torch.randint(0, 8, (200,), generator=generator)
    metrics = ClassificationMetrics(8)
    for start in range(0, 200, 32):
        metrics.update(logits[start : start + 32], targets[start : start + 32])
    result = metrics.compute()
    predicted = logits.argmax(1).numpy()
    assert result["accuracy"] == pytest.approx(accuracy_score(targets.numpy(), predicted))
    assert result["confusion"] == confusion_matrix(targets.numpy(), predicted, labels=range(8)).tolist()
    assert result["macro_f1"] == pytest.approx(f1_score(targets.numpy(), predicted, average="macro", zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets.numpy(), predicted, labels=range(8), zero_division=0
    )
    for i in range(8):
        row = result["per_class"][str(i)]
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]


def test_summed_state_tensors_equal_single_process_metrics():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(90, 6, generator=generator)
    targets = torch.randint(0, 6, (90,), generator=generator)
    single = ClassificationMetrics(6)
    single.update(logits, targets)

    # Three "ranks" see disjoint shards; all_reduce(SUM) is a sum of their state tensors.
    ranks = [ClassificationMetrics(6) for _ in range(3)]
    for rank, metrics in enumerate(ranks):
        metrics.update(logits[rank::3], targets[rank::3])
    reduced = sum(metrics.state_tensor() for metrics in ranks)
    assert reduced.dtype == torch.float64 and reduced.ndim == 1
    ranks[0].load_state_tensor(reduced)

    merged, expected = ranks[0].compute(), single.compute()
    assert merged["confusion"] == expected["confusion"]
    assert merged["num_images"] == 90
    for key in ("loss", "accuracy", "top5", "macro_f1"):
        assert merged[key] == pytest.approx(expected[key], rel=1e-9)


def test_state_tensor_is_a_copy_and_wrong_sizes_are_rejected():
    metrics = ClassificationMetrics(["a", "b"])
    state = metrics.state_tensor()
    state += 1
    assert metrics.num_images == 0
    with pytest.raises(ValueError, match="entries"):
        metrics.load_state_tensor(torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        metrics.update(torch.zeros(2, 3), torch.tensor([0, 1]))
