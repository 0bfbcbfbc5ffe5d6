#!/usr/bin/env bash
# The quantize stage's GGUF file in llama.cpp itself, its real client: llama.cpp loads the file, its tokenizer gives
# the HF tokenizer's ids on held-out text, and its perplexity is near the HF model's. Prints one JSON object; exits 1
# when a check fails. The test suite checks the file with transformers' GGUF reader instead (tests/stages/
# test_quantize_gguf.py): llama-cpp-python is a source build (about 20 minutes on 2 cores), too slow for every CI run.
#
#   benchmarks/gguf_llamacpp.sh [WORKDIR]     # env: PYTHON (default .venv), QUANT_TYPE (default Q8_0)
#
# Needs `pip install llama-cpp-python` in that Python. Q8_0 by default: near-lossless, so a perplexity far from the
# HF model's points at the file (layout, rotary permutation, tokenizer), not at the rounding.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
quant_type="${QUANT_TYPE:-Q8_0}"
work="${1:-$(mktemp -d /tmp/gguf-llamacpp.XXXXXX)}"

die() {
    echo "gguf_llamacpp.sh: $*" >&2
    exit 1
}

"$python" -c 'import llama_cpp' 2>/dev/null \
    || die "llama_cpp is not importable by $python; install it with: $python -m pip install llama-cpp-python"
mkdir -p "$work"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$work/q"
"$python" -m compressor quantize --model zoo:tiny-test --out "$work/q" --method gguf --quant-type "$quant_type" \
    >"$work/quantize.log" 2>&1 || die "quantize failed (log: $work/quantize.log)"

"$python" - "$work/q" <<'PY'
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from llama_cpp import Llama

from compressor.models import zoo
from compressor.models import load_model, load_tokenizer

out = Path(sys.argv[1])
gguf = next(out.glob("*.gguf"))
source = zoo.ensure_model("tiny-test")
texts = [p for p in (zoo.corpus_dir("tiny-test") / "heldout.txt").read_text().split("\n\n") if len(p) > 200][:20]
hf_tokenizer, hf_model = load_tokenizer(source), load_model(source).eval()
llm = Llama(model_path=str(gguf), logits_all=True, n_ctx=hf_model.config.max_position_embeddings, verbose=False)

matches, nll_cpp, nll_hf, count = 0, 0.0, 0.0, 0
for text in texts:
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"][: llm.n_ctx()]
    cpp_ids = llm.tokenize(text.encode(), add_bos=False, special=False)[: llm.n_ctx()]
    matches += ids == cpp_ids
    llm.reset()
    llm.eval(ids)
    logits_cpp = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    with torch.no_grad():
        logits_hf = hf_model(input_ids=torch.tensor([ids])).logits[0, :-1].double().numpy()
    for logits, total in ((logits_cpp, "cpp"), (logits_hf, "hf")):
        log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        nll = -log_probs[np.arange(len(ids) - 1), ids[1:]].sum()
        if total == "cpp":
            nll_cpp += nll
        else:
            nll_hf += nll
    count += len(ids) - 1

ppl_cpp, ppl_hf = math.exp(nll_cpp / count), math.exp(nll_hf / count)
report = {
    "gguf": gguf.name,
    "texts": len(texts),
    "tokenizer_matches": f"{matches}/{len(texts)}",
    "perplexity_llamacpp": round(ppl_cpp, 4),
    "perplexity_hf_float": round(ppl_hf, 4),
    "ratio": round(ppl_cpp / ppl_hf, 4),
    "goal": "every tokenization equal; ratio within 1.05 (Q8_0)",
}
print(json.dumps(report, indent=2))
sys.exit(0 if matches == len(texts) and abs(ppl_cpp / ppl_hf - 1) < 0.05 else 1)
PY
