"""What a reference to a model (or to a zoo corpus or task) names: the one parser of the forms a user writes.

- `zoo:NAME`: a reference model, corpus or task set of compressor's own zoo, built offline on first use;
- `ORG/NAME` (with a separate `revision`): a Hugging Face hub repository;
- a storage URI (`s3://...`, `gs://...`, told by `storage.is_remote`): a published stage output or snapshot;
- anything else: a local path.

The `zoo:` prefix is spelled here alone: everyone else asks `zoo_name` / `is_zoo` or builds one with `zoo_ref`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

ZOO_PREFIX = "zoo:"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_zoo(text: str) -> bool:
    return text.startswith(ZOO_PREFIX)


def zoo_name(text: str) -> Optional[str]:
    """`zoo:NAME` -> NAME; None for any other reference."""
    return text[len(ZOO_PREFIX) :] if is_zoo(text) else None


def zoo_ref(name: str) -> str:
    """NAME -> `zoo:NAME`."""
    return ZOO_PREFIX + name


def is_hub_id(model: str) -> bool:
    """`ORG/NAME` that is neither a zoo name, a URL nor an existing local path."""
    return (
        bool(REPO_ID.match(model))
        and not is_zoo(model)
        and "://" not in model
        and not Path(model).expanduser().exists()
    )
