"""The distill stage's options (torch-free: validating a pipeline imports this, never torch)."""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from compressor.contract.spec import Strict, data_source, neutral
from compressor.stages.distill.search_spec import DistillSearch, Range, with_settings

FeatureKind = Literal["hidden_mse", "hidden_cosine", "attention_mse"]


class FeatureTerm(Strict):
    """One intermediate-layer term (TextBrewer / TinyBERT / DistillKit): a student layer pulled towards a teacher
    layer. Where their hidden widths differ, a learned linear projector (student width -> teacher width) is trained
    with the student; it is kept in the distill checkpoint, never in the exported student."""

    student_layer: Optional[int] = Field(
        None, description="0-based decoder layer of the student (with layer_map explicit; else chosen by the map)."
    )
    teacher_layer: Optional[int] = Field(
        None, description="0-based decoder layer of the teacher (with layer_map explicit; else chosen by the map)."
    )
    kind: FeatureKind = Field(
        "hidden_mse",
        description="hidden_mse: MSE of the layers' outputs; hidden_cosine: 1 - cosine similarity per token; "
        "attention_mse: MSE of the attention maps (averaged over heads when the head counts differ; both models "
        "then run eager attention).",
    )
    weight: float = Field(1.0, ge=0, description="Weight of this term in the loss.")


class TargetsSpec(Strict):
    """The teacher's distribution computed once over the distill data and stored sparsely (compressor/targets.py):
    distillation then runs without the teacher, and every student, prune candidate and re-run on the same data and
    teacher reads the same targets."""

    kind: Literal["sampled", "topk"] = Field(
        "sampled",
        description="sampled: k draws from the teacher's distribution at T, kept as ids with counts (unbiased "
        "gradients; Gemma, RS-KD); topk: the k most likely tokens and the tail mass (DistillKit; biased).",
    )
    k: int = Field(64, ge=1, description="Tokens (topk) or draws (sampled) per position; at most the vocabulary.")
    seed: int = Field(0, ge=0, description="Seed of the draws (sampled); part of the targets' key.")
    path: Optional[str] = Field(
        None,
        description="Targets computed elsewhere (a directory or URI holding index.json); they must have been made "
        "with this teacher and this tokenizer. Default: found or computed beside the token shards.",
    )


