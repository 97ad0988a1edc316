import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from helpers.shards import WDS, data_module, edit_manifest, encoded, replace_shard, same_batch
from PIL import Image

from alexnet_dist.config import Data, Loader, make
from alexnet_dist.data import sources, wds
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.plan import make_plan
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.data.transforms import Augmentation, center_crop, crop_box, cut_window, draw
from alexnet_dist.data.wds import decode_image, training_view
from alexnet_dist.errors import DataError


def coordinate_image(w=40, h=30):
    """Red = x, green = y: every crop tells where it came from."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.arange(w)[None, :]
    a[..., 1] = np.arange(h)[:, None]
    return Image.fromarray(a)


def test_random_crops_stay_inside_and_flips_mirror():
    rng, augment = random.Random(0), augmentation(crop=24)
    flips, lefts = 0, set()
    for _ in range(200):
        out = np.asarray(cut_window(coordinate_image(), draw(augment, rng, 40, 30)))
        xs, ys = out[0, :, 0].astype(int), out[:, 0, 1].astype(int)
        assert out.shape == (24, 24, 3)
        assert list(ys) == list(range(ys[0], ys[0] + 24)) and 0 <= ys[0] <= 6
        if xs[0] > xs[-1]:  # mirrored: x runs backwards
            flips += 1
            assert list(xs) == list(range(xs[0], xs[0] - 24, -1))
        else:
            assert list(xs) == list(range(xs[0], xs[0] + 24))
        lefts.add(int(min(xs)))
    assert 70 < flips < 130  # p = 0.5
    assert lefts == set(range(0, 17))  # every offset 0..16 occurs


def test_center_crop_takes_the_middle_after_resizing_the_short_side():
    out = np.asarray(center_crop(coordinate_image(40, 30), 20))
    assert out[0, 0, 0] == 10 and out[0, 0, 1] == 5
    assert center_crop(coordinate_image(40, 30), 24, resize=32).size == (24, 24)


def test_greyscale_and_png_decode_to_rgb():
    import io

    for image, fmt in ((Image.new("L", (8, 8), 77), "JPEG"), (Image.new("RGBA", (8, 8), (1, 2, 3, 4)), "PNG")):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        assert decode_image(buf.getvalue(), "x").mode == "RGB"
    with pytest.raises(DataError, match="shard.tar:key7: cannot decode image"):
        decode_image(b"not a jpeg", "shard.tar:key7")


@pytest.fixture(scope="module")
def unique_labels(tmp_path_factory):
    """37 samples, each its own class, so a label identifies a sample; 6 shards."""
    root = tmp_path_factory.mktemp("unique")
    src = sources.synthetic(num_classes=37, train_count=37, val_count=37, size=16)
    write_dataset(src, root, source_name="synthetic", min_shards=6, progress=False)
    return root


def augmentation(**data) -> Augmentation:
    return Augmentation.of(make(Data, {"root": "-", **data}))


def stream(root, split, *, train, rank, world, workers=2, batch=4, seed=0, epoch=0, done=0):
    """The webdataset loader of one rank, built from its plan as the data module builds it."""
    manifest = Manifest.read(root)
    mode = "train" if train else "val"
    plan = make_plan(manifest.shards(split), mode, batch * world, rank, world, seed, "test", partitions=12, window=10)
    settings = make(Loader, {"name": "wds", "workers": workers})
    loader = wds.build(
        plan,
        augmentation(crop=12, val_resize=None),
        settings,
        sample_format=manifest.sample_format,
        classes=manifest.classes,
        position=lambda: (epoch, done),
        device=torch.device("cpu"),
        worker_signals=(),
    )
    return loader, list(loader)


def test_validation_reads_every_sample_exactly_once_across_ranks(unique_labels):
    seen = []
    for rank in range(3):
        loader, batches = stream(unique_labels, "val", train=False, rank=rank, world=3)
        assert len(batches) == len(loader)  # the progress bar's total is right
        seen += [int(y) for batch in batches for y in batch.labels]
    assert sorted(seen) == list(range(37))


def test_training_gives_every_rank_the_same_number_of_full_batches(unique_labels):
    # 37 samples, global batch 12 over 3 ranks: 3 steps per epoch on every rank,
    # although the ranks own 2 shards of unequal size each.
    for rank in range(3):
        loader, batches = stream(unique_labels, "train", train=True, rank=rank, world=3)
        assert len(batches) == len(loader) == 3
        assert all(b.images.shape == (4, 3, 12, 12) and b.images.dtype == torch.uint8 for b in batches)


def labels_of(root, **kw):
    return [int(y) for batch in stream(root, "train", train=True, rank=0, world=1, **kw)[1] for y in batch.labels]


def test_same_seed_same_batches_other_seed_or_epoch_different(unique_labels):
    first = labels_of(unique_labels, seed=1)
    assert first == labels_of(unique_labels, seed=1)
    assert first != labels_of(unique_labels, seed=2)
    assert first != labels_of(unique_labels, seed=1, epoch=1)


def test_out_of_range_label_names_shard_and_key(tmp_path):
    write_dataset(sources.synthetic(5, 20, 10, 16), tmp_path, source_name="synthetic", min_shards=2, progress=False)
    edit_manifest(tmp_path, lambda m: m.update(classes=m["classes"][:3]))  # the shards hold labels 0..4
    dm = data_module(tmp_path, {"name": "wds"}, batch_size=4, crop=12)
    with pytest.raises(DataError, match=r"val/00000[01].tar:val-\d+: label [34] is outside 0..2"):
        list(dm.val_dataloader())


def test_datamodule_normalises_on_the_device_and_checks_batch_division(synthetic_root):
    dm = data_module(synthetic_root, WDS, batch_size=32, crop=28)
    images, labels = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert images.dtype == torch.float32 and abs(images.mean().item()) < 0.2 and 0.7 < images.std().item() < 1.3
    assert dm.steps_per_epoch() == 2000 // 32


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_a_resumed_pass_yields_exactly_the_batches_not_yet_trained_on(unique_labels, workers):
    def loader(done):  # epoch 1, `done` batches of it trained on
        manifest = Manifest.read(unique_labels)
        plan = make_plan(manifest.shards("train"), "train", 4, 0, 1, 3, "test", partitions=4)  # 37 samples: 9 steps
        settings = make(Loader, {"name": "wds", "workers": workers})
        return wds.build(
            plan,
            augmentation(crop=12),
            settings,
            sample_format=manifest.sample_format,
            classes=manifest.classes,
            position=lambda: (1, done),
            device=torch.device("cpu"),
            worker_signals=(),
        )

    full = list(loader(0))
    rest = list(loader(5))
    assert len(full) == 9 and len(rest) == 4
    for a, b in zip(full[5:], rest, strict=True):  # same images, same crops and flips
        assert same_batch(a, b)


def test_a_truncated_tar_and_a_count_mismatch_name_the_shard(tmp_path):
    for name in ("truncated", "miscounted"):
        write_dataset(sources.synthetic(3, 24, 12, 16), tmp_path / name, source_name="t", min_shards=2, progress=False)
    tar = tmp_path / "truncated" / "val" / "000000.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    with pytest.raises(  # found at start (check_shard) by the index's last line
        DataError, match=r"val/000000.tar: 3000 bytes but its index lists data up to byte \d+; the tar is truncated"
    ):
        data_module(tmp_path / "truncated", WDS, batch_size=4, crop=12).val_dataloader()

    def one_more(m):
        m["splits"]["val"]["shards"][1]["count"] += 1
        m["splits"]["val"]["count"] += 1

    edit_manifest(tmp_path / "miscounted", one_more)
    dm = data_module(tmp_path / "miscounted", WDS, batch_size=4, crop=12)
    with pytest.raises(DataError, match=r"val/000001.tar: holds 6 samples but manifest.json says 7"):
        list(dm.val_dataloader())


def test_a_sample_without_label_or_with_a_corrupt_jpeg_is_named(tmp_path):
    write_dataset(sources.synthetic(3, 12, 8, 16), tmp_path, source_name="synthetic", min_shards=2, progress=False)
    picture = encoded(Image.new("RGB", (16, 16)))
    cases = [
        ("a", picture, None, r"val/000000.tar:a: sample has no .cls label"),
        ("b", b"\xff\xd8 not really", b"1", r"val/000000.tar:b: cannot decode image .*loader.bad_images=skip"),
    ]
    for key, jpg, cls, expected in cases:
        replace_shard(tmp_path, "val", 0, [(key, jpg, cls)])
        dm = data_module(tmp_path, {**WDS, "bad_images": "error"}, batch_size=4, crop=12)
        with pytest.raises(DataError, match=expected):
            list(dm.val_dataloader())


def test_modern_crops_cover_their_region_and_reduced_decoding_changes_little():
    import io

    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = crop_box(400, 300, rng)
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        assert w * h >= 0.08 * 400 * 300 * 0.95 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    ramp = np.zeros((300, 400, 3), np.uint8)
    ramp[..., 0] = np.linspace(0, 255, 400)[None, :]
    ramp[..., 1] = np.linspace(0, 255, 300)[:, None]
    data = io.BytesIO()
    Image.fromarray(ramp).save(data, format="JPEG", quality=95)
    full = Image.open(io.BytesIO(data.getvalue())).convert("RGB")
    modern = augmentation(crop=64, augment="modern", flip=False)
    for seed in range(20):
        out, _ = training_view(data.getvalue(), modern, random.Random(seed), "x")
        left, top, w, h = crop_box(400, 300, random.Random(seed))
        exact = full.resize((64, 64), Image.BILINEAR, box=(left, top, left + w, top + h))
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
        assert np.abs(out.permute(1, 2, 0).numpy().astype(float) - np.asarray(exact, float)).mean() < 2.0


def test_a_rank_starting_inside_a_shard_seeks_there_by_the_index_and_a_stale_index_is_named(tmp_path):
    """20 samples in shards of 7, 7 and 6: rank 1 of 3 reads samples 6-12, from sample 6 of the
    first shard on, which it reaches through the index file without reading samples 0-5; an
    index that no longer fits its tar is named, not followed into the wrong samples."""
    src = sources.synthetic(num_classes=20, train_count=20, val_count=20, size=16)
    write_dataset(src, tmp_path, source_name="synthetic", min_shards=3, progress=False)
    in_order = []
    for tar in sorted((tmp_path / "val").glob("*.tar")):
        with tarfile.open(tar) as f:
            in_order += [int(f.extractfile(m).read()) for m in f if m.name.endswith(".cls")]
    _, batches = stream(tmp_path, "val", train=False, rank=1, world=3, workers=0, batch=7)
    assert [int(y) for b in batches for y in b.labels] == in_order[6:13]
    index = tmp_path / "val" / "000000.idx"
    header, *lines = index.read_text().splitlines()
    five, six = lines[5].split(), lines[6].split()
    lines[6] = " ".join(six[i] if i % 4 == 3 else five[i] for i in range(len(six)))  # 6's names, 5's offsets
    index.write_text("\n".join([header, *lines]) + "\n")
    with pytest.raises(DataError, match=r"val/000000.tar: its index file says sample 6 is .*; re-run alexnet-prepare"):
        stream(tmp_path, "val", train=False, rank=1, world=3, workers=0, batch=7)


def test_a_garbled_index_line_where_a_rank_starts_is_named_not_the_tar(tmp_path):
    """Rank 1 of 3 seeks through sample 6's index line (see above): cut to 3 fields it was an
    IndexError traceback from a loader worker; a word that is no number blamed the tar."""
    src = sources.synthetic(num_classes=20, train_count=20, val_count=20, size=16)
    write_dataset(src, tmp_path, source_name="synthetic", min_shards=3, progress=False)
    index = tmp_path / "val" / "000000.idx"
    header, *lines = index.read_text().splitlines()
    for garbled in (" ".join(lines[6].split()[:3]), lines[6].replace(lines[6].split()[1], "x1", 1)):
        index.write_text("\n".join([header, *lines[:6], garbled, *lines[7:]]) + "\n")
        with pytest.raises(DataError, match=rf"^{index}: not a DALI index file \(a sample's line reads"):
            stream(tmp_path, "val", train=False, rank=1, world=3, workers=0, batch=7)


# A DALI pipeline in a reference cycle, left to the cycle collector, then the webdataset loader
# with two forked workers that collect at once (as they may at any allocation).
LEFT_PIPELINE = """
import gc, os, sys
import torch
from nvidia.dali import fn, pipeline_def
from alexnet_dist.config import Data, Loader, make
from alexnet_dist.data import wds
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.plan import make_plan
from alexnet_dist.data.transforms import Augmentation

