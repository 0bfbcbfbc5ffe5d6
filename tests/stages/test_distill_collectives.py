"""Collectives of the distill loop run on the worker's device. On GPUs Ray Train's process group is NCCL, which has
no CPU backend: a CPU tensor there fails at the end of step 1. A gloo group bound to cuda only stands in for it."""

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from compressor.stages.distill import train
from compressor.stages.distill.engines import StepMetrics


@pytest.fixture
def process_group(request):
    """A one-process gloo group with the backend spec given by the test's parameter."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(request.param, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("process_group", ["cuda:gloo"], indirect=True)
def test_a_group_without_a_cpu_backend_refuses_cpu_tensors(process_group):
    with pytest.raises(RuntimeError, match="(?i)no backend"):
        train.mean_over_workers([1.0, 2.0], torch.device("cpu"), 1)


@pytest.mark.parametrize("process_group", ["cpu:gloo"], indirect=True)
def test_the_mean_over_workers_runs_on_the_device_it_is_given(process_group):
    assert train.mean_over_workers([1.0, 3.0], torch.device("cpu"), 1) == [1.0, 3.0]


def test_the_training_loop_reduces_on_the_engines_device(monkeypatch):
    """Whatever device the engines train on (a GPU in production), the loss reduction is handed that device."""
    gpu = torch.device("cuda", 3)
    seen = []

    def reduction(values, device, world):
        seen.append(device)
        return [v / world for v in values]

    monkeypatch.setattr(train, "mean_over_workers", reduction)
    monkeypatch.setattr(train, "train_step", lambda engines, batch, lr: StepMetrics(1.0, 0.5, 2.0, 0.0, 0.0, None))
    spec = SimpleNamespace(
        global_batch=2,
        checkpoint_every=100,
        loss=SimpleNamespace(hidden_mse=[], features=[]),
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=0,
    )
    job = SimpleNamespace(spec=spec, steps=2, seq_len=8, sink=None, progress=None, trace=None)
    data = SimpleNamespace(batch=lambda step: [], trace=lambda *a, **k: None)
    train.train_steps(SimpleNamespace(device=gpu), job, data, 0, rank=1, world=2)
    assert seen == [gpu, gpu]
