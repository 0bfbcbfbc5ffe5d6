"""Keep secrets out of MLflow and the console: passwords and tokens inside URIs, and the values of secret
environment variables (HF_TOKEN, AWS keys, ...) wherever they turn up in text.

`redact(text)` is applied to everything compressor logs to MLflow as text (params, tags, the pipeline YAML) and
to console lines that show URIs or user input. It is conservative: a value is only replaced when it is long
enough to be a secret, so ordinary words and numbers in the output stay readable."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"
# Environment variables whose values are secrets whatever their names say otherwise.
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
    "WANDB_API_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
)
# ... and any variable named like one: *_TOKEN, *_SECRET*, *_PASSWORD, *_API_KEY, *_ACCESS_KEY, *_PRIVATE_KEY.
SECRET_NAME_RE = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY(_ID)?|SECRET_KEY|PRIVATE_KEY|"
    r"CREDENTIALS?)(_|$)",
    re.IGNORECASE,
)
MIN_SECRET_CHARS = 6  # shorter values ("1", "true", "us") are settings, and masking them would garble the output

# scheme://user:password@host, scheme://token@host: the userinfo part of a URI.
_USERINFO_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/\s:@'\"]*)(?::(?P<pw>[^/\s@'\"]*))?@")
# ?token=...&X-Amz-Signature=...: credentials carried as query parameters (presigned URLs, SAS tokens).
_QUERY_RE = re.compile(
    r"(?P<key>[?&](?:token|access_token|api_key|apikey|key|sig|signature|password|secret|"
    r"x-amz-signature|x-amz-credential|x-amz-security-token)=)(?P<value>[^&\s'\"#]+)",
    re.IGNORECASE,
)
# Token formats that are secrets on sight, wherever they come from.
_TOKEN_RES = (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"))

_registered: set[str] = set()


def is_secret_name(name: str) -> bool:
    return name.upper() in SECRET_ENV or bool(SECRET_NAME_RE.search(name))


def register(*values: str) -> None:
    """Also mask these values from now on in this process (e.g. the values of `compressor submit --env`)."""
    _registered.update(v for v in values if v and len(v) >= MIN_SECRET_CHARS)


def secret_values(env: dict[str, str] | None = None) -> set[str]:
    """Values to mask: secret-named environment variables of `env` (default os.environ) and registered values."""
    env = os.environ if env is None else env
    found = {v for k, v in env.items() if is_secret_name(k) and v and len(v) >= MIN_SECRET_CHARS}
    return found | _registered


def redact_uri(text: str) -> str:
    """`http://user:secret@host/x?token=abc` -> `http://user:***@host/x?token=***`; `s3://KEY@bucket` -> `s3://***@bucket`."""

    def userinfo(m: re.Match) -> str:
        if m.group("pw") is not None:
            return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
        return f"{m.group('scheme')}{MASK}@" if m.group("user") else m.group(0)

    text = _USERINFO_RE.sub(userinfo, text)
    return _QUERY_RE.sub(lambda m: m.group("key") + MASK, text)


def redact(text: Any, extra: Iterable[str] = ()) -> str:
    """`text` (made a string) with URI credentials, known token formats and secret values replaced by ***."""
    text = redact_uri(str(text))
    for pattern in _TOKEN_RES:
        text = pattern.sub(MASK, text)
    # Longest first: a secret that contains another is masked whole.
    for value in sorted(
        secret_values() | {v for v in extra if v and len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True
    ):
        text = text.replace(value, MASK)
    return text


def redact_mapping(values: dict[str, Any]) -> dict[str, str]:
    """Each value redacted; a value under a secret-looking key is masked whole."""
    return {k: MASK if is_secret_name(k.rsplit(".", 1)[-1]) else redact(v) for k, v in values.items()}
