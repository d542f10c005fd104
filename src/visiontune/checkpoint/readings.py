"""Other readings of a checkpoint's tensors, offered to the matcher only where the model asks for them.

- **fused / split attention**: a checkpoint holding query, key and value as three tensors
  (``transformers``' ``q_proj``/``k_proj``/``v_proj``, older ``query``/``key``/``value``) offers a
  fused ``qkv`` tensor, concatenated, when the model has fused ones (timm's ``qkv``, torchvision's
  ``in_proj_weight``) and no separate ones; and the reverse, chunks of a fused tensor for a model
  that keeps them apart. The three must share one parent module and one shape: anything else is
  not offered, so the matcher never sees a reading the structure does not force.
- **resampled position embeddings and adapted input channels**: a pair the matcher found but whose
  shapes cannot fit becomes a transform when it can only mean one thing: an absolute position
  embedding for another patch grid (the grid is square on both sides for exactly one count of
  class/register tokens), or the model's first convolution with 3 input channels in the file and
  1 or 4 in the model.

Like the matchers, this module works on ``{key: shape}`` maps only.
"""

from __future__ import annotations

from visiontune.checkpoint.keys import WEIGHT, Shape, leaf_of, module_of, role_of
from visiontune.checkpoint.match import Plan, ShapeMap
from visiontune.checkpoint.transforms import ADAPT_CHANNELS, CAT, CHUNK, RESAMPLE, RESAMPLE_TABLE, Transform, square_grid

