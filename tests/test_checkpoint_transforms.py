"""Tensor transforms in the plan: fused/split attention offered only where the model asks for it,
mapping files that write cat/chunk/transpose, and ambiguous readings reported, never guessed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn

from visiontune.checkpoint import load_weights
from visiontune.checkpoint.transforms import CAT, CHUNK, TRANSPOSE, Transform, parse_expression
from visiontune.errors import CheckpointError, ConfigError


class Separate(nn.Module):
    """Attention with query, key and value apart (the transformers layout)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        return self.out(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


class Fused(nn.Module):
    """The same computation with one fused projection (the timm layout)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(q * k + v)


def test_each_transform_builds_the_tensor_and_its_shape():
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4, 3), "c": torch.randn(6, 3)}
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    cat = Transform(CAT, ("a", "b"), (0,))
    assert torch.equal(cat.apply(tensors), torch.cat([tensors["a"], tensors["b"]]))
    assert cat.shape(shapes) == (6, 3)
    chunk = Transform(CHUNK, ("c",), (3, 1, 0))
    assert torch.equal(chunk.apply(tensors), tensors["c"][2:4])
    assert chunk.shape(shapes) == (2, 3)
    transpose = Transform(TRANSPOSE, ("b",), (0, 1))
    assert torch.equal(transpose.apply(tensors), tensors["b"].t())
    assert transpose.shape(shapes) == (3, 4)
    assert (cat.describe(), chunk.describe(), transpose.describe()) == ("cat(a, b)", "chunk(c, 3, 1)", "transpose(b, 0, 1)")


@pytest.mark.parametrize("text", ["cat(a, b, c)", "cat(a, b, dim=1)", "chunk(a, 3, 2)", "transpose(a, 0, 1)"])
def test_expressions_round_trip(text):
    assert parse_expression(text, "test").describe() == text


@pytest.mark.parametrize("text", ["cat(a)", "chunk(a, 3, 3)", "chunk(a, x, 1)", "cat(a, b, axis=1)", "transpose(a)"])
def test_bad_expressions_are_one_line_errors(text):
    with pytest.raises(ConfigError, match="not a valid transform"):
        parse_expression(text, "test")


def test_query_key_value_fuse_into_qkv_and_split_back_with_identical_outputs():
    torch.manual_seed(0)
    separate, fused = Separate(), Fused()
    x = torch.randn(4, 8)
    report = load_weights(fused, separate.state_dict())
    assert report.complete and report.transformed["qkv.weight"] == "cat(q_proj.weight, k_proj.weight, v_proj.weight)"
    # one (24x8) matrix product instead of three (8x8) ones: BLAS may block the sums differently,
    # ~1e-7 relative; a wrong or swapped part would change outputs by ~1e-1
    tolerance = 1e-5 * max(1.0, separate(x).abs().max().item())
    torch.testing.assert_close(fused(x), separate(x), rtol=0, atol=tolerance)
    back = Separate()
    report = load_weights(back, fused.state_dict())
    assert report.complete and report.transformed["k_proj.bias"] == "chunk(qkv.bias, 3, 1)"
    torch.testing.assert_close(back(x), separate(x), rtol=0, atol=0)  # split back: the very same numbers


def test_parts_of_unequal_shape_are_not_fused():
    """A key projection of another width is not a self-attention triplet: nothing is built."""
    source = Separate().state_dict()
    source["k_proj.weight"] = torch.randn(8, 4)
    target = Fused()
    before = target.qkv.weight.detach().clone()
    report = load_weights(target, source)
    assert "qkv.weight" in report.missing and not report.transformed
    assert torch.equal(target.qkv.weight, before)


def test_equal_shaped_fused_readings_in_another_order_are_not_guessed():
    """The RegNet miniature with attention: two triplets that fuse to the same shape, registered in
    the opposite order to the model's two fused projections. Neither may be loaded."""

    class Source(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.a = Separate(), Separate()  # names that pair with nothing in the model
            self.b = nn.Conv2d(8, 8, 3)

    class Target(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = Fused()
            self.middle = nn.Conv2d(8, 8, 3)
            self.shortcut = Fused()

    source_state = {key: value for key, value in Source().state_dict().items() if ".out." not in key}
    target = Target()
    report = load_weights(target, source_state, match="auto")
    assert report.loaded == {"middle.weight": "b.weight", "middle.bias": "b.bias"}
    assert {"first.qkv.weight", "shortcut.qkv.weight"} <= set(report.missing)
    assert "no unambiguous partner" in " ".join(report.notes)


def test_a_mapping_file_can_write_transforms(tmp_path):
    torch.manual_seed(0)
    separate, fused = Separate(), Fused()
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(
        "mapping:\n"
        "  qkv.weight: cat(q_proj.weight, k_proj.weight, v_proj.weight)\n"
        "  qkv.bias: cat(q_proj.bias, k_proj.bias, v_proj.bias)\n"
        "  out.weight: transpose(out.weight, 0, 1)\n"
    )
    report = load_weights(fused, separate.state_dict(), match=str(mapping))
    assert report.complete, str(report)
    assert torch.equal(fused.out.weight, separate.out.weight.t())
    assert torch.equal(fused.qkv.bias, torch.cat([separate.q_proj.bias, separate.k_proj.bias, separate.v_proj.bias]))
    assert report.unexpected == []


def test_a_mapping_transform_over_missing_keys_or_wrong_shapes_is_a_one_line_error():
    with pytest.raises(CheckpointError, match="names keys that do not exist"):
        load_weights(Fused(), Separate().state_dict(), match={"qkv.weight": "cat(q_proj.weight, nope.weight)"})
    with pytest.raises(CheckpointError, match="differ in rank"):
        load_weights(Fused(), Separate().state_dict(), match={"qkv.weight": "cat(q_proj.weight, q_proj.bias)"})
