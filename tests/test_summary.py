"""The table of runs: alexnet-runs over a folder of finished runs, and a sweep's jobs (finished,
stopped, failed) with their validation curves, from files as the runs leave them."""

import json
from pathlib import Path

import pytest
from helpers.tables import markdown_rows

from alexnet_dist.cli.runs import main as alexnet_runs
from alexnet_dist.training.summary import sweep_figure, sweep_jobs, table


def write_run(run_dir: Path, overrides: list[str], **results) -> dict:
    run_dir.mkdir(parents=True)
    results = {"overrides": overrides, "val_top5": 0.9, "epochs": 2, "global_step": 20, **results}
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


def test_alexnet_runs_prints_a_row_per_finished_run_under_the_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["experiment=smoke", "data.root=/data/syn"]
    write_run(Path("runs/a/0"), [*common, "optim.lr=0.01"], val_top1=0.5, val_loss=1.23456, train_images_per_sec=812.3)
    write_run(Path("runs/b"), [*common, "optim.lr=0.1"], val_top1=0.875, val_loss=0.5, train_images_per_sec=1003.0)
    Path("runs/c/checkpoints").mkdir(parents=True)  # a run without results.json: not finished, not listed
    alexnet_runs(["runs"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "2 runs; every one with: experiment=smoke data.root=/data/syn"
    assert markdown_rows(out) == [
        ["overrides", "status", "val top-1", "val loss", "img/s", "run directory"],
        ["optim.lr=0.01", "done", "0.5000", "1.2346", "812.3", "runs/a/0"],
        ["optim.lr=0.1", "done", "0.8750", "0.5000", "1003.0", "runs/b"],
    ]


def test_alexnet_runs_on_a_folder_without_runs_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        alexnet_runs([str(tmp_path)])
    assert stop.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        f"error: {tmp_path}: no finished run under it (no results.json at any depth); a run writes one when it ends\n"
    )


def test_a_sweeps_table_shows_stopped_and_failed_jobs_and_its_picture_one_curve_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", ["optim.lr=0.01"], val_top1=0.6, val_loss=1.0, train_images_per_sec=50.0, steps_per_epoch=10)
    (sweep / "0/logs/version_0").mkdir(parents=True)
    # as the CSVLogger writes them: each epoch's validation at the step before the next, then the
    # closing validation (trainer.validate) at the final step, a repeat of the last
    (sweep / "0/logs/version_0/metrics.csv").write_text(
        "epoch,step,train_loss,val_top1\n0,4,2.0,\n0,9,,0.3\n1,19,,0.6\n2,20,,0.6\n"
    )
    (sweep / "1/.hydra").mkdir(parents=True)
    (sweep / "1/.hydra/overrides.yaml").write_text("- optim.lr=0.1\n")
    (sweep / "1/checkpoints").mkdir()
    (sweep / "1/checkpoints/step-000000015.ckpt").write_bytes(b"")
    (sweep / "1/logs/version_0").mkdir(parents=True)
    (sweep / "1/logs/version_0/metrics.csv").write_text("epoch,step,val_top1\n0,9,0.2\n")
    (sweep / "2/.hydra").mkdir(parents=True)
    (sweep / "2/.hydra/overrides.yaml").write_text("- optim.lr=fast\n")
    rows = sweep_jobs(sweep)
    assert markdown_rows(table(rows))[1:] == [
        ["optim.lr=0.01", "done", "0.6000", "1.0000", "50.0", f"{sweep}/0"],
        ["optim.lr=0.1", "stopped, saved at step 15", "-", "-", "-", f"{sweep}/1"],
        ["optim.lr=fast", "failed", "-", "-", "-", f"{sweep}/2"],
    ]
    axes = sweep_figure(rows).axes[0]
    assert (axes.get_xlabel(), axes.get_ylim()) == ("epoch", (0, 1))
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines] == [
        ("optim.lr=0.01", [1.0, 2.0], [0.3, 0.6]),
        ("optim.lr=0.1 (stopped, saved at step 15)", [1.0], [0.2]),
    ]
