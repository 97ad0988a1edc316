"""alexnet-prepare index over other tools' layouts: the image as .jpg, .jpeg, .png or .webp (grey,
palette and transparent ones among them), the label as a class number (.cls), a class name or
number in a .txt, or a field of a .json (img2dataset's layout: .jpg, a .txt caption and a .json);
the tars written by webdataset's ShardWriter and by plain tar. Each is indexed, then both loaders
read it, in training and in validation, and every image and label they deliver is checked against
the picture and class it was made from."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from helpers.shards import data_module
from PIL import Image

from alexnet_dist.data.index import index_shards
from alexnet_dist.data.members import index_format

NAMES = ["owl", "cat", "dog"]  # class c's name; not sorted, so that collected names are numbered anew
W, H, CROP = 20, 16, 12
LOADERS = {"wds": {"name": "wds", "workers": 0}, "dali": {"name": "dali"}}
LOSSLESS = ("png", "webp")


def source(i: int, c: int) -> Image.Image:
    """Sample i of class c: the class's colour under ramps that differ from sample to sample, so
    that a crop a pixel off, a mirror or another sample's image would show."""
    y, x = np.mgrid[0:H, 0:W]
    colour = np.array([(170, 30, 30), (30, 170, 30), (30, 30, 170)][c], float)
    ramp = (x * (2 + i % 3) + y * 2 + i)[..., None]
    return Image.fromarray(np.clip(colour + ramp, 0, 255).astype(np.uint8), "RGB")


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` as a picture of that PIL mode; transparency varies across the image."""
    if mode in ("RGBA", "LA"):
        out = image.convert(mode[0] if mode == "LA" else "RGB")
        out.putalpha(Image.linear_gradient("L").resize(image.size))
        return out
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return image.convert(mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def image_member(kind: str, i: int, c: int) -> tuple[str, bytes]:
    """(extension, bytes) of sample i's image as a `kind` layout stores it: PNGs cycle through
    RGB, grey, palette, RGBA and grey+alpha; WebPs through lossless, lossy and transparent ones;
    .jpeg through colour and grey."""
    picture = source(i, c)
    if kind == "png":
        return "png", encode(in_mode(picture, ["RGB", "L", "P", "RGBA", "LA"][i % 5]), "PNG")
    if kind == "webp":
        options = [{"lossless": True}, {"quality": 90}, {"lossless": True}][i % 3]
        return "webp", encode(in_mode(picture, "RGBA" if i % 3 == 2 else "RGB"), "WEBP", **options)
    if kind == "jpeg":
        return "jpeg", encode(in_mode(picture, "L" if i % 2 else "RGB"), "JPEG", quality=95)
    return "jpg", encode(picture, "JPEG", quality=95)


def img2dataset_json(key: str, c: int) -> dict:
    """What img2dataset writes into each sample's .json, with a class field added by its user."""
    return {
        "url": f"https://images.example.org/{key}.jpg",
        "caption": f"a photo of a {NAMES[c]}",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": W,
        "height": H,
        "original_width": 4 * W,
        "original_height": 4 * H,
        "sha256": "0" * 64,
        "label": NAMES[c],
    }


def as_json(value) -> dict:
    return {"json": json.dumps(value).encode()}


# layout: (image kind, label spec, --classes given, the label members of sample i of class c)
LAYOUTS = {
    "jpeg": ("jpeg", "cls", False, lambda key, i, c: {"cls": str(c).encode()}),
    "png": ("png", "cls", False, lambda key, i, c: {"cls": str(c).encode()}),
    "webp": ("webp", "cls", False, lambda key, i, c: {"cls": str(c).encode()}),
    "json-number": ("jpg", "json:label", False, lambda key, i, c: as_json({"label": c})),
    "json-name": ("png", "json:meta.class", False, lambda key, i, c: as_json({"meta": {"class": NAMES[c]}})),
    # a name, or every third sample its class number, one a line as other tools write them
    "txt": ("webp", "txt", True, lambda key, i, c: {"txt": (str(c) if i % 3 == 2 else NAMES[c] + "\n").encode()}),
    "img2dataset": (
        "jpg",
        "json:label",
        False,
        lambda key, i, c: {"txt": f"a photo of a {NAMES[c]}".encode(), **as_json(img2dataset_json(key, c))},
    ),
}


def make_samples(layout: str, split: str, count: int) -> list[dict]:
    """{"__key__", ext: bytes, ...} of the split, with the picture and class each was made from."""
    kind, _, _, label = LAYOUTS[layout]
    samples = []
    for i in range(count):
        key, c = f"{split}{i:04d}", (i * 7 + len(split)) % 3
        ext, data = image_member(kind, i, c)
        samples.append({"__key__": key, ext: data, **label(key, i, c), "_class": c, "_image": data})
    return samples


def write_tars(folder: Path, samples: list[dict], per_tar: int, writer: str) -> None:
    """The samples in tars of `per_tar`, by webdataset's ShardWriter or as plain tar members."""
    import webdataset

    folder.mkdir(parents=True)
    members = [{k: v for k, v in s.items() if k not in ("_class", "_image")} for s in samples]
    if writer == "shardwriter":
        with webdataset.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_tar, verbose=0) as out:
            for sample in members:
                out.write(sample)
        return
    for n in range(0, len(members), per_tar):
        with tarfile.open(folder / f"shard-{n // per_tar:06d}.tar", "w") as tar:
            for sample in members[n : n + per_tar]:
                for ext, data in sample.items():
                    if ext != "__key__":
                        info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))


def made(tmp_path: Path, layout: str, writer: str) -> tuple[dict, list[str], dict]:
    """The layout's tars (12 training samples in 2 tars, 6 validation ones) indexed as the README
    says: (sources by key, the classes expected, the manifest)."""
    kind, spec, given, _ = LAYOUTS[layout]
    samples = {"train": make_samples(layout, "train", 12), "val": make_samples(layout, "val", 6)}
    for split, per in (("train", 6), ("val", 6)):
        write_tars(tmp_path / split, samples[split], per, writer)
    classes = None
    if given:
        classes = tmp_path / "classes.txt"
        classes.write_text("".join(f"{name}\n" for name in NAMES))
    # a --classes file's order, else the train split's names sorted, else its numbers 0 up to the largest
    expected = NAMES if given else sorted(NAMES) if layout in ("json-name", "img2dataset") else ["0", "1", "2"]
    manifest = index_shards(
        f"{tmp_path}/train/",
        f"{tmp_path}/val/",
        tmp_path / "out",
        classes=str(classes) if classes else None,
        fmt=index_format(None if layout == "img2dataset" else kind, spec),
    )
    by_key = {s["__key__"]: s for split in samples.values() for s in split}
    return by_key, expected, manifest


def decoded(data: bytes) -> np.ndarray:
    """The RGB pixels PIL reads from an image's bytes: what both loaders must deliver."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def found_in(crop: np.ndarray, picture: np.ndarray) -> bool:
    """Whether `crop` (h, w, 3) is a window of `picture`, or of its mirror image."""
    h, w = crop.shape[:2]
    for candidate in (picture, picture[:, ::-1]):
        for top in range(picture.shape[0] - h + 1):
            for left in range(picture.shape[1] - w + 1):
                if np.array_equal(candidate[top : top + h, left : left + w], crop):
                    return True
    return False


@pytest.mark.parametrize("writer", ["shardwriter", "tar"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_is_indexed_and_both_loaders_deliver_its_pictures_and_classes(tmp_path, layout, writer):
    by_key, classes, manifest = made(tmp_path, layout, writer)
    kind, spec, _, _ = LAYOUTS[layout]
    assert manifest["classes"] == classes and manifest["label"] == spec
    assert manifest["images"] == (["jpg", "jpeg", "png", "webp"] if layout == "img2dataset" else [kind])
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["count"], val["count"], train["skipped"], val["skipped"]) == (12, 6, [], [])

    def label(key: str) -> int:  # a name is numbered by the class list, a number is the class number
        c = by_key[key]["_class"]
        return classes.index(NAMES[c]) if NAMES[c] in classes else c

    for name, loader in LOADERS.items():
        dm = data_module(tmp_path / "out", loader, batch_size=4, crop=CROP, val_resize=None)
        seen = set()
        for batch in dm.val_dataloader():
            for image, got, (_, key) in zip(batch.images, batch.labels.tolist(), batch.keys, strict=True):
                picture = decoded(by_key[key]["_image"])
                top, left = (H - CROP) // 2, (W - CROP) // 2  # the centre crop
                want = picture[top : top + CROP, left : left + CROP]
                assert np.array_equal(image.permute(1, 2, 0).numpy(), want), (name, key)
                assert got == label(key), (name, key)
                seen.add(key)
        assert seen == {k for k in by_key if k.startswith("val")}, name
        trained = []
        for batch in dm.train_dataloader():
            for image, got, (_, key) in zip(batch.images, batch.labels.tolist(), batch.keys, strict=True):
                assert found_in(image.permute(1, 2, 0).numpy(), decoded(by_key[key]["_image"])), (name, key)
                assert got == label(key), (name, key)
                trained.append(key)
        assert sorted(trained) == sorted(k for k in by_key if k.startswith("train")), name
    for key, sample in by_key.items():  # and what the loaders delivered is the source picture
        picture = decoded(sample["_image"]).astype(int)
        original = np.asarray(source(int(key[-4:]), sample["_class"])).astype(int)
        if kind in LOSSLESS and Image.open(io.BytesIO(sample["_image"])).mode in ("RGB", "RGBA"):
            lossy = kind == "webp" and int(key[-4:]) % 3 == 1
            assert np.abs(picture - original).max() <= (8 if lossy else 0), key
        elif Image.open(io.BytesIO(sample["_image"])).mode == "RGB":
            assert np.abs(picture - original).max() <= 8, key  # JPEG at quality 95


def sixteen_bit_png() -> bytes:
    """An RGB PNG of 16 bits a sample (PIL writes none): the loaders would reduce it differently."""
    import struct
    import zlib

    rows = b"".join(b"\0" + np.full((W, 3), 40000, ">u2").tobytes() for _ in range(H))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_labels_and_images_the_loaders_cannot_take_are_skipped_with_why(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to show"
    png = encode(source(0, 1), "PNG")
    train = [
        {"__key__": "ok0", "png": png, "json": as_json({"y": "owl"})["json"]},
        {"__key__": "ok1", "png": png, "json": as_json({"y": "cat"})["json"]},
        {"__key__": "number", "png": png, "json": as_json({"y": 1})["json"]},  # class 1 of [cat, owl]
        {"__key__": "far", "png": png, "json": as_json({"y": 2})["json"]},  # only 2 classes
        {"__key__": "no-field", "png": png, "json": as_json({"x": "owl"})["json"]},
        {"__key__": "not-json", "png": png, "json": b"{owl"},
        {"__key__": "a-list", "png": png, "json": as_json({"y": ["owl"]})["json"]},
        {"__key__": "deep", "png": png, "json": as_json({"y": {"z": 1}})["json"]},
        {"__key__": "sixteen", "png": sixteen_bit_png(), "json": as_json({"y": "owl"})["json"]},
        {
            "__key__": "exif-webp",
            "webp": encode(source(0, 0), "WEBP", exif=exif),
            "json": as_json({"y": "owl"})["json"],
        },
        {"__key__": "gif", "png": encode(source(0, 0), "GIF"), "json": as_json({"y": "owl"})["json"]},
    ]
    val = [
        {"__key__": "v-ok", "webp": encode(source(0, 2), "WEBP"), "json": as_json({"y": "owl"})["json"]},
        {"__key__": "v-new", "png": png, "json": as_json({"y": "dog"})["json"]},  # no train sample is a dog
    ]
    write_tars(tmp_path / "train", train, 20, "tar")
    write_tars(tmp_path / "val", val, 20, "shardwriter")
    manifest = index_shards(
        f"{tmp_path}/train/", f"{tmp_path}/val/", tmp_path / "out", fmt=index_format(None, "json:y"), max_skipped=1
    )
    t, v = f"{tmp_path}/train/shard-000000.tar", f"{tmp_path}/val/shard-000000.tar"
    assert manifest["classes"] == ["cat", "owl"] and manifest["label"] == "json:y"
    assert manifest["splits"]["train"]["skipped"] == [
        f"{t}:far: label 2 is outside the 2 classes (0..1)",
        f"{t}:no-field: the .json has no field 'y'",
        f"{t}:not-json: the .json label is not JSON (Expecting property name enclosed in double quotes at character 1)",
        f"{t}:a-list: field 'y' of the .json holds [\"owl\"], neither a class number nor a class name",
        f"{t}:deep: field 'y' of the .json holds {{\"z\": 1}}, neither a class number nor a class name",
        f"{t}:sixteen: the .png is a 16-bit PNG, which the loaders reduce to 8 bits differently; store it as 8-bit",
        f"{t}:exif-webp: the .webp is a WebP with EXIF metadata, which DALI cannot decode; store it without EXIF, "
        "or as JPEG",
        f"{t}:gif: the .png holds a GIF image; both loaders decode JPEG, PNG and WebP only",
    ]
    assert manifest["splits"]["val"]["skipped"] == [f"{v}:v-new: label 'dog' is not one of the train split's 2 classes"]
    assert manifest["splits"]["train"]["class_counts"] == {"0": 1, "1": 2}  # cat; owl and the number 1


def test_txt_labels_that_are_no_class_of_the_list_are_skipped(tmp_path):
    (tmp_path / "classes.txt").write_text("owl\ncat\n")
    jpg = encode(source(0, 0), "JPEG")
    samples = [
        {"__key__": "a", "jpg": jpg, "txt": b"cat\n"},
        {"__key__": "b", "jpg": jpg, "txt": b"zebra"},
        {"__key__": "c", "jpg": jpg, "txt": b"a photo of a cat\non a mat"},
        {"__key__": "d", "jpg": jpg, "txt": b"  "},
        {"__key__": "e", "jpg": jpg, "txt": b"-1"},
        {"__key__": "f", "jpg": jpg, "txt": b"\xff\xfe"},
        {"__key__": "g", "jpg": jpg, "cls": b"1"},
    ]
    write_tars(tmp_path / "train", samples, 20, "shardwriter")
    write_tars(tmp_path / "val", [{"__key__": "v", "jpg": jpg, "txt": b"owl"}], 20, "shardwriter")
    tar = f"{tmp_path}/train/shard-000000.tar"
    manifest = index_shards(
        tar,
        f"{tmp_path}/val/",
        tmp_path / "out",
        classes=str(tmp_path / "classes.txt"),
        fmt=index_format("jpg", "txt"),
        max_skipped=1,
    )
    assert manifest["splits"]["train"]["skipped"] == [
        f"{tar}:b: label 'zebra' is not one of the 2 classes of --classes {tmp_path}/classes.txt",
        f"{tar}:c: the .txt label 'a photo of a cat\\non ' spans several lines; a class name is one line",
        f"{tar}:d: the .txt label '  ' is empty",
        f"{tar}:e: label -1 is negative",
        f"{tar}:f: the .txt label b'\\xff\\xfe' is not UTF-8 text",
        f"{tar}:g: no .txt label",
    ]
    assert manifest["classes"] == ["owl", "cat"] and manifest["splits"]["train"]["class_counts"] == {"1": 1}


NO_FIELD = "json needs the field holding the label, e.g. json:label or json:meta.class"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--label", "json:"], f"--label json:: {NO_FIELD}"),
        (["--label", "json:a..b"], f"--label json:a..b: {NO_FIELD}"),
        (["--label", "foo"], "--label foo: not a label spec; use cls, txt or json:FIELD"),
        (["--label", "cls:x"], "--label cls:x: not a label spec; use cls, txt or json:FIELD"),
        (["--image", "gif"], "--image gif: not an image type both loaders decode; use one of jpg, jpeg, png, webp"),
    ],
)  # fmt: skip
def test_a_label_spec_or_image_type_that_cannot_be_read_is_one_line(tmp_path, cli_env, args, message):
    proc = run_cli(
        "alexnet-prepare", "index", "--train", "t/", "--val", "v/", "--out", tmp_path / "out", *args,
        cwd=tmp_path, env=cli_env, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (2, f"error: {message}\n")


def test_image_and_label_are_for_index_only(tmp_path, cli_env):
    proc = run_cli(
        "alexnet-prepare", "synthetic", "--out", tmp_path / "out", "--label", "txt",
        cwd=tmp_path, env=cli_env, check=False,
    )  # fmt: skip
    assert proc.stderr == "error: --label is for alexnet-prepare index; synthetic reads --src\n"


@pytest.mark.slow
def test_an_img2dataset_set_indexed_as_the_readme_says_trains(tmp_path, cli_env):
    samples = {"train": make_samples("img2dataset", "train", 48), "val": make_samples("img2dataset", "val", 16)}
    for split, per in (("train", 16), ("val", 16)):
        write_tars(tmp_path / "shards" / split, samples[split], per, "shardwriter")
    run_cli(
        "alexnet-prepare", "index", "--train", "shards/train/", "--val", "shards/val/", "--out", "data",
        "--label", "json:label", cwd=tmp_path, env=cli_env,
    )  # fmt: skip
    # one run, with the loader the machine picks (DALI here): both loaders' reading of every layout
    # is held to the source pictures above. The 20x16 pictures are below the smoke crop (28):
    # modern crops and val_resize enlarge them.
    run_cli(
        "alexnet-train", "experiment=smoke", "logger=csv", "+trainer.enable_progress_bar=false",
        "data.root=data", "run_id=i2d", "trainer.max_epochs=1",
        "data.batch_size=16", "data.augment=modern", "data.val_resize=32", cwd=tmp_path, env=cli_env,
    )  # fmt: skip
    results = json.loads((tmp_path / "runs" / "smoke" / "i2d" / "results.json").read_text())
    assert results["loader"] == "dali" and results["global_step"] == 3 and results["val_count"] == 16
    assert results["skipped_images"] == 0
