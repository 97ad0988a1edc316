"""launch/gpu-check.sh at toy sizes on the CPU: the commands a lent GPU session will run, each part
bringing back the figures docs/performance.md needs, so that GPU time goes to running, not mending."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def lines(out: Path, part: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{part}.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)  # seven parts, each with its own time limit inside
def test_every_part_of_the_gpu_check_runs_and_reports_its_figures(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "gpu-check.sh"), str(out), "--quick", "--work", str(tmp_path / "work")],
        cwd=tmp_path,  # not the repository: the script finds its own files
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = {s["of"]: s for s in lines(out, "summary")}
    assert done.returncode == 0, [s["error"] for s in summary.values() if not s["ok"]]
    assert list(summary) == ["data", "a", "b", "c", "d", "e", "f"] and all(s["ok"] for s in summary.values())

    assert lines(out, "data") == [{"part": "data", "train": 64, "val": 32}]
    loader = lines(out, "a")
    assert [(x["name"], x["augment"], x["crop"]) for x in loader] == [
        ("loader/dali", "paper", 224),
        ("loader/dali", "modern", 224),
    ]
    assert all(x["images"] == 8 and x["images_per_sec"] > 0 for x in loader)

    model = lines(out, "b")
    assert [(x["name"], x["precision"], x["compile"], x["fuse_norms"], x["channels_last"]) for x in model] == [
        ("model/alexnet2012", "fp32", False, False, True),
        ("model/alexnet_owt", "fp32", False, False, False),
    ]
    assert all(x["images_per_sec"] > 0 and x["tflops"] > 0 for x in model)

    (e2e,) = lines(out, "c")
    assert (e2e["model"], e2e["loader"], e2e["world_size"], e2e["skipped_images"]) == ("alexnet2012", "dali", 1, 0)
    (saved,) = (tmp_path / "work" / "runs").glob("*/alexnet2012/e2e/checkpoints/last.ckpt")
    assert torch.load(saved, weights_only=True)["hyper_parameters"]["fuse_norms"] is True  # compute.fuse_norms=true
    ddp = lines(out, "d")
    assert [(x["what"], x["world_size"], x["loader"]) for x in ddp] == [
        ("one process, gloo", 1, "dali"),
        ("two ranks on one device, gloo", 2, "dali"),
    ]

    bad = {x["case"]: x for x in lines(out, "e")}
    assert not bad["good"]["skipped"] and bad["good"]["delivered_mean_pixel"] > 0
    for case in ("not-a-jpeg", "cut-short"):  # an error from the decoder: skipped and named
        assert bad[case]["skipped"] and f":{case} (cannot decode: " in bad[case]["why"][0]
    assert "garbled" in bad  # libjpeg decodes some garbled scans without an error: reported, not judged
    assert bad["bad_images=error"]["error"].endswith("or set loader.bad_images=skip to skip such images")

    (resume,) = lines(out, "f")
    assert resume["killed_after"].startswith("step-") and resume["steps"][0] == resume["steps"][1] > 0
    # deterministic on the CPU: the killed-and-resumed run is bit-identical to the uninterrupted one
    # (--quick leaves out the second uninterrupted run, which only a GPU can make differ)
    assert resume["uninterrupted_max_abs_diff"] is None and resume["resumed_max_abs_diff"] == 0.0

    (goals,) = lines(out, "goals")  # the goals beside the best figure of each kind
    assert goals["loader_img_s"] == max(x["images_per_sec"] for x in loader if x["augment"] == "paper")
    assert goals["owt_img_s"] == model[1]["images_per_sec"] and goals["end_to_end_img_s"] == (
        e2e["train_images_per_sec"] or None
    )
