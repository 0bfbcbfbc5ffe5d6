"""Pipeline spec: pydantic schema (`schema`), stage specs (`stages`) and YAML loading (`load`).

Nothing in this package imports torch, so `compressor validate` stays fast.
"""
