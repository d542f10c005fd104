"""visiontune: fine-tune pretrained image classifiers correctly, quickly, and visibly.

The public API is imported lazily so that ``import visiontune`` (and ``visiontune --help``) stays
fast: torch is only imported when a function that needs it is first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # model building and surgery
    "create_model": "visiontune.model.create",
    "list_models": "visiontune.model.create",
    "resolve_preprocessing": "visiontune.model.create",
    "ModelInfo": "visiontune.model.create",
    "find_head": "visiontune.model.heads",
    "replace_head": "visiontune.model.heads",
    "head_names": "visiontune.model.heads",
    "freeze": "visiontune.model.freeze",
    "layer_groups": "visiontune.model.freeze",
    "LayerGroup": "visiontune.model.freeze",
    "param_groups": "visiontune.model.param_groups",
    "init_weights": "visiontune.model.init",
    # checkpoints
    "load_weights": "visiontune.checkpoint",
    "save_weights": "visiontune.checkpoint",
    "save_model": "visiontune.checkpoint",
    "load_model": "visiontune.checkpoint",
    "LoadReport": "visiontune.checkpoint",
    "read_checkpoint": "visiontune.checkpoint",
    # training
    "TrainConfig": "visiontune.config",
    "train": "visiontune.training.engine",
    "resume": "visiontune.training.engine",
    "TrainResult": "visiontune.training.engine",
    "load_run": "visiontune.run.loaded",
    "LoadedRun": "visiontune.run.loaded",
    # after training
    "export_run": "visiontune.run.export",
    "lr_find": "visiontune.training.lr_finder",
    "select_backbone": "visiontune.training.select",
    "write_report": "visiontune.run.report_html",
    "audit": "visiontune.training.audit",
    "AuditResult": "visiontune.run.audit_report",
    "explain": "visiontune.run.explain",
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
