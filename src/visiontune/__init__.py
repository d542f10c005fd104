"""visiontune: fine-tune pretrained image classifiers correctly, quickly, and visibly.

The public API is imported lazily so that ``import visiontune`` (and ``visiontune --help``) stays
fast: torch is only imported when a function that needs it is first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # model building and surgery (issue: foundation)
    "create_model": "visiontune.models",
    "list_models": "visiontune.models",
    "resolve_preprocessing": "visiontune.models",
    "ModelInfo": "visiontune.models",
    "find_head": "visiontune.heads",
    "replace_head": "visiontune.heads",
    "head_names": "visiontune.heads",
    "freeze": "visiontune.freeze",
    "layer_groups": "visiontune.freeze",
    "LayerGroup": "visiontune.freeze",
    "param_groups": "visiontune.optim",
    "init_weights": "visiontune.initialization",
    # checkpoints
    "load_weights": "visiontune.checkpoint",
    "save_weights": "visiontune.checkpoint",
    "save_model": "visiontune.checkpoint",
    "load_model": "visiontune.checkpoint",
    "LoadReport": "visiontune.checkpoint",
    "read_checkpoint": "visiontune.checkpoint",
    # training
    "TrainConfig": "visiontune.config",
    "train": "visiontune.engine",
    "resume": "visiontune.engine",
    "TrainResult": "visiontune.engine",
    "load_run": "visiontune.run",
    "LoadedRun": "visiontune.run",
    # after training
    "export_run": "visiontune.export",
    "lr_find": "visiontune.lr_finder",
    "write_report": "visiontune.report_html",
    # errors
    "VisiontuneError": "visiontune.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'visiontune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
