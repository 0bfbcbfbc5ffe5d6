"""The generate stage's options (torch-free: validating a pipeline imports this, never torch).

The teacher answers the prompts of a data source. `teacher` unset: the pipeline's teacher (local weights) through
`backend` hf (transformers, Ray Data actors) or vllm (ray.data.llm); `teacher: openai:MODEL`: any OpenAI-compatible
chat-completions endpoint at `base_url`, the key read from the environment variable named by `api_key_env`."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from compressor.contract.spec import Strict, data_source

API_PREFIX = "openai:"


class Price(Strict):
    """What an API teacher charges, in dollars per million tokens (for `plan` and the logged cost)."""

    input_per_mtok: float = Field(ge=0, description="Dollars per million prompt tokens.")
    output_per_mtok: float = Field(ge=0, description="Dollars per million answer tokens.")


class Filters(Strict):
    """Answers dropped from the dataset (each kind counted in the manifest); the raw answers stay in the store."""

    drop_empty: bool = Field(True, description="Drop answers that are empty or whitespace.")
    drop_truncated: bool = Field(False, description='Drop answers cut by max_new_tokens (finish_reason "length").')
    dedupe: bool = Field(True, description="Drop exact duplicates of a (prompt, answer) pair.")
    accept: Optional[str] = Field(None, description="Keep only answers in which this regular expression matches.")
    labels: Optional[list[str]] = Field(None, description="Keep only answers that are one of these (stripped).")

    @field_validator("accept")
    @classmethod
    def _regex(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"{v!r} is not a regular expression ({exc})") from None
        return v


class GenerateSpec(Strict):
    """The teacher answers the prompts of a data source; the output is a dataset of (prompt, answer) rows."""

    prompts: str = data_source(
        keyed=False,  # keyed by the kind (key_extra): the files' content, an hf: commit
        reads="prompts",
        description="Name of a data source under `data:` with a `messages` (OpenAI chat format) or `prompt` "
        "(+ optional `system`) column, and an optional `id` column.",
    )
    teacher: Optional[str] = Field(
        None, description="Unset: the pipeline's teacher (local weights). `openai:MODEL`: an API teacher."
    )
    backend: Literal["hf", "vllm"] = Field("hf", description="Engine for a local teacher: hf (transformers) or vllm.")
    base_url: Optional[str] = Field(None, description="API teacher: the endpoint, e.g. http://host:8000/v1.")
    api_key_env: Optional[str] = Field(
        None, description="API teacher: NAME of the environment variable holding the key (never the key itself)."
    )
    max_concurrency: int = Field(16, gt=0, description="API teacher: requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="API teacher: seconds before a request is abandoned and retried.")
    max_retries: int = Field(
        6, ge=0, description="API teacher: retries of a request on 429, 5xx, timeouts and dropped connections."
    )
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, gt=0, description="Most tokens per answer.")
    n: int = Field(1, ge=1, description="Answers per prompt.")
    seed: Optional[int] = Field(None, ge=0, description="Sampling seed; default: the pipeline's seed.")
    stop: list[str] = Field(default_factory=list, description="Strings that end an answer (not kept in it).")
    logprobs: Optional[int] = Field(
        None, ge=1, le=20, description="Store the top-k log-probabilities of each answer token (where supported)."
    )
    batch_size: int = Field(8, gt=0, description="hf backend: prompts per `generate` call.")
    commit_every: int = Field(64, gt=0, description="Prompts per committed shard (the unit a re-run resumes from).")
    actors: Optional[int] = Field(
        None,
        gt=0,
        description="Local teacher: Ray Data actors, each with the stage's `resources`; default: as many "
        "as the cluster's free CPUs/GPUs fit.",
    )
    max_failed: float = Field(
        0.01, ge=0, le=1, description="Fraction of prompts that may fail after their retries before the stage fails."
    )
    filters: Filters = Field(default_factory=Filters, description="Answers dropped from the dataset.")
    review_samples: int = Field(50, ge=0, description="Random (prompt, answer) pairs written to review.md.")
    price: Optional[Price] = Field(None, description="API teacher: dollars per million tokens, for plan and MLflow.")
    tokens_per_s: Optional[float] = Field(
        None, gt=0, description="Local teacher: answer tokens/s of one actor, for plan's GPU-hours until measured."
    )

    # How it is run, not what it answers: a re-run with other values resumes from the same committed answers.
    NOT_IN_KEY = frozenset(
        {"api_key_env", "max_concurrency", "timeout_s", "max_retries", "batch_size", "commit_every", "actors"}
        | {"max_failed", "price", "tokens_per_s"}
    )

    @property
    def api_model(self) -> Optional[str]:
        return self.teacher[len(API_PREFIX) :] if self.teacher and self.teacher.startswith(API_PREFIX) else None

    @model_validator(mode="after")
    def _teacher(self):
        if self.teacher is not None and not self.api_model:
            raise ValueError(
                f"teacher: {self.teacher!r}: write `openai:MODEL` for an API teacher, or leave it unset for the "
                "pipeline's teacher"
            )
        if self.api_model and not self.base_url:
            raise ValueError("base_url: an API teacher needs the endpoint (e.g. https://api.openai.com/v1)")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(
                "api_key_env: give the NAME of an environment variable that holds the key, never the key itself"
            )
        return self
