"""Users' own data: a folder of pictures, video files, or a torchvision set, as training examples.

``data.source`` names it:

- ``folder:PATH``: every ``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.gif``, ``.tif``, ``.tiff``, ``.webp`` and
  ``.avif`` under ``PATH`` (recursively, in sorted order; of an animated or multi-page one, its first frame);
  pictures Pillow cannot decode (HEIC, JPEG XL, camera raw) are listed as skipped;
- ``video:PATH_OR_GLOB``: one video file, or every file a glob matches (``**`` recurses); one frame every
  ``data.frame_stride`` frames, decoded by PyAV (FFmpeg);
- ``torchvision:STL10`` (its 5,000 ``train`` images, 96×96; labels unused; read by torchvision) or
  ``torchvision:CIFAR10`` (its 50,000 ``train`` images, 32×32; read from its binary distribution by
  :mod:`downpour.data.cifar`, without torchvision), downloaded on first use into ``data.cache_dir``.

Each picture becomes grayscale (``data.channels = 1``) or RGB (``3``); a picture or frame whose longer side
exceeds ``data.max_side`` is shrunk to it (area-averaged). Training examples are then cut exactly as for the bundled
``natural-images`` source: ``data.examples + data.held_out`` square crops of side ``data.image_size`` at uniformly
random places (:func:`downpour.data.sources.random_crops`), so ``rica`` learns on them with ``data.image_size = 16``
and ``cat`` with the default 32 or more. A file that cannot be read (corrupt, truncated, not a picture, a video
without a video stream, a named pipe or device named like a picture) is skipped and counted in a
:class:`ReadReport`; the run goes on with the rest.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from downpour.config import DataConfig
from downpour.data import cifar
from downpour.data.gray import float_picture_unit, luminance
from downpour.data.sources import crop_positions, random_crops
from downpour.errors import DataError

# What Pillow decodes (an animated GIF or WebP, or a multi-page TIFF: its first frame)
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif")
# Pictures Pillow cannot decode (or of which it would read only a small preview): listed as skipped, with the reason,
# so that a folder of phone photos in HEIC is not silently read as its few JPEGs
UNREAD_PICTURE_SUFFIXES = {
    **{".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL"},
    **dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".raf", ".rw2"), "camera raw"),
}
# How pictures are found and decoded, recorded beside their digest (what changed since each earlier version: a run
# saved by one may see other pictures in the same files)
READER_CHANGES = {
    1: "decoded pictures differently (before 2026-11-27: gray by BT.601 weights, EXIF orientation and video "
    "rotation ignored)",
    2: "listed folders differently (before 2026-11-28: linked subfolders not followed, a file reached twice read "
    "twice)",
    3: "read float gray pictures differently (a TIFF of floats in [0, 1] read as black)",
    4: "read only .jpg, .jpeg and .png files (before 2026-11-28: .bmp, .gif, .tif, .tiff, .webp and .avif pictures "
    "left out without a word)",
}
READER_VERSION = 5
NAMED_LIKE_PICTURES = (*PICTURE_SUFFIXES, *UNREAD_PICTURE_SUFFIXES)  # listed from a folder
SHOWN_SKIPS = 20  # skipped files named in the summary (all are counted)


@dataclass
class ReadReport:
    """What reading a folder or videos found: files, the pictures kept, and every file skipped with its reason."""

    source: str
    files: int = 0
    pictures: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    digest: str = ""  # of the pictures read (pictures_digest)
    crop_positions: int = 0  # distinct crops the pictures hold (random crops repeat beyond a fraction of it)
    too_small: int = 0  # pictures (or frames) read but smaller than a crop: no crop is cut from them
    cut_short: list[tuple[str, str]] = field(default_factory=list)  # (path, what): videos whose frames ended early

    def summary(self) -> dict[str, Any]:
        """For ``summary.json``: counts, and the first ``SHOWN_SKIPS`` skipped files as ``"path: reason"``."""
        return {
            "source": self.source,
            "files": self.files,
            "read": self.files - len(self.skipped),
            "skipped": len(self.skipped),
            "pictures": self.pictures,
            "skipped_files": [printable(f"{path}: {reason}") for path, reason in self.skipped[:SHOWN_SKIPS]],
            "digest": self.digest,
            "crop_positions": self.crop_positions,
            "too_small": self.too_small,
            "cut_short": len(self.cut_short),
            "cut_short_files": [printable(f"{path}: {what}") for path, what in self.cut_short[:SHOWN_SKIPS]],
        }


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (which Python holds as lone surrogates, and which UTF-8
    files such as ``summary.json`` and the report page cannot hold) written as ``\\xff``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an undecodable byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _shrink(image: Any, max_side: int) -> Any:
    """A PIL image whose longer side is at most ``max_side`` (0: unchanged), area-averaged."""
    from PIL import Image

    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.resize(size, Image.Resampling.BOX)
    return image


def _to_array(image: Any, channels: int, max_side: int) -> np.ndarray:
    """A PIL image as uint8 ``(C, H, W)``: gray (:func:`~downpour.data.gray.luminance`, not Pillow's own "L"
    weights) or RGB, shrunk to ``max_side``."""
    from PIL import Image

    if image.mode.startswith("I"):  # 16-bit grayscale: PIL's own conversion would clip everything above 255
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (values.min() >= 0 and values.max() <= 65535):  # a signed or 32-bit TIFF
            raise ValueError(f"integer gray values {values.min():.0f}..{values.max():.0f} lie outside 0..65535 "
                             "(a signed or 32-bit picture): convert it to 8 or 16 bits")  # fmt: skip
        image = Image.fromarray((values / 65535.0 * 255.0).round().clip(0, 255).astype(np.uint8))
    elif image.mode == "F":  # float gray: Pillow's conversion clips to 0..255, so a [0, 1] picture came out black
        image = Image.fromarray((float_picture_unit(np.asarray(image)) * 255.0).round().astype(np.uint8))
    if not (image.mode == "L" and channels == 1):  # colour becomes gray below, by the luminance all sources use
        image = image.convert("RGB")
    array = np.asarray(_shrink(image, max_side), dtype=np.uint8)  # (H, W) gray or (H, W, 3)
    if array.ndim == 2:
        return array[None]  # (1, H, W)
    if channels == 1:
        return luminance(array, channel_axis=-1).round().astype(np.uint8).transpose(2, 0, 1)  # (1, H, W)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (3, H, W)


LARGEST_PICTURE = 1_000_000_000  # pixels (Pillow's own limit is 179 million, below some phones' 200 MP photos)


@contextlib.contextmanager
def large_pictures() -> Iterator[None]:
    """The block in which users' pictures are read. Pillow refuses pictures over 179 million pixels as possible
    "decompression bombs" (and warns over 89 million): here pictures up to :data:`LARGEST_PICTURE` pixels are read
    without a warning. (A JPEG is decoded at a reduced size where ``data.max_side`` allows, see
    :func:`_open_small`.) Pillow's advice on palettes with transparency in bytes is not the user's either."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = LARGEST_PICTURE // 2  # Pillow refuses beyond twice its limit (warns beyond it)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def upright(image: Any) -> Any:
    """A PIL image turned as its EXIF orientation says (a phone's portrait photo is stored sideways with a tag),
    or the image itself when it has none (Pillow 13 would return a copy, which evaluation takes for a turned
    picture)."""
    from PIL import ImageOps

    if image.getexif().get(0x0112, 1) not in range(2, 9):  # 1: as stored
        return image
    turned = ImageOps.exif_transpose(image)
    return image if turned is None else turned


