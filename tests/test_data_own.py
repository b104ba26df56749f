"""Users' own data: folders of pictures, videos (written here with PyAV), torchvision sets; corrupt files skipped."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data

from conftest import CliResult
from downpour.config import DataConfig, ModelConfig, load
from downpour.data import data_warnings, load_dataset, own, unread_warning
from downpour.errors import ConfigError, DataError
from downpour.models import build_model


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """A folder with two readable photos (one nested, one .JPG), a corrupt JPEG, a truncated PNG and a text file."""
    root = tmp_path / "pictures"
    (root / "nested").mkdir(parents=True)
    Image.fromarray(data.camera()[:120, :160]).save(root / "camera.png")  # (120, 160) grayscale
    Image.fromarray(data.astronaut()[:100, :90]).save(root / "nested" / "astronaut.JPG", quality=95)
    (root / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    whole = (root / "camera.png").read_bytes()
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("not a picture")
    return root


def write_video(path: Path, frames: int, *, width: int = 64, height: int = 48) -> None:
    """A short MPEG-4 video whose frame i is grey of level 10·i, with a faint ±4 checkerboard of 8-pixel squares (a
    flat picture has no variance to learn from: load_dataset refuses it)."""
    rows, cols = np.indices((height, width))
    checker = np.where((rows // 8 + cols // 8) % 2 == 0, 4, -4)[..., None]  # (H, W, 1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.clip(10 * i + checker, 0, 255).astype(np.uint8).repeat(3, axis=2)  # (H, W, 3)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_a_folder_is_read_recursively_and_corrupt_files_are_counted(pictures: Path) -> None:
    report = own.ReadReport(f"folder:{pictures}")
    images = own.read_folder(pictures, channels=1, max_side=0, report=report)
    assert [im.shape for im in images] == [(1, 120, 160), (1, 100, 90)]  # sorted: camera.png, nested/astronaut.JPG
    np.testing.assert_array_equal(images[0][0], data.camera()[:120, :160])  # PNG is lossless
    summary = report.summary()
    assert (summary["files"], summary["read"], summary["skipped"], summary["pictures"]) == (4, 2, 2, 2)
    assert {Path(line.split(":")[0]).name for line in summary["skipped_files"]} == {"cut.png", "broken.jpg"}
    deep = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(deep).save(pictures / "sixteen-bit.png")  # a 16-bit PNG is scaled to 8 bits, not clipped
    scaled = own.read_folder(pictures, channels=1, max_side=0, report=own.ReadReport("x"))[2][0]
    np.testing.assert_allclose(scaled, deep / 257.0, atol=0.51)
    colour = own.read_folder(pictures, channels=3, max_side=40, report=own.ReadReport("x"))
    assert [im.shape for im in colour] == [(3, 30, 40), (3, 40, 36), (3, 32, 32)]  # longer side at most max_side


def test_colour_becomes_the_same_gray_in_every_source_and_in_evaluation(tmp_path: Path) -> None:
    """A gray model trained on a folder, on the bundled photos or on a torchvision set, and tested on a picture
    (face-neuron test, detect), must see one gray: BT.709 luminance, as scikit-image's rgb2gray (not Pillow's "L",
    whose green weighs 0.587, nor the channels' mean)."""
    from skimage import color

    from downpour.data.sources import bundled_photos
    from downpour.eval.images import fit_images, read_image

    astronaut = data.astronaut()  # (512, 512, 3) uint8
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    folder = own.read_folder(tmp_path, channels=1, max_side=0, report=own.ReadReport("x"))[0][0] / 255.0  # (H, W)
    expected = color.rgb2gray(astronaut)
    np.testing.assert_allclose(folder, expected, atol=0.5 / 255 + 1e-6)  # stored as 8 bits
    np.testing.assert_allclose(read_image(tmp_path / "astronaut.png", 1)[0], expected, atol=1e-5)
    fitted = fit_images(astronaut.transpose(2, 0, 1)[None] / 255.0, (1, 512, 512))  # (1, 1, 512, 512)
    np.testing.assert_allclose(fitted[0, 0], expected, atol=1e-5)
    np.testing.assert_allclose(bundled_photos()[1], expected, atol=1e-5)  # PHOTOS[1] is the astronaut
    green = np.zeros((4, 4, 3), np.uint8)
    green[..., 1] = 200
    Image.fromarray(green).save(tmp_path / "green.png")
    assert own.read_folder(tmp_path, channels=1, max_side=0, report=own.ReadReport("x"))[1][0, 0, 0] == 143  # .7154


