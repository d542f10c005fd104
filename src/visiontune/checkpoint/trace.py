"""Source-model tracing: order a model's tensors by where they sit in the data flow, not by registration.

Structure alignment pairs two implementations by the order of their tensors. That fails where one
library registers a module before a sibling and the other after it: torchvision's RegNet registers
a block's shortcut (``proj``) before its first convolution (``f.a``), timm's (``downsample``) after
its last, with identical shapes, so order and shape cannot tell them apart. Their computation
graphs can: both convolutions read the block's input, but the first convolution's output travels
through the whole block while the shortcut's reaches the sum at once.

So each model is traced with ``torch.fx`` (modules that own tensors are leaves), and its tensor-
owning modules are ordered by (weighted modules between the input and them, then *more* of them
between them and the output first, then registration). That order is the same in both
implementations of one architecture, whatever order their authors wrote. The reordered state dicts
then go through the usual alignment, with all its refusals intact.
"""

from __future__ import annotations

import logging

from visiontune.checkpoint.keys import module_of
from visiontune.errors import CheckpointError, shown

logger = logging.getLogger(__name__)


def dataflow_order(model) -> list[str] | None:
    """Names of ``model``'s tensor-owning modules in data-flow order; None when it cannot be traced."""
    import torch.fx  # heavy; only a load with a source model needs it

    owners = {name for name, module in model.named_modules()
              if any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))}

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, qualified_name: str) -> bool:
            return qualified_name in owners or super().is_leaf_module(module, qualified_name)

    try:
        graph = LeafTracer().trace(model)
    except Exception as error:  # fx refuses data-dependent control flow in many ways; any of them means "cannot trace"
        logger.debug("could not trace %s: %s", type(model).__name__, error)
        return None
    nodes = list(graph.nodes)  # topological order
    weight = {node: int(node.op == "call_module" and node.target in owners) for node in nodes}
    before: dict = {}
    for node in nodes:
        before[node] = max((before[parent] + weight[parent] for parent in node.all_input_nodes), default=0)
    after: dict = {}
    for node in reversed(nodes):
        after[node] = weight[node] + max((after[user] for user in node.users), default=0)
    registration = {name: index for index, (name, _) in enumerate(model.named_modules())}
    first_calls = {}
    for node in nodes:
        if weight[node] and node.target not in first_calls:
            first_calls[node.target] = node
    return sorted(first_calls, key=lambda name: (before[first_calls[name]], -after[first_calls[name]], registration[name]))


def reorder(shapes: dict, order: list[str]) -> dict:
    """``shapes`` with keys grouped by module in ``order``. A key belongs to its nearest traced
    ancestor (a leaf module owning tensors may hold sub-modules, as torchvision's Swin attention
    holds its ``qkv``); a tensor no traced module owns (a class token on the model itself, an
    auxiliary head the trace never reached) stays right after the key it followed."""
    rank = {name: index for index, name in enumerate(order)}

    def owner_rank(key: str) -> int | None:
        module = module_of(key)
        while module not in rank and module:
            module = module_of(module)
        return rank.get(module)

    ranks, previous = [], -1
    for key in shapes:
        found = owner_rank(key)
        previous = found if found is not None else previous
        ranks.append(previous)
    keyed = sorted(zip(ranks, range(len(ranks)), shapes), key=lambda item: item[:2])
    return {key: shapes[key] for _, _, key in keyed}


def build_source_model(name: str):
    """A torchvision or timm architecture by name (``timm:`` for timm, as elsewhere), built without
    weights (on the meta device where its initialisation allows): tracing needs its structure only."""
    import torch
    import torchvision

    library, _, architecture = name.rpartition(":")
    if library not in ("", "timm", "torchvision"):
        raise CheckpointError(f"source_model {shown(name)}: unknown library {library!r}; use a torchvision name or 'timm:NAME'.")
    use_timm = library == "timm" or (not library and architecture not in torchvision.models.list_models())
    try:
        try:
            with torch.device("meta"):
                return _build(architecture, use_timm)
        except (RuntimeError, NotImplementedError):  # an initialisation that copies data needs real tensors
            return _build(architecture, use_timm)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"source_model {shown(name)} could not be built ({error}). Give a torchvision name "
                              "such as 'regnet_y_400mf' or a timm name such as 'timm:regnety_004'.") from None


def _build(architecture: str, use_timm: bool):
    import timm
    import torchvision

    if use_timm:
        return timm.create_model(architecture, pretrained=False)
    return torchvision.models.get_model(architecture, weights=None)
