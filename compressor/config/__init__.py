"""The pipeline spec: the pydantic schema of a pipeline YAML (`schema`, one stage-entry key per registered kind; the
kinds' own specs live in their packages, on the bases of compressor/contract/spec.py) and YAML loading with
overrides (`load`).

Nothing in this package imports torch, so `compressor validate` stays fast.
"""
