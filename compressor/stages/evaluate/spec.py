"""The evaluate stage's options (torch-free: validating a pipeline imports this, never torch)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from compressor.contract.spec import Strict


class EvaluateSpec(Strict):
    """Evaluate the previous stage's model on the pipeline's tasks (no new model)."""

    tasks: Optional[list[str]] = Field(None, description="Subset of the pipeline's evaluation task names; default all.")
