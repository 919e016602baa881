"""Find CIFAR-10 on disk (or download it), decode it once, and cache it as a uint8 tensor file.

All of CIFAR-10's on-disk paths live in this module. Sources, first found wins:

1. a cache file ``<root>/.netcompress_cache/cifar10-uint8-v1.pt``, or the fallback
   ``<cache_dir or ~/.cache/netcompress>/<sha1 of the absolute root>/cifar10-uint8-v1.pt``;
2. the official python release ``<root>/cifar-10-batches-py/`` (pickles, read by an unpickler
   that admits only numpy arrays, lists, dicts, bytes, str and numbers: a doctored batch file is
   refused, naming it, and its code never runs);
3. an ImageFolder tree ``<root>/train/<class>/*.jpg`` + ``<root>/test/<class>/*.jpg`` with the
   10 CIFAR-10 classes (alphabetical, which is also the official label order); an undecodable
   image is an error naming it, or, with ``data.skip_bad_images=true``, left out and counted;
4. ``torchvision.datasets.CIFAR10(root, download=True)``.

The cache is a ``torch.save`` of plain tensors, lists and strings (loads with
``weights_only=True``), written to a temporary file and moved into place with ``os.replace``,
under a file lock, so concurrent jobs neither decode twice nor read a half-written file.
Following open_lth, a step that finds its output already there skips the work.
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import importlib
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from filelock import FileLock
from PIL import Image

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CACHE_FORMAT = "netcompress-cifar10/1"
CACHE_NAME = "cifar10-uint8-v1.pt"
CACHE_SUBDIR = ".netcompress_cache"
BATCHES_DIR = "cifar-10-batches-py"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_SERIAL_BELOW = 2000  # decode smaller trees in-process: starting a pool costs more than it saves

Data = dict[str, Any]  # {"train": {"images", "labels"}, "test": {...}, "classes": [...], ...}


# -- cache locations ---------------------------------------------------------------------------
def primary_cache_file(root: Path) -> Path:
    """Cache beside the data: ``<root>/.netcompress_cache/cifar10-uint8-v1.pt``."""
    return root / CACHE_SUBDIR / CACHE_NAME


def fallback_cache_file(root: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Cache for a read-only root: ``<cache_dir or ~/.cache/netcompress>/<sha1(abs root)>/...``;
    keyed by the root so several roots can share one ``cache_dir``."""
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "netcompress"
    digest = hashlib.sha1(str(root).encode()).hexdigest()
    return base.resolve() / digest / CACHE_NAME


def is_writable_dir(path: Path) -> bool:
    """Whether we may create files in the existing directory ``path``.

    Root passes ``os.access`` everywhere, so for root a directory without its owner-write bit
    also counts as read-only: a shared data folder marked ``r-x`` is never written to.
    """
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        return False
    geteuid = getattr(os, "geteuid", None)
    return not (geteuid is not None and geteuid() == 0 and not path.stat().st_mode & stat.S_IWUSR)


