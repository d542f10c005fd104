"""Multi-label metrics (torchmetrics) against scikit-learn, threshold tuning, the BCE loss and mixing."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from visiontune.config import config_from_dict
from visiontune.data.multilabel import mask_of
from visiontune.metrics_multilabel import MultilabelMetrics, tune_thresholds
from visiontune.training.task import MultiLabel, MultilabelLoss, MultilabelMixer

# float32 inside torchmetrics' curves vs float64 in scikit-learn: agreement to ~1e-6 relative;
# 1e-5 leaves room without hiding a wrong formula (a wrong AP differs by > 1e-2 on 60 images).
TOLERANCE = 1e-5


def _scores(seed=0, images=60, classes=4):
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(images, classes, generator=generator) < 0.4).long()
    logits = torch.randn(images, classes, generator=generator, dtype=torch.float64) + 1.5 * targets
    return logits, targets


def test_map_and_per_class_ap_agree_with_scikit_learn():
    logits, targets = _scores()
    metrics = MultilabelMetrics(["a", "b", "c", "d"])
    metrics.update(logits[:25], targets[:25])
    metrics.update(logits[25:], targets[25:])
    result = metrics.compute()
    scores = torch.sigmoid(logits).numpy()
    per_class = average_precision_score(targets.numpy(), scores, average=None)
    assert [row["ap"] for row in result["per_class"].values()] == pytest.approx(per_class.tolist(), abs=TOLERANCE)
    assert result["mAP"] == pytest.approx(per_class.mean(), abs=TOLERANCE)
    predicted = (scores >= torch.tensor(result["thresholds"]).numpy()).astype(int)
    assert result["micro_f1"] == pytest.approx(f1_score(targets.numpy(), predicted, average="micro"), abs=TOLERANCE)
    assert result["macro_f1"] == pytest.approx(f1_score(targets.numpy(), predicted, average="macro"), abs=TOLERANCE)
    assert result["num_images"] == 60 and result["task"] == "multilabel" and result["top5"] is None


def test_tuned_thresholds_give_each_class_its_best_f1():
    logits, targets = _scores(seed=1)
    scores = torch.sigmoid(logits)
    thresholds = tune_thresholds(scores, targets)
    for c in range(targets.shape[1]):
        tuned = f1_score(targets[:, c], (scores[:, c] >= thresholds[c]).long(), zero_division=0)
        # Every score is a candidate cut: none may beat the tuned threshold.
        best = max(f1_score(targets[:, c], (scores[:, c] >= cut).long(), zero_division=0) for cut in scores[:, c])
        assert tuned == pytest.approx(best, abs=1e-12)


def test_given_thresholds_are_used_and_classes_without_positives_have_no_ap():
    logits, targets = _scores(seed=2)
    targets[:, 3] = 0
    result = MultilabelMetrics(list("abcd"), [0.5, 0.5, 0.5, 0.5])
    result.update(logits, targets)
    computed = result.compute()
    assert computed["thresholds"] == [0.5] * 4
    assert computed["per_class"]["d"]["ap"] is None and computed["per_class"]["d"]["support"] == 0
    present = [row["ap"] for row in computed["per_class"].values() if row["ap"] is not None]
    assert computed["mAP"] == pytest.approx(sum(present) / 3)


def test_rows_round_trip_for_distributed_gathering():
    logits, targets = _scores(seed=3)
    first = MultilabelMetrics(list("abcd"))
    first.update(logits, targets)
    second = MultilabelMetrics(list("abcd"))
    second.load_rows(first.rows())
    assert second.compute() == first.compute()


def test_loss_is_bce_on_decoded_masks_with_multilabel_smoothing_and_pos_weight():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -2.0]])
    masks = torch.tensor([mask_of([0, 2]), mask_of([1])])
    vectors = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, vectors)
    assert MultilabelLoss(3)(logits, masks) == pytest.approx(float(plain))
    smoothed = torch.nn.functional.binary_cross_entropy_with_logits(logits, vectors * 0.8 + 0.1)
    assert MultilabelLoss(3, label_smoothing=0.2)(logits, masks) == pytest.approx(float(smoothed))
    config = config_from_dict({"data": "x", "model": "m", "balance": True})
    loss = MultiLabel(3).build_loss(config, [mask_of([0]), mask_of([0, 1]), mask_of([0]), 0], 3)
    assert loss.pos_weight.tolist() == pytest.approx([1 / 3, 3.0, 4.0])  # negatives / positives (0 positives: 4/1)


def test_mixing_mixes_label_vectors_in_the_images_proportion():
    torch.manual_seed(0)
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    masks = torch.tensor([mask_of([0]), mask_of([1, 2])])
    for mixer in (MultilabelMixer(3, 0.4, 0.0), MultilabelMixer(3, 0.0, 1.0)):
        mixed, targets = mixer(images, masks)
        share_of_ones = float(mixed[0].mean())  # image 0 (zeros) mixed with image 1 (ones)
        assert targets[0].tolist() == pytest.approx([1 - share_of_ones, share_of_ones, share_of_ones])