def test_crops_of_own_pictures_feed_rica_and_cat(pictures: Path) -> None:
    config = DataConfig(source=f"folder:{pictures}", image_size=16, examples=400, held_out=80, whiten=False)
    dataset = load_dataset(config, seed=0)
    assert dataset.shape == (1, 16, 16) and dataset.train.shape == (400, 256) and dataset.held_out.shape == (80, 256)
    assert dataset.read_report["skipped"] == 2 and "2 of 4 files" in unread_warning(dataset)
    again = load_dataset(config, seed=0)
    assert torch.equal(dataset.train, again.train)  # the seed fixes the crops
    rica = build_model(ModelConfig(name="rica", features=8), dataset.dim, seed=0, shape=dataset.shape)
    assert torch.isfinite(rica.loss(dataset.train[:32]))
    default_held_out = load_dataset(DataConfig(source=f"folder:{pictures}", image_size=16, examples=40), seed=0)
    assert (len(default_held_out.train), len(default_held_out.held_out)) == (40, 10)  # data.examples, exactly
    cat_data = load_dataset(DataConfig(source=f"folder:{pictures}", image_size=24, examples=64, held_out=16), seed=0)
    cat_config = ModelConfig(name="cat", receptive_field=8, maps=2, pool=3, lcn=3)
    cat = build_model(cat_config, cat_data.dim, seed=0, shape=cat_data.shape)
    assert torch.isfinite(cat.loss(cat_data.train[:8]))


def test_video_frames_every_stride_and_a_corrupt_video_skipped(tmp_path: Path) -> None:
    write_video(tmp_path / "clip.mp4", 25)
    (tmp_path / "bad.mp4").write_bytes(b"this is no video" * 64)
    frames = own.read_video(tmp_path / "clip.mp4", stride=5, channels=1, max_side=0)
    assert [f.shape for f in frames] == [(1, 48, 64)] * 5
    levels = [float(f.mean()) for f in frames]
    np.testing.assert_allclose(levels, [0, 50, 100, 150, 200], atol=6)  # frames 0, 5, 10, 15, 20 (lossy codec)
    config = DataConfig(source=f"video:{tmp_path}/*.mp4", frame_stride=5, image_size=16, examples=200, held_out=40)
    dataset = load_dataset(config, seed=1)
    report = dataset.read_report
    assert (report["files"], report["skipped"], report["pictures"]) == (2, 1, 5)
    assert "bad.mp4" in report["skipped_files"][0]


