"""Models have one home: where a model is, what it is, and how it is loaded and saved.

- reference:  the one parser of a reference: `zoo:NAME`, a hub id `ORG/NAME`, a storage URI or a local path
              (the `zoo:` prefix is spelled there alone, for zoo corpora and task sets too);
- config:     a model's config.json, read where it lives, or known offline for validate and plan;
- local:      a model (or only its tokenizer) as a directory on this node;
- io:         load and save models and tokenizers through transformers; perplexity and parameter count;
- hub:        Hugging Face hub snapshots, resolved to a commit and published once per pipeline;
- checkpoint: facts about a checkpoint directory from its safetensors headers (no weights read);
- shapes:     the widths of a Llama / Mistral / Qwen2-style decoder, from its config.json.
- zoo:        the reference models built offline (with their corpora and task sets), as the hub is for hub ids;
              it builds with `io`, and `local` and `config` resolve `zoo:NAME` through it.

torch-free to import: torch and transformers are imported inside the functions that need them."""

from compressor.models.config import offline_config, read_config, shipped_configs
from compressor.models.io import count_params, load_model, load_tokenizer, perplexity, save_checkpoint, save_tokenizer
from compressor.models.local import is_tokenizer_file, materialize, resolve_model, tokenizer_dir
from compressor.models.reference import is_hub_id, is_zoo, zoo_name, zoo_ref
from compressor.models.shapes import Shape

__all__ = [
    "Shape",
    "count_params",
    "is_hub_id",
    "is_tokenizer_file",
    "is_zoo",
    "load_model",
    "load_tokenizer",
    "materialize",
    "offline_config",
    "perplexity",
    "read_config",
    "resolve_model",
    "save_checkpoint",
    "save_tokenizer",
    "shipped_configs",
    "tokenizer_dir",
    "zoo_name",
    "zoo_ref",
]
