"""The table of runs that a sweep ends with (SweepSummary, a Hydra callback) and that alexnet-runs
prints for any folder: a row per run with its command-line overrides, validation top-1 and loss,
training images per second and run directory, read from what each run left on disk (results.json,
.hydra/overrides.yaml, checkpoints/, logs/). Reading the files rather than the jobs' return values
lets one table serve every launcher, the submitit jobs on other machines included, and finished
runs of long ago."""

import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback as HydraCallback

RESULTS = "results.json"
DONE = "done"
COLUMNS = ("overrides", "status", "val top-1", "val loss", "img/s", "run directory")


@dataclass
class Row:
    """One run: where it is, the settings it was given, how it ended, and its results.json ({}
    when it has none)."""

    run_dir: Path
    overrides: list[str]
    status: str
    results: dict = field(default_factory=dict)


def saved_step(run_dir: Path) -> int | None:
    """The global step of the run's newest checkpoint (checkpoints/step-<step>.ckpt), or None."""
    steps = [
        int(m.group(1)) for p in (run_dir / "checkpoints").glob("step-*.ckpt") if (m := re.search(r"(\d+)", p.name))
    ]
    return max(steps, default=None)


def read_row(run_dir: Path) -> Row:
    """What `run_dir` shows of its run. Without results.json the run did not finish: it was
    stopped (preempted, killed, or failed after its first checkpoint; running it again resumes
    there) or it failed before saving anything."""
    results, status = {}, DONE
    try:
        results = json.loads((run_dir / RESULTS).read_text())
        if not isinstance(results, dict):
            results, status = {}, f"unreadable {RESULTS} (not an object)"
    except FileNotFoundError:
        step = saved_step(run_dir)
        status = "failed" if step is None else f"stopped, saved at step {step}"
    except (OSError, ValueError) as exc:
        status = f"unreadable {RESULTS} ({type(exc).__name__})"
    overrides = results.get("overrides")
    if overrides is None:  # a run of an older version, or one that did not finish: Hydra's copy
        try:
            overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        except (OSError, yaml.YAMLError):
            overrides = []
    return Row(run_dir, [str(o) for o in overrides], status, results)


def finished_runs(folder: Path) -> list[Row]:
    """Every run under `folder` (at any depth) that left a results.json, in path order."""
    return [read_row(path.parent) for path in sorted(Path(folder).rglob(RESULTS))]


def sweep_jobs(sweep_dir: Path) -> list[Row]:
    """Every job of a sweep, finished or not: the folders Hydra made for them in `sweep_dir`
    (each holds .hydra/, or results.json), in the jobs' order."""
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / RESULTS).exists())]
    return [
        read_row(p) for p in sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name))
    ]


def common_overrides(rows: list[Row]) -> list[str]:
    """The overrides every row shares (none for a single row, which then shows all of its own)."""
    if len(rows) < 2:
        return []
    return [o for o in rows[0].overrides if all(o in row.overrides for row in rows[1:])]


def cells(row: Row, common: list[str]) -> list[str]:
    r = row.results

    def number(key: str, form: str) -> str:
        return format(r[key], form) if isinstance(r.get(key), int | float) else "-"

    own = " ".join(o for o in row.overrides if o not in common) or "-"
    return [
        own,
        row.status,
        number("val_top1", ".4f"),
        number("val_loss", ".4f"),
        number("train_images_per_sec", ".1f"),
        str(row.run_dir),
    ]


def table(rows: list[Row]) -> str:
    """A Markdown table of `rows` (padded so that it reads as well in a terminal), after one line
    naming the overrides every row shares."""
    common = common_overrides(rows)
    lines = [list(COLUMNS), *(cells(row, common) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]

    def join(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    head = f"{len(rows)} run{'' if len(rows) == 1 else 's'}" + (
        f"; every one with: {' '.join(common)}" if common else ""
    )
    return "\n".join([head, join(lines[0]), join("-" * w for w in widths), *(join(line) for line in lines[1:])]) + "\n"


def top1_curve(row: Row) -> list[tuple[float, float]]:
    """(epochs trained, validation top-1) of every validation of the run's fit, from its CSV logs
    (logs/version_N/metrics.csv, one file per start; a later start's value wins for a step)."""
    per, closing = row.results.get("steps_per_epoch"), row.results.get("global_step")
    points = {}

    def version(path: Path) -> int:  # logs/version_N/metrics.csv, in the order of N
        number = path.parent.name.removeprefix("version_")
        return int(number) if number.isdigit() else -1

    for path in sorted((row.run_dir / "logs").glob("version_*/metrics.csv"), key=version):
        with path.open(newline="") as f:
            for line in csv.DictReader(f):
                if not line.get("val_top1"):
                    continue
                step, epoch = int(float(line["step"])), int(float(line.get("epoch") or 0))
                if step == closing:
                    continue  # the validation after the fit (logged at the final step) repeats the last one
                # The fit logs a validation at the step before the global step it follows.
                points[step] = ((step + 1) / per if per else epoch + 1, float(line["val_top1"]))
    return sorted(points.values())


def sweep_figure(rows: list[Row]):
    """One validation top-1 curve per job, over epochs, labelled with the job's own overrides."""
    from .figures import new_figure  # here: alexnet-runs, which draws nothing, starts without matplotlib

    figure = new_figure(900, 520, layout="constrained")
    axes = figure.subplots()
    common = common_overrides(rows)
    for row in rows:
        points = top1_curve(row)
        if points:
            label = cells(row, common)[0] + ("" if row.status == DONE else f" ({row.status})")
            axes.plot(*zip(*points, strict=True), marker="o", markersize=4, label=label)
    axes.set(title="validation top-1 per job", xlabel="epoch", ylabel="top-1", ylim=(0, 1))
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower right", fontsize="small")
    else:
        axes.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=axes.transAxes)
    return figure


class SweepSummary(HydraCallback):
    """At the end of a multirun (-m, any launcher): prints the table of its jobs and writes it to
    the sweep directory as sweep.md, with sweep.png (each job's validation top-1 over epochs).
    A job that did not finish is a row saying so; the command then ends with one error line and
    exit status 2."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = sweep_jobs(sweep_dir)
        text = f"sweep {sweep_dir}: " + table(rows)
        (sweep_dir / "sweep.md").write_text(text)
        sweep_figure(rows).savefig(sweep_dir / "sweep.png")
        print(text + f"(also in {sweep_dir / 'sweep.md'}, curves in {sweep_dir / 'sweep.png'})", flush=True)
        unfinished = [row for row in rows if row.status != DONE]
        if unfinished:
            # submitit's jobs print into their logs, not into this command's output
            logs = sweep_dir / ".submitit"
            where = f", in its log under {logs}" if logs.is_dir() else ""
            print(
                f"error: {len(unfinished)} of {len(rows)} jobs did not finish "
                f"({', '.join(r.run_dir.name for r in unfinished)}; each one's own output says why{where}); the "
                f"same command with run_id={sweep_dir.name} runs them again, from what they saved",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(2)