def _mirrors(frame: Any) -> bool:
    """Whether a video frame's display matrix mirrors it (determinant < 0): PyAV then reports a mirror as a
    rotation (an h-flip as -180), so such a frame is left as stored rather than turned upside down."""
    for side in frame.side_data:
        if "DISPLAYMATRIX" in str(side.type):
            a, b, _, c, d = np.frombuffer(bytes(side)[:20], dtype="<i4").astype(np.float64) / 65536.0
            return a * d - b * c < 0
    return False


def _open_small(image: Any, max_side: int) -> None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 of its size when that still leaves its longer side at least
    ``max_side`` (0: full size): a 200 MP photo then never exists in memory at full size."""
    if max_side and image.format == "JPEG":
        scale = max_side / max(image.size)
        image.draft(None, (math.ceil(image.size[0] * scale), math.ceil(image.size[1] * scale)))  # mode as it is


def read_folder(folder: Path, *, channels: int, max_side: int, report: ReadReport) -> list[np.ndarray]:
    """Every picture under ``folder`` as uint8 ``(C, H, W)``; unreadable files are skipped into ``report``."""
    from PIL import Image

    if not folder.is_dir():
        raise DataError(f"data.source {report.source}: {folder} is not a folder")
    unlisted: list[tuple[str, str]] = []
    paths = picture_paths(folder, unlisted=unlisted)
    if unlisted and unlisted[0][0] == str(folder):
        raise DataError(f"data.source {report.source}: {folder} cannot be listed ({unlisted[0][1]})")
    if not paths and not unlisted:
        raise DataError(f"data.source {report.source}: no {', '.join(PICTURE_SUFFIXES)} files under {folder}")
    images = []
    report.files += len(paths) + len(unlisted)
    report.skipped += [(path, f"folder not listed ({reason})") for path, reason in unlisted]
    with large_pictures():
        for path in paths:
            if kind := UNREAD_PICTURE_SUFFIXES.get(path.suffix.lower()):
                report.skipped.append((str(path), f"{kind} pictures are not read: convert them to JPEG or PNG"))
                continue
            if kind := _not_regular(path):  # opening a named pipe waits for a writer: training hung before it began
                report.skipped.append((str(path), f"not a regular file but {kind}: not opened"))
                continue
            try:
                with Image.open(path) as image:
                    _open_small(image, max_side)
                    image.load()  # decode now: a truncated or corrupt file fails here, not later
                    images.append(_to_array(upright(image), channels, max_side))
            except Exception as exc:  # any decoder failure of one file must not end the run
                report.skipped.append((str(path), f"{type(exc).__name__}: {exc}"))
    report.pictures += len(images)
    return images


def _not_regular(path: Path) -> str:
    """What ``path`` is when, after links, it is not a regular file ("a named pipe", ...), else "" (a regular file,
    or a broken link, whose opening then says what is wrong)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode):
        return ""
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device"}  # fmt: skip
    return next((kind for test, kind in kinds.items() if test(mode)), "another kind of file")


