import os as _os

__version__ = "0.1.0"

# GPTQModel imports `tokenicer`, which sets HF_HOME and HF_HUB_CACHE to /tmp/tokenicer_hf_home when they are unset:
# after the first GPTQ load, a process (a reused Ray worker, a child process) would look for hub models in an empty
# cache. Pinning the defaults huggingface_hub itself uses keeps every process on the user's cache.
_os.environ.setdefault(
    "HF_HOME", _os.path.join(_os.environ.get("XDG_CACHE_HOME", _os.path.expanduser("~/.cache")), "huggingface")
)
_os.environ.setdefault("HF_HUB_CACHE", _os.path.join(_os.environ["HF_HOME"], "hub"))
