"""The DALI loader in DALI's CPU mode: the same pipeline definition a GPU job runs, with the
"cpu" decoder instead of "mixed"."""

import io
import tarfile
from functools import partial

import numpy as np
import pytest
import torch
from helpers.shards import RAW, WDS, data_module, encoded, reindex, replace_shard, same_batch
from PIL import Image

from alexnet_dist.data import sources
from alexnet_dist.data.shards import write_dataset
from alexnet_dist.data.transforms import PCA_STD, PCA_VECTORS
from alexnet_dist.errors import ConfigError, DataError
from alexnet_dist.training.module import Classifier


def coded_image(index: int, label: int, size: int = 20) -> Image.Image:
    """A flat colour that names its sample (red and blue) and its label (green), in steps wide
    enough to survive JPEG's colour rounding."""
    return Image.new("RGB", (size, size), (20 * (index % 12), 30 * label, 20 * (index // 12)))


def decode_codes(images: torch.Tensor) -> tuple[list, list]:
    r, g, b = images.double().mean(dim=(-1, -2)).T.tolist()  # per image
    return [round(x / 20) + 12 * round(z / 20) for x, z in zip(r, b, strict=True)], [round(v / 30) for v in g]


@pytest.fixture(scope="module", autouse=True)
def shards_written_before_any_pipeline(synthetic_root):
    """write_dataset forks worker processes, and a child forked once DALI's threads run can crash
    (seen: the session's synthetic shards, first needed late in this module, died with a
    segmentation fault); so they are written before this module builds its first pipeline."""


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """101 training and 53 validation images (odd counts), 7 classes, 5 shards each."""
    root = tmp_path_factory.mktemp("coded")
    splits = {
        split: [sources.Sample(f"{split}-{i:04d}", partial(coded_image, i, i % 7), i % 7) for i in range(n)]
        for split, n in (("train", 101), ("val", 53))
    }
    write_dataset(
        sources.Source([f"c{k}" for k in range(7)], splits),
        root,
        source_name="test",
        quality=100,
        min_shards=5,
        progress=False,
    )
    return root


def module(root, rank=0, world=1, epoch=0, loader=None, **kw):
    args = dict(batch_size=8 * world, crop=16, val_resize=None, **RAW)
    args.update(kw)
    return data_module(root, loader or {"name": "dali"}, rank=rank, world=world, epoch=epoch, **args)


def batches(dm, split):
    """What training sees: the loader's batches after the data module's on-device step."""
    loader = getattr(dm, f"{split}_dataloader")()
    return [dm.on_after_batch_transfer(batch, 0) for batch in loader]


def test_every_label_stays_with_its_image_in_training_and_validation(coded):
    dm = module(coded)
    for split, expected in (("train", 101 // 8 * 8), ("val", 53)):
        seen = 0
        for images, labels in batches(dm, split):
            ids, codes = decode_codes(images)
            assert codes == labels.tolist()
            assert codes == [i % 7 for i in ids]
            seen += len(labels)
        assert seen == expected


def test_validation_reads_every_sample_exactly_once_across_ranks(coded):
    ids = []
    for rank in range(3):
        for batch in module(coded, rank, 3).val_dataloader():
            ids += decode_codes(batch.images)[0]
    assert sorted(ids) == list(range(53))


@pytest.mark.parametrize("loader", [{"name": "dali"}, {"name": "wds", "workers": 2}], ids=["dali", "wds"])
def test_training_gives_every_rank_the_same_steps_and_no_sample_twice_in_an_epoch(coded, loader):
    per_rank = []
    for rank in range(3):
        dm = module(coded, rank, 3, loader=loader)
        steps = batches(dm, "train")
        assert len(steps) == len(dm.loaders["train"]) == 101 // 24
        assert all(len(labels) == 8 for _, labels in steps)
        per_rank.append([i for images, _ in steps for i in decode_codes(images)[0]])
    everything = sum(per_rank, [])
    assert len(set(everything)) == len(everything) == 3 * 4 * 8


def test_same_seed_same_batches_another_seed_or_epoch_others(coded):
    def order(**kw):
        return [i for images, _ in batches(module(coded, **kw), "train") for i in decode_codes(images)[0]]

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)


def ramp_image() -> Image.Image:
    """A 32x32 picture whose red channel grows with the column and green with the row, so every
    window of it is different."""
    ramp = np.zeros((32, 32, 3), np.uint8)
    ramp[..., 0] = (np.arange(32) * 7)[None, :]
    ramp[..., 1] = (np.arange(32) * 7)[:, None]
    return Image.fromarray(ramp)


@pytest.fixture(scope="module")
def coordinates(tmp_path_factory):
    root = tmp_path_factory.mktemp("coordinates")
    splits = {s: [sources.Sample(f"{s}-{i}", ramp_image, 0) for i in range(64)] for s in ("train", "val")}
    write_dataset(sources.Source(["only"], splits), root, source_name="test", quality=100, min_shards=2, progress=False)
    return root


def test_paper_crops_stay_inside_the_stored_image_and_flips_mirror(coordinates):
    whole = next(iter(module(coordinates, crop=32).val_dataloader()))[0][0]  # the decoded picture
    flips, offsets = 0, set()
    for images, *_ in module(coordinates, crop=24, batch_size=64).train_dataloader():
        for image in images:
            matches = [
                (x, y, m)
                for m in (0, 1)
                for y in range(9)
                for x in range(9)
                if torch.equal(image, (whole.flip(-1) if m else whole)[:, y : y + 24, x : x + 24])
            ]
            assert matches, "a training crop that is no window of the stored image"
            x, y, m = matches[0]
            flips += m
            offsets.add((x, y))
    assert 16 <= flips <= 48  # p = 0.5 over 64 images
    assert len(offsets) > 20  # positions spread over the 9 x 9 possible offsets


@pytest.mark.parametrize("loader", [{"name": "dali"}, WDS], ids=["dali", "wds"])
def test_colour_noise_has_the_papers_covariance(coordinates, loader):
    clean = batches(module(coordinates, crop=32, loader=loader), "val")[0][0][0].double().mean(dim=(1, 2))
    shifts = []
    for epoch in range(40):  # every image identical: what differs is the noise, 64 draws an epoch
        dm = module(coordinates, crop=32, colour_noise=0.1, epoch=epoch, batch_size=64, loader=loader)
        for images, _ in batches(dm, "train"):
            shifts.append((images.double().mean(dim=(2, 3)) - clean).numpy())
    shifts = np.concatenate(shifts)  # 2560 draws of 0.1 * V (z * s)
    in_axes = shifts @ PCA_VECTORS  # along the principal axes: independent, std 0.1 * s
    assert np.allclose(in_axes.std(axis=0), 0.1 * PCA_STD, rtol=0.08)
    corr = np.corrcoef(in_axes.T)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.08
    assert np.abs(in_axes.mean(axis=0) / (0.1 * PCA_STD)).max() < 0.1


def test_train_scale_divides_training_inputs_only(coded):
    plain = batches(module(coded, crop=20, flip=False), "train")[0][0]
    scaled = batches(module(coded, crop=20, flip=False, train_scale=1.1), "train")[0][0]
    assert torch.allclose(plain / 1.1, scaled, atol=1e-4)
    assert torch.equal(
        batches(module(coded, crop=20, train_scale=1.1), "val")[0][0], batches(module(coded, crop=20), "val")[0][0]
    )  # validation is not scaled


@pytest.mark.parametrize("loader", [{"name": "dali"}, WDS], ids=["dali", "wds"])
def test_ten_views_are_corners_centre_and_mirrors_and_their_prediction_is_the_mean(coordinates, loader):
    whole = batches(module(coordinates, crop=32, loader=loader), "val")[0][0][0]
    views, _ = batches(module(coordinates, crop=24, test_views=10, loader=loader), "test")[0]
    assert views.shape == (8, 10, 3, 24, 24)
    windows = [whole[:, y : y + 24, x : x + 24] for x, y in ((0, 0), (8, 0), (0, 8), (8, 8), (4, 4))]
    for v, window in enumerate(windows + [w.flip(-1) for w in windows]):
        assert torch.equal(views[0, v], window), f"view {v}"
    classifier = Classifier(
        {"_target_": "alexnet_dist.models.AlexNetSmall", "num_classes": 3, "width": 8, "fc": 16},
        optim={},
        global_batch=8,
    ).eval()
    with torch.no_grad():
        ten = classifier.predict_log_probs((views - 128) / 64).exp()
        singles = torch.stack([classifier((views[:, v] - 128) / 64).softmax(1) for v in range(10)]).mean(0)
    assert torch.allclose(ten, singles, atol=1e-6)


def test_modern_crops_have_the_crop_size_and_channels_last_and_bf16_layouts(coded):
    images, _ = batches(
        module(coded, augment="modern", loader={"name": "dali", "layout": "NHWC", "dtype": "bfloat16"}), "train"
    )[0]
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("loader", [{"name": "dali"}, WDS], ids=["dali", "wds"])
def test_a_pass_started_mid_epoch_yields_the_rest_of_the_uninterrupted_pass(coded, loader):
    """What a resumed run's loader does: asked to start at batch 2 of epoch 1, it reads none of the
    batches before and gives the same images, crops, flips, colour shifts and keys as an
    uninterrupted pass from there."""
    full = list(module(coded, epoch=1, colour_noise=0.1, loader=loader).train_dataloader())
    resumed = module(coded, epoch=1, colour_noise=0.1, loader=loader)
    resumed.position = lambda: (1, 2)
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(full) - 2
    for a, b in zip(full[2:], rest, strict=True):
        assert same_batch(a, b) and a.keys == b.keys


@pytest.fixture
def awkward(tmp_path, coded):
    """The coded set with a val shard replaced by one holding greyscale, CMYK and PNG images, bytes
    that are no image and a truncated JPEG; the DALI index is rebuilt for it."""
    import shutil

    root = tmp_path / "awkward"
    shutil.copytree(coded, root)
    picture = coded_image(7, 0)
    images = [
        encoded(picture.convert("L")),
        encoded(picture.convert("CMYK")),
        encoded(picture, "PNG"),
        b"\xff\xd8\xff\xe0 this is not a JPEG" * 4,
        encoded(picture)[:300],
        encoded(picture),
    ]
    tar = replace_shard(root, "val", 0, [(f"odd-{i}", data, b"0") for i, data in enumerate(images)])
    return root, str(tar.relative_to(root))


LOADERS = [{"name": "dali"}, {"name": "wds", "workers": 1}]


@pytest.mark.parametrize("loader", LOADERS, ids=["dali", "wds"])
def test_grey_cmyk_and_png_decode_to_rgb_and_a_corrupt_image_is_skipped_and_counted(awkward, loader):
    root, tar = awkward
    dm = module(root, loader=loader)
    loader = dm.val_dataloader()
    passed = list(loader)
    assert sum(len(b.labels) for b in passed) == dm.manifest.count("val") - 2
    skipped = sorted(dm.skipped_images())
    assert skipped == sorted(s for b in passed for s in b.skipped)  # each named with the batch it left
    assert len(skipped) == 2 and all(f"{tar}:" in where and "(cannot decode: " in where for where in skipped)
    assert "odd-3" in skipped[0] and "odd-4" in skipped[1]  # not an image; a JPEG cut short
    first = passed[0].images  # the shard's samples in order, the two bad ones left out
    grey, cmyk, png, plain = first[:4].double().mean(dim=(2, 3))
    assert grey.max() - grey.min() < 2  # grey comes out as three equal channels
    assert torch.allclose(cmyk, plain, atol=3) and torch.allclose(png, plain, atol=3)
    assert decode_codes(first[1:4])[0] == [7, 7, 7]


def patterned(mode: str) -> Image.Image:
    """A 20x20 picture of varied colours in PIL mode `mode`, with varying transparency where it has any."""
    y, x = np.mgrid[0:20, 0:20]
    rgb = Image.fromarray(np.stack([x * 12, y * 12, (x * y) % 256], -1).astype(np.uint8), "RGB")
    if mode in ("RGBA", "LA"):
        picture = rgb.convert(mode[:-1])
        picture.putalpha(Image.linear_gradient("L").resize((20, 20)))
        return picture
    if mode.startswith("P"):
        picture = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        if mode == "P+transparency":
            picture.info["transparency"] = 3  # a palette entry shown as see-through
        return picture
    return rgb.convert(mode)


def test_both_loaders_decode_png_webp_grey_palette_and_alpha_to_the_same_rgb_pixels(tmp_path, coded):
    """Every mode of the image types alexnet-prepare index accepts: the two loaders' pixels agree
    exactly, and are PIL's convert("RGB") of the picture (alpha dropped, grey repeated, the
    palette looked up)."""
    import shutil

    root = tmp_path / "modes"
    shutil.copytree(coded, root)
    images = [encoded(patterned(mode), "PNG") for mode in ("RGB", "L", "1", "P", "P+transparency", "RGBA", "LA")]
    images += [encoded(patterned(mode), "WEBP") for mode in ("RGB", "RGBA")]  # lossy
    lossless = io.BytesIO()
    patterned("RGBA").save(lossless, "WEBP", lossless=True)
    images += [lossless.getvalue(), encoded(patterned("L"), "JPEG")]
    replace_shard(root, "val", 0, [(f"mode-{i:02d}", data, b"0") for i, data in enumerate(images)])
    pixels = {}
    for name, loader in zip(("dali", "wds"), LOADERS, strict=True):
        first = next(iter(module(root, loader=loader, batch_size=len(images), crop=20).val_dataloader()))
        pixels[name] = first.images.permute(0, 2, 3, 1).numpy()
    want = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in images])
    assert np.array_equal(pixels["dali"], want) and np.array_equal(pixels["wds"], want)
    for grey in (1, 2, 6, 10):  # L, 1 and LA PNGs, the grey JPEG: three equal channels
        assert np.array_equal(want[grey][..., 0], want[grey][..., 2])


@pytest.mark.parametrize("loader", LOADERS, ids=["dali", "wds"])
def test_a_corrupt_image_stops_a_strict_loader_naming_shard_and_key(awkward, loader):
    root, tar = awkward
    dm = module(root, loader={**loader, "bad_images": "error"})
    with pytest.raises(DataError, match=rf"{tar}:(\d+:)?odd-3(.jpg)?: cannot decode image .*loader.bad_images=skip"):
        list(dm.val_dataloader())


def test_a_sample_without_a_label_stops_with_shard_and_key(tmp_path, coded):
    import shutil

    shutil.copytree(coded, tmp_path / "data")
    tar = tmp_path / "data" / "val" / "000001.tar"
    with tarfile.open(tar) as f:
        members = [(m, f.extractfile(m).read()) for m in f.getmembers()]
    unlabelled = [m.name for m, _ in members if m.name.endswith(".cls")][1]
    with tarfile.open(tar, "w") as f:
        for member, data in members:
            if member.name != unlabelled:
                f.addfile(member, io.BytesIO(data))
    reindex(tar)
    key = unlabelled[:-4]
    with pytest.raises(DataError, match=rf"{tar}:{key}: sample has no .cls label"):
        list(module(tmp_path / "data").val_dataloader())


def test_a_truncated_shard_is_named_before_training_starts(tmp_path, coded):
    import shutil

    shutil.copytree(coded, tmp_path / "data")
    tar = tmp_path / "data" / "train" / "000003.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(
        DataError, match=rf"{tar}: \d+ bytes but its index lists data up to byte \d+; the tar is truncated"
    ):
        module(tmp_path / "data").train_dataloader()


def test_paper_crops_larger_than_the_stored_images_are_refused(coded):
    with pytest.raises(ConfigError, match=r"data.crop=24 is larger than the smallest stored image side \(20 px\)"):
        module(coded, crop=24).train_dataloader()


def test_dali_and_webdataset_loaders_give_the_same_validation_images_labels_and_predictions(synthetic_root):
    """The two loaders side by side on the same 500 validation images (resized to 36, centre crop
    28), compared image for image, not through a training whose outcome depends on the CPU.

    What it catches: a crop off by one pixel (the test checks below that such a shift moves every
    image by far more than the tolerance), another resize, swapped channels or a mirror (same),
    labels out of step with their images or in another order (compared exactly; and the classifier
    below scores 100% when each label belongs to its image, 15% with the labels shuffled), a loader
    normalising on its own or delivering something else than uint8 NCHW (the model inputs are
    compared too). Each of these, tried on a patched loader, failed the test.

    Measured on a 2-core x86 CPU (Pillow and DALI 2.4, both with libjpeg-turbo): without the resize
    the two deliver identical pixels; the two resizes round 22% of the pixels to the neighbouring
    value, never further (per-pixel difference at most 1, per-image mean at most 0.26). A crop one
    pixel off moves every image by a mean of 7.9 or more; a neighbouring image differs by 12.6 or more."""
    loaders = {"wds": {"name": "wds", "workers": 0}, "dali": {"name": "dali"}}
    raw, inputs, labels = {}, {}, {}
    for name, loader in loaders.items():
        dm = data_module(synthetic_root, loader, batch_size=50, crop=28, val_resize=36)
        batches = list(dm.val_dataloader())
        assert all(b.images.dtype == torch.uint8 for b in batches)
        raw[name] = torch.cat([b.images for b in batches]).int()
        inputs[name] = torch.cat([dm.on_after_batch_transfer(batch, 0)[0] for batch in batches]).double()
        labels[name] = torch.cat([b.labels for b in batches])
    std = torch.tensor(dm.manifest.stat("std"), dtype=torch.float64).view(1, 3, 1, 1)  # both use the manifest's
    assert raw["wds"].shape == raw["dali"].shape == (500, 3, 28, 28)
    assert torch.equal(labels["wds"], labels["dali"])  # the same images in the same order, each with its label

    most, mean = 4, 1.5  # grey levels: measured 1 and 0.26, room for other JPEG decoder and resize builds
    gap = (raw["wds"] - raw["dali"]).abs()
    assert gap.max() <= most and gap.double().mean(dim=(1, 2, 3)).max() <= mean
    model_gap = ((inputs["wds"] - inputs["dali"]) * std).abs()  # what the model sees, back in grey levels
    assert model_gap.max() <= most + 0.01 and model_gap.mean(dim=(1, 2, 3)).max() <= mean
    shifted = (raw["wds"][..., 1:] - raw["dali"][..., :-1]).abs().double().mean(dim=(1, 2, 3))
    assert shifted.min() > 3 * mean  # the tolerance would let no crop one pixel off through

    # The same fixed classifier on both loaders' inputs: nearest class mean, the means taken from
    # the webdataset inputs (no training, so no CPU's rounding decides how well it does). It scores
    # the same images right on both; its margin (8.3 in distance, measured) dwarfs the inputs' gap
    # (0.47), so no prediction can flip: a point moved by d changes each distance by at most d.
    x = {name: inputs[name].flatten(1) for name in loaders}
    means = torch.stack([x["wds"][labels["wds"] == c].mean(0) for c in range(10)])
    distances = {name: torch.cdist(x[name], means) for name in loaders}
    predictions = {name: distances[name].argmin(1) for name in loaders}
    assert torch.equal(predictions["wds"], predictions["dali"])
    assert (predictions["dali"] == labels["dali"]).double().mean() > 0.9  # measured 1.0; 0.15 if shuffled


@pytest.mark.parametrize("loader", [{"name": "dali"}, WDS], ids=["dali", "wds"])
def test_the_mean_image_is_subtracted_at_each_crops_own_window(tmp_path, coordinates, loader):
    """Every stored image is the same ramp, so its mean image is the ramp itself: whatever the
    crop, flip or view, subtracting the mean image's matching window leaves about zero."""
    import shutil

    from alexnet_dist.data.stats import compute_stats

    root = tmp_path / "data"
    shutil.copytree(coordinates, root)
    compute_stats(root, count=64)
    for split, kw in (("train", {}), ("val", {}), ("test", {"test_views": 10})):
        dm = module(root, crop=24, mean_image=True, loader=loader, batch_size=64, **kw)
        for images, _ in batches(dm, split):
            assert images.abs().max() < 3, split  # a window one pixel off would leave 7 or more
    off = module(root, crop=24, loader=loader, batch_size=64)  # without: the ramp minus a constant
    assert batches(off, "train")[0][0].abs().max() > 50


@pytest.mark.parametrize("loader", LOADERS, ids=["dali", "wds"])
def test_a_training_batch_with_no_decodable_image_stops_in_one_line(tmp_path, loader):
    write_dataset(sources.synthetic(2, 8, 4, 20), tmp_path, source_name="synthetic", min_shards=1, progress=False)
    replace_shard(tmp_path, "train", 0, [(f"bad-{i}", b"\xff\xd8\xff\xe0 no JPEG" * 4, b"0") for i in range(8)])
    with pytest.raises(DataError, match=r"every image of a training batch was undecodable \(.*bad-\d"):
        list(module(tmp_path, loader=loader, batch_size=4).train_dataloader())


@pytest.mark.parametrize("loader", [{"name": "dali"}, WDS], ids=["dali", "wds"])
def test_each_rank_checks_its_share_of_the_shards_and_a_tar_gone_from_its_slice_is_named(tmp_path, loader):
    """4 validation shards, 2 ranks: rank 0 checks shards 0 and 2 at start, rank 1 shards 1 and 3;
    rank 0's slice (shards 0 and 1) still names shard 1 in one line when it is missing."""
    write_dataset(sources.synthetic(2, 16, 16, 20), tmp_path, source_name="synthetic", min_shards=4, progress=False)
    (tmp_path / "val" / "000001.tar").unlink()
    with pytest.raises(DataError, match=r"val/000001.tar: listed in .*manifest.json but missing"):
        module(tmp_path, rank=1, world=2, loader=loader, batch_size=4).val_dataloader()
    loader_of_rank_0 = module(tmp_path, rank=0, world=2, loader=loader, batch_size=4).val_dataloader()
    with pytest.raises(DataError, match=r"val/000001.tar: (listed in manifest.json but missing|unreadable after 0)"):
        list(loader_of_rank_0)
