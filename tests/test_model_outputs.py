"""main_logits: one reading of a model's output for training, evaluation, prediction and export."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn
from torchvision.models import GoogLeNetOutputs, InceptionOutputs

from visiontune.model.outputs import main_logits
from visiontune.run.inference import class_log_probabilities
from visiontune.training.loops import evaluate

LOGITS = torch.arange(6.0).reshape(2, 3)
AUX = -LOGITS


def test_a_plain_tensor_is_its_own_logits():
    assert main_logits(LOGITS) is LOGITS


@pytest.mark.parametrize("outputs", [
    GoogLeNetOutputs(LOGITS, AUX, AUX * 2),  # googlenet in train mode: (logits, aux2, aux1)
    InceptionOutputs(LOGITS, AUX),  # inception_v3 in train mode: (logits, aux)
    InceptionOutputs(LOGITS, None),  # inception_v3 built without its aux head
    namedtuple("Renamed", ["aux", "logits"])(AUX, LOGITS),  # a named field wins over position
    {"aux": AUX, "logits": LOGITS},  # Hugging Face style mapping
    (LOGITS, AUX),  # a user model returning (logits, extra)
    [LOGITS, AUX],
], ids=["googlenet", "inception", "inception-no-aux", "named-second", "dict", "tuple", "list"])
def test_the_main_logits_are_found_in_every_output_shape(outputs):
    assert main_logits(outputs) is LOGITS


@pytest.mark.parametrize("outputs", [{"aux": AUX}, (), ("text", LOGITS), None, 3.0],
                         ids=["dict-without-logits", "empty-tuple", "tuple-not-tensor-first", "none", "float"])
def test_an_output_without_logits_names_its_type(outputs):
    with pytest.raises(TypeError, match=type(outputs).__name__):
        main_logits(outputs)


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, images):
        logits = self.fc(images.flatten(1))
        return {"aux": torch.zeros_like(logits), "logits": logits}


def test_evaluation_and_prediction_read_the_same_logits_from_a_dict_model():
    torch.manual_seed(0)
    model = _DictModel().eval()
    images = torch.randn(5, 1, 2, 2)
    labels = model(images)["logits"].argmax(dim=1)  # the model is right on every image by construction
    expected = torch.log_softmax(model(images)["logits"].double(), dim=1)
    assert torch.equal(class_log_probabilities(model, images), expected)
    evaluation = evaluate(model, [(images, labels)], torch.device("cpu"), ["a", "b", "c"])
    assert evaluation.metrics["accuracy"] == 1.0