def picture_paths(folder: Path, *, unlisted: list[tuple[str, str]] | None = None) -> list[Path]:
    """The entries named like pictures under ``folder``, recursively and through linked folders (each real folder
    once, so a link loop ends), sorted, each real file once (a link to a picture beside it is not a second example).
    A broken link, and anything but a regular file (a named pipe, a device), is kept: a file that cannot be read,
    counted and reported (:func:`read_folder` never opens the latter). Each folder that cannot be listed (no
    permission) is appended to ``unlisted`` as ``(path, reason)``: ``os.walk`` alone passes over it without a word."""

    def note(error: OSError) -> None:
        if unlisted is not None:
            unlisted.append((str(error.filename), f"{type(error).__name__}: {error.strerror}"))

    candidates = []
    seen_folders: set[str] = set()
    for root, folders, files in os.walk(folder, onerror=note, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_folders:
            folders[:] = []  # a link back to a folder already walked
            continue
        seen_folders.add(real)
        folders.sort()  # walked in sorted order: a folder reached twice is named by its first route
        candidates += [Path(root) / name for name in files if Path(name).suffix.lower() in NAMED_LIKE_PICTURES]
    found: dict[str, Path] = {}
    for path in sorted(candidates):  # the first name in sorted order stands for a file reached twice
        found.setdefault(os.path.realpath(path) if path.exists() else str(path), path)
    return sorted(found.values())


def video_paths(pattern: str) -> list[Path]:
    """The files ``pattern`` names: one file, or the sorted matches of a glob (``~`` expanded, ``**`` recursive),
    each real file once (``**/**/*.mp4`` matched one file three times)."""
    expanded = os.path.expanduser(pattern)
    if Path(expanded).is_file():
        return [Path(expanded)]
    found: dict[str, Path] = {}
    for match in sorted(glob.glob(expanded, recursive=True)):
        if Path(match).is_file():
            found.setdefault(os.path.realpath(match), Path(match))
    return sorted(found.values())


def _declared_frames(container: Any, stream: Any) -> int:
    """The frames a video's header declares: the stream's count where the container keeps one (MP4, AVI), else its
    duration times the stream's average rate (Matroska keeps only a duration); 0 when neither is known."""
    if stream.frames:
        return int(stream.frames)
    if container.duration and stream.average_rate:
        return round(container.duration / 1e6 * float(stream.average_rate))  # (duration in microseconds)
    return 0


def read_video(path: Path, *, stride: int, channels: int, max_side: int,
               cut_short: list[tuple[str, str]] | None = None) -> list[np.ndarray]:  # fmt: skip
    """Frames 0, ``stride``, 2·``stride`` ... of the first video stream of ``path``, each uint8 ``(C, H, W)``.

    A damaged or truncated file may decode without an error and simply end early (a Matroska file cut in half gave
    8 of its 30 frames): when the frames decoded fall short of what the header declares by more than 2 and 5%,
    ``(path, "decoded N of the M frames its header declares")`` is appended to ``cut_short``; the frames are kept."""
    import av

    frames = []
    decoded = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DataError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index % stride == 0:
                picture = frame.to_image()
                if frame.rotation % 360 and not _mirrors(frame):  # a phone's portrait video: stored sideways
                    picture = picture.rotate(frame.rotation, expand=True)  # (both count degrees counterclockwise)
                frames.append(_to_array(picture, channels, max_side))
        declared = _declared_frames(container, stream)
    if not frames:
        raise DataError("no frame could be decoded")
    if cut_short is not None and declared - decoded > max(2, 0.05 * declared):
        cut_short.append((str(path), f"decoded {decoded:,} of the {declared:,} frames its header declares"))
    return frames


def read_videos(pattern: str, *, stride: int, channels: int, max_side: int, report: ReadReport) -> list[np.ndarray]:
    """The frames of every video ``pattern`` names; a file that fails to decode is skipped whole into ``report``."""
    paths = video_paths(pattern)
    if not paths and os.path.isdir(folder := os.path.expanduser(pattern)):  # "no file matches" it: it exists
        glob_of = os.path.join(pattern, "*.mp4")
        raise DataError(f"data.source {report.source}: {folder} is a folder; name its videos with a glob: "
                        f"video:{glob_of} (or ** to recurse)")  # fmt: skip
    if not paths:
        raise DataError(f"data.source {report.source}: no file matches {pattern} (name a file or a glob: clips/*.mp4)")
    report.files += len(paths)
    frames: list[np.ndarray] = []
    for path in paths:
        try:
            frames.extend(read_video(path, stride=stride, channels=channels, max_side=max_side,
                                     cut_short=report.cut_short))  # fmt: skip
        except Exception as exc:  # corrupt container, missing codec, truncated stream: skip this file
            report.skipped.append((str(path), f"{type(exc).__name__}: {exc}"))
    report.pictures += len(frames)
    return frames


def cache_root(config: DataConfig) -> Path:
    """Where torchvision sets are kept: ``data.cache_dir``, else ``$XDG_CACHE_HOME/downpour`` (``~/.cache/...``)."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "downpour"


def read_torchvision(name: str, config: DataConfig) -> np.ndarray:
    """The ``train`` images of the ``name`` set (``STL10`` or ``CIFAR10``) as uint8 ``(N, C, H, W)``, downloaded
    on first use into ``data.cache_dir``/``name``."""
    source = f"torchvision:{name}"
    root = cache_root(config) / name
    # CIFAR10: its binary distribution, read here (torchvision's CIFAR10 unpickles the batch files of another one)
    images = cifar.train_images(root, source) if name == "CIFAR10" else _torchvision_stl10(root, source)
    if config.channels == 1:
        images = luminance(images, channel_axis=1).round().astype(np.uint8)  # (N, 1, H, W)
    return np.ascontiguousarray(images)


def _torchvision_stl10(root: Path, source: str) -> np.ndarray:
    """STL-10's 5,000 ``train`` images as uint8 ``(N, 3, 96, 96)``, by torchvision (which reads its binary files
    with numpy), downloaded on first use into ``root``."""
    try:
        import torchvision
    except Exception as exc:  # missing, or built for another torch (then it fails with other errors than ImportError)
        raise DataError(
            f"data.source {source} needs torchvision, which does not import here ({type(exc).__name__}: {exc}); "
            "install one built for your torch: pip install 'downpour-sgd[torchvision]'"
        ) from None
    try:
        return np.asarray(torchvision.datasets.STL10(str(root), split="train", download=True).data)
    except (OSError, RuntimeError, ValueError) as exc:  # offline (URLError is an OSError), a broken download
        raise DataError(
            f"data.source {source}: could not download or read it into {root} ({type(exc).__name__}: {exc}); it is "
            "downloaded on first use, so the first run needs the internet (or copy a download there)"
        ) from None


def own_examples(config: DataConfig, rng: np.random.Generator, count: int) -> tuple[np.ndarray, ReadReport | None]:
    """``count`` crops ``(N, C, image_size, image_size)`` float32 in [0, 1] from the user's source (``data.examples``
    and the held-out ones), and the report of files read (for torchvision sets: the pictures and their crops)."""
    kind, _, where = config.source.partition(":")
    size = config.image_size
    where_text = f"data.source {config.source} (data.image_size = {size}; data.max_side = {config.max_side})"
    if kind == "torchvision":
        images = list(read_torchvision(where, config))
        report = ReadReport(config.source, pictures=len(images), crop_positions=crop_positions(images, size))
        return random_crops(images, count, size, rng, where=where_text), report  # (its positions: data_warnings)
    report = ReadReport(config.source)
    if kind == "folder":
        pictures = read_folder(Path(where).expanduser(), channels=config.channels, max_side=config.max_side,
                               report=report)  # fmt: skip
    elif kind == "video":
        pictures = read_videos(where, stride=config.frame_stride, channels=config.channels,
                               max_side=config.max_side, report=report)  # fmt: skip
    else:
        raise DataError(f"invalid data.source: {config.source!r}")
    if not pictures:
        raise DataError(f"data.source {config.source}: none of its {report.files} files could be read "
                        f"(first: {report.skipped[0][0]}: {report.skipped[0][1]})")  # fmt: skip
    report.digest = pictures_digest(pictures)
    report.crop_positions = crop_positions(pictures, size)
    report.too_small = sum(min(picture.shape[1:]) < size for picture in pictures)  # left out by random_crops
    return random_crops(pictures, count, size, rng, where=where_text), report


def pictures_digest(pictures: list[np.ndarray]) -> str:
    """SHA-256 of the decoded pictures in order, each with its shape: what the crops are cut from, so that a run is
    only resumed on the same pictures (files added, removed or edited change it; a copy with new dates does not)."""
    digest = hashlib.sha256()
    for picture in pictures:
        digest.update(np.asarray(picture.shape, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(picture).tobytes())
    return digest.hexdigest()