class KDLoss(Strict):
    """The distillation loss: (1 - alpha) * T^2 * divergence + alpha * CE (+ hidden_weight * hidden-state MSE)
    (+ the weighted feature terms)."""

    kind: Literal["forward_kl", "reverse_kl", "gjsd"] = Field(
        "forward_kl",
        description="forward_kl = KL(teacher || student), mass-covering (Minitron); reverse_kl = KL(student || "
        "teacher), mode-seeking; gjsd = the generalized Jensen-Shannon divergence of TRL's GKD, which `beta` "
        "interpolates between the two.",
    )
    beta: float = neutral(
        0.5,
        ge=0,
        le=1,
        description="gjsd only: beta * KL(teacher || M) + (1 - beta) * KL(student || M) with M = beta * teacher + "
        "(1 - beta) * student (TRL GKD). beta 0 is exactly forward_kl and 1 exactly reverse_kl (as in TRL; the "
        "formula itself tends to 0 at both ends).",
    )
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature T of both models' logits; the KL is scaled by T^2."
    )
    alpha: float = Field(
        0.0, ge=0, le=1, description="Weight of the hard-label CE term (0 = logit-only KD, as Minitron)."
    )
    hidden_mse: list[tuple[int, int]] = Field(
        default_factory=list,
        description="(student_layer, teacher_layer) pairs (0-based decoder layers) whose outputs are pulled together "
        "by MSE; both models need the same hidden_size (else use `features`, which learns projectors).",
    )
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state MSE term.")
    features: list[FeatureTerm] = neutral(
        [],
        description="Intermediate-layer terms: explicit layer pairs, or (with layer_map uniform / last) the kind "
        "and weight of terms on the layers the map picks.",
    )
    layer_map: Literal["explicit", "uniform", "last"] = neutral(
        "explicit",
        description="How `features` find their layers: explicit (each names both layers), uniform (TinyBERT: "
        "student layer i pairs with teacher layer floor(i * N_teacher / N_student), layers counted from 1, so the "
        "last layers pair) or last (the last layers only).",
    )
    projector_lr: Optional[float] = neutral(
        None, gt=0, description="Peak learning rate of the feature projectors (same schedule); default: `lr`."
    )
    chunk_tokens: int = Field(
        1024,
        gt=0,
        description="Tokens per chunk of the KD loss; only one chunk's [tokens, vocab] logits exist at a time.",
    )
    targets: Optional[TargetsSpec] = neutral(
        None,
        description="Distill from teacher targets computed once (no teacher in the training loop); forward_kl or "
        "reverse_kl, with alpha's CE term.",
    )

    @model_validator(mode="after")
    def _targets_need_no_live_teacher(self):
        if self.targets is None:
            return self
        if self.kind == "gjsd":
            raise ValueError("targets: gjsd needs the teacher's whole distribution; use forward_kl or reverse_kl")
        if self.hidden_mse or self.features:
            raise ValueError(
                "targets: hidden-state and feature terms need the live teacher, which targets leave out of the "
                "loop; drop `targets` or the hidden_mse / features terms"
            )
        return self

    @model_validator(mode="after")
    def _layers_match_the_map(self):
        for i, term in enumerate(self.features):
            named = term.student_layer is not None, term.teacher_layer is not None
            if self.layer_map == "explicit" and not all(named):
                raise ValueError(f"features.{i}: give student_layer and teacher_layer (layer_map is explicit)")
            if self.layer_map != "explicit" and any(named):
                raise ValueError(
                    f"features.{i}: layer_map {self.layer_map} chooses the layers; leave out student_layer and "
                    "teacher_layer, or set layer_map: explicit"
                )
        return self


