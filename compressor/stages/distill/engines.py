"""DeepSpeed engines for distillation and the training step the stage runs (also timed by benchmarks/distill.py).

The student is trained under ZeRO 0-3 with a torch AdamW client optimizer (DeepSpeed's CPU AdamW under ZeRO-Offload
on GPUs). The teacher is frozen and, with several
workers, wrapped in its own optimizer-less ZeRO-3 engine, so N workers each hold 1/N of it. The loss runs inside the
student engine's forward, so ZeRO-3 gathers the student's output head when the chunked loss calls it (once per
micro-batch, not per chunk: see deepspeed_config.MAX_REUSE_DISTANCE).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from compressor.stages.distill.deepspeed_config import effective_zero_stage, student_config, teacher_config
from compressor.stages.distill.layout import FeaturePair, feature_pairs
from compressor.stages.distill.loss import LossTerms, Outputs, distill_loss
from compressor.stages.distill.spec import DistillSpec


def prepare_deepspeed_env() -> None:
    """Call before importing deepspeed in a process: pick the accelerator and skip the CPU JIT build."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  (after DS_ACCELERATOR)

    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce (about a minute, needs a compiler) on the
        # first initialize. gloo does the same job, so skip the build: this keeps CPU runs from stalling.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # torch 2.13 deprecates the reduce_scatter_tensor call ZeRO makes every step; one warning per step is noise.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def use_bf16(spec: DistillSpec) -> bool:
    if spec.deepspeed.bf16 is not None:
        return spec.deepspeed.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class StudentWithLoss(torch.nn.Module):
    """The student and the projectors of its feature terms, whose forward returns the distillation loss against given
    teacher outputs. One module, so that one DeepSpeed engine (ZeRO-3 included) trains, shards and checkpoints both;
    the exported model is the `student` submodule alone (train.export_student)."""

    def __init__(self, student, teacher_head, spec: DistillSpec, features: list[FeaturePair], teacher_width: int):
        super().__init__()
        self.student = student
        self.spec = spec
        self.features = features
        width = student.config.hidden_size
        # A learned linear map (student width -> teacher width) per hidden-state term whose widths differ.
        self.projectors = torch.nn.ModuleDict(
            {
                pair.name: torch.nn.Linear(width, teacher_width, bias=False)
                for pair in features
                if pair.kind != "attention_mse" and width != teacher_width
            }
        )
        # A plain attribute, not a submodule: the teacher's weights must not join the student's optimizer.
        self.__dict__["teacher_head"] = teacher_head

    def forward(
        self,
        tokens: torch.Tensor,
        teacher_outputs,
        sparse: Optional[dict] = None,
        positions=None,
        loss_mask=None,
        soft_mask=None,
    ) -> LossTerms:
        """`positions` and `loss_mask` come with packed chat data (compressor.chat_data), `soft_mask` with an API
        teacher's log-probabilities (compressor.soft_labels)."""
        from compressor.chat_data import packed_inputs, target_mask

        if self.spec.black_box:  # no teacher logits: CE on the answers, KD on the API's top log-probs
            return self._black_box_loss(tokens, sparse, positions, loss_mask, soft_mask)
        if sparse is not None:  # teacher targets (loss.targets): no teacher outputs, no feature terms
            return self._sparse_loss(tokens, sparse)
        hidden, attentions = wanted_outputs(self.spec, self.features)
        out = self.student.base_model(
            input_ids=tokens,
            output_hidden_states=hidden,
            output_attentions=attentions,
            use_cache=False,
            **packed_inputs(self.student, positions),
        )
        states = Outputs(out.hidden_states if hidden else (out.last_hidden_state,), out.attentions)
        head = self.student.get_output_embeddings()
        return distill_loss(
            states,
            teacher_outputs,
            tokens,
            head,
            self.teacher_head,
            self.spec.loss,
            self.features,
            self.projectors,
            loss_mask=None if loss_mask is None else target_mask(loss_mask),
        )

    def _sparse_loss(self, tokens: torch.Tensor, sparse: dict) -> LossTerms:
        from compressor.stages.distill.sparse_loss import sparse_kd_loss

        hidden = self.student.base_model(input_ids=tokens, use_cache=False).last_hidden_state
        width = hidden.shape[-1]
        # positions 0..L-2 predict tokens 1..L-1; the teacher's targets at position p are its next-token distribution
        flat = {name: t[:, :-1].reshape(-1, *t.shape[2:]) for name, t in sparse.items()}
        loss, kd, ce = sparse_kd_loss(
            hidden[:, :-1].reshape(-1, width),
            flat,
            tokens[:, 1:].reshape(-1),
            self.student.get_output_embeddings(),
            self.spec.loss,
            self.spec.loss.targets.kind,
        )
        zero = torch.zeros((), device=loss.device)
        return LossTerms(loss, kd, ce, zero, zero)

    def _black_box_loss(self, tokens, sparse, positions, loss_mask, soft_mask) -> LossTerms:
        from compressor.chat_data import packed_inputs, target_mask
        from compressor.stages.distill.sparse_loss import black_box_loss

        hidden = self.student.base_model(
            input_ids=tokens, use_cache=False, **packed_inputs(self.student, positions)
        ).last_hidden_state
        # positions 0..L-2 predict tokens 1..L-1; only those predicting an answer token count (all, for plain text)
        keep = (target_mask(loss_mask) if loss_mask is not None else torch.ones_like(tokens, dtype=torch.bool))[:, :-1]
        soft = target_mask(soft_mask)[:, :-1][keep] if soft_mask is not None and sparse is not None else None
        loss, kd, ce = black_box_loss(
            hidden[:, :-1][keep],
            tokens[:, 1:][keep],
            self.student.get_output_embeddings(),
            self.spec.loss,
            {name: t[:, :-1][keep] for name, t in sparse.items()} if soft is not None else None,
            soft,
        )
        zero = torch.zeros((), device=loss.device)
        return LossTerms(loss, kd, ce, zero, zero)

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: the student's, and the projectors' with their own peak lr (train_step scales the schedule)."""
        groups = [{"params": list(self.student.parameters())}]
        if len(self.projectors):
            scale = (self.spec.loss.projector_lr or self.spec.lr) / self.spec.lr
            groups.append({"params": list(self.projectors.parameters()), "lr_scale": scale})
        return groups


def wanted_outputs(spec: DistillSpec, features: list[FeaturePair]) -> tuple[bool, bool]:
    """(all hidden states, attention maps): what the loss reads beyond the final hidden states."""
    hidden = bool(spec.loss.hidden_mse) or any(p.kind != "attention_mse" for p in features)
    return hidden, any(p.kind == "attention_mse" for p in features)


class TeacherStates(torch.nn.Module):
    def __init__(self, teacher, hidden: bool, attentions: bool):
        super().__init__()
        self.teacher = teacher
        self.hidden, self.attentions = hidden, attentions

    def forward(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> Outputs:
        from compressor.chat_data import packed_inputs

        out = self.teacher.base_model(
            input_ids=tokens,
            output_hidden_states=self.hidden,
            output_attentions=self.attentions,
            use_cache=False,
            **packed_inputs(self.teacher, positions),
        )
        return Outputs(out.hidden_states if self.hidden else (out.last_hidden_state,), out.attentions)


@dataclass
class Engines:
    student: deepspeed.DeepSpeedEngine  # noqa: F821  (wraps StudentWithLoss)
    teacher: Optional[torch.nn.Module]  # TeacherStates, in a ZeRO-3 engine with several workers; None with targets
    device: torch.device
    bf16: bool
    zero_stage: int  # the student's ZeRO stage as run (see effective_zero_stage)

    @property
    def student_model(self):
        return self.student.module.student


def build_engines(
    spec: DistillSpec, student_path: str, teacher_path: str, world_size: int, micro_batch: int, grad_accum: int
) -> Engines:
    """Load both models and wrap them in DeepSpeed engines (torch.distributed must already be initialised or
    RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set)."""
    prepare_deepspeed_env()
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from compressor import remote_code

    bf16 = use_bf16(spec)
    dtype = torch.bfloat16 if bf16 else torch.float32
    trust = remote_code.enabled()  # off unless the pipeline sets teacher.trust_remote_code
    student_shape = AutoConfig.from_pretrained(student_path, trust_remote_code=trust)
    teacher_shape = AutoConfig.from_pretrained(teacher_path, trust_remote_code=trust)
    features = feature_pairs(spec.loss, student_shape.num_hidden_layers, teacher_shape.num_hidden_layers)
    hidden, attentions = wanted_outputs(spec, features)
    # Attention maps come only from the eager implementation (SDPA and flash attention never form them).
    attention = {"attn_implementation": "eager"} if attentions else {}
    teacher_states = teacher_head = None
    if spec.loss.targets is None and not spec.black_box:  # targets, black box: the teacher never enters the loop
        teacher_states, teacher_head = build_teacher(teacher_path, dtype, trust, attention, hidden, attentions)
        if world_size > 1:  # shard the frozen teacher: each worker holds 1/N of it
            teacher_states, *_ = deepspeed.initialize(model=teacher_states, config=teacher_config(micro_batch, bf16))
        teacher_states.eval()

    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=dtype, trust_remote_code=trust, **attention)
    if spec.gradient_checkpointing:
        # Each decoder layer keeps only its input and recomputes the rest in backward. Non-reentrant: it works under
        # ZeRO-3's gather hooks and needs no input that requires grad.
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = StudentWithLoss(student, teacher_head, spec, features, teacher_shape.hidden_size)
    model.projectors.to(dtype)
    config = student_config(spec, world_size, micro_batch, grad_accum, bf16, torch.cuda.is_available())
    groups = model.parameter_groups()
    if "optimizer" in config:  # DeepSpeed builds it (ZeRO-Offload)
        student_engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)
    else:
        optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
        student_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    student_engine.train()
    if world_size == 1 and teacher_states is not None:  # no engine placed the unsharded teacher
        teacher_states.to(student_engine.device)
    zero_stage = effective_zero_stage(spec.deepspeed.zero_stage, world_size)
    return Engines(student_engine, teacher_states, student_engine.device, bf16, zero_stage)


def build_teacher(path: str, dtype, trust: bool, attention: dict, hidden: bool, attentions: bool):
    """(TeacherStates, the teacher's output head) of the frozen teacher."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust, **attention)
    teacher = teacher.eval().requires_grad_(False)
    return TeacherStates(teacher, hidden, attentions), teacher.get_output_embeddings()


def lr_at(step: int, spec: DistillSpec, steps: int) -> float:
    """Linear warm-up to `lr`, then cosine down to `min_lr` at the last step (stateless, so resume is exact)."""
    warmup = warmup_steps(spec, steps)
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return spec.min_lr + 0.5 * (spec.lr - spec.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(spec: DistillSpec, steps: int) -> int:
    return spec.warmup_steps if spec.warmup_steps is not None else min(40, steps // 10)


@dataclass
class StepMetrics:
    loss: float
    kd_loss: float
    ce_loss: float
    hidden_mse: float
    feature_loss: float
    grad_norm: Optional[float]


def train_step(engines: Engines, micro_batches: list[torch.Tensor], lr: float) -> StepMetrics:
    """One optimizer step over this worker's micro-batches ([micro, seq_len] token tensors), returning the mean
    loss terms over them (this worker's share; the caller averages across workers if it wants global numbers)."""
    for group in engines.student.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    sums = torch.zeros(5)
    for batch in micro_batches:
        packed = dict(batch) if isinstance(batch, dict) else {}  # chat data: {tokens, loss_mask, positions, ...}
        batch = packed.pop("tokens", batch)
        tokens, sparse = batch if isinstance(batch, tuple) else (batch, packed.pop("sparse", None))
        tokens = tokens.to(engines.device)
        if engines.teacher is None and packed:  # black box on chat data: the answers' CE, the API's soft labels
            packed = {name: t.to(engines.device) for name, t in packed.items()}
            sparse = {name: t.to(engines.device) for name, t in sparse.items()} if sparse is not None else None
            terms = engines.student(tokens, None, sparse, **packed)
        elif sparse is not None or engines.teacher is None:  # teacher targets, or black box on plain text
            sparse = {name: t.to(engines.device) for name, t in sparse.items()} if sparse is not None else None
            terms = engines.student(tokens, None, sparse)
        else:
            packed = {name: t.to(engines.device) for name, t in packed.items()}
            with torch.no_grad():
                teacher_states = engines.teacher(tokens, packed.get("positions"))
            terms = engines.student(tokens, teacher_states, None, **packed)
        engines.student.backward(terms.loss)
        engines.student.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
        sums += torch.stack([t.detach().float().cpu() for t in terms])
    loss, kd, ce, hidden, features = (sums / len(micro_batches)).tolist()
    norm = engines.student.get_global_grad_norm()
    return StepMetrics(loss, kd, ce, hidden, features, float(norm) if norm is not None else None)