@pipeline_def(batch_size=1, num_threads=2, device_id=None)
def numbers():
    return fn.random.uniform(shape=[1])

gc.disable()  # the cycle stays uncollected here until the loader's own collection
pipe = numbers()
pipe.build()
pipe.run()
cycle = [pipe]
cycle.append(cycle)
del pipe, cycle
os.register_at_fork(after_in_child=gc.collect)
manifest = Manifest.read(sys.argv[1])
plan = make_plan(manifest.shards("train"), "train", 4, 0, 1, 0, "test")
augment = Augmentation.of(make(Data, {"root": "-", "crop": 12, "val_resize": None}))
loader = wds.build(plan, augment, make(Loader, {"name": "wds", "workers": 2}),
    sample_format=manifest.sample_format, classes=manifest.classes, position=lambda: (0, 0),
    device=torch.device("cpu"))
print(len(list(loader)))
"""


def test_workers_start_cleanly_after_a_dali_pipeline_was_left_to_the_garbage_collector(unique_labels):
    """Forked workers that collected their copy of such a pipeline hung in its destructor (seen:
    DALI, then the webdataset loader, in one process); the loader collects before it forks."""
    proc = subprocess.run(
        [sys.executable, "-c", LEFT_PIPELINE, str(unique_labels)], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout) == (0, "9\n"), proc.stderr[-2000:]
