"""The suite's own machinery: the expensive shared runs (test_resume's reference, test_remote's local
runs, test_export's checkpoint, the SLURM cluster's one job at a time) rely on pytest-xdist's
loadgroup keeping each xdist_group on one worker. pytest 9.2 changed node ids so that loadgroup
silently spread the groups again (pytest-xdist issue 1386): this test fails if that comes back."""

import pytest

pytestmark = pytest.mark.xdist_group("canary")


def test_an_xdist_group_is_kept_on_one_worker(request):
    if request.config.getoption("dist", "no") != "loadgroup":
        return  # a plain run (no -n, or another --dist): nothing is grouped
    assert request.node.nodeid.endswith("@canary"), (
        f"{request.node.nodeid}: pytest-xdist's loadgroup did not mark this test's group, so groups run "
        f"on any worker; pin pytest as constraints.txt does (pytest {pytest.__version__} here)"
    )
