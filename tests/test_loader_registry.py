"""The loader table (config.LOADERS) is what the settings, loader=auto, the data module and the
benchmark consult: a third loader registered here is picked up by name everywhere and refused in
one line where it cannot run. Also the one reader of DALI index files and the one retry policy."""

import re

import pytest
from helpers.shards import data_module

from alexnet_dist.bench import cli as bench
from alexnet_dist.config import LOADERS, Loader, LoaderEntry, StoreLimits, WdsSettings, make, own_keys
from alexnet_dist.data import shard_index, store, wds
from alexnet_dist.data.manifest import Shard
from alexnet_dist.errors import ConfigError, DataError

built = []  # the modes the third loader was built for


def build(plan, augment, settings, **common):
    """The third loader: the webdataset loader's own build, under another name."""
    built.append(plan.mode)
    return wds.build(plan, augment, settings, **common)


def third(missing=None, reads_http=True) -> LoaderEntry:
    return LoaderEntry(__name__, WdsSettings, "the third loader", reads_http, missing=lambda: missing)


@pytest.fixture
def table():
    """LOADERS, to put loaders into for one test (first, so loader=auto tries them first)."""
    saved = dict(LOADERS)
    built.clear()

    def put(**entries):
        LOADERS.clear()
        LOADERS.update({**entries, **saved})

    yield put
    LOADERS.clear()
    LOADERS.update(saved)


def test_a_registered_loader_is_a_setting_and_built_by_the_data_module(table, synthetic_root):
    with pytest.raises(ConfigError, match=r"^loader.name: Invalid value 'third', expected one of \[auto, dali, wds\]"):
        make(Loader, {"name": "third"})
    table(third=third())
    assert make(Loader, {"name": "third", "workers": 0}).workers == 0 and own_keys("third") == ("workers",)
    dm = data_module(synthetic_root, {"name": "third", "workers": 0}, batch_size=50)
    assert dm.loader_name == "third"
    batch = next(iter(dm.train_dataloader()))
    assert built == ["train"] and batch.images.shape[0] == 50


def test_a_key_of_another_loader_is_ignored_and_a_key_of_none_refused():
    # loader=wds reads loader.workers and ignores DALI's keys, so an experiment may set both
    assert own_keys("wds") == ("workers",) and set(own_keys("dali")) == {"device", "threads", "layout"}
    assert make(Loader, {"name": "wds", "threads": 4}).threads == 4
    with pytest.raises(ConfigError, match=r"^foo: Key 'foo' not in 'Loader'; fix the override"):
        make(Loader, {"name": "wds", "foo": 1})


def test_auto_takes_the_first_loader_that_runs_here_and_a_chosen_one_that_cannot_is_refused(
    table, synthetic_root, capsys
):
    table(third=third())
    assert data_module(synthetic_root, {"name": "auto", "workers": 0}).loader_name == "third"
    table(third=third(missing="it needs a frobnicator, which this machine lacks"))
    passed = data_module(synthetic_root, {"name": "auto", "workers": 0}).loader_name
    assert passed in ("dali", "wds")
    assert "notice: loader=auto uses " in capsys.readouterr().err
    with pytest.raises(ConfigError) as refused:
        data_module(synthetic_root, {"name": "third"})
    assert str(refused.value) == (
        "loader=third but it needs a frobnicator, which this machine lacks, or use loader=auto or loader=dali "
        "or loader=wds"
    )


def test_the_benchmark_measures_a_registered_loader_by_name(table, synthetic_root):
    table(third=third())
    args = bench.parse_args(
        ["loader", "--loader", "third", "--data", str(synthetic_root), "--device", "cpu", "--batch-size", "20"]
        + ["--size", "24", "--steps", "2", "--warmup", "0", "--workers", "0"]
    )
    result = bench.bench_loader(args)
    assert result["name"] == "loader/third" and result["workers"] == 0 and "threads" not in result
    assert result["images"] == 40 and built == ["train"]