def _prepare_dir(path: Path) -> bool:
    """Create ``path`` if its nearest existing ancestor is writable; True if ``path`` is usable."""
    if path.exists():
        return is_writable_dir(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not is_writable_dir(ancestor):
        return False
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return is_writable_dir(path)


# -- cache file --------------------------------------------------------------------------------
def read_cache(path: Path) -> Data | None:
    """The cached data set at ``path``, or None if absent or not a valid cache (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"format is not {CACHE_FORMAT}")
        if tuple(data["classes"]) != CIFAR10_CLASSES:
            raise ValueError(f"classes {data['classes']}")
        for split in ("train", "test"):
            images, labels = data[split]["images"], data[split]["labels"]
            if images.dtype != torch.uint8 or images.shape[1:] != (3, 32, 32) or labels.shape != images.shape[:1]:
                raise ValueError(f"{split} tensors {images.dtype} {tuple(images.shape)} / {tuple(labels.shape)}")
    except Exception as err:  # a damaged or foreign file: rebuild instead of failing the run
        log.warning("CIFAR-10: ignoring cache %s (%s); rebuilding it", path, err)
        return None
    if data.get("skipped"):
        log.warning("CIFAR-10: cache %s was built without %d unreadable images (data.skip_bad_images=true); "
                    "delete it to decode the tree again", path, len(data["skipped"]))
    return data


def write_cache_atomic(data: Data, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _pack(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], source: str) -> Data:
    """Arrays (N, 3, 32, 32) uint8 + labels -> the cache dict."""
    def split(images: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor]:
        return {"images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
                "labels": torch.as_tensor(np.asarray(labels), dtype=torch.int64)}
    return {"format": CACHE_FORMAT, "source": source, "classes": list(CIFAR10_CLASSES),
            "train": split(*train), "test": split(*test)}


# -- source: official python release -----------------------------------------------------------
def _numpy_attr(name: str, attr: str) -> Any:
    """``numpy._core.<name>.<attr>`` (numpy 2) or ``numpy.core.<name>.<attr>`` (numpy 1)."""
    try:
        module = importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # numpy < 2
        module = importlib.import_module(f"numpy.core.{name}")
    return getattr(module, attr)


def _batch_globals() -> dict[tuple[str, str], Any]:
    """The only globals an official batch file (or a faithful re-pickling of one) refers to:
    numpy's array and dtype reconstruction, and Python 2 byte strings' ``_codecs.encode``."""
    reconstruct, frombuffer = _numpy_attr("multiarray", "_reconstruct"), _numpy_attr("numeric", "_frombuffer")
    scalar = _numpy_attr("multiarray", "scalar")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):
        allowed.update({(f"{core}.multiarray", "_reconstruct"): reconstruct,
                        (f"{core}.multiarray", "scalar"): scalar,
                        (f"{core}.numeric", "_frombuffer"): frombuffer})
    return allowed


class UnsafeBatchFile(ValueError):
    """A CIFAR-10 batch file that asks the unpickler for anything the official files do not contain."""


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, lists, dicts, bytes, str and numbers; refuses every other
    global, so a doctored batch file cannot run code (the official format is a pickle)."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path
        self.allowed = _batch_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafeBatchFile(
                f"data.root: {self.path} is not an official CIFAR-10 batch file: it asks to load {module}.{name}, "
                "which the official files never contain (refused, nothing was run); delete the "
                f"{BATCHES_DIR} folder and download it again, or point data.root at a trusted copy")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeBatchFile(f"data.root: {self.path} is not an official CIFAR-10 batch file (persistent ids)")


def _unpickle(path: Path) -> dict[str, Any]:
    """One official batch file; keys as str whether it was pickled by Python 2 or 3.

    Read with :class:`_BatchUnpickler`, never plain ``pickle.load``: see its docstring."""
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, path).load()
    except UnsafeBatchFile:
        raise
    except Exception as exc:  # truncated, not a pickle, ...
        raise ValueError(f"data.root: {path} is not a readable CIFAR-10 batch file ({type(exc).__name__}: {exc}); "
                         f"delete the {BATCHES_DIR} folder and download it again") from None
    if not isinstance(entry, dict):
        raise ValueError(f"data.root: {path} is not a CIFAR-10 batch file (holds a {type(entry).__name__}, "
                         "not a dict)")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or data.dtype == object or not (
            "labels" in entry or "fine_labels" in entry):
        raise ValueError(f"data.root: {path} is not a CIFAR-10 batch file (needs a numeric 'data' array and "
                         f"'labels'; has {sorted(entry)})")
    return entry


def read_batches_py(folder: Path) -> Data:
    """Decode ``cifar-10-batches-py`` (data_batch_1..5, test_batch) as torchvision does."""
    def load(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in names:
            entry = _unpickle(folder / name)
            data = np.asarray(entry["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{folder / name}: 'data' has shape {data.shape}, expected (N, 3072)")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        return np.concatenate(images), np.asarray(labels, dtype=np.int64)

    return _pack(load([f"data_batch_{i}" for i in range(1, 6)]), load(["test_batch"]), f"{folder}")


def has_batches_py(root: Path) -> bool:
    folder = root / BATCHES_DIR
    return all((folder / n).is_file() for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])


# -- source: ImageFolder tree ------------------------------------------------------------------
def _decode_one(path: str) -> torch.Tensor:
    """uint8 (3, H, W): libjpeg-turbo/libpng through torchvision (2-3x faster than PIL on these
    tiny files), PIL for other formats."""
    try:
        return torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


SKIP_HINT = "set data.skip_bad_images=true to leave unreadable images out (their count is logged)"


def decode_images(paths: list[str], skip_bad: bool = False) -> tuple[np.ndarray, list[int]]:
    """Decode 32x32 images into uint8 (n, 3, 32, 32), and the indices of undecodable ones (only
    with ``skip_bad``; else the first one raises, naming the file). Runs in pool workers."""
    out = np.empty((len(paths), 3, 32, 32), dtype=np.uint8)
    bad: list[int] = []
    for i, path in enumerate(paths):
        try:
            image = _decode_one(path)
        except Exception as exc:  # truncated, corrupt, not an image
            if skip_bad:
                bad.append(i)
                continue
            reason = " ".join(str(exc).split(", ")[-1].split()) if isinstance(exc, RuntimeError) else str(exc)
            raise ValueError(f"data.root: cannot decode image {path} ({type(exc).__name__}: {reason}); delete or "
                             f"replace it, or {SKIP_HINT}") from None
        if image.shape != (3, 32, 32):
            raise ValueError(f"{path}: image is {image.shape[2]}x{image.shape[1]}, CIFAR-10 images are 32x32")
        out[i] = image.numpy()
    return out, bad


def _worker_init() -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool


def _decode_all(paths: list[str], skip_bad: bool = False) -> tuple[np.ndarray, list[int]]:
    """Decode in a process pool; serially when small or when this process may not have
    children (e.g. a daemonic worker). Returns (pixels, indices of skipped images)."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(workers, 8)
    if len(paths) < _SERIAL_BELOW or workers < 2:
        return decode_images(paths, skip_bad)
    chunk = 500
    chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
    try:
        pool = mp.get_context().Pool(workers, initializer=_worker_init)
    except (AssertionError, OSError) as err:
        log.info("CIFAR-10: no process pool (%s); decoding in this process", err)
        return decode_images(paths, skip_bad)
    with pool:
        parts = pool.map(functools.partial(decode_images, skip_bad=skip_bad), chunks, chunksize=1)
    bad = [start + i for start, (_, part_bad) in zip(range(0, len(paths), chunk), parts) for i in part_bad]
    return np.concatenate([pixels for pixels, _ in parts]), bad


def _list_split(split_dir: Path, root: Path) -> tuple[list[str], np.ndarray]:
    classes = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir()))
    if classes != CIFAR10_CLASSES:
        raise ValueError(
            f"data.root={root}: {split_dir.name}/ has class folders {list(classes)}; a CIFAR-10 ImageFolder "
            f"tree needs exactly {list(CIFAR10_CLASSES)}")
    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        files = sorted(f for f in os.listdir(split_dir / name) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"data.root={root}: {split_dir.name}/{name}/ has no images ({IMAGE_EXTENSIONS})")
        paths.extend(str(split_dir / name / f) for f in files)
        labels.extend([index] * len(files))
    return paths, np.asarray(labels, dtype=np.int64)


