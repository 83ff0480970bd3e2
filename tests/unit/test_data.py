"""Data loaders: every source gives the same item format, skips unreadable images and counts them.

Fixtures are written in tmp_path in each source's real on-disk format: the COCO captions JSON,
the CC3M TSV with its image folder, img2dataset folders, a webdataset shard written with tarfile,
and an image folder exported from the shapes world.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from aptp.data import CaptionDataset, ImageTransform, build_dataset
from aptp.data.cc3m import CC3MTsv, Img2DatasetFolder
from aptp.data.shapes_world import ShapesDataset, ShapesWorld, export_image_folder
from aptp.data.shards import WebDatasetShards
from aptp.errors import DataError
from aptp.settings import DataSettings

R = 16
# Solid colours, so that a decoded (lossy) JPEG still says which file it came from.
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def jpeg_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    data = jpeg_bytes((1, 2, 3), size=(64, 64))
    return data[: len(data) // 2]


def mean_rgb(pixels: torch.Tensor) -> tuple[int, ...]:
    """(3, R, R) in [-1, 1] -> mean colour in 0..255."""
    return tuple(int(round(v)) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def close_colour(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def settings(name: str, root: Path | None = None, **kw) -> DataSettings:
    return DataSettings(name=name, root=root, resolution=R, **kw)


def check_items(ds: CaptionDataset, n: int | None = None) -> list[dict]:
    n = len(ds) if n is None else n
    items = [ds[i] for i in range(n)]
    for item in items:
        assert item["pixel_values"].shape == (3, R, R)
        assert item["pixel_values"].dtype == torch.float32
        assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        assert isinstance(item["caption"], str) and item["caption"]
        assert ds.captions()[item["index"]] == item["caption"]
    return items


def forbid_decoding(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("captions() must not open images")

    monkeypatch.setattr(Image, "open", fail)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2014").mkdir()
    images = [  # listed out of id order on purpose
        {"license": 1, "file_name": "COCO_train2014_000000000025.jpg", "coco_url": "", "height": 24,
         "width": 40, "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": 25},
        {"license": 2, "file_name": "COCO_train2014_000000000009.jpg", "coco_url": "", "height": 24,
         "width": 40, "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": 9},
        {"license": 1, "file_name": "COCO_train2014_000000000030.jpg", "coco_url": "", "height": 24,
         "width": 40, "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": 30},  # no caption
    ]
    annotations = [
        {"image_id": 25, "id": 700, "caption": "A giraffe eating leaves from a tree. "},
        {"image_id": 9, "id": 661, "caption": "Closeup of bins of food that include broccoli and bread."},
        {"image_id": 9, "id": 150, "caption": "A meal is presented in brightly colored plastic trays.\n"},
        {"image_id": 25, "id": 690, "caption": "A giraffe standing next to a tall tree."},
        {"image_id": 999, "id": 5, "caption": "An annotation of an image that is not listed."},
    ]
    data = {"info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
            "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1,
                          "name": "Attribution-NonCommercial-ShareAlike License"}],
            "images": images, "annotations": annotations}
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps(data))
    for image, colour in zip(images, COLOURS):
        (root / "train2014" / image["file_name"]).write_bytes(jpeg_bytes(colour))
    return root


CC3M_ROWS = [
    ("a very typical bus station", COLOURS[0]),
    ("sierra looked stunning in this top and this skirt", COLOURS[1]),
    ("young confused girl standing in front of a wardrobe", None),  # never downloaded
    ("interior design of modern living room", COLOURS[2]),
    ("cybernetic scene isolated on white background", "truncated"),
]


@pytest.fixture()
def cc3m_tsv_root(tmp_path: Path) -> Path:
    root = tmp_path / "cc3m"
    (root / "training").mkdir(parents=True)
    lines = [f"{caption}\thttp://example.com/{i}.jpg" for i, (caption, _) in enumerate(CC3M_ROWS)]
    (root / "Train_GCC-training.tsv").write_text("\n".join(lines) + "\n")
    for row, (_, image) in enumerate(CC3M_ROWS):
        if image == "truncated":
            (root / "training" / f"{row}.jpg").write_bytes(truncated_jpeg())
        elif image is not None:
            (root / "training" / f"{row}.jpg").write_bytes(jpeg_bytes(image))
    return root


# The layout igorbrigadir/DownloadConceptualCaptions leaves: training/<row>_<crc32(url)> and
# validation/<row>_<crc32(url)>, without extension, beside the two official TSVs and its reports.
DOWNLOADER_ROWS = {
    "train": [("a very typical bus station", "jpeg", COLOURS[0]),
              ("sierra looked stunning in this top", "png", COLOURS[1]),
              ("young confused girl in front of a wardrobe", None, None),  # never downloaded
              ("interior design of modern living room", "jpeg", COLOURS[2]),
              ("cybernetic scene isolated on white background", "truncated", None),
              ("a dead link that returned a web page", "html", None)],
    "validation": [("author : a life in photography", "png", COLOURS[3]),
                   ("a missing validation image", None, None),
                   ("the player celebrates a goal", "jpeg", COLOURS[4])],
}


def downloader_name(row: int, url: str) -> str:
    import zlib

    return f"{row}_{zlib.crc32(url.encode('utf-8')) & 0xffffffff}"


@pytest.fixture()
def cc3m_downloader_root(tmp_path: Path) -> Path:
    root = tmp_path / "DownloadConceptualCaptions"
    for split, tsv, folder in [("train", "Train_GCC-training.tsv", "training"),
                               ("validation", "Validation_GCC-1.1.0-Validation.tsv", "validation")]:
        (root / folder).mkdir(parents=True)
        lines, report = [], []
        for row, (caption, kind, colour) in enumerate(DOWNLOADER_ROWS[split]):
            url = f"https://images.example.com/{split}/{row}/photo.jpg?w=800&h=600"
            lines.append(f"{caption}\t{url}")
            name = downloader_name(row, url)
            data = {"jpeg": lambda: jpeg_bytes(colour), "png": lambda: _png_bytes(colour),
                    "truncated": truncated_jpeg, "html": lambda: b"<html><body>404</body></html>",
                    None: lambda: None}[kind]()
            if data is not None:
                (root / folder / name).write_bytes(data)
            report.append(f"{url}\t{folder}\t{200 if data else 404}\t\t\t{folder}/{name if data else ''}\t{{}}")
        (root / tsv).write_text("\n".join(lines) + "\n")
        (root / f"downloaded_{folder}_report.tsv").write_text("\n".join(report) + "\n")
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shard_root(tmp_path: Path) -> Path:
    root = tmp_path / "shards"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, caption, colour in [("000000000", "a red thing", COLOURS[0]),
                                     ("000000001", "a green thing", COLOURS[1])]:
            add_member(tar, f"{key}.jpg", jpeg_bytes(colour))
            add_member(tar, f"{key}.txt", caption.encode())
            add_member(tar, f"{key}.json", json.dumps({"caption": caption, "key": key, "status": "success"}).encode())
        add_member(tar, "000000002.txt", b"a sample whose image is missing")
        add_member(tar, "000000003.jpg", truncated_jpeg())
        add_member(tar, "000000003.txt", b"a truncated image")
        add_member(tar, "000000004.jpg", jpeg_bytes(COLOURS[2]))  # no caption: not a sample
    with tarfile.open(root / "00001.tar", "w") as tar:
        add_member(tar, "000010000.png", _png_bytes(COLOURS[3]))
        add_member(tar, "000010000.json", json.dumps({"caption": "a yellow thing from json"}).encode())
    (root / "00000_stats.json").write_text("{}")  # img2dataset writes these beside the shards
    return root


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 40), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- transform


def test_transform_resizes_shorter_side_and_crops_centre():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (20, 0, 40, 20))  # white middle third
    pixels = ImageTransform(R)(image)
    assert pixels.shape == (3, R, R)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, 2:-2].min() > 0.9  # the centre crop is the white third


def test_transform_random_crop_and_flip_follow_torch_seed():
    image = Image.fromarray(np.arange(30 * 90 * 3, dtype=np.uint8).reshape(30, 90, 3) % 251)
    transform = ImageTransform(R, center_crop=False, random_flip=True)
    torch.manual_seed(0)
    first = [transform(image) for _ in range(4)]
    torch.manual_seed(0)
    again = [transform(image) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({tuple(t.flatten()[:8].tolist()) for t in first}) > 1


def test_transform_composites_transparency_on_white():
    pixels = ImageTransform(8)(Image.new("RGBA", (8, 8), (255, 0, 0, 0)))
    assert torch.allclose(pixels, torch.ones(3, 8, 8))


# --------------------------------------------------------------------------- COCO


def test_coco_one_caption_per_image_by_default(coco_root):
    ds = build_dataset(settings("coco", coco_root))
    assert ds.captions() == ["A meal is presented in brightly colored plastic trays.",
                             "A giraffe standing next to a tall tree."]
    items = check_items(ds)
    assert close_colour(mean_rgb(items[0]["pixel_values"]), COLOURS[1])  # image 9
    assert close_colour(mean_rgb(items[1]["pixel_values"]), COLOURS[0])  # image 25
    assert [item["skipped"] for item in items] == [0, 0]


def test_coco_all_captions_and_max_samples(coco_root):
    ds = build_dataset(settings("coco", coco_root), captions="all")
    assert ds.captions() == ["A meal is presented in brightly colored plastic trays.",
                             "Closeup of bins of food that include broccoli and bread.",
                             "A giraffe standing next to a tall tree.",
                             "A giraffe eating leaves from a tree."]
    limited = build_dataset(settings("coco", coco_root, max_samples=3), captions="all")
    assert limited.captions() == ds.captions()[:3]


def test_coco_errors(coco_root, tmp_path):
    with pytest.raises(DataError, match="--data-root"):
        build_dataset(settings("coco"))
    with pytest.raises(DataError, match="captions_val2014.json"):
        build_dataset(settings("coco", coco_root), split="validation")
    (coco_root / "train2014").rename(coco_root / "elsewhere")
    with pytest.raises(DataError, match="no train2014/ image folder"):
        build_dataset(settings("coco", coco_root))
    empty = tmp_path / "empty-coco"
    (empty / "annotations").mkdir(parents=True)
    (empty / "train2014").mkdir()
    (empty / "annotations" / "captions_train2014.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": [], "annotations": []}))
    with pytest.raises(DataError, match="no captioned image"):
        build_dataset(settings("coco", empty))


# --------------------------------------------------------------------------- CC3M


def test_cc3m_tsv_skips_missing_and_truncated_images(cc3m_tsv_root):
    ds = build_dataset(settings("cc3m", cc3m_tsv_root))
    assert isinstance(ds, CC3MTsv)
    assert ds.captions() == [caption for caption, _ in CC3M_ROWS]
    items = check_items(ds)
    # Row 2 (missing) stands in with row 3; row 4 (truncated) wraps around to row 0.
    assert [item["index"] for item in items] == [0, 1, 3, 3, 0]
    assert [item["skipped"] for item in items] == [0, 0, 1, 0, 1]
    assert sum(item["skipped"] for item in items) == 2
    assert ds.skipped == 2 and sorted(ds.unreadable) == [2, 4]
    assert close_colour(mean_rgb(items[3]["pixel_values"]), COLOURS[2])


def test_cc3m_skipped_total_is_exact_with_workers(cc3m_tsv_root):
    ds = build_dataset(settings("cc3m", cc3m_tsv_root))
    loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert sum(int(b["skipped"].sum()) for b in batches) == 2
    assert sum(len(b["caption"]) for b in batches) == len(ds)
    assert ds.skipped == 0  # the counting happened in the workers: the per-item field is what counts
    assert ds.scan() == [2, 4] and ds.skipped == 2


def test_cc3m_downloader_layout_both_splits(cc3m_downloader_root):
    train = build_dataset(settings("cc3m", cc3m_downloader_root))
    assert isinstance(train, CC3MTsv) and train.image_dir.name == "training"
    assert train.captions() == [c for c, _, _ in DOWNLOADER_ROWS["train"]]
    items = check_items(train)
    # Row 2 (missing) stands in with row 3; rows 4 (truncated) and 5 (an HTML page) wrap to row 0.
    assert [item["index"] for item in items] == [0, 1, 3, 3, 0, 0]
    assert [item["skipped"] for item in items] == [0, 0, 1, 0, 1, 1]
    assert train.skipped == 3 and sorted(train.unreadable) == [2, 4, 5]
    for item, (_, _, colour) in zip(items, DOWNLOADER_ROWS["train"]):
        if not item["skipped"]:
            assert close_colour(mean_rgb(item["pixel_values"]), colour)
    assert "training/2_" in train.describe(2)  # the message names the file the downloader would write

    val = build_dataset(settings("cc3m", cc3m_downloader_root, split="validation"))
    assert isinstance(val, CC3MTsv) and val.image_dir.name == "validation"
    items = check_items(val)
    assert [item["index"] for item in items] == [0, 2, 2]
    assert [item["skipped"] for item in items] == [0, 1, 0]
    assert close_colour(mean_rgb(items[0]["pixel_values"]), COLOURS[3])
    loader = DataLoader(train, batch_size=2, num_workers=0, shuffle=False)
    assert sum(int(b["skipped"].sum()) for b in loader) == 3


def test_cc3m_downloader_earlier_naming_and_plain_row_names(tmp_path):
    root = tmp_path / "cc3m"
    (root / "validation").mkdir(parents=True)
    urls = [f"http://example.com/{i}.jpg" for i in range(3)]
    captions = ["old scheme: crc only", "row with extension", "row without extension"]
    (root / "Validation_GCC-1.1.0-Validation.tsv").write_text(
        "".join(f"{c}\t{u}\n" for c, u in zip(captions, urls)))
    crc0 = downloader_name(0, urls[0]).split("_")[1]
    (root / "validation" / crc0).write_bytes(jpeg_bytes(COLOURS[0]))
    (root / "validation" / "1.jpg").write_bytes(jpeg_bytes(COLOURS[1]))
    (root / "validation" / "2").write_bytes(_png_bytes(COLOURS[2]))
    ds = build_dataset(settings("cc3m", root, split="val"))
    items = check_items(ds)
    assert [item["skipped"] for item in items] == [0, 0, 0]
    for item, colour in zip(items, COLOURS):
        assert close_colour(mean_rgb(item["pixel_values"]), colour)


def test_cc3m_img2dataset_folders(tmp_path):
    root = tmp_path / "cc3m-files"
    for folder, keys in [("00000", ["000000000", "000000001"]), ("00001", ["000010000"])]:
        (root / folder).mkdir(parents=True)
        for key, colour in zip(keys, COLOURS):
            (root / folder / f"{key}.txt").write_text(f"caption {key}\n")
            (root / folder / f"{key}.json").write_text("{}")
            if key != "000000001":  # one missing image
                (root / folder / f"{key}.jpg").write_bytes(jpeg_bytes(colour))
    (root / "00000.parquet").write_bytes(b"")
    ds = build_dataset(settings("cc3m", root))
    assert isinstance(ds, Img2DatasetFolder)
    assert ds.captions() == ["caption 000000000", "caption 000000001", "caption 000010000"]
    items = check_items(ds)
    assert [item["skipped"] for item in items] == [0, 1, 0]


def test_cc3m_webdataset_shards(shard_root):
    ds = build_dataset(settings("cc3m", shard_root))
    assert isinstance(ds, WebDatasetShards)
    assert ds.captions() == ["a red thing", "a green thing", "a sample whose image is missing",
                             "a truncated image", "a yellow thing from json"]
    items = check_items(ds)
    assert [item["skipped"] for item in items] == [0, 0, 1, 1, 0]
    assert [item["index"] for item in items] == [0, 1, 4, 4, 4]
    assert close_colour(mean_rgb(items[1]["pixel_values"]), COLOURS[1])
    assert close_colour(mean_rgb(items[4]["pixel_values"]), COLOURS[3])
    assert build_dataset(settings("cc3m", shard_root, max_samples=2)).captions() == ["a red thing", "a green thing"]


def test_cc3m_shards_take_precedence_and_unknown_layout_errors(cc3m_tsv_root, shard_root, tmp_path):
    (cc3m_tsv_root / "00000.tar").write_bytes((shard_root / "00000.tar").read_bytes())
    assert isinstance(build_dataset(settings("cc3m", cc3m_tsv_root)), WebDatasetShards)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(DataError, match="--data-root"):
        build_dataset(settings("cc3m", nothing))
    with pytest.raises(DataError, match="--data-root"):
        build_dataset(settings("cc3m"))
    empty_tsv = tmp_path / "empty-tsv"
    (empty_tsv / "images").mkdir(parents=True)
    (empty_tsv / "Train_GCC-training.tsv").write_text("")
    with pytest.raises(DataError, match="no captioned row"):
        build_dataset(settings("cc3m", empty_tsv))


# --------------------------------------------------------------------------- image folder and shapes


def test_image_folder_from_shapes_matches_shapes_dataset(tmp_path):
    folder = export_image_folder(tmp_path / "shapes-folder", "train", 4)
    ds = build_dataset(settings(str(folder)))
    reference = ShapesDataset("train", size=4, resolution=R)
    assert ds.captions() == ShapesWorld(0).captions("train", 4)
    for i in range(4):
        item, ref = ds[i], reference[i]
        assert torch.equal(item["pixel_values"], ref["pixel_values"])
        assert (item["caption"], item["tier"], item["attributes"]) == (ref["caption"], ref["tier"], ref["attributes"])
        assert item["skipped"] == 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="neither one of shapes, coco, cc3m"):
        build_dataset(settings(str(tmp_path / "no-such-folder")))
    with pytest.raises(DataError, match="no metadata.jsonl"):
        build_dataset(settings(str(tmp_path)))
    (tmp_path / "metadata.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        build_dataset(settings(str(tmp_path)))


def test_shapes_through_the_common_interface():
    ds = build_dataset(settings("shapes", max_samples=6))
    assert len(ds) == 6
    assert ds.captions() == ShapesWorld(0).captions("train", 6)
    items = check_items(ds, 2)
    assert {"tier", "attributes"} <= set(items[0]) and items[0]["skipped"] == 0
    assert len(build_dataset(settings("shapes", max_samples=10**6), split="val")) == 2000
    with pytest.raises(DataError, match="random_flip"):
        build_dataset(settings("shapes", random_flip=True))


def test_a_larger_shapes_train_split_extends_the_default_one():
    """data.max_samples past 20,000 draws more of the generated world: the default split is its
    prefix, the new samples are new scenes (not a wrap-around), and validation is untouched."""
    big = build_dataset(settings("shapes", max_samples=20_040))
    assert len(big) == 20_040
    default = ShapesWorld(0)
    world = big.shapes.world
    assert [world.attributes("train", i) for i in (0, 7, 19_999)] == \
        [default.attributes("train", i) for i in (0, 7, 19_999)]
    new = [world.attributes("train", i) for i in range(20_000, 20_040)]
    assert all(a != default.attributes("train", i) for i, a in enumerate(new))
    assert sorted(a["tier"] for a in new) == sorted(["easy"] * 10 + ["medium"] * 12 + ["hard"] * 10 + ["hardest"] * 8)
    again = ShapesDataset("train", world=ShapesWorld(0, train_size=30_000), resolution=big.shapes.resolution)
    assert torch.equal(big[20_039]["pixel_values"], again[20_039]["pixel_values"])  # a pure function of the index
    with pytest.raises(IndexError):
        default.attributes("train", 20_000)
    assert len(build_dataset(settings("shapes", max_samples=20_040), split="val")) == 2000
    assert repr(world) == "ShapesWorld(seed=0, train_size=20040)" and repr(default) == "ShapesWorld(seed=0)"
    with pytest.raises(ValueError, match="train_size"):
        ShapesWorld(0, train_size=0)


def test_captions_never_decode_images(monkeypatch, coco_root, cc3m_tsv_root, shard_root, tmp_path):
    folder = export_image_folder(tmp_path / "folder", "train", 3)
    datasets = [build_dataset(settings("coco", coco_root)), build_dataset(settings("cc3m", cc3m_tsv_root)),
                build_dataset(settings("cc3m", shard_root)), build_dataset(settings(str(folder))),
                build_dataset(settings("shapes", max_samples=3))]
    forbid_decoding(monkeypatch)
    monkeypatch.setattr("aptp.data.shapes_world.render", lambda *a, **k: pytest.fail("captions() rendered"))
    for ds in datasets:
        assert len(ds.captions()) == len(ds) > 0


def test_all_unreadable_is_a_data_error(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    ds = build_dataset(settings(str(tmp_path)))
    with pytest.raises(DataError, match="no readable image"):
        ds[0]
