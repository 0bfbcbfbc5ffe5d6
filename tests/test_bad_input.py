"""The bad-input battery: every kind of bad input a user can give is refused early, the same way.

Each case runs the real CLI in a subprocess and must: exit 2; print exactly one paragraph (one line, "error: ...")
naming the field, flag or file; print no traceback; finish well within a few seconds (20 s is asserted, only to
catch hangs: the real times are printed); leave the case's directory (inputs, storage, --out) byte-identical; and
never import torch (a stand-in `torch` that raises on import is first on the subprocess's path).

Cases cover the pipeline YAML (through `validate`), CLI arguments of every command, model inputs of the
standalone commands (broken copies of the test teacher), data files, and storage (a file where a directory should
be, a read-only and a full filesystem: small tmpfs mounts, skipped with the reason where mounting is not allowed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

HANG_S = 20.0
PIPELINE = textwrap.dedent("""\
    name: battery
    teacher: {model: "zoo:tiny-test"}
    seed: 0
    data:
      calib: {source: "zoo:tiny-test", samples: 8, seq_len: 64}
    evaluation:
      tasks: [{name: ref_ppl, include: "zoo:tiny-test"}, {name: ref_next, include: "zoo:tiny-test"}]
    stages:
      - prune: {target: {intermediate_size: 192}, calibration: calib}
        gate: {ref_next.acc: {min_recovery: 0.5}}
      - quantize: {bits: 4, group_size: 64, calibration: calib}
    """)
PRUNE = ["--target", "intermediate_size=192", "--calibration", "zoo:tiny-test", "--samples", "4", "--seq-len", "32"]


@dataclass
class Env:
    """What a case builds its command from: its own directory, the test teacher, and a storage dir inside."""

    root: Path
    teacher: Path

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    def pipeline(self, text: str = PIPELINE, old: str = "", new: str = "") -> str:
        assert not old or old in text, f"case edits text that is not there: {old!r}"
        path = self.root / "p.yaml"
        path.write_text(text.replace(old, new) if old else text)
        return str(path)

    def validate(self, *edit: str) -> list[str]:
        return ["validate", self.pipeline(PIPELINE, *edit), f"storage={self.storage}"]

    def model(self, change: Callable[[Path], None]) -> str:
        """A copy of the test teacher, broken by `change`."""
        copy = self.root / "model"
        shutil.copytree(self.teacher, copy)
        change(copy)
        return str(copy)

    def file(self, name: str, content: bytes) -> str:
        path = self.root / name
        path.write_bytes(content)
        return str(path)

    def prune(self, model: str | None = None, *extra: str, out: str | None = None) -> list[str]:
        return ["prune", "--model", model or str(self.teacher), "--out", out or str(self.root / "out"), *PRUNE, *extra]

    def mount(self, name: str, options: str) -> Path:
        """A tmpfs at root/name (unmounted by the fixture); skips the case where mounting is not allowed here."""
        point = self.root / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}): storage case not run")
        MOUNTS.append(point)
        return point


MOUNTS: list[Path] = []


def _set_config(**changes) -> Callable[[Path], None]:
    def change(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(changes)
        (model / "config.json").write_text(json.dumps(config))

    return change


def _truncate(model: Path) -> None:
    weights = model / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)


def _drop_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()


def _full_tmpfs(env: Env) -> Path:
    """A 64 KiB tmpfs filled to the last block."""
    point = env.mount("full", "size=64k")
    with open(point / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:  # ENOSPC: full
            pass
    return point


def _under_a_file(env: Env) -> Path:
    blocker = env.root / "a-file"
    blocker.write_text("not a directory\n")
    return blocker / "sub"


# No AWS credentials anywhere botocore looks (environment, files, the instance metadata service).
NO_AWS = {
    "AWS_ACCESS_KEY_ID": None,
    "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SESSION_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/aws/config",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# id -> (command builder, text the error must contain[, environment changes: None removes a variable])
CHAT_ROW = b'{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}\n'
TASKS = 'tasks: [{name: ref_ppl, include: "zoo:tiny-test"}, {name: ref_next, include: "zoo:tiny-test"}]'


def _heldout_task(e: Env, rows: bytes, labels: str = "") -> tuple[str, str]:
    """The pipeline edit that adds an evaluation task `mod` generated from a held-out file with `rows`."""
    path = e.file("heldout.jsonl", rows)
    return TASKS, TASKS[:-1] + f', {{name: mod, data: "{path}"{labels}}}]'


CASES: dict[str, tuple] = {
    # ------------------------------------------------------------------ labelled held-out tasks (validate)
    "heldout-row-without-answer": (
        lambda e: e.validate(*_heldout_task(e, b'{"prompt": "a", "answer": "os"}\n{"prompt": "b"}\n')),
        "heldout.jsonl:2: no `answer`",
    ),
    "heldout-accuracy-gate-without-labels": (
        lambda e: [
            "validate",
            e.pipeline(
                PIPELINE.replace(*_heldout_task(e, b'{"prompt": "a", "answer": "os"}\n')).replace(
                    "ref_next.acc: {min_recovery: 0.5}", "mod.accuracy: {min: 0.5}"
                )
            ),
            f"storage={e.storage}",
        ],
        "stages.0.gate.mod.accuracy: accuracy needs the label set",
    ),
    "distill-chat-without-chat-template": (  # the test teacher's tokenizer has no chat template
        lambda e: e.validate("  - quantize:", "  - distill: {data: calib, chat: {}, steps: 2}\n  - quantize:"),
        "stages.1.distill.chat: the data is rendered with the tokenizer's chat template",
    ),
    "distill-black-box-with-a-teacher-only-loss": (
        lambda e: e.validate(
            "  - quantize:", "  - distill: {data: calib, teacher: none, loss: {kind: gjsd}, steps: 2}\n  - quantize:"
        ),
        "teacher none: loss.kind gjsd needs the teacher's logits",
    ),
    "distill-hard-labels-unknown-source": (
        lambda e: e.validate(
            "  - quantize:",
            '  - distill: {data: calib, chat: {template: "{prompt}"}, hard_labels: {data: nope}, steps: 2}\n'
            "  - quantize:",
        ),
        "hard_labels.data: unknown data source 'nope'",
    ),
    # ------------------------------------------------------------------ pipeline YAML (validate)
    "yaml-syntax": (lambda e: e.validate("stages:\n", "stages: [\n"), "p.yaml:"),
    "yaml-not-a-mapping": (lambda e: ["validate", e.pipeline("- prune\n- quantize\n")], "must be a mapping"),
    "yaml-duplicate-key": (lambda e: e.validate("seed: 0\n", "seed: 0\nseed: 1\n"), "'seed' appears twice"),
    "yaml-python-tag": (
        lambda e: e.validate('teacher: {model: "zoo:tiny-test"}', 'teacher: !!python/object/apply:os.system ["true"]'),
        "p.yaml:2: tag",
    ),
    "yaml-wrong-type": (lambda e: e.validate("samples: 8", "samples: eight"), "p.yaml:5: data.calib.samples"),
    "yaml-unknown-key": (lambda e: e.validate("seed: 0", "sede: 0"), "sede: unknown key"),
    "distill-search-unknown-field": (
        lambda e: e.validate(
            "  - quantize:",
            "  - distill: {data: calib, steps: 4, search: {space: {loss.temprature: [1, 2]}}}\n  - quantize:",
        ),
        "space.loss.temprature: not a field a search can vary (did you mean loss.temperature?)",
    ),
    "yaml-unknown-nested-key": (
        lambda e: e.validate("intermediate_size: 192", "intermediat_size: 192"),
        "stages.0.prune.target.intermediat_size",
    ),
    "yaml-impossible-bits": (lambda e: e.validate("bits: 4", "bits: 3"), "stages.1.quantize.bits"),
    "yaml-awq-3-bits": (
        lambda e: e.validate("bits: 4", "method: awq, bits: 3"),
        "p.yaml:11: stages.1.quantize.bits: AWQ checkpoints are 4-bit",
    ),
    "yaml-gguf-group-size": (
        lambda e: e.validate(
            "bits: 4, group_size: 64, calibration: calib", "method: gguf, quant_type: Q4_0, group_size: 64"
        ),
        "stages.1.quantize.group_size: unknown key",
    ),
    "yaml-gguf-unknown-quant-type": (
        lambda e: e.validate("bits: 4, group_size: 64, calibration: calib", "method: gguf, quant_type: Q3_K_X"),
        "stages.1.quantize.quant_type: 'Q3_K_X' is not a quant type",
    ),
    "yaml-unknown-quantize-method": (
        lambda e: e.validate("bits: 4", "method: exl2, bits: 4"),
        "stages.1.quantize: method: not one of gptq, awq, gguf",
    ),
    "yaml-gguf-k-quant-misaligned": (
        lambda e: e.validate("bits: 4, group_size: 64, calibration: calib", "method: gguf, quant_type: Q4_K_M"),
        "Q4_K_M stores rows in blocks of 256 weights",
    ),
    "yaml-target-larger-than-teacher": (
        lambda e: e.validate("intermediate_size: 192", "intermediate_size: 4096"),
        "stages.0.prune",
    ),
    "yaml-budget-larger-than-teacher": (
        lambda e: e.validate("{intermediate_size: 192}", "{params: 5.0e6}"),
        "prune.target.params: 5,000,000 is more than the source's 1,049,728",
    ),
    "yaml-budget-below-every-shape": (
        lambda e: e.validate("{intermediate_size: 192}", "{params: 0.001}"),
        "the smallest aligned shape has 28,864",  # aligned heads too (issue 23): 2 heads of 32
    ),
    "yaml-budget-conflicting-constraints": (
        lambda e: e.validate("{intermediate_size: 192}", "{params: 0.2, hidden_size: 128, num_layers: 4}"),
        "the smallest aligned shape with hidden_size 128, num_layers 4 has 230,528",  # heads aligned too
    ),
    "yaml-prune-target-and-candidates": (
        lambda e: e.validate("{intermediate_size: 192},", "{intermediate_size: 192}, candidates: [{params: 0.5}],"),
        "stages.0.prune: give either target (one shape or budget) or candidates (a selection), not both",
    ),
    "yaml-prune-empty-candidates": (
        lambda e: e.validate("target: {intermediate_size: 192}", "candidates: [], bar: {max_perplexity_ratio: 1.3}"),
        "stages.0.prune: candidates: empty; list at least one",
    ),
    "yaml-prune-candidate-missing-checkpoint": (
        lambda e: e.validate(
            "target: {intermediate_size: 192}",
            "candidates: [{params: 0.5}, {model: ./no-such-ckpt}], bar: {max_perplexity_ratio: 1.3}",
        ),
        "prune.candidates.1.model: ./no-such-ckpt: no such directory",
    ),
    "yaml-prune-bar-without-candidates": (
        lambda e: e.validate(
            "{intermediate_size: 192},", "{intermediate_size: 192}, bar: {max_perplexity_ratio: 1.3},"
        ),
        "stages.0.prune: bar: a bar selects among candidates; give candidates too, or drop the bar",
    ),
    "yaml-negative-seed": (lambda e: e.validate("seed: 0", "seed: -1"), "p.yaml:3: seed"),
    "yaml-huge-seed": (lambda e: e.validate("seed: 0", "seed: 1e30"), "p.yaml:3: seed: 1e30 is out of range"),
    "yaml-seed-past-32-bits": (lambda e: e.validate("seed: 0", "seed: 4294967296"), "0 <= seed < 2**32"),
    "yaml-teacher-plain-string": (
        lambda e: e.validate('teacher: {model: "zoo:tiny-test"}', "teacher: meta-llama/Llama-3.1-8B"),
        "p.yaml:2: teacher: Input should be a valid dictionary or instance of TeacherSpec; write "
        "`teacher: {model: meta-llama/Llama-3.1-8B}`",
    ),
    "yaml-hub-teacher-not-cached-offline": (
        lambda e: e.validate() + ["teacher.model=meta-llama/Llama-3.1-8B"],
        "teacher.model 'meta-llama/Llama-3.1-8B': not in the local Hugging Face cache",
        {"HF_HOME": "/nonexistent/hf-home", "HF_HUB_CACHE": "/nonexistent/hf-home/hub"},
    ),
    "yaml-no-stages-key": (
        lambda e: ["validate", e.pipeline(PIPELINE.split("stages:")[0]), f"storage={e.storage}"],
        "stages: Field required",
    ),
    "yaml-empty-stages": (
        lambda e: ["validate", e.pipeline(PIPELINE.split("stages:")[0] + "stages: []\n"), f"storage={e.storage}"],
        "at least one stage",
    ),
    "yaml-duplicate-stage-names": (
        lambda e: e.validate("  - quantize:", "    name: x\n  - name: x\n    quantize:"),
        "p.yaml:12: stages.1.name: duplicate stage name 'x'",
    ),
    "yaml-stage-name-dotdot": (
        lambda e: e.validate("  - prune:", "  - name: ../../escape\n    prune:"),
        "p.yaml:9: stages.0.name",
    ),
    "yaml-stage-name-absolute": (
        lambda e: e.validate("  - prune:", "  - name: /etc/escape\n    prune:"),
        "stages.0.name",
    ),
    "yaml-gate-unknown-task": (
        lambda e: e.validate("ref_next.acc:", "ref_nxt.acc:"),
        "p.yaml:10: stages.0.gate.ref_nxt.acc: no evaluation task",
    ),
    "yaml-gate-unknown-metric": (lambda e: e.validate("ref_next.acc:", "ref_next.bleu:"), "p.yaml:10: stages.0.gate"),
    "yaml-unknown-calibration": (
        lambda e: e.validate("calibration: calib}\n", "calibration: calbi}\n"),
        "p.yaml:9: stages.0.prune.calibration: unknown data source 'calbi'",
    ),
    "yaml-missing-teacher-dir": (
        lambda e: e.validate('"zoo:tiny-test"}\nseed', "./no/such/model}\nseed"),
        "teacher.model",
    ),
    "pipeline-file-missing": (lambda e: ["validate", str(e.root / "nope.yaml")], "nope.yaml: no such file"),
    # ------------------------------------------------------------------ CLI arguments
    "override-without-equals": (lambda e: ["validate", e.pipeline(), "seed"], "override 'seed'"),
    "override-unknown-stage": (
        lambda e: ["validate", e.pipeline(), "stages.distill.steps=3"],
        "no stage named 'distill'",
    ),
    "override-wrong-type": (lambda e: ["validate", e.pipeline(), "seed=abc"], "override seed=abc: seed"),
    # an override's error names the override, not the file line it replaced; every way of addressing a field
    "override-wrong-type-nested": (
        lambda e: e.validate() + ["data.calib.samples=many"],
        "override data.calib.samples=many: data.calib.samples",
    ),
    "override-wrong-type-stage-index": (
        lambda e: e.validate() + ["stages.0.prune.samples=x"],
        "override stages.0.prune.samples=x: stages.0.prune.samples",
    ),
    "override-wrong-type-stage-kind": (
        lambda e: e.validate() + ["stages.quantize.bits=four"],
        "override stages.quantize.bits=four: stages.1.quantize.bits",
    ),
    "override-wrong-type-list-entry-by-name": (
        lambda e: e.validate() + ["evaluation.tasks.ref_ppl.num_fewshot=x"],
        "override evaluation.tasks.ref_ppl.num_fewshot=x: evaluation.tasks.0.num_fewshot",
    ),
    "override-wrong-type-whole-stage": (
        lambda e: e.validate() + ["stages.prune=5"],
        "override stages.prune=5: stages.0.prune",
    ),
    "override-float-text": (
        lambda e: e.validate() + ["stages.prune.samples=1e3"],
        "override stages.prune.samples=1e3: stages.0.prune.samples: Input should be a valid integer, unable to "
        "parse string as an integer (YAML reads 1e3 as text",
    ),
    "override-empty-stage": (lambda e: e.validate() + ["stages.quantize="], "override stages.quantize=: stages.1"),
    "override-empty-mapping-stage": (
        lambda e: e.validate() + ["stages.prune={}"],
        "override stages.prune={}: stages.0.prune.target: Field required",
    ),
    "override-empty-index": (lambda e: e.validate() + ["stages.0="], "override stages.0=: stages.0"),
    "override-empty-unknown-stage": (lambda e: e.validate() + ["stages.X="], "no stage named 'X'"),
    "override-no-key": (lambda e: e.validate() + ["=5"], "override '=5': no KEY before '='"),
    "override-empty-part": (lambda e: e.validate() + ["stages..bits=4"], "an empty part in the key 'stages..bits'"),
    "override-index-past-end": (lambda e: e.validate() + ["stages.5.prune.samples=1"], "index 5 is past the end"),
    "override-into-a-scalar": (lambda e: e.validate() + ["seed.x=1"], "override seed.x: seed is not a mapping"),
    "run-unknown-flag": (lambda e: ["run", e.pipeline(), "--frobnicate"], "--frobnicate"),
    "unknown-command": (lambda e: ["frobnicate"], "No such command 'frobnicate'"),
    "plan-mfu-out-of-range": (lambda e: ["plan", e.pipeline(), "--mfu", "2"], "--mfu"),
    "prune-missing-model-flag": (lambda e: ["prune", "--out", str(e.root / "out")], "--model"),
    "prune-keep-and-drop-layers": (
        lambda e: e.prune(None, "--target", "keep_layers=[0,1],drop_layers=[2]"),
        "give only one of num_layers, keep_layers, drop_layers",
    ),
    "prune-bad-target": (
        lambda e: ["prune", "--model", str(e.teacher), "--out", str(e.root / "out"), "--target", "hidden=64"],
        "--target: unknown key 'hidden'",
    ),
    "distill-steps-and-tokens": (
        lambda e: [
            "distill",
            "--teacher",
            str(e.teacher),
            "--model",
            str(e.teacher),
            "--out",
            str(e.root / "out"),
            "--steps",
            "3",
            "--tokens",
            "1e6",
        ],
        "`--steps` and `--tokens`",
    ),
    "quantize-bits": (
        lambda e: [
            "quantize",
            "--model",
            str(e.teacher),
            "--out",
            str(e.root / "out"),
            "--bits",
            "3",
            "--calibration",
            "zoo:tiny-test",
        ],
        "--bits",
    ),
    "eval-batch-size": (lambda e: ["eval", "--model", str(e.teacher), "--batch-size", "zero"], "--batch-size"),
    "submit-malformed-env": (
        lambda e: [
            "submit",
            e.pipeline(),
            "--env",
            "HF_TOKEN:hf_notshown",
            "--working-dir",
            str(e.root),
            "--address",
            "http://127.0.0.1:1",
        ],
        "--env number 1",
    ),
    "submit-no-address": (lambda e: ["submit", e.pipeline(), "--working-dir", str(e.root)], "--address"),
    "jobs-status-bad-address": (lambda e: ["jobs", "status", "x", "--address", "127.0.0.1:8265"], "--address"),
    "zoo-unknown-model": (lambda e: ["zoo", "build", "no-such-zoo-model"], "no-such-zoo-model"),
    # ------------------------------------------------------------------ model inputs (standalone commands)
    "model-truncated-safetensors": (lambda e: e.prune(e.model(_truncate)), "model.safetensors: truncated"),
    "model-no-tokenizer": (lambda e: e.prune(e.model(_drop_tokenizer)), "no tokenizer"),
    "model-unknown-architecture": (
        lambda e: e.prune(e.model(_set_config(architectures=["FooForCausalLM"], model_type="foo"))),
        "FooForCausalLM",
    ),
    "model-heads-do-not-divide": (
        lambda e: e.prune(e.model(_set_config(num_key_value_heads=3))),
        "num_key_value_heads 3",
    ),
    "model-config-not-json": (
        lambda e: e.prune(e.model(lambda m: (m / "config.json").write_text("{oops"))),
        "config.json is not valid JSON",
    ),
    "model-needs-remote-code": (
        lambda e: e.prune(e.model(_set_config(auto_map={"AutoModelForCausalLM": "x.Model"}))),
        "trust_remote_code",
    ),
    "model-missing-dir": (lambda e: e.prune(str(e.root / "no-model")), "no-model: no such directory"),
    "quantize-truncated-model": (
        lambda e: [
            "quantize",
            "--model",
            e.model(_truncate),
            "--out",
            str(e.root / "out"),
            "--calibration",
            "zoo:tiny-test",
        ],
        "--model",
    ),
    "distill-teacher-without-tokenizer": (
        lambda e: [
            "distill",
            "--teacher",
            e.model(_drop_tokenizer),
            "--student",
            str(e.teacher),
            "--out",
            str(e.root / "out"),
            "--steps",
            "2",
            "--data",
            "zoo:tiny-test",
        ],
        "--teacher",
    ),
    # ------------------------------------------------------------------ data
    "data-empty-file": (
        lambda e: e.prune(None, "--calibration", e.file("empty.txt", b"")),
        "empty.txt: the file is empty",
    ),
    "data-too-short": (
        lambda e: e.prune(None, "--calibration", e.file("short.txt", b"Too short to calibrate on.\n")),
        "fewer than",
    ),
    "data-jsonl-without-text-field": (
        lambda e: e.prune(None, "--calibration", e.file("rows.jsonl", b'{"body": "some text"}\n' * 50)),
        "no field 'text'",
    ),
    "data-binary-junk": (
        lambda e: e.prune(None, "--calibration", e.file("junk.txt", bytes(range(256)) * 64)),
        "junk.txt: not UTF-8 text",
    ),
    "data-unsupported-type": (
        lambda e: e.prune(None, "--calibration", e.file("data.csv", b"text\nhello\n")),
        "unsupported data file type",
    ),
    "data-missing-file": (lambda e: e.prune(None, "--calibration", str(e.root / "nope.txt")), "nope.txt"),
    "pipeline-data-binary": (
        lambda e: e.validate(
            'source: "zoo:tiny-test", samples', f'source: "{e.file("junk.jsonl", os.urandom(4096))}", samples'
        ),
        "data.calib.source",
    ),
    "pipeline-data-chat-turns": (  # issue 24: trained on as the Python repr of the list, before
        lambda e: e.validate(
            'source: "zoo:tiny-test", samples',
            f'source: "{e.file("chat.jsonl", CHAT_ROW * 50)}", text_field: messages, samples',
        ),
        "chat.jsonl:1: field 'messages' holds chat turns, not text",
    ),
    # ------------------------------------------------------------------ storage
    "storage-under-a-file": (lambda e: ["validate", e.pipeline(), f"storage={_under_a_file(e)}"], "is not a directory"),
    "storage-read-only": (
        lambda e: ["validate", e.pipeline(), f"storage={e.mount('ro', 'ro,size=64k')}"],
        "cannot write there",
    ),
    "storage-full-disk": (lambda e: ["validate", e.pipeline(), f"storage={_full_tmpfs(e)}/store"], "free on"),
    "storage-s3-no-credentials": (
        lambda e: ["validate", e.pipeline(), "storage=s3://bucket/x"],
        "storage s3://bucket/x: no AWS credentials (Unable to locate credentials); set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE",
        NO_AWS,
    ),
    "plan-s3-no-credentials": (
        lambda e: ["plan", e.pipeline(), "--storage", "s3://bucket/x"],
        "storage s3://bucket/x: no AWS credentials",
        NO_AWS,
    ),
    "storage-unknown-fsspec-driver": (
        lambda e: ["validate", e.pipeline(), "storage=nosuchfs://bucket/x"],
        "storage nosuchfs://bucket/x",
    ),
    "out-under-a-file": (lambda e: e.prune(None, out=str(_under_a_file(e))), "--out"),
    "out-not-empty": (lambda e: e.prune(None, out=str(Path(e.file("keep.txt", b"mine")).parent)), "not empty"),
    "out-full-disk": (lambda e: e.prune(None, out=str(_full_tmpfs(e) / "out")), "free on"),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root -> sha256 of its bytes ("dir" for directories)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> Path:
    """A directory with a `torch` that refuses to import: put first on PYTHONPATH, it proves no case loads a model."""
    shim = tmp_path_factory.mktemp("no_torch")
    (shim / "torch").mkdir()
    (shim / "torch" / "__init__.py").write_text("raise ImportError('torch was imported while refusing bad input')\n")
    return shim


@pytest.fixture
def env(tmp_path, tiny_teacher):
    root = tmp_path / "case"
    root.mkdir()
    (root / "storage").mkdir()
    yield Env(root, tiny_teacher)
    while MOUNTS:
        subprocess.run(["umount", str(MOUNTS.pop())], check=False)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_early_in_one_paragraph(case, env, no_torch):
    build, needle, *changes = CASES[case]
    args = build(env)
    before = snapshot(env.root)
    child_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    child_env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(no_torch), os.environ.get("PYTHONPATH", "")]),
    )
    for key, value in (changes[0] if changes else {}).items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "compressor", *args],
        capture_output=True,
        text=True,
        env=child_env,
        cwd=env.root,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    print(f"{case}: {seconds:.2f}s: {result.stderr.strip()}")
    err = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}: {result.stdout[-2000:]}{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr and "torch was imported" not in result.stderr, result.stderr[-3000:]
    assert err.startswith("error: ") and "\n" not in err, f"not one paragraph:\n{result.stderr}"
    assert needle in err, f"{needle!r} not in: {err}"
    assert "hf_notshown" not in result.stdout + result.stderr
    assert seconds < HANG_S, f"{case} took {seconds:.1f}s"
    assert snapshot(env.root) == before, "the case changed files under its directory"


def test_help_lists_every_command():
    from compressor.commands import MODULES

    result = subprocess.run([sys.executable, "-m", "compressor", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    commands = {"run", "validate", "plan", "eval", "prune", "distill", "quantize", "submit", "jobs", "zoo"}
    assert MODULES and all(f" {name} " in result.stdout for name in commands), result.stdout