def read_imagefolder(root: Path, skip_bad: bool = False) -> Data:
    """Decode ``root/train/<class>/*`` and ``root/test/<class>/*`` (both splits in one pool).

    An undecodable image raises an error naming it; with ``skip_bad`` it is left out instead,
    and the cache records the skipped files (``"skipped"``)."""
    train_paths, train_labels = _list_split(root / "train", root)
    test_paths, test_labels = _list_split(root / "test", root)
    start = time.perf_counter()
    paths = train_paths + test_paths
    pixels, bad = _decode_all(paths, skip_bad)
    log.info("CIFAR-10: decoded %d images from %s in %.1f s", len(pixels), root, time.perf_counter() - start)
    n = len(train_paths)
    keep = np.ones(len(paths), dtype=bool)
    keep[bad] = False
    labels = np.concatenate([train_labels, test_labels])
    skipped = [os.path.relpath(paths[i], root) for i in bad]
    if skipped:
        log.warning("CIFAR-10: skipped %d unreadable images under %s (data.skip_bad_images=true), e.g. %s",
                    len(skipped), root, ", ".join(skipped[:3]))
    data = _pack((pixels[:n][keep[:n]], labels[:n][keep[:n]]), (pixels[n:][keep[n:]], labels[n:][keep[n:]]), f"{root}")
    data["skipped"] = skipped
    return data


def has_imagefolder(root: Path) -> bool:
    train, test = (root / "train").is_dir(), (root / "test").is_dir()
    if train != test:
        found, missing = ("train", "test") if train else ("test", "train")
        raise ValueError(f"data.root={root} has {found}/ but no {missing}/; a CIFAR-10 ImageFolder tree needs "
                         "root/train/<class>/*.jpg and root/test/<class>/*.jpg")
    return train


# -- source: download --------------------------------------------------------------------------
def download(dest: Path) -> None:
    """Fetch the official release into ``dest/cifar-10-batches-py`` with torchvision."""
    torchvision.datasets.CIFAR10(str(dest), train=True, download=True)
    torchvision.datasets.CIFAR10(str(dest), train=False, download=True)


