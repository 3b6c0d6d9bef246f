"""One adapter per pipeline family behind one interface (`base.PipelineAdapter`).

    load_adapter(path, options, device)   the adapter of a model folder, by its pipeline class

The family of each supported `_class_name` is in `engine.models.pipeline_index.FAMILIES`; a new
family is a new module here defining `ADAPTER`, and a line there.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from engine.models.adapters.base import Conditioning, PipelineAdapter, default_device
from engine.run_config import ModelOptions


def load_adapter(path: str | Path, options: ModelOptions | None = None, device=None) -> PipelineAdapter:
    from engine.models.loader import ModelLoadError
    from engine.models.pipeline_index import PipelineError, inspect_pipeline

    options = options or ModelOptions()
    try:
        info = inspect_pipeline(path, drop_t5=options.drop_t5)
        module = importlib.import_module(f"engine.models.adapters.{info.family.adapter}")
        return module.ADAPTER(info, options, device)
    except PipelineError as exc:
        raise ModelLoadError(str(exc)) from None


__all__ = ["Conditioning", "PipelineAdapter", "default_device", "load_adapter"]