# the names of attention's three projections, one style per tuple
_SEPARATE_STYLES = (("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_FUSED_MODULE = "qkv"  # timm: <attn>.qkv.weight
_FUSED_LEAF = "in_proj_"  # torchvision / nn.MultiheadAttention: <attn>.in_proj_weight
_POSITION_LEAVES = ("pos_embed", "position_embeddings", "pos_embedding")
_TABLE_LEAF = "relative_position_bias_table"  # Swin
_PREFIX_TOKEN_LEAVES = ("cls_token", "class_token", "dist_token", "distillation_token", "reg_token", "register_tokens")


def with_attention_readings(target: ShapeMap, source: ShapeMap) -> tuple[ShapeMap, dict[str, Transform]]:
    """``source`` with fused (or split) attention tensors in place of their parts, where ``target`` has that form only."""
    target_separate, target_fused = bool(_separate_triplets(target)), bool(_fused_tensors(target))
    if target_fused and not target_separate:
        return _fuse(target, source)
    if target_separate and not target_fused:
        return _split(target, source)
    return source, {}


def _separate_triplets(shapes: ShapeMap) -> dict[tuple[str, str], tuple[str, str, str]]:
    """{(parent module, leaf): (q key, k key, v key)} for triplets of equal shape."""
    found = {}
    for key in shapes:
        module, leaf = module_of(key), leaf_of(key)
        parent, _, name = module.rpartition(".")
        for style in _SEPARATE_STYLES:
            if name != style[0]:
                continue
            keys = tuple(f"{parent}.{part}.{leaf}" if parent else f"{part}.{leaf}" for part in style)
            if all(k in shapes for k in keys) and len({tuple(shapes[k]) for k in keys}) == 1:
                found[(parent, leaf)] = keys
    return found


def _fused_tensors(shapes: ShapeMap) -> dict[tuple[str, str], str]:
    """{(attention module, leaf): fused key} for qkv / in_proj tensors whose first dimension splits in 3."""
    found = {}
    for key, shape in shapes.items():
        module, leaf = module_of(key), leaf_of(key)
        if not shape or shape[0] % 3:
            continue
        if module.rpartition(".")[2] == _FUSED_MODULE:
            found[(module.rpartition(".")[0], leaf)] = key
        elif leaf.startswith(_FUSED_LEAF):
            found[(module, leaf.removeprefix(_FUSED_LEAF))] = key
    return found


def _fuse(target: ShapeMap, source: ShapeMap) -> tuple[ShapeMap, dict[str, Transform]]:
    uses_in_proj = any(leaf_of(key).startswith(_FUSED_LEAF) for key in target)
    transforms: dict[str, Transform] = {}
    for (parent, leaf), parts in _separate_triplets(source).items():
        virtual = f"{parent}.{_FUSED_LEAF}{leaf}" if uses_in_proj else f"{parent}.{_FUSED_MODULE}.{leaf}"
        if virtual not in source:
            transforms[virtual] = Transform(CAT, parts, (0,))
    # each fused tensor where its query part was: q.weight, q.bias -> qkv.weight, qkv.bias
    return _replace(source, transforms, {virtual: transform.sources[0] for virtual, transform in transforms.items()}), transforms


def _split(target: ShapeMap, source: ShapeMap) -> tuple[ShapeMap, dict[str, Transform]]:
    styles = [style for style in _SEPARATE_STYLES if any(module_of(key).rpartition(".")[2] == style[0] for key in target)]
    if len(styles) != 1:
        return source, {}
    transforms: dict[str, Transform] = {}
    anchor: dict[str, str] = {}
    fused = _fused_tensors(source)
    first_of_parent: dict[str, str] = {}
    for (parent, _), key in fused.items():
        first_of_parent.setdefault(parent, key)
    for index, name in enumerate(styles[0]):  # part-major: q.weight, q.bias, k.weight, ... so each part is one unit
        for (parent, leaf), key in fused.items():
            virtual = f"{parent}.{name}.{leaf}" if parent else f"{name}.{leaf}"
            if virtual not in source:
                transforms[virtual] = Transform(CHUNK, (key,), (3, index, 0))
                anchor[virtual] = first_of_parent[parent]
    return _replace(source, transforms, anchor), transforms


def _replace(source: ShapeMap, transforms: dict[str, Transform], anchor: dict[str, str]) -> ShapeMap:
    """The source map with each transform's inputs replaced by its outputs, placed at its anchor key
    (in the order of ``transforms``)."""
    consumed = {name for transform in transforms.values() for name in transform.sources}
    outputs_at: dict[str, list[str]] = {}
    for virtual in transforms:
        outputs_at.setdefault(anchor[virtual], []).append(virtual)
    result: ShapeMap = {}
    for key, shape in source.items():
        for virtual in outputs_at.get(key, []):
            result[virtual] = transforms[virtual].shape(source)
        if key not in consumed:
            result[key] = shape
    return result


def resolve_mismatches(plan: Plan, target: ShapeMap, source: ShapeMap) -> None:
    """Turn mismatched pairs that can mean only one thing into resample / adapt-channel transforms."""
    first_conv = next((key for key, shape in target.items() if role_of(key) == WEIGHT and len(shape) == 4), None)
    prefix_tokens = sum(shape[-2] if len(shape) == 3 else 1 for key, shape in target.items() if leaf_of(key) in _PREFIX_TOKEN_LEAVES)
    for target_key, source_key in list(plan.mismatched.items()):
        transform = None
        if leaf_of(target_key) in _POSITION_LEAVES:
            transform = _resample(source_key, tuple(target[target_key]), tuple(source[source_key]), prefix_tokens, plan)
        elif leaf_of(target_key) == _TABLE_LEAF:
            transform = _resample_table(source_key, tuple(target[target_key]), tuple(source[source_key]))
        elif target_key == first_conv:
            transform = _adapt_channels(source_key, tuple(target[target_key]), tuple(source[source_key]))
        if transform is None:
            continue
        virtual = f"{transform.op}({source_key})"
        plan.transforms[virtual] = transform
        del plan.mismatched[target_key]
        plan.loaded[target_key] = virtual
    _release_held_back(plan)


def _resample(source_key: str, target_shape: Shape, source_shape: Shape, prefix_tokens: int, plan: Plan) -> Transform | None:
    if len(target_shape) != 3 or len(source_shape) != 3 or target_shape[0] != source_shape[0] or target_shape[2] != source_shape[2]:
        return None
    readings = []
    for prefix in sorted({0, prefix_tokens}):
        before, after = square_grid(source_shape[1] - prefix), square_grid(target_shape[1] - prefix)
        if before and after:
            readings.append((before, after, prefix))
    if len(readings) != 1:
        if readings:
            plan.notes.append(f"{source_key}: the position embedding's grid fits {len(readings)} counts of class tokens; not resampled")
        return None
    return Transform(RESAMPLE, (source_key,), readings[0])


def _resample_table(source_key: str, target_shape: Shape, source_shape: Shape) -> Transform | None:
    """A square window's table has (2w-1)^2 rows, one column per head."""
    if len(target_shape) != 2 or len(source_shape) != 2 or target_shape[1] != source_shape[1]:
        return None
    before, after = square_grid(source_shape[0]), square_grid(target_shape[0])
    if not before or not after or before[0] % 2 == 0 or after[0] % 2 == 0:
        return None
    window = lambda grid: ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
    return Transform(RESAMPLE_TABLE, (source_key,), (window(before), window(after)))


def _adapt_channels(source_key: str, target_shape: Shape, source_shape: Shape) -> Transform | None:
    if len(source_shape) != 4 or source_shape[1] != 3 or target_shape[0] != source_shape[0] or target_shape[2:] != source_shape[2:]:
        return None
    return Transform(ADAPT_CHANNELS, (source_key,), (target_shape[1],))


def _release_held_back(plan: Plan) -> None:
    """Tensors held back only because a sibling did not fit load now that the sibling does."""
    broken = {module_of(key) for key in plan.mismatched}
    released = {t: s for t, s in plan.held_back.items() if module_of(t) not in broken}
    plan.loaded.update(released)
    plan.held_back = {t: s for t, s in plan.held_back.items() if t not in released}
    if released:
        plan.notes[:] = [note for note in plan.notes if not note.startswith("not loaded although their shapes fit")]
        if plan.held_back:
            plan.notes.append(f"not loaded although their shapes fit, because other tensors of their module do not: {', '.join(plan.held_back)}")