def index_file(tmp_path, lines: list[str], count: int | None = None) -> Shard:
    path = tmp_path / "000000.idx"
    path.write_text(shard_index.text(lines))
    return Shard(str(tmp_path / "000000.tar"), str(path), len(lines) if count is None else count)


def test_the_index_reader_gives_each_samples_place_and_key(tmp_path):
    lines = ["jpg 1024 300 a/x.jpg cls 1536 2 a/x.cls", "jpg 2048 10 y.seg.jpg cls 2560 1 y.seg.cls"]
    shard = index_file(tmp_path, lines)
    assert shard_index.read(shard) == lines
    assert [shard_index.entry(line, shard.index) for line in lines] == [(1024, 1538, "a/x"), (2048, 2561, "y")]
    assert shard_index.ends(shard) == (2, lines[-1])
    assert shard_index.ends(index_file(tmp_path, [], 0)) == (0, "")


@pytest.mark.parametrize(
    "text, count, message",
    [
        ("v1.2 1\njpg 1024 x\n", 1, r"not a DALI index file \(a sample's line reads 'jpg 1024 x'\); re-run"),
        ("v1.2 1\njpg 12 3 x.jpg\n", 1, r"not a DALI index file \(a sample's line reads 'jpg 12 3 x.jpg'\)"),
        ("garbage\njpg 1024 3 x.jpg\n", 1, r"not a DALI index file \(no 'v1.2 <count>' first line\); re-run"),
        ("v1.2 2\njpg 1024 3 x.jpg\n", 3, r"lists 1 samples but manifest.json says 3; re-run alexnet-prepare"),
    ],
)
def test_a_bad_index_file_is_one_line_naming_it(tmp_path, text, count, message):
    shard = index_file(tmp_path, [], count)
    (tmp_path / "000000.idx").write_text(text)
    with pytest.raises(DataError, match=rf"^{re.escape(shard.index)}: {message}") as caught:
        for line in shard_index.read(shard):
            shard_index.entry(line, shard.index)
    assert "\n" not in str(caught.value)
    (tmp_path / "000000.idx").unlink()
    with pytest.raises(
        DataError, match=rf"^{re.escape(shard.index)}: DALI index file of {re.escape(shard.tar)} missing; re-run"
    ):
        shard_index.read(shard)


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(store, "_limits", StoreLimits(waits=[0.01, 0.02]))


def attempts(*outcomes):
    """An attempt that fails or returns as `outcomes` say, in turn; `tries` counts the calls."""
    tries = []

    def attempt():
        tries.append(1)
        outcome = outcomes[len(tries) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return attempt, tries


def test_a_transient_failure_is_tried_again_until_it_passes(quick):
    attempt, tries = attempts(store.Transient("x: reset", "reset"), store.Transient("x: reset", "reset"), "data")
    assert store.retry("x", attempt) == "data" and len(tries) == 3


def test_a_final_failure_stops_at_once(quick):
    attempt, tries = attempts(DataError("x: no such file"), "data")
    with pytest.raises(DataError, match="^x: no such file$"):
        store.retry("x", attempt)
    assert len(tries) == 1


def test_the_tries_are_bounded_and_the_last_line_names_the_place_and_why(quick):
    attempt, tries = attempts(*[store.Transient("x: refused", f"refused {i}") for i in range(3)], "late")
    with pytest.raises(store.Unreachable) as caught:
        store.retry("s3://b/x.tar", attempt)
    assert len(tries) == 3
    assert str(caught.value).startswith("s3://b/x.tar: cannot be read (refused 2) after 3 tries over 0 s; check")
    # a first try already made and failed counts as one
    attempt, tries = attempts(*[store.Transient("x: refused", "refused")] * 3)
    with pytest.raises(store.Unreachable, match=r"after 3 tries"):
        store.retry("x", attempt, failed=store.Transient("x: refused", "refused"))
    assert len(tries) == 2