class DeepSpeedOptions(Strict):
    """DeepSpeed settings of the student (the teacher is always a ZeRO-3 inference engine)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        3, description="ZeRO stage of the student: 2 shards gradients and optimizer state, 3 also the weights."
    )
    bf16: Optional[bool] = Field(
        None, description="Train in bf16 (fp32 master weights). Default: on when the GPUs support it, off on CPU."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO-Offload).")
    zero_hpz_partition_size: int = Field(
        1,
        ge=1,
        description="ZeRO++ hierarchical partitioning (ZeRO-3 only): each group of this many consecutive "
        "workers also keeps a copy of the weights split among themselves, so the backward pass all-gathers within "
        "the group. For multi-node GPU runs: set it to the GPUs per node (8); it must divide `workers`.",
    )


class ChatData(Strict):
    """Chat rows as the data (a generate stage's answers, or `messages` / `prompt` + `response` rows): rendered with
    the tokenizer's chat template or `template`, the loss on the answer tokens only, packed whole (docs/task.md)."""

    template: Optional[str] = Field(
        None,
        description="A plain template with a {prompt} placeholder, for a tokenizer without a chat template "
        '(e.g. "{prompt}\\nAnswer: "); the answer follows it, then EOS. Unset: the tokenizer\'s chat template.',
    )
    truncate: Literal["drop", "prompt"] = Field(
        "drop", description="An example longer than seq_len: dropped, or the start of its prompt cut (both counted)."
    )


class HardLabels(Strict):
    """The control of a task distillation: the same student (this stage's input) trained on a labelled set alone,
    CE on its answers, without the teacher, with this stage's settings. The pipeline scores it beside the distilled
    student, and the summary and report show the distillation table: teacher, hard labels, distilled and the
    fraction of the gap recovered, (distilled - hard labels) / (teacher - hard labels)."""

    data: str = data_source(
        keyed=False,  # keyed by the kind (key_extra): the control's data is not the stage's
        reads="chat",
        description="Name of a data source under `data:` of labelled rows: `prompt` or `messages`, with `answer` "
        "(the held-out format) or `response`; e.g. the scarce labelled train split the teacher learned from.",
    )
    steps: Optional[int] = Field(None, gt=0, description="Optimizer steps; default: the distillation's.")


class DistillSpec(Strict):
    """Knowledge distillation from the frozen teacher into the previous stage's output, in Ray Train with DeepSpeed."""

    # A re-run may change these and still resume the same Ray Train run from its checkpoints. `workers` stays in the
    # key: ZeRO checkpoints are sharded per worker and do not load into another world size.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset(
        {
            "max_failures",
            "checkpoint_every",
            "wait_for_resources_s",
            "placement_strategy",
            "cpus_per_worker",
            "max_epochs",
            "gradient_checkpointing",
        }
    )

    data: str = data_source(
        dataset=True,
        description="Name of a data source under `data:`, or of an earlier stage that made a dataset (generate); "
        "tokenized with the teacher's tokenizer.",
    )
    chat: Optional[ChatData] = neutral(
        None, description="The data is chat rows: the loss on the answer tokens only (docs/task.md)."
    )
    teacher: Optional[str] = Field(
        None,
        description="Teacher model (directory or hub id); default: the pipeline teacher. `none` (or an API teacher, "
        "`openai:MODEL`): black-box, no teacher logits: CE on the data's answers (sequence-level distillation), "
        "plus a sparse KD term on the top_logprobs a generate stage stored, where there are any (docs/task.md).",
    )
    steps: Optional[int] = Field(None, gt=0, description="Optimizer steps to train (give this or `tokens`).")
    tokens: Optional[float] = Field(
        None,
        gt=0,
        description="Token budget; steps = ceil(tokens / (global_batch * seq_len)), "
        "so at least this many tokens are trained.",
    )
    seq_len: Optional[int] = Field(
        None, gt=0, description="Tokens per packed sequence; default: the data source's seq_len."
    )
    max_epochs: float = Field(
        1.0,
        ge=1.0,
        description="How many times the run may see its data. With the default 1, a budget larger than "
        "the source is refused before training (exit 2, naming both numbers); e.g. 3 lets each sequence come up to "
        "3 times (a new seeded order each epoch).",
    )
    global_batch: int = Field(8, gt=0, description="Sequences per optimizer step, across all workers.")
    micro_batch: int = Field(
        4,
        gt=0,
        description="Sequences per worker per forward pass (at most global_batch / workers); the rest is gradient accumulation.",
    )
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW), reached after the warm-up.")
    min_lr: float = Field(1e-5, ge=0, description="Learning rate at the last step, after the cosine decay.")
    warmup_steps: Optional[int] = Field(
        None, ge=0, description="Linear warm-up steps; default: 10% of the steps, at most 40 (Minitron's value)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = no clipping).")
    loss: KDLoss = Field(default_factory=KDLoss, description="The loss.")
    deepspeed: DeepSpeedOptions = Field(default_factory=DeepSpeedOptions, description="DeepSpeed settings.")
    workers: int = Field(1, gt=0, description="Ray Train workers (one process each; one GPU each on GPU clusters).")
    gpus_per_worker: float = Field(
        0, ge=0, description="GPUs per worker; > 0 trains on GPU with NCCL, 0 on CPU with gloo."
    )
    cpus_per_worker: float = Field(1, gt=0, description="CPUs per worker (also its torch thread count on CPU).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers on nodes (STRICT_SPREAD: one worker per node)."
    )
    wait_for_resources_s: float = Field(
        0,
        ge=0,
        description="When the Ray cluster cannot place the workers yet, ask its autoscaler for them and wait up to "
        "this many seconds, with a progress line every 30 s (0 = refuse at once; autoscaling clusters: e.g. 1800).",
    )
    checkpoint_every: int = Field(50, gt=0, description="Steps between DeepSpeed checkpoints reported to Ray Train.")
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts (from the last checkpoint) before the stage fails."
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the student's decoder layers in the backward pass instead of keeping their "
        "activations: about 1/3 more student compute for far less activation memory (longer seq_len or micro_batch).",
    )
    hard_labels: Optional[HardLabels] = neutral(
        None,
        description="Also train the same student on labelled data alone (the control), scored beside the distilled "
        "one: the distillation table in the summary and the report (docs/task.md).",
    )
    search: Optional[DistillSearch] = neutral(
        None,
        description="Search loss / optimizer settings first with short trials (Ray Tune), then train with the best "
        "(docs/stages/distill.md).",
    )

    @model_validator(mode="after")
    def _searched_values_are_valid(self):
        """Every value a search may try passes this spec's own checks, named as in the YAML (search.space.FIELD)."""
        if self.search is None:
            return self
        from pydantic import ValidationError

        if self.chat is not None:
            raise ValueError(
                "search: trials are scored by the LM loss of plain-text validation sequences, which chat data (its "
                "loss on the answers only) does not have yet; drop `search` or `chat`"
            )
        base = self.model_dump(exclude={"search"})
        for name, values in self.search.space.items():
            for value in [values.low, values.high] if isinstance(values, Range) else values:
                try:
                    type(self).model_validate(with_settings(base, {name: value}))
                except ValidationError as exc:
                    first = exc.errors()[0]
                    raise ValueError(
                        f"search.space.{name}: {value!r}: {first['msg'].removeprefix('Value error, ')}"
                    ) from None
        return self

    @model_validator(mode="after")
    def _hierarchical_partitioning(self):
        hpz = self.deepspeed.zero_hpz_partition_size
        if hpz > 1 and self.deepspeed.zero_stage != 3:
            raise ValueError(
                f"deepspeed.zero_hpz_partition_size {hpz} needs deepspeed.zero_stage 3 (it partitions "
                "the weights, which only ZeRO-3 does)"
            )
        if hpz > 1 and self.workers % hpz:
            raise ValueError(
                f"deepspeed.zero_hpz_partition_size {hpz} does not divide workers {self.workers}: the "
                "workers split into groups of that size (the GPUs of one node)"
            )
        return self

    @property
    def black_box(self) -> bool:
        """No teacher logits: `teacher: none`, or an API teacher (whose answers, and log-probs, are the data)."""
        return self.teacher is not None and (self.teacher == "none" or self.teacher.startswith("openai:"))

    @model_validator(mode="after")
    def _black_box_losses(self):
        if not self.black_box:
            return self
        needs = [
            name
            for name, used in (
                ("loss.kind gjsd", self.loss.kind == "gjsd"),
                ("loss.hidden_mse", bool(self.loss.hidden_mse)),
                ("loss.features", bool(self.loss.features)),
                ("loss.targets", self.loss.targets is not None),
            )
            if used
        ]
        if needs:
            raise ValueError(
                f"teacher {self.teacher}: {needs[0]} needs the teacher's logits or layers, which a black-box "
                "teacher does not give; drop it (black-box distillation trains CE on the answers, and KD on the "
                "top_logprobs the generate stage stored)"
            )
        return self

    @model_validator(mode="after")
    def _hard_labels_are_chat_rows(self):
        if self.hard_labels is not None and self.chat is None:
            raise ValueError(
                "hard_labels: the control trains on labelled (prompt, answer) rows with the loss on the answers, "
                "which needs chat data: set `chat: {}` (and distil on chat rows, such as a generate stage's)"
            )
        return self

    @model_validator(mode="after")
    def _chat_with_a_live_teacher(self):
        if self.chat is not None and self.loss.targets is not None:
            raise ValueError(
                "chat: teacher targets are computed over plain token shards, not over packed chat data with its "
                "loss mask; drop `loss.targets` (the teacher runs in the loop) or `chat`"
            )
        return self

    @model_validator(mode="after")
    def _budget(self):
        if self.steps is None and self.tokens is None:
            raise ValueError("give `steps` or `tokens`")
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give only one of `steps` and `tokens`")
        return self