# -- entry point -------------------------------------------------------------------------------
_SET_ROOT = ("set data.root to a folder with cifar-10-batches-py or an ImageFolder train/ test/ tree, "
             "e.g. data.root=../shared/data/cifar10-jpeg")


def _decode_sources(root: Path, allow_download: bool, fallback_dir: Path, skip_bad: bool = False) -> Data:
    if has_batches_py(root):
        return read_batches_py(root / BATCHES_DIR)
    if root.is_dir() and has_imagefolder(root):
        return read_imagefolder(root, skip_bad)
    if not allow_download:
        reason = "not attempted: data.download=false"
    else:
        dest = root if _prepare_dir(root) else fallback_dir
        if dest != root:
            log.info("CIFAR-10: data.root=%s is not writable; downloading into %s", root, dest)
        try:
            download(dest)
            return read_batches_py(dest / BATCHES_DIR)
        except UnsafeBatchFile:
            raise
        except Exception as err:  # no network, read-only disk, bad checksum: all end the same way
            reason = " ".join(f"{type(err).__name__}: {err}".split())
    raise FileNotFoundError(f"no CIFAR-10 under data.root={root}, download failed ({reason}), {_SET_ROOT}")


def check_root(root: str | os.PathLike, cache_dir: str | os.PathLike | None, allow_download: bool) -> None:
    """Raise when ``root`` does not exist, nothing may be downloaded there and no cache holds it."""
    root = Path(root).expanduser().resolve()
    if allow_download or root.exists() or fallback_cache_file(root, cache_dir).is_file():
        return
    raise FileNotFoundError(f"data.root={root} does not exist (and data.download=false, so nothing is fetched "
                            f"there); {_SET_ROOT}, or data.download=true to download it there")


def load_cifar10(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 allow_download: bool = True, skip_bad_images: bool = False) -> Data:
    """CIFAR-10 as ``{"train": {"images": uint8 (50000, 3, 32, 32), "labels": int64}, "test": ...,
    "classes": [...]}``, from the cache if there is one, else decoded (and cached) from the first
    source found; see the module docstring for the order.

    ``root`` is created only for a download, and removed again if that fails (a mistyped
    data.root leaves nothing behind). ``skip_bad_images``: leave undecodable images of an
    ImageFolder tree out (counted in the log and in the cache's ``"skipped"``) instead of failing.
    """
    root = Path(root).expanduser().resolve()
    primary, fallback = primary_cache_file(root), fallback_cache_file(root, cache_dir)
    for path in (primary, fallback):
        if (data := read_cache(path)) is not None:
            log.info("CIFAR-10: using cache %s", path)
            return data

    local = has_batches_py(root) or (root.is_dir() and has_imagefolder(root))
    if not local and not allow_download:
        check_root(root, cache_dir, allow_download)
        return _decode_sources(root, allow_download, fallback.parent)  # raises; creates no cache folder
    created = None if root.exists() else _first_missing(root)  # a download creates root ...
    try:
        return _load_or_build(root, primary, fallback, allow_download, skip_bad_images)
    except BaseException:
        if created is not None:  # ... and a failed one leaves no folder behind
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path:
    """The outermost folder of ``path`` that does not exist yet (what creating ``path`` would add)."""
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _load_or_build(root: Path, primary: Path, fallback: Path, allow_download: bool, skip_bad: bool) -> Data:
    root_usable = root.is_dir() or (allow_download and _prepare_dir(root))  # a download creates root
    if root_usable and is_writable_dir(root) and _prepare_dir(primary.parent):
        target: Path | None = primary
    elif _prepare_dir(fallback.parent):
        target = fallback
        log.info("CIFAR-10: data.root=%s is read-only; caching in %s", root, fallback.parent)
    else:
        target = None
        log.warning("CIFAR-10: no writable cache folder (tried %s and %s); decoding without a cache",
                    primary.parent, fallback.parent)
    if target is None:
        return _decode_sources(root, allow_download, fallback.parent, skip_bad)

    return build_cache(root, target, allow_download, fallback.parent, skip_bad)


def build_cache(root: Path, target: Path, allow_download: bool = True, download_dir: Path | None = None,
                skip_bad: bool = False) -> Data:
    """Decode CIFAR-10 from ``root`` and write the cache file ``target``, under a file lock;
    returns the data (read from ``target`` if another job wrote it while we waited)."""
    with FileLock(str(target) + ".lock"):
        if (data := read_cache(target)) is not None:
            return data
        data = _decode_sources(root, allow_download, download_dir or target.parent, skip_bad)
        write_cache_atomic(data, target)
        log.info("CIFAR-10: wrote cache %s", target)
    return data
