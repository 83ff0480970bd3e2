"""The training set's VAE latents, encoded once (``data.cache_latents``).

Pruning and fine-tuning draw the latent of every training image from the VAE posterior,
``mean + std · ε`` with a fresh ε each step. The posterior itself (``mean``, ``std``, scaled as
:meth:`Teacher.encode_images` returns them) depends only on the image, so it can be computed once
per data set and VAE and read back instead of running the VAE encoder every step — about a fifth
of a toy pruning step and a quarter of a fine-tuning step on the CPU, the same idea as the
"cache latents" option of the usual Stable Diffusion trainers.

The cache is a folder ``<cache_dir>/<key>/`` with ``mean.npy``, ``std.npy`` (float32, one row per
data-set index, memory-mapped on read so a large set is not loaded whole), ``present.npy`` (the
indices that have a row: an unreadable image has none, as the data set never returns it) and
``meta.json``. The key hashes what the posterior depends on: the data set's settings that shape an
image (name, root, split, resolution, crop, max_samples), its length and captions, and the VAE's
weights and config. It is built into a temporary folder and renamed into place, so an interrupted
build leaves nothing half-written and two runs building the same key at once keep one copy.
Only deterministic transforms can be cached: the settings refuse ``data.random_flip`` and random crops.
With a cache the training loops read :class:`CachedItems` instead of the data set: the caption and
index of each item, no image decoded or rendered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from aptp.errors import SettingsError
from aptp.io import _current_umask

logger = logging.getLogger(__name__)

FILES = ("mean.npy", "std.npy", "present.npy", "meta.json")


def default_latent_cache() -> Path:
    return Path.home() / ".cache" / "aptp" / "latents"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def vae_digest(vae: torch.nn.Module) -> str:
    """SHA-256 over the VAE's config and every weight (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(getattr(vae, "config", {})), sort_keys=True, default=str).encode())
    for name, t in sorted(vae.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def cache_key(data, dataset, vae: torch.nn.Module, captions: list[str] | None = None) -> str:
    """What the cached posteriors depend on, hashed (see the module docstring); ``captions`` is
    ``dataset.captions()`` when the caller has it already."""
    h = hashlib.sha256()
    shape = {"name": str(data.name), "root": None if data.root is None else str(Path(data.root).resolve()),
             "split": data.split, "resolution": data.resolution, "center_crop": data.center_crop,
             "max_samples": data.max_samples, "len": len(dataset)}
    h.update(json.dumps(shape, sort_keys=True).encode())
    for caption in dataset.captions() if captions is None else captions:
        h.update(caption.encode())
        h.update(b"\n")
    h.update(vae_digest(vae).encode())
    return h.hexdigest()[:32]


class LatentCache:
    """The cached posteriors of one data set; :meth:`lookup` returns what ``encode_images`` would."""

    def __init__(self, path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from aptp.rundir import damaged, read_json

        self.path = Path(path)
        self.device, self.dtype = torch.device(device), dtype
        self._hint = hint = f"delete {self.path} (it is rebuilt on the next run)"
        try:
            meta = read_json(self.path / "meta.json")
            self.mean = np.load(self.path / "mean.npy", mmap_mode="r")
            self.std = np.load(self.path / "std.npy", mmap_mode="r")
            self.present = np.load(self.path / "present.npy")
        except (OSError, ValueError) as exc:
            raise damaged(self.path, exc, hint) from None
        n = int(meta.get("count", -1))
        if not (self.mean.shape == self.std.shape and len(self.mean) == n == len(self.present)):
            raise damaged(self.path, "its arrays do not match meta.json", hint)
        self.count = n
        self.latent_shape = tuple(self.mean.shape[1:])

    def lookup(self, index: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the images at these data-set indices, on the cache's device and dtype."""
        idx = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.count or not self.present[idx].all()):
            from aptp.rundir import damaged

            missing = [int(i) for i in idx if not (0 <= i < self.count and self.present[i])]
            raise damaged(self.path, f"no latent for data-set index {missing[0]}", self._hint)
        mean = torch.from_numpy(np.ascontiguousarray(self.mean[idx]))
        std = torch.from_numpy(np.ascontiguousarray(self.std[idx]))
        return mean.to(self.device, self.dtype), std.to(self.device, self.dtype)


class CachedItems(Dataset):
    """The training set as a loop with cached latents reads it: item ``i`` is ``caption``, ``index``
    and ``skipped``, as the data set returns them, without its image (the posterior is
    ``cache.lookup(index)``). An item the cache lacks (its image was unreadable when the cache was
    built) is read from the data set, which returns its stand-in, as it did for the cache.

    Args:
        dataset: The data set the cache was built from.
        cache: Its latent cache.
        captions: ``dataset.captions()``, when the caller has it already.
    """

    def __init__(self, dataset: Dataset, cache: LatentCache, captions: list[str] | None = None):
        self.dataset, self.present = dataset, cache.present
        self.captions = list(dataset.captions() if captions is None else captions)
        if len(self.captions) != len(dataset) or cache.count != len(dataset):
            from aptp.rundir import damaged

            raise damaged(cache.path, f"it holds {cache.count} items, the data set {len(dataset)}", cache._hint)
        first = np.flatnonzero(self.present)
        # every cached image has one size (the settings ask for a centre crop to data.resolution)
        self.image_size: tuple[int, int] = (tuple(dataset[int(first[0])]["pixel_values"].shape[-2:])
                                            if len(first) else (0, 0))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        if self.present[index]:
            return {"caption": self.captions[index], "index": index, "skipped": 0}
        item = self.dataset[index]
        return {"caption": item["caption"], "index": item["index"], "skipped": item.get("skipped", 0)}


def build_latent_cache(teacher, dataset, dest: Path, *, batch_size: int = 64, num_workers: int = 0,
                       progress: Callable[[int, int], None] | None = None) -> Path:
    """Encode every image of ``dataset`` once into ``dest`` (atomic: a temporary folder renamed)."""
    from torch.utils.data import DataLoader

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        n = len(dataset)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        mean = std = None
        present = np.zeros(n, dtype=bool)
        done = 0
        for batch in loader:
            m, s = teacher.encode_images(batch["pixel_values"].to(teacher.vae.device))
            if mean is None:
                shape = (n, *m.shape[1:])
                mean = np.lib.format.open_memmap(tmp / "mean.npy", mode="w+", dtype=np.float32, shape=shape)
                std = np.lib.format.open_memmap(tmp / "std.npy", mode="w+", dtype=np.float32, shape=shape)
            idx = batch["index"].numpy()  # the index actually returned (an unreadable image is replaced)
            mean[idx] = m.float().cpu().numpy()
            std[idx] = s.float().cpu().numpy()
            present[idx] = True
            done += len(idx)
            if progress is not None:
                progress(done, n)
        if mean is None:
            raise SettingsError("data.cache_latents: the data set has no images")
        mean.flush()
        std.flush()
        del mean, std
        np.save(tmp / "present.npy", present)
        (tmp / "meta.json").write_text(json.dumps({"count": n, "cached": int(present.sum()),
                                                   "dtype": "float32"}, indent=2))
        os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it 0700; give it a plain mkdir's permissions
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "meta.json").is_file():  # not another run's finished copy: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another run built the same key first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def open_latent_cache(settings, teacher, dataset, *, is_main: bool = True, barrier: Callable[[], None] = lambda: None,
                      batch_size: int = 64, captions: list[str] | None = None) -> LatentCache | None:
    """The training set's cache when ``data.cache_latents`` is on (built by the main process first,
    the others waiting), else ``None``."""
    data = settings.data
    if not data.cache_latents:
        return None
    root = Path(data.latent_cache_dir).expanduser() if data.latent_cache_dir is not None else default_latent_cache()
    path = root / cache_key(data, dataset, teacher.vae, captions)
    if is_main and not (path / "meta.json").is_file():
        logger.info("encoding %d training images once into %s (data.cache_latents)", len(dataset), path)
        build_latent_cache(teacher, dataset, path, batch_size=batch_size, num_workers=data.num_workers)
    barrier()
    vae = teacher.vae
    return LatentCache(path, device=vae.device, dtype=vae.dtype)


@dataclass
class TrainingSet:
    """The training data as a loop reads it: ``items`` is ``dataset`` itself, or its
    :class:`CachedItems` view when ``latents`` holds the data set's posteriors."""

    dataset: Dataset
    latents: LatentCache | None
    items: Dataset


def open_training_set(settings, teacher, dataset, *, is_main: bool = True, barrier: Callable[[], None] = lambda: None,
                      batch_size: int = 64, captions: list[str] | None = None) -> TrainingSet:
    """``dataset`` with its latent cache (:func:`open_latent_cache`) and the view the loop reads."""
    if captions is None and settings.data.cache_latents:  # listed once: for the cache key and the view
        captions = dataset.captions()
    latents = open_latent_cache(settings, teacher, dataset, is_main=is_main, barrier=barrier, batch_size=batch_size,
                                captions=captions)
    return TrainingSet(dataset, latents, dataset if latents is None else CachedItems(dataset, latents, captions))
