"""CIFAR-10 (``data.source = "torchvision:CIFAR10"``) from its binary distribution, read with numpy.

torchvision's ``CIFAR10`` unpickles the batches of the "python version"; this reads the "binary version"
(``cifar-10-binary.tar.gz``, https://www.cs.toronto.edu/~kriz/cifar.html) instead, so nothing from disk is ever
unpickled, and torchvision is not needed. Its folder ``cifar-10-batches-bin`` holds ``data_batch_1.bin`` ...
``data_batch_5.bin`` (the 50,000 training pictures, 10,000 each) and ``test_batch.bin``; each record is one label
byte (0 to 9), then the 1,024 red values of a 32×32 picture row by row from the top, its 1,024 green, its 1,024 blue.

The archive is downloaded on first use into ``data.cache_dir``/CIFAR10, checked against the MD5 published beside it,
and its batch files are extracted into ``cifar-10-batches-bin`` (an archive copied there by hand is used as it is).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import stat
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from downpour.errors import DataError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # published on the page above, beside the link (170,052,171 bytes)
ARCHIVE = "cifar-10-binary.tar.gz"
FOLDER = "cifar-10-batches-bin"
TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
BATCHES = (*TRAIN_BATCHES, "test_batch.bin")  # what is extracted from the archive (its readme and label names not)
SIDE = 32
RECORD = 1 + 3 * SIDE * SIDE  # bytes: the label, then the red, green and blue planes
CLASSES = 10


def train_images(root: Path, source: str, *, url: str = URL, md5: str = MD5) -> np.ndarray:
    """The training pictures of ``data_batch_1.bin`` ... ``data_batch_5.bin`` under ``root/cifar-10-batches-bin``,
    in order, as uint8 ``(N, 3, 32, 32)``; the folder is downloaded first when it is not there."""
    if not (root / FOLDER).is_dir():
        download(root, source, url=url, md5=md5)
    return np.concatenate([read_batch(root / FOLDER / name, source) for name in TRAIN_BATCHES])


def read_batch(path: Path, source: str) -> np.ndarray:
    """The pictures of one binary batch file as uint8 ``(N, 3, 32, 32)``; a file that is missing, not a whole number
    of records (truncated) or holds a label beyond 9 (not a CIFAR-10 batch) is a DataError naming it."""
    again = f"delete {path.parent} to download CIFAR-10 again"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a named pipe would block the read
            raise DataError(f"data.source {source}: {path} is not a regular file; {again}")
        records = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"data.source {source}: cannot read {path} ({type(exc).__name__}: {exc}); {again}") from None
    if not records.size or records.size % RECORD:
        raise DataError(
            f"data.source {source}: {path} is not a CIFAR-10 binary batch: its {records.size:,} bytes are not a whole "
            f"number of {RECORD:,}-byte records (a truncated file?); {again}"
        )
    records = records.reshape(-1, RECORD)
    labels = records[:, 0]
    if labels.max() >= CLASSES:
        first = int(np.argmax(labels >= CLASSES))
        raise DataError(
            f"data.source {source}: {path} is not a CIFAR-10 binary batch: record {first} has label "
            f"{labels[first]} (labels are 0 to {CLASSES - 1}); {again}"
        )
    return records[:, 1:].reshape(-1, 3, SIDE, SIDE)  # (N, C, H, W): each plane row-major, the top row first


def download(root: Path, source: str, *, url: str = URL, md5: str = MD5) -> None:
    """``root/cifar-10-batches-bin`` from the archive at ``url`` (or from one already in ``root`` with the right MD5):
    the archive is downloaded beside it and checked, then the batch files are extracted."""
    archive = root / ARCHIVE
    wrong = None  # the MD5 of an archive already there that is not the right one (a truncated or other copy)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if archive.is_file() and (found := file_md5(archive)) != md5:
            wrong = found
        if wrong is not None or not archive.is_file():
            try:
                fetch(url, archive, md5)
            except (OSError, http.client.HTTPException) as exc:
                if wrong is None:
                    raise
                raise DataError(f"{archive} has MD5 {wrong}, not {md5} (a truncated or wrong copy), and downloading "
                                f"it again failed ({type(exc).__name__}: {exc}): replace it with the right archive"
                                ) from None  # fmt: skip
        extract(archive, root / FOLDER)
    except DataError as exc:
        raise DataError(f"data.source {source}: {exc}") from None
    except (OSError, http.client.HTTPException) as exc:  # offline (URLError is an OSError), a connection cut short
        raise DataError(
            f"data.source {source}: could not download {url} into {root} ({type(exc).__name__}: {exc}); it is "
            f"downloaded on first use, so the first run needs the internet (or copy {ARCHIVE} there)"
        ) from None


def fetch(url: str, archive: Path, md5: str) -> None:
    """``url`` saved as ``archive`` when its MD5 is ``md5`` (written beside it first, so that a download cut short
    never stands as the archive); a wrong MD5 is a DataError."""
    partial = archive.with_name(archive.name + ".part")
    print(f"downloading {url} into {archive.parent} (on first use only)", file=sys.stderr, flush=True)
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"{url} came with MD5 {digest.hexdigest()}, not {md5} (a broken download): run again")
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)


def file_md5(path: Path) -> str:
    """The MD5 of a file's bytes, as a hex string."""
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def extract(archive: Path, folder: Path) -> None:
    """The regular files named ``cifar-10-batches-bin/BATCH`` in ``archive`` copied into ``folder``, each to a name
    chosen here (the archive's names are only compared, never used as paths, so no member can land elsewhere);
    written beside ``folder`` and renamed at the end, so that an extraction cut short is never read."""
    partial = folder.with_name(folder.name + ".part")
    wanted = {f"{FOLDER}/{name}": name for name in BATCHES}
    try:
        shutil.rmtree(partial, ignore_errors=True)  # left by an extraction cut short
        partial.mkdir()
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # in order, in one pass over the compressed stream
                name = wanted.pop(member.name.removeprefix("./"), None) if member.isfile() else None
                if name is not None:
                    with tar.extractfile(member) as data, open(partial / name, "wb") as out:
                        shutil.copyfileobj(data, out)
        if wanted:
            raise DataError(f"{archive} holds no {', '.join(sorted(wanted))}: not the CIFAR-10 binary archive")
        os.replace(partial, folder)
    except (OSError, EOFError, tarfile.TarError) as exc:  # a truncated or corrupt archive, a full disk
        raise DataError(
            f"cannot extract {archive} ({type(exc).__name__}: {exc}); delete it to download again"
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