def test_a_video_cut_short_keeps_its_frames_and_is_warned_of(tmp_path: Path) -> None:
    """A Matroska file cut in half decodes without an error and simply ends early: its frames are kept, and it is
    named as cut short (decoded N of the 30 frames its header declares) in the summary and in a warning, where it
    passed without a word. The whole file is not named."""
    write_video(tmp_path / "whole.mkv", 30)
    data = (tmp_path / "whole.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])
    cut_short: list[tuple[str, str]] = []
    assert len(own.read_video(tmp_path / "whole.mkv", stride=1, channels=1, max_side=0, cut_short=cut_short)) == 30
    assert cut_short == []
    frames = own.read_video(tmp_path / "cut.mkv", stride=1, channels=1, max_side=0, cut_short=cut_short)
    assert 0 < len(frames) < 25
    assert cut_short == [(str(tmp_path / "cut.mkv"), f"decoded {len(frames)} of the 30 frames its header declares")]
    config = DataConfig(source=f"video:{tmp_path}/*.mkv", frame_stride=1, image_size=16, examples=200, held_out=40)
    dataset = load_dataset(config, seed=1)
    report = dataset.read_report
    assert (report["files"], report["skipped"], report["pictures"], report["cut_short"]) == (2, 0, 30 + len(frames), 1)
    assert report["cut_short_files"] == [f"{tmp_path / 'cut.mkv'}: decoded {len(frames)} of the 30 frames its header "
                                         "declares"]  # fmt: skip
    said = [line for line in data_warnings(dataset) if "ended before" in line]
    assert len(said) == 1 and said[0].startswith(f"1 of the videos of video:{tmp_path}/*.mkv ended before"), said


def test_training_on_a_folder_warns_and_reports_the_skipped_files(
    pictures: Path, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    out = tmp_path / "run"
    result = cli("train", "--out", str(out), "--backend", "sim", "--workers", "2", "--steps", "30",
                      "--set", f"data.source=folder:{pictures}", "--set", "data.image_size=8",
                      "--set", "data.examples=500", "--set", "data.held_out=100", "--set", "model.features=8",
                      "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning: 2 of 4 files of folder:" in " ".join(result.stderr.split())  # one line (console.warn)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_files"]["skipped"] == 2 and summary["data_files"]["pictures"] == 2
    page = (out / "report.html").read_text()  # written by the simulator's train too
    assert "2 of 4 data files could not be read" in page
    assert page.count("data:image/png;base64,") == 3  # loss, staleness, filters: the simulator logs no throughput
    assert "a simulated run logs none" in page


def test_pictures_over_pillows_size_limit_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses pictures over its pixel limit (179 million by default: below some phones' 200 MP photos) and
    warns over half of it; a folder source and ``detect``'s reader read them, shrunk to data.max_side, without a
    warning. The limit is lowered here so that the pictures can be small; a JPEG also decodes at a reduced size."""
    import warnings

    from PIL import Image

    from downpour.data.own import ReadReport, read_folder
    from downpour.eval.images import read_image

    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(data.camera()[:100, :100]).save(folder / "over.png")  # 10,000 pixels: over twice the limit
    Image.fromarray(data.astronaut()[:60, :50]).save(folder / "warned.jpg")  # 3,000: over the limit, warned
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(folder / "over.png")
    report = ReadReport("folder:big")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pictures = read_folder(folder, channels=1, max_side=32, report=report)
        assert read_image(folder / "over.png", 1).shape == (1, 100, 100)
    assert report.skipped == [] and sorted(p.shape for p in pictures) == [(1, 32, 27), (1, 32, 32)]
    assert Image.MAX_IMAGE_PIXELS == 2_000  # Pillow's limit as it was, outside the readers


def test_a_broken_link_is_counted_and_reported(pictures: Path) -> None:
    """A link named like a picture whose target is gone is one more file that cannot be read (it was left out of
    the counts without a word)."""
    from downpour.data.own import ReadReport, read_folder

    (pictures / "gone.png").symlink_to(pictures / "moved-away.png")
    report = ReadReport("folder:pictures")
    read_folder(pictures, channels=1, max_side=0, report=report)
    assert (report.files, len(report.skipped), report.pictures) == (5, 3, 2)
    assert any(path.endswith("gone.png") and "FileNotFoundError" in why for path, why in report.skipped)


def test_linked_folders_are_read_once_and_a_link_loop_ends(pictures: Path, tmp_path: Path) -> None:
    """A linked subfolder is read (Path.rglob skipped it without a word, though globs of videos follow links); a link
    back up ends, and a file reached twice (a link beside its target, or a folder linked twice) is one example."""
    from downpour.data.own import ReadReport, picture_paths, read_folder, video_paths

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(data.camera()[:64, :64]).save(elsewhere / "linked.png")
    (pictures / "photos").symlink_to(elsewhere, target_is_directory=True)
    (pictures / "photos-again").symlink_to(elsewhere, target_is_directory=True)
    (pictures / "nested" / "up").symlink_to(pictures, target_is_directory=True)  # a loop
    (pictures / "same.png").symlink_to(pictures / "camera.png")
    names = [path.relative_to(pictures).as_posix() for path in picture_paths(pictures)]
    assert names == ["camera.png", "cut.png", "nested/astronaut.JPG", "nested/broken.jpg", "photos/linked.png"]
    report = ReadReport("folder:pictures")
    images = read_folder(pictures, channels=1, max_side=0, report=report)
    assert (report.files, report.pictures) == (5, 3) and images[2].shape == (1, 64, 64)
    write_video(tmp_path / "clip.mp4", 3)
    assert video_paths(str(tmp_path / "**" / "**" / "*.mp4")) == [tmp_path / "clip.mp4"]  # matched 3 times


def test_a_run_on_a_folder_resumes_only_on_the_same_pictures(
    pictures: Path, tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    """The checkpoint keeps a digest of the pictures read: a picture added (the counts of examples stay, since
    crops are cut to data.examples) is refused before anything is written; the same pictures copied anew (new
    dates) resume. (The default data.held_out, capped at a quarter of data.examples, is recorded as the count it
    held out, which cuts the same examples again.)"""
    out = tmp_path / "run"
    common = ["--set", "data.image_size=8", "--no-progress"]
    first = cli("train", "--out", str(out), "--steps", "20", "--set", f"data.source=folder:{pictures}", "--set",
                "data.examples=500", "--set", "model.features=8", *common)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "held_out = 125\n" in (out / "config.toml").read_text()  # the default 1024, capped: what was held out
    digest = json.loads((out / "checkpoint" / "state.json").read_text())["data_counts"]["pictures_digest"]
    assert digest == json.loads((out / "summary.json").read_text())["data_files"]["digest"] and len(digest) == 64
    files = {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != ".lock"}
    Image.fromarray(data.coins()[:80, :80]).save(pictures / "coins.png")
    refused = cli("train", "--resume", str(out), "--steps", "40", *common)
    assert refused.returncode == 2
    assert "holds other pictures than when run" in refused.stderr and "start a new run" in refused.stderr
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file() and path.name != ".lock"} == files
    state_json = out / "checkpoint" / "state.json"  # as saved before the reader was recorded (it decoded otherwise)
    state = json.loads(state_json.read_text())
    assert state["data_counts"]["pictures_reader"] == own.READER_VERSION
    state["data_counts"]["pictures_reader"] = 2  # as saved before linked folders were followed
    state_json.write_text(json.dumps(state))
    refused = cli("train", "--resume", str(out), "--steps", "40", *common)
    assert refused.returncode == 2
    assert "saved by an earlier downpour that listed folders differently (before 2026-11-28" in refused.stderr
    del state["data_counts"]["pictures_reader"]
    state_json.write_text(json.dumps(state))
    refused = cli("train", "--resume", str(out), "--steps", "40", *common)
    assert refused.returncode == 2
    assert "saved by an earlier downpour that decoded pictures differently" in refused.stderr
    assert "and listed folders differently" in refused.stderr and "and read float gray pictures" in refused.stderr
    (pictures / "coins.png").unlink()
    for path in pictures.rglob("*"):  # the same pictures, written again: new modification times
        if path.is_file():
            path.write_bytes(path.read_bytes())
    config_toml = out / "config.toml"  # as a run saved before
    config_toml.write_text(config_toml.read_text().replace("held_out = 125", "held_out = 1024"))  # the count was
    state = json.loads(state_json.read_text())  # recorded: the default, capped without a word
    state["config"]["data"]["held_out"] = 1024
    del state["config"]["data"]["whiten_centre"]  # nor did it know this key: its default then
    state_json.write_text(json.dumps(state))
    assert "held_out = 1024" in (out / "config.toml").read_text()
    resumed = cli("train", "--resume", str(out), "--steps", "40", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 40
    assert "held_out = 125\n" in (out / "config.toml").read_text()
    reader = json.loads(state_json.read_text())["data_counts"]["pictures_reader"]
    assert reader == own.READER_VERSION  # the same digest: resumed
    last_start = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if row["event"] == "start"][-1]  # fmt: skip
    assert "changed" not in last_start  # 1024 -> 125 is a recording of the count, not a change of settings


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("data.source=folder:", "invalid data.source: 'folder:' (choose one of natural-patches"),
        ("data.source=pictures:/tmp", "invalid data.source: 'pictures:/tmp'"),
        ("data.source=torchvision:MNIST", "(torchvision sets: torchvision:STL10, torchvision:CIFAR10)"),
        ("data.frame_stride=0", "invalid data.frame_stride: 0 (must be at least 1)"),
        ("data.max_side=4", "invalid data.max_side: 4"),
    ],
)
def test_bad_own_source_settings_name_the_key(setting: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, [setting])
    assert message in str(caught.value)


def test_missing_or_empty_sources_are_clear_errors(tmp_path: Path, pictures: Path) -> None:
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset(DataConfig(source=f"folder:{tmp_path / 'nowhere'}"), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.jpg, \.jpeg, \.png, \.bmp, .* files under"):
        load_dataset(DataConfig(source=f"folder:{tmp_path / 'empty'}"), seed=0)
    with pytest.raises(DataError, match="no file matches"):
        load_dataset(DataConfig(source=f"video:{tmp_path}/*.mkv"), seed=0)
    with pytest.raises(DataError, match=rf"{tmp_path} is a folder; name its videos with a glob: video:{tmp_path}/\*"):
        load_dataset(DataConfig(source=f"video:{tmp_path}"), seed=0)  # it was said to match no file
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of its 1 files could be read"):
        load_dataset(DataConfig(source=f"folder:{tmp_path / 'bad'}"), seed=0)
    with pytest.raises(DataError, match="is at least 200 pixels on its shorter side"):
        load_dataset(DataConfig(source=f"folder:{pictures}", image_size=200, examples=500), seed=0)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_stl10_without_torchvision_is_a_clear_error(tmp_path: Path) -> None:
    """(CIFAR10 is read without torchvision: test_cifar10_is_read_from_its_binary_files_without_torchvision.)"""
    config = DataConfig(source="torchvision:STL10", cache_dir=str(tmp_path))
    with pytest.raises(DataError) as caught:
        load_dataset(config, seed=0)
    text = str(caught.value)
    assert "torchvision:STL10 needs torchvision" in text and "pip install 'downpour-sgd[torchvision]'" in text
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded


def test_portrait_photos_and_videos_are_read_upright(tmp_path: Path) -> None:
    """A phone stores a portrait photo sideways with an EXIF orientation tag, and a portrait video sideways with a
    display matrix: both were trained on sideways (and detect drew its map over the sideways photo). Training's
    reader and evaluation's now turn them as a viewer does."""
    from downpour.eval.images import read_image

    stored = np.zeros((40, 60), np.uint8)  # 60 wide, 40 tall as stored
    stored[:, :30] = 200  # its left half bright
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(stored).save(folder / "portrait.jpg", exif=exif, quality=100)
    viewed = np.asarray(ImageOps.exif_transpose(Image.open(folder / "portrait.jpg")))  # (60, 40), as a viewer shows
    trained = own.read_folder(folder, channels=1, max_side=0, report=own.ReadReport("x"))[0][0]
    assert trained.shape == (60, 40) and viewed.shape == (60, 40)
    np.testing.assert_array_equal(trained, viewed)
    assert trained[:30].mean() > 150 > 50 > trained[30:].mean()  # the left half, turned clockwise, is the top
    np.testing.assert_allclose(read_image(folder / "portrait.jpg", 1)[0], viewed / 255.0, atol=1e-6)

    video = tmp_path / "portrait.mp4"
    with av.open(str(video), "w") as container:  # 64 wide, 48 tall as stored, its left half bright
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:, :32] = 200
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(video.read_bytes())  # the matrix a phone writes for portrait: a = 0, b = 1, c = -1, d = 0
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.find(identity, data.find(b"tkhd"))
    data[at : at + 36] = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    video.write_bytes(bytes(data))
    frames = own.read_video(video, stride=1, channels=1, max_side=0)
    assert frames[0].shape == (1, 64, 48)  # upright: 48 wide, 64 tall
    assert frames[0][0, :28].mean() > 150 > 50 > frames[0][0, 36:].mean()  # the left half, turned clockwise
    data[at : at + 36] = struct.pack(">9I", 0xFFFF0000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)  # a mirror (h-flip)
    video.write_bytes(bytes(data))
    frames = own.read_video(video, stride=1, channels=1, max_side=0)  # PyAV calls it rotation -180: not turned
    assert frames[0].shape == (1, 48, 64) and frames[0][0, :, :28].mean() > 150 > 50 > frames[0][0, :, 36:].mean()
    deep = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)  # 16-bit gray, values up to 64,773
    Image.fromarray(deep).save(tmp_path / "deep.png")  # no tag: evaluation reads it as before, not clipped white
    np.testing.assert_allclose(read_image(tmp_path / "deep.png", 1)[0], deep / 65535.0, atol=1e-6)
    Image.fromarray(deep).save(tmp_path / "deep-tagged.png", exif=exif)
    np.testing.assert_allclose(read_image(tmp_path / "deep-tagged.png", 1)[0], np.rot90(deep, -1) / 65535.0, atol=1e-6)


def test_repeated_crops_and_own_data_memory_are_warned_of_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One 64x64 picture holds 2,401 crops of side 16: 50,000 training crops repeat them, and every held-out crop
    was bit-identical to a training one without a word. Own data was never checked against the memory either."""
    from downpour.data import data_warnings

    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(data.camera()[:64, :64]).save(folder / "small.png")
    config = DataConfig(source=f"folder:{folder}", image_size=16, examples=5000, whiten=False)
    lines = data_warnings(load_dataset(config, seed=0))
    assert len(lines) == 1 and "hold 2,401 distinct crops for 5,000 training examples: about 88% of the" in lines[0]
    roomy = DataConfig(source=f"folder:{folder}", image_size=16, examples=40, held_out=10, whiten=False)
    assert data_warnings(load_dataset(roomy, seed=0)) == []  # 40 of 2,401: about 2%
    small_set = np.repeat(np.asarray(data.camera()[:32, :32])[None, None], 50, axis=0)  # (50, 1, 32, 32) uint8
    monkeypatch.setattr(own, "read_torchvision", lambda name, config: small_set)  # a set's pictures, downloaded
    cifar = DataConfig(source="torchvision:CIFAR10", image_size=30, channels=1, examples=2000, whiten=False)
    lines = data_warnings(load_dataset(cifar, seed=0))  # 50 pictures x 9 positions for 2,000 crops
    assert len(lines) == 1 and "of torchvision:CIFAR10 hold 450 distinct crops" in lines[0]
    monkeypatch.setattr("downpour.backends.local.available_memory", lambda: 10 * 2**20)
    with pytest.raises(DataError, match=r"data.examples = 5000 \(\+ 1024 held out\)|data.examples = 5000 \(\+ 1250"):
        load_dataset(config, seed=0)


def test_palette_transparency_reads_without_pillows_warning_and_held_out_limits_say_a_quarter(
    tmp_path: Path,
) -> None:
    import warnings

    folder = tmp_path / "palette"
    folder.mkdir()
    picture = Image.fromarray(data.camera()[:40, :40]).convert("P")
    picture.info["transparency"] = bytes(range(256))  # transparency "expressed in bytes"
    picture.save(folder / "p.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's UserWarning leaked into the command's output
        assert own.read_folder(folder, channels=1, max_side=0, report=own.ReadReport("x"))[0].shape == (1, 40, 40)
    with pytest.raises(DataError, match=r"data.held_out = 64 is more than a quarter of data.examples = 100 \(at most "
                                        r"25 can be held out\)"):  # fmt: skip
        load_dataset(DataConfig(examples=100, held_out=64, whiten=False), seed=0)


def test_a_named_pipe_named_like_a_picture_is_skipped_not_waited_on(pictures: Path) -> None:
    """Opening a named pipe for reading waits for a writer: ``mkfifo DIR/f.png`` made training on ``folder:DIR``
    hang before it began. It is counted and reported as skipped, and the pictures beside it are read."""
    import os
    import threading

    pipe = pictures / "nested" / "pipe.png"
    os.mkfifo(pipe)
    (pictures / "linked-pipe.jpg").symlink_to(pipe)  # a link to it: the same file, reached first by this name
    report = own.ReadReport(f"folder:{pictures}")
    read: list[list[np.ndarray]] = []
    reader = threading.Thread(target=lambda: read.append(own.read_folder(pictures, channels=1, max_side=0,
                                                                         report=report)), daemon=True)  # fmt: skip
    reader.start()
    reader.join(timeout=15)  # two small pictures: well under a second
    if reader.is_alive():  # a regression: let the blocked open go on (to an empty read), then fail
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=30)
        pytest.fail(f"reading a folder with a named pipe in it waited on the pipe ({pipe})")
    assert [image.shape for image in read[0]] == [(1, 120, 160), (1, 100, 90)]  # camera.png, nested/astronaut.JPG
    summary = report.summary()
    assert (summary["files"], summary["read"], summary["skipped"], summary["pictures"]) == (5, 2, 3, 2)
    assert (str(pictures / "linked-pipe.jpg"), "not a regular file but a named pipe: not opened") in report.skipped
    alone = pictures.parent / "only-a-pipe"
    alone.mkdir()
    os.mkfifo(alone / "f.png")
    with pytest.raises(DataError, match=r"none of its 1 files could be read \(first: .*f.png: not a regular file"):
        load_dataset(DataConfig(source=f"folder:{alone}"), seed=0)


def write_cifar_batch(path: Path, pictures: np.ndarray, labels: list[int]) -> None:
    """A batch file in CIFAR-10's binary format, written record by record from ``pictures`` as a viewer shows them,
    ``(N, 32, 32, 3)`` uint8 (row 0 at the top, channels red, green, blue): one label byte, then the red plane, the
    green and the blue, each row by row."""
    with open(path, "wb") as file:
        for picture, label in zip(pictures, labels, strict=True):
            file.write(bytes([label]))
            for channel in range(3):
                file.write(bytes(int(value) for row in picture[:, :, channel] for value in row))


def cifar_folder(root: Path) -> np.ndarray:
    """``root/cifar-10-batches-bin`` with 2, 1, 1, 1 and 2 pictures in ``data_batch_1.bin`` ... ``_5.bin`` (and a
    test batch, not read), their first picture red in its top-left corner and blue along its bottom row; the
    pictures as a viewer shows them, ``(7, 32, 32, 3)``."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    pictures = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    pictures[0] = 0
    pictures[0, :4, :4, 0] = 255  # red, top left
    pictures[0, 31, :, 2] = 200  # blue, the bottom row
    starts = [0, 2, 3, 4, 5, 7]
    for batch in range(5):
        chunk = pictures[starts[batch] : starts[batch + 1]]
        write_cifar_batch(folder / f"data_batch_{batch + 1}.bin", chunk, [batch, 9][: len(chunk)])
    write_cifar_batch(folder / "test_batch.bin", np.zeros((1, 32, 32, 3), np.uint8), [3])
    return pictures


def test_cifar10_is_read_from_its_binary_files_without_torchvision(tmp_path: Path) -> None:
    """torchvision's CIFAR10 unpickles its batch files; the binary distribution is read with numpy instead, from the
    folder its archive extracts to under data.cache_dir (here written by the test: nothing is downloaded)."""
    pictures = cifar_folder(tmp_path / "CIFAR10")
    before = sorted(tmp_path.rglob("*"))
    config = DataConfig(source="torchvision:CIFAR10", cache_dir=str(tmp_path), channels=3)
    images = own.read_torchvision("CIFAR10", config)
    assert images.shape == (7, 3, 32, 32) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, pictures.transpose(0, 3, 1, 2))  # in order, channels first
    assert images[0, 0, :4, :4].min() == 255 and images[0, 0].sum() == 16 * 255  # red, top left
    assert (images[0, 2, 31] == 200).all() and images[0, 2, :31].max() == 0 and images[0, 1].max() == 0
    gray = own.read_torchvision("CIFAR10", DataConfig(source="torchvision:CIFAR10", cache_dir=str(tmp_path)))
    assert gray.shape == (7, 1, 32, 32) and gray[0, 0, 0, 0] == 54  # BT.709: 0.2126 * 255
    dataset = load_dataset(DataConfig(source="torchvision:CIFAR10", cache_dir=str(tmp_path), image_size=32,
                                      examples=40, held_out=10, whiten=False), seed=0)  # fmt: skip
    assert dataset.read_report["pictures"] == 7 and dataset.train.shape == (40, 32 * 32)
    assert sorted(tmp_path.rglob("*")) == before  # nothing downloaded or written


def test_a_truncated_or_wrong_cifar10_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    cifar_folder(tmp_path / "CIFAR10")
    config = DataConfig(source="torchvision:CIFAR10", cache_dir=str(tmp_path))
    batch = tmp_path / "CIFAR10" / "cifar-10-batches-bin" / "data_batch_3.bin"
    whole = batch.read_bytes()
    batch.write_bytes(whole[:-100])  # a download cut short
    with pytest.raises(DataError) as caught:
        own.read_torchvision("CIFAR10", config)
    assert f"{batch} is not a CIFAR-10 binary batch: its 2,973 bytes are not a whole number of 3,073-byte" in str(
        caught.value
    )
    assert "\n" not in str(caught.value) and f"delete {batch.parent} to download" in str(caught.value)
    batch.write_bytes(bytes([200]) + whole[1:])  # a label byte beyond 9: another file of the same size
    with pytest.raises(DataError, match=r"data_batch_3.bin is not a CIFAR-10 binary batch: record 0 has label 200"):
        own.read_torchvision("CIFAR10", config)
    batch.unlink()
    with pytest.raises(DataError, match=r"cannot read .*data_batch_3.bin \(FileNotFoundError"):
        own.read_torchvision("CIFAR10", config)


def test_the_cifar10_archive_is_checked_and_only_its_batch_files_are_extracted(tmp_path: Path) -> None:
    """The download path, from a test-made archive at a file:// address (nothing comes from the internet): its MD5
    is checked before anything is extracted, only the batch files are written, each under a name chosen by the
    reader, and an archive copied into the cache folder by hand is used without a download."""
    import hashlib
    import tarfile

    from downpour.data import cifar

    pictures = cifar_folder(tmp_path / "made")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "made" / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
        tar.add(tmp_path / "made" / "cifar-10-batches-bin" / "test_batch.bin", arcname="../outside.bin")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    root = tmp_path / "cache" / "CIFAR10"
    with pytest.raises(DataError, match=rf"came with MD5 {md5}, not 0123456789abcdef0123456789abcdef"):
        cifar.train_images(root, "torchvision:CIFAR10", url=archive.as_uri(), md5="0123456789abcdef" * 2)
    assert list(root.iterdir()) == []  # neither the download nor a folder left behind
    images = cifar.train_images(root, "torchvision:CIFAR10", url=archive.as_uri(), md5=md5)
    np.testing.assert_array_equal(images, pictures.transpose(0, 3, 1, 2))
    assert sorted(path.name for path in root.rglob("*")) == sorted(
        ["cifar-10-binary.tar.gz", "cifar-10-batches-bin", "test_batch.bin"]
        + [f"data_batch_{i}.bin" for i in range(1, 6)]
    )
    assert not (tmp_path / "cache" / "outside.bin").exists()
    copied = tmp_path / "copied" / "CIFAR10"
    copied.mkdir(parents=True)
    (copied / "cifar-10-binary.tar.gz").write_bytes(archive.read_bytes())
    nowhere = (tmp_path / "nowhere.tar.gz").as_uri()
    assert len(cifar.train_images(copied, "torchvision:CIFAR10", url=nowhere, md5=md5)) == 7
    offline = r"CIFAR10: could not download .*nowhere.tar.gz into .*\(or copy cifar-10-binary.tar.gz there\)"
    with pytest.raises(DataError, match=offline):
        cifar.train_images(tmp_path / "offline", "torchvision:CIFAR10", url=nowhere, md5=md5)
    # a truncated copy there, offline: the error names the copy and its MD5, not only the failed download
    truncated = tmp_path / "truncated" / "CIFAR10"
    truncated.mkdir(parents=True)
    (truncated / "cifar-10-binary.tar.gz").write_bytes(archive.read_bytes()[:100])
    wrong = hashlib.md5(archive.read_bytes()[:100]).hexdigest()
    with pytest.raises(DataError, match=rf"truncated/CIFAR10/cifar-10-binary.tar.gz has MD5 {wrong}, not {md5} \(a "
                                        r"truncated or wrong copy\), and downloading it again failed"):  # fmt: skip
        cifar.train_images(truncated, "torchvision:CIFAR10", url=nowhere, md5=md5)
    assert cifar.train_images(truncated, "torchvision:CIFAR10", url=archive.as_uri(), md5=md5).shape == images.shape


def test_gif_tiff_bmp_webp_pictures_are_read_and_heic_or_wide_tiffs_are_named(tmp_path: Path) -> None:
    """A folder of other formats than JPEG and PNG was read as its few JPEGs and PNGs without a word: GIF (its first
    frame), 16-bit TIFF, BMP and WebP are read; HEIC and a signed TIFF are skipped and named with their reason."""
    root = tmp_path / "mixed"
    root.mkdir()
    gray = np.arange(40 * 50, dtype=np.uint8).reshape(40, 50)
    Image.fromarray(gray).save(root / "a.png")
    frames = [Image.fromarray(np.full((40, 50), level, np.uint8)) for level in (10, 200)]
    frames[0].save(root / "b.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(gray.astype(np.uint16) * 257).save(root / "c.tif")  # 16-bit gray: 0..65535 -> 0..255
    Image.fromarray(gray).save(root / "d.bmp")
    Image.fromarray(gray).save(root / "e.webp", lossless=True)
    Image.fromarray(gray.astype(np.int32) - 100).save(root / "f.tif")  # signed: no scale to read it on
    (root / "g.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    report = own.ReadReport(f"folder:{root}")
    images = own.read_folder(root, channels=1, max_side=0, report=report)
    assert len(images) == 5 and report.files == 7
    assert int(images[1].max()) == 10  # the GIF's first frame
    for image in (images[0], images[2], images[3], images[4]):
        np.testing.assert_array_equal(image[0], gray)
    assert [(Path(path).name, reason.split(":")[0]) for path, reason in report.skipped] == [
        ("f.tif", "ValueError"),
        ("g.HEIC", "HEIC pictures are not read"),
    ]
    assert "-100..155 lie outside 0..65535" in report.skipped[0][1]


def test_pictures_smaller_than_a_crop_are_counted_and_warned_of(tmp_path: Path) -> None:
    """Nine of ten pictures smaller than data.image_size (thumbnails, or panoramas shrunk to data.max_side) were left
    out without a word: the run trained on the tenth alone."""
    root = tmp_path / "thumbs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(root / f"small{i}.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / "large.png")
    dataset = load_dataset(DataConfig(source=f"folder:{root}", image_size=24, examples=400, held_out=100), seed=0)
    assert dataset.read_report is not None and dataset.read_report["too_small"] == 9
    warned = [line for line in data_warnings(dataset) if "left out" in line]
    assert len(warned) == 1 and warned[0].startswith(f"9 of the 10 pictures of folder:{root} are smaller than a 24×24")


def test_file_names_that_are_not_utf8_are_reported_and_refused_as_a_source(tmp_path: Path) -> None:
    """A skipped file whose name is not UTF-8 (Latin-1 "café" from an old camera or disk) was kept as lone surrogates:
    the report page could not be written. A folder named so failed writing config.toml with a traceback."""
    root = tmp_path / "photos"
    root.mkdir()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(root / "good.png")
    bad = Path(os.fsdecode(os.fsencode(root) + b"/caf\xe9.jpg"))
    bad.write_bytes(b"not a picture")
    report = own.ReadReport(f"folder:{root}")
    own.read_folder(root, channels=1, max_side=0, report=report)
    line = report.summary()["skipped_files"][0]
    assert line.startswith(f"{root}/caf\\xe9.jpg: UnidentifiedImageError")
    json.dumps(report.summary(), ensure_ascii=False).encode("utf-8")  # as summary.json and the report page hold it
    with pytest.raises(ConfigError, match=r"invalid data.source: .*holds bytes that are not UTF-8"):
        load(None, [f"data.source=folder:{bad.parent}/caf\udce9"])


def test_a_folder_that_cannot_be_listed_is_reported_not_passed_over(
    pictures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``os.walk`` passes over a folder it may not list (another user's, mode 700): its pictures were left out without
    a word, and an unlistable source folder was said to hold no pictures. (Listing is refused here by replacing
    ``os.scandir``: a test run as root may list any folder.)"""
    listing = os.scandir
    refused = {str(pictures / "nested")}

    def scandir(path: Any) -> Any:
        if os.fspath(path) in refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = own.ReadReport(f"folder:{pictures}")
    images = own.read_folder(pictures, channels=1, max_side=0, report=report)
    assert len(images) == 1 and report.files == 3  # camera.png, cut.png, and the folder nested/
    assert (str(pictures / "nested"), "folder not listed (PermissionError: Permission denied)") in report.skipped
    refused.add(str(pictures))
    with pytest.raises(DataError, match=r"cannot be listed \(PermissionError: Permission denied\)"):
        own.read_folder(pictures, channels=1, max_side=0, report=own.ReadReport(f"folder:{pictures}"))
