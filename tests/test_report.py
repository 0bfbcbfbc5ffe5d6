"""`compressor report | compare | runs` on two finished test-size runs of the tiny pipeline (prune targets 192 and
256, see tests/pipeline_runs.py), read through a real `mlflow server`; and the run summary's stable columns."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from pipeline_runs import MlflowServer, compressor

STAGES = ["prune", "distill", "quantize"]


def test_report_without_a_store_exits_2_with_one_line(tmp_path):
    result = compressor("report", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no MLflow store" in result.stderr
    assert not (tmp_path / "none.db").exists()  # MLflow would have made an empty store


@pytest.fixture(scope="module")
def server(tiny_runs):
    with MlflowServer(tiny_runs.store, tiny_runs.base / "server-report.log") as running:
        yield running, tiny_runs.runs


def _pixels(png: Path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(png)[..., :3]


def _assert_real_plot(png: Path) -> None:
    """Not blank: the image varies, in many colours (axes alone are black on white)."""
    pixels = _pixels(png)
    assert pixels.std() > 0.05, png
    assert len(np.unique(pixels.reshape(-1, 3).round(2), axis=0)) > 20, png


@pytest.mark.slow
def test_report_writes_html_md_and_real_plots_and_logs_them(server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, (run_a, run_b) = server[0].uri, server[1]
    out = tmp_path / "report"
    result = compressor("report", "--tracking-uri", uri, "--out", str(out))  # default: the latest pipeline run
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_b.run_id in result.stdout

    page = (out / "report.html").read_text()
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r"src='([^']*)'", page))
    assert len(re.findall(r"src='data:image/png", page)) == 3 and "<link" not in page
    assert "pass: &gt;= " in page and "(0.8 of teacher" in page  # gate bars and verdicts beside the scores
    for stage in run_b.summary["stages"]:
        assert f"<td>{stage['name']}</td>" in page
    md = (out / "report.md").read_text()
    assert "| quantize | quantize | ran |" in md and "![Score against size](score_vs_size.png)" in md

    for name in ("score_vs_size", "distill_curves", "stage_seconds"):
        _assert_real_plot(out / f"{name}.png")
    # what was plotted: one point per stage plus the teacher, at each model's size and score
    drawn = json.loads((out / "score_vs_size.json").read_text())
    (label,) = drawn
    summary = run_b.summary
    assert sorted(drawn[label]) == ["ref_next.acc", "ref_ppl.bits_per_byte"]  # the gated metrics
    for metric, points in drawn[label].items():
        task, _, name = metric.partition(".")
        assert [p[0] for p in points] == ["teacher", *STAGES]
        assert points[0][2] == pytest.approx(summary["baseline"][task][name])
        for (_, size_mb, value), s in zip(points[1:], summary["stages"]):
            assert value == pytest.approx(s["scores"][task][name]) and size_mb == pytest.approx(s["bytes"] / 1e6)
    curves = json.loads((out / "distill_curves.json").read_text())["distill"]
    assert [step for step, _ in curves["loss"]] == list(range(1, 41))
    assert curves["loss"][-1][1] < curves["loss"][0][1]  # it learned
    lrs = [v for _, v in curves["lr"]]
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=0.05)  # warm-up, cosine decay
    seconds = json.loads((out / "stage_seconds.json").read_text())[label]
    assert seconds == pytest.approx({s["name"]: s["seconds"] for s in summary["stages"]})

    logged = {f.path for f in MlflowClient(uri).list_artifacts(run_b.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/score_vs_size.png"} <= logged

    # a stage directory stands for the run that made it
    stage_dir = _stage_dir(server, run_a)
    result = compressor("report", str(stage_dir), "--tracking-uri", uri, "--out", str(tmp_path / "by_dir"))
    assert result.returncode == 0 and run_a.run_id in result.stdout, result.stderr[-3000:]


def _stage_dir(server, run) -> Path:
    from mlflow.tracking import MlflowClient

    final_model = Path(MlflowClient(server[0].uri).get_run(run.run_id).data.tags["final_model"])
    return next(final_model.parents[1].glob(f"distill-{run.summary['stages'][1]['key'][:12]}"))


@pytest.mark.slow
def test_report_for_an_unknown_run_exits_2_with_one_line(server):
    result = compressor("report", "0123456789abcdef0123456789abcdef", "--tracking-uri", server[0].uri)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such MLflow run" in lines[0]


@pytest.mark.slow
def test_compare_shows_the_prune_target_difference(server, tmp_path):
    uri, (run_a, run_b) = server[0].uri, server[1]
    out = tmp_path / "compare"
    result = compressor("compare", run_a.run_id, run_b.run_id, "--tracking-uri", uri, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if re.match(r"\W*prune\.target\.intermediate_size", line))
    assert re.search(r"192\D+256", row)
    page = (out / "compare.html").read_text()
    assert '<tr class="diff"><td>prune.target.intermediate_size</td><td>192</td><td>256</td></tr>' in page
    assert re.search(r"<td>final/num_params</td><td><b class='best'>[\d.]+M</b></td><td>[\d.]+M</td>", page)
    assert "distill.steps" not in page  # only the settings that differ

    drawn = json.loads((out / "score_vs_size.json").read_text())
    assert len(drawn) == 2  # both runs overlaid in one plot
    (points_a, points_b) = (drawn[label]["ref_ppl.bits_per_byte"] for label in drawn)
    assert points_a[0] == points_b[0]  # the same teacher
    assert points_a[1][1] < points_b[1][1]  # a smaller prune target, a smaller model
    _assert_real_plot(out / "score_vs_size.png")


@pytest.mark.slow
def test_runs_lists_the_pipeline_runs_newest_first(server):
    result = compressor("runs", "--tracking-uri", server[0].uri)
    assert result.returncode == 0, result.stderr[-3000:]
    run_a, run_b = server[1]
    assert 0 <= result.stdout.index(run_b.run_id) < result.stdout.index(run_a.run_id)
    assert "ref_ppl.bits_per_byte" in result.stdout and "(4-bit)" in result.stdout


def _summary_header(stdout: str) -> list[list[str]]:
    """The column titles of the run summary table (two lines: task, metric), cell by cell."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"tiny: [\d.]+s", line.strip()))
    header = lines[start + 2 : next(i for i in range(start, len(lines)) if lines[i].startswith("┡"))]
    return [[cell.strip() for cell in line.strip().strip("┃").split("┃")] for line in header]


@pytest.mark.slow
def test_summary_columns_are_in_the_same_order_in_two_runs(server):
    run_a, run_b = server[1]
    header = _summary_header(run_a.stdout)
    assert header == _summary_header(run_b.stdout)
    tasks = [t for t in header[0] if t]
    assert tasks == sorted(tasks) == ["ref_next", "ref_ppl"]
    assert "(4-bit)" in run_a.stdout  # the quantized model's real parameter count, with its bits
