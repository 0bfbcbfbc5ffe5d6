"""The console of `compressor run`: stage rules, one progress line per stage, gate tables and the summary; what
libraries print goes to per-stage log files."""

import io
import logging
import os
import warnings
from pathlib import Path

import pytest

WARNING_TEXT = ("Warning:", "warnings.warn", "FutureWarning", "DeprecationWarning", "INFO ")


def test_captured_output_takes_c_level_python_and_logging_output_and_restores_the_console(tmp_path, capfd):
    from compressor.runner import captured_output

    log = tmp_path / "stage.log"
    with captured_output(log):
        os.write(2, b"from C on fd 2\n")
        os.write(1, b"from C on fd 1\n")
        print("a print")
        warnings.warn("a library warning", FutureWarning)
        logging.getLogger("some.library").warning("a library log line")
    print("after")
    out, err = capfd.readouterr()
    text = log.read_text()
    for line in (
        "from C on fd 2",
        "from C on fd 1",
        "a print",
        "FutureWarning: a library warning",
        "a library log line",
    ):
        assert line in text and line not in out + err
    assert out == "after\n"


def test_driver_progress_without_a_tty_prints_a_line_per_interval_not_per_update():
    from ray.util.queue import Empty
    from rich.console import Console

    from compressor.contract.context import DriverProgress

    class FakeQueue:  # ray.util.queue.Queue's get/get_nowait, fed from a list
        def __init__(self, items):
            self.items = list(items)

        def get(self, timeout=None):
            if not self.items:
                raise Empty
            return self.items.pop(0)

        get_nowait = get

    updates = [("progress", "calibration", i, 500) for i in range(1, 501)] + [("info", "prune: 1 -> 2 parameters")]
    out = io.StringIO()
    polls = iter(range(3))
    DriverProgress(Console(file=out, width=120), "prune", FakeQueue(updates), interval=0.0).wait(
        lambda timeout: next(polls, 2) >= 2
    )
    lines = out.getvalue().splitlines()
    assert "prune: 1 -> 2 parameters" in lines
    assert len(lines) < 10, lines  # not one line per update
    assert any(line.startswith("prune: calibration ") and "/500" in line for line in lines), lines


@pytest.mark.slow
def test_run_console_without_tty_is_short_and_libraries_output_is_in_stage_logs(tiny_runs):
    """The first of the session's shared runs (tests/pipeline_runs.py): `compressor run` without a TTY."""
    first = tiny_runs.runs[0]
    console = first.stdout + first.stderr
    lines = console.splitlines()
    assert len(lines) < 80, console
    for text in WARNING_TEXT:
        assert text not in console, f"{text!r} on the console:\n{console}"
    for stage in ("prune", "distill", "quantize"):
        assert f"{stage}: done in" in console
    assert "gate" in console

    storage = tiny_runs.storage
    logs = {
        s["name"]: (storage / "tiny" / f"{s['name']}-{s['key'][:12]}" / "stage.log").read_text()
        for s in first.summary["stages"]
    }
    assert "INFO:" in logs["quantize"], logs["quantize"][-2000:]  # libraries' logging, e.g. GPTQModel's tokenizer fix
    assert "Loading weights" in logs["prune"]  # transformers' tqdm bar, printed in a Ray worker
    eval_logs = "".join(p.read_text() for p in (storage / "_logs").glob("tiny-evaluate-*.log"))
    assert "Running loglikelihood requests" in eval_logs and "INFO  Kernel" in eval_logs  # lm-eval's, GPTQModel's


def test_teacher_build_without_a_terminal_prints_a_line_per_interval(capsys):
    from compressor.models.zoo.build import _plain_progress

    assert list(_plain_progress(range(4), "training", interval=0.0)) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("zoo: training 4/4, ") and len(lines) == 4
    assert list(_plain_progress(range(1000), "training", interval=60.0)) == list(range(1000))
    assert capsys.readouterr().err == ""  # not one line per step


def test_a_failing_stage_keeps_its_log_where_the_driver_says(tmp_path, monkeypatch, capfd):
    from compressor import contract, runner
    from compressor.contract.context import StageContext
    from compressor.contract.kind import StageKind
    from compressor.manifest import ModelRef
    from compressor.stages.evaluate.spec import EvaluateSpec

    class Broken(StageKind):
        name, spec, summary = "broken", EvaluateSpec, "A stage that fails."
        check = flops = None

        def run(self, spec, model, ctx):
            os.write(2, b"CUDA error from a C library\n")
            raise RuntimeError("the stage broke")

    contract.register(Broken())
    ctx = StageContext(progress_queue=object())  # a pipeline run: the queue to the driver is set
    publish_to = str(tmp_path / "tiny" / "pending" / "broken-0123456789ab")
    try:
        with pytest.raises(RuntimeError, match="the stage broke"):
            runner.execute_stage(
                "broken", "broken", None, ModelRef(path=str(tmp_path), key="dir:x"), ctx, "0" * 64, publish_to
            )
    finally:
        contract.unregister("broken")
    assert "CUDA error from a C library" in Path(runner.failed_log_uri(publish_to)).read_text()
    assert "CUDA error" not in capfd.readouterr().err
    assert not Path(ctx.work_dir).exists()


def test_the_summary_fits_80_columns_with_every_metric_name_whole():
    """issue 24: at 80 columns the one-table summary cut `bits_per…`; it now splits in two tables where it would."""
    from rich.console import Console

    from compressor.commands.pipeline import _summary_tables

    scores = {"ref_next": {"acc": 0.76}, "ref_ppl": {"bits_per_byte": 2.02, "word_perplexity": 123.4}}
    rows = [
        {"name": n, "status": "ran", "num_params": 8.1e6, "bits": 4, "bytes": 5.9e6, "seconds": 12.3}
        | {"scores": scores, "gate_verdict": "passed"}
        for n in ("teacher", "prune", "distill", "quantize")
    ]
    metrics = [("ref_next", "acc"), ("ref_ppl", "bits_per_byte"), ("ref_ppl", "word_perplexity")]
    for width in (80, 250):
        console = Console(width=width, record=True)
        for table in _summary_tables("tiny: 1.0s", rows, metrics, width):
            console.print(table)
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width and "…" not in text
        assert all(name in text for name in ("bits_per_byte", "word_perplexity", "quantize", "8.10M (4-bit)"))
