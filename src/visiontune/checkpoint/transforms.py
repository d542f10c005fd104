"""Tensor transforms: one model tensor built from checkpoint tensors by more than a rename.

A plan step is normally "this checkpoint tensor fills that model tensor". Some layouts need more:
``transformers`` stores attention's query, key and value as three tensors where timm stores one
fused ``qkv`` (torchvision one ``in_proj_weight``), a checkpoint trained at another image size
has a position embedding for another patch grid, a 3-channel stem goes into a 1-channel model.
Each such step is a :class:`Transform` whose ``sources`` are checkpoint keys; it knows the shape it
produces (so matching stays a pure function of shapes) and says what it does in one line for the
report: ``cat(q.weight, k.weight, v.weight)``.

Mappings and rules files may write the same expressions as a checkpoint key:
``cat(a, b, c)``, ``cat(a, b, dim=1)``, ``chunk(a, 3, 0)`` (part 0 of 3 along dim 0),
``transpose(a, 0, 1)``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from visiontune.errors import ConfigError, shown

Shape = tuple[int, ...]

CAT, CHUNK, TRANSPOSE, RESAMPLE, RESAMPLE_TABLE, ADAPT_CHANNELS = "cat", "chunk", "transpose", "resample", "resample_table", "adapt_channels"


@dataclass(frozen=True)
class Transform:
    """Build one tensor from ``sources`` (checkpoint keys). ``args`` depend on ``op``:

    - cat: (dim,) — concatenate the sources along dim;
    - chunk: (parts, index, dim) — part ``index`` of ``parts`` equal parts along dim;
    - transpose: (dim0, dim1);
    - resample: (grid_before, grid_after, prefix_tokens) — an absolute position embedding
      resampled bicubically over its patch grid, class/register tokens kept (timm's own function);
    - resample_table: (window_before, window_after) — a Swin relative position bias table
      ((2w-1)^2, heads) for another attention window (timm's ``resize_rel_pos_bias_table``);
    - adapt_channels: (in_chans,) — an input convolution's kernels adapted to another number of
      input channels (timm's ``adapt_input_conv``: summed for 1, repeated and rescaled for more).
    """

    op: str
    sources: tuple[str, ...]
    args: tuple = ()

    def shape(self, shapes: dict[str, Shape]) -> Shape:
        """The shape this transform produces from sources of the given shapes."""
        first = tuple(shapes[self.sources[0]])
        if self.op == CAT:
            dim = self.args[0]
            return first[:dim] + (sum(shapes[key][dim] for key in self.sources),) + first[dim + 1 :]
        if self.op == CHUNK:
            parts, _, dim = self.args
            return first[:dim] + (first[dim] // parts,) + first[dim + 1 :]
        if self.op == TRANSPOSE:
            dims = list(first)
            a, b = self.args
            dims[a], dims[b] = dims[b], dims[a]
            return tuple(dims)
        if self.op == RESAMPLE:
            _, (height, width), prefix = self.args
            return first[:1] + (prefix + height * width,) + first[2:]
        if self.op == RESAMPLE_TABLE:
            height, width = self.args[1]
            return ((2 * height - 1) * (2 * width - 1),) + first[1:]
        if self.op == ADAPT_CHANNELS:
            return (first[0], self.args[0]) + first[2:]
        raise ValueError(f"unknown transform {self.op!r}")

    def apply(self, tensors: dict):
        """The built tensor (a new one; the sources are not modified)."""
        import torch  # heavy; the checkpoint layer's planning stays torch-free

        sources = [tensors[key] for key in self.sources]
        if self.op == CAT:
            return torch.cat(sources, dim=self.args[0])
        if self.op == CHUNK:
            parts, index, dim = self.args
            return sources[0].chunk(parts, dim=dim)[index]
        if self.op == TRANSPOSE:
            return sources[0].transpose(*self.args).contiguous()
        if self.op == RESAMPLE:
            # timm's own resampling, so a checkpoint loads exactly as timm would load it; timm is a
            # core dependency, imported here because only this rare step needs it
            from timm.layers import resample_abs_pos_embed

            before, after, prefix = self.args
            return resample_abs_pos_embed(sources[0].float(), list(after), list(before), num_prefix_tokens=prefix, verbose=False).to(sources[0].dtype)
        if self.op == RESAMPLE_TABLE:
            from timm.layers import resize_rel_pos_bias_table  # see above

            after = tuple(self.args[1])
            new_shape = ((2 * after[0] - 1) * (2 * after[1] - 1),) + tuple(sources[0].shape[1:])
            return resize_rel_pos_bias_table(sources[0].float(), after, new_shape, old_window_size=tuple(self.args[0])).to(sources[0].dtype)
        if self.op == ADAPT_CHANNELS:
            from timm.models import adapt_input_conv  # see above

            return adapt_input_conv(self.args[0], sources[0])
        raise ValueError(f"unknown transform {self.op!r}")

    def describe(self, names: dict[str, str] | None = None) -> str:
        """``cat(a, b, c)``: the step as a mapping file would write it, with checkpoint names."""
        names = names or {}
        keys = ", ".join(names.get(key, key) for key in self.sources)
        if self.op == CAT:
            return f"cat({keys})" if self.args[0] == 0 else f"cat({keys}, dim={self.args[0]})"
        if self.op == CHUNK:
            parts, index, dim = self.args
            return f"chunk({keys}, {parts}, {index})" if dim == 0 else f"chunk({keys}, {parts}, {index}, dim={dim})"
        if self.op == TRANSPOSE:
            return f"transpose({keys}, {self.args[0]}, {self.args[1]})"
        if self.op == RESAMPLE:
            before, after, prefix = self.args
            return f"resample({keys}, {before[0]}x{before[1]} -> {after[0]}x{after[1]} grid, {prefix} prefix tokens kept)"
        if self.op == RESAMPLE_TABLE:
            before, after = self.args
            return f"resample_table({keys}, window {before[0]}x{before[1]} -> {after[0]}x{after[1]})"
        return f"adapt_channels({keys}, in_chans={self.args[0]})"


_CALL = re.compile(r"^\s*(cat|chunk|transpose)\s*\((.*)\)\s*$")


def parse_expression(text: str, origin: str) -> Transform | None:
    """A mapping value such as ``cat(a, b, c)``; None when ``text`` is a plain key."""
    found = _CALL.match(text)
    if not found:
        return None
    op, inner = found.group(1), found.group(2)
    parts = [part.strip() for part in inner.split(",") if part.strip()]
    options = dict(part.split("=", 1) for part in parts if "=" in part)
    positional = [part for part in parts if "=" not in part]
    try:
        dim = int(options.pop("dim", 0))
        if options:
            raise ValueError(f"unknown option(s) {sorted(options)}")
        if op == CAT and len(positional) >= 2:
            return Transform(CAT, tuple(positional), (dim,))
        if op == CHUNK and len(positional) == 3 and int(positional[1]) > 0 and 0 <= int(positional[2]) < int(positional[1]):
            return Transform(CHUNK, (positional[0],), (int(positional[1]), int(positional[2]), dim))
        if op == TRANSPOSE and len(positional) == 3:
            return Transform(TRANSPOSE, (positional[0],), (int(positional[1]), int(positional[2])))
    except ValueError as error:
        raise ConfigError(f"{origin}: {shown(text)} is not a valid transform ({error}). {_FORMS}") from None
    raise ConfigError(f"{origin}: {shown(text)} is not a valid transform. {_FORMS}")


_FORMS = "Write cat(a, b[, ...][, dim=D]), chunk(a, PARTS, INDEX[, dim=D]) or transpose(a, D0, D1) with checkpoint keys."


def shape_fits(transform: Transform, shapes: dict[str, Shape]) -> str | None:
    """Why ``transform`` cannot apply to sources of these shapes, or None when it can."""
    first = tuple(shapes[transform.sources[0]])
    if transform.op == CAT:
        dim = transform.args[0]
        if not all(len(shapes[key]) == len(first) and dim < len(first) for key in transform.sources):
            return "its tensors differ in rank or have no such dimension"
        if any(tuple(shapes[key])[:dim] + tuple(shapes[key])[dim + 1 :] != first[:dim] + first[dim + 1 :] for key in transform.sources):
            return "its tensors differ outside the concatenated dimension"
    if transform.op == CHUNK:
        parts, _, dim = transform.args
        if dim >= len(first) or first[dim] % parts:
            return f"dimension {dim} of {first} does not split into {parts} equal parts"
    if transform.op == TRANSPOSE and max(transform.args) >= len(first):
        return f"{first} has no dimension {max(transform.args)}"
    return None


def square_grid(tokens: int) -> tuple[int, int] | None:
    side = math.isqrt(tokens)
    return (side, side) if tokens > 0 and side * side == tokens else None
