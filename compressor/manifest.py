"""The manifest: the small record a stage returns and writes last. Weights never travel through Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "manifest.json"


class ModelRef(BaseModel):
    """A model a stage reads: where it is, and the key that identifies its content for the cache."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Local directory of an HF checkpoint, or a hub id.")
    key: str = Field(description="Content key: a stage key, or a hash of the teacher spec.")
    revision: Optional[str] = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage: str
    kind: str
    key: str
    model_uri: str = Field(description="Directory of the output checkpoint (stage dir / 'model').")
    input_key: Optional[str] = None
    num_params: Optional[int] = None
    bytes: Optional[int] = Field(None, description="Bytes of weights on disk.")
    seconds: Optional[float] = None
    metrics: dict[str, float] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict, description="Stage-specific facts (shapes, bits, ...).")
    mlflow_run_id: Optional[str] = None
    compressor_version: Optional[str] = None
    files: dict[str, int] = Field(
        default_factory=dict,
        description="Bytes of each file of the output model (path inside model_uri); a stage whose files differ is computed again.",
    )

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True))
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls.model_validate_json((Path(directory) / MANIFEST).read_text())
