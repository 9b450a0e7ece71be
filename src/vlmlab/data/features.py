"""Frozen-feature cache: each image goes through the frozen encoder once, ever.

The encoder never changes during training, so its outputs are computed once per
(encoder + preprocessing, image content) and reused across epochs and runs. Keys are
`encoder.fingerprint()` (a folder) and the SHA-1 of the image file's bytes (a tensor name), so an
edited image or a changed encoder/preprocessing misses the cache instead of reusing stale
features. New features are appended as a new shard (safetensors, float16); nothing is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .formats import SkipReport, load_image

SHARD_IMAGES = 512


def file_digest(path: str | Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def shard_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (its size does not match its header), or None.

    The format: 8 bytes little-endian header length, the JSON header, then the tensor bytes whose extents the
    header lists. safe_open reads only the header, so a file cut inside the tensor bytes opens fine and fails
    (or reads garbage) only when those tensors are read, in the middle of a run.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a header"
            n = int.from_bytes(head, "little")
            if 8 + n > size:
                return f"{size} bytes, header says {8 + n}+"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable header ({type(e).__name__}: {e})"
    if size != 8 + n + end:
        return f"{size} bytes, its header says {8 + n + end}"
    return None


class FeatureCache:
    def __init__(self, root: str | Path, encoder):
        self.encoder = encoder
        self.dir = Path(root) / encoder.fingerprint()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, Path] = {}  # content hash -> shard file
        self._refresh()

    def _refresh(self) -> None:
        """Indexes shards written since the last look (e.g. by rank 0 while the other ranks waited).

        A shard whose size does not match its own header (cut short by a full disk or a copy) is set aside as
        `*.damaged`, named in a warning; its images are then encoded again. Temp files of writers that died
        (killed mid-write) are removed.
        """
        self._remove_orphaned_temp_files()
        known = set(self._where.values())
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            if shard in known:
                continue
            problem = shard_problem(shard)
            if problem is None:
                try:
                    with safe_open(shard, "pt") as f:
                        keys = list(f.keys())
                except Exception as e:  # noqa: BLE001 - safetensors' own check of the header
                    problem = f"{type(e).__name__}: {e}"
            if problem is not None:
                aside = shard.with_suffix(".damaged")
                shard.replace(aside)
                warnings.warn(
                    f"feature cache file {shard} is damaged ({problem}); moved to {aside.name}, "
                    "its images will be encoded again",
                    stacklevel=2,
                )
                continue
            for key in keys:
                self._where[key] = shard

    def _remove_orphaned_temp_files(self) -> None:
        for tmp in self.dir.glob("shard-*.tmp"):
            pid = tmp.stem.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                warnings.warn(f"removed {tmp}: a feature cache write interrupted by its process's death", stacklevel=3)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def features(
        self,
        image_paths: list[str],
        batch_size: int = 32,
        desc: str = "encoding images",
        skipped: SkipReport | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Image tokens for `image_paths` as one float16 tensor [M, N, D], encoding only what is missing.

        Returns (features, kept): `kept` indexes the paths whose image could be read. Missing, unreadable
        and oversized images are left out, never a crash mid-epoch: each goes to `skipped` with its reason,
        or, without a report, into one warning line.
        """
        self._refresh()
        report = SkipReport() if skipped is None else skipped
        hashes, kept, bad = [], [], []
        for i, path in enumerate(image_paths):
            try:
                hashes.append(file_digest(path))
                kept.append(i)
            except OSError as e:
                bad.append(path)
                report.add("missing images", str(path), f"{type(e).__name__}: {e.strerror or e}")
        todo = sorted({h: image_paths[i] for h, i in zip(hashes, kept) if h not in self._where}.items())
        unreadable = self._encode_missing(todo, batch_size, desc)
        for h, i in zip(hashes, kept):
            if h in unreadable:
                bad.append(image_paths[i])
                report.add("unreadable images", str(image_paths[i]), unreadable[h])
        kept_pairs = [(h, i) for h, i in zip(hashes, kept) if h not in unreadable]
        if bad and skipped is None:
            warnings.warn(
                f"skipped {len(bad)} of {len(image_paths)} images that could not be read (first: {bad[0]})",
                stacklevel=2,
            )
        return self._read([h for h, _ in kept_pairs]), [i for _, i in kept_pairs]

    @torch.no_grad()
    def _encode_missing(self, todo: list[tuple[str, str]], batch_size: int, desc: str) -> dict[str, str]:
        """Encodes (hash, path) pairs into new shards; returns {hash: reason} for images that failed to load.

        A shard is written every `SHARD_IMAGES` images, so an interrupted run keeps what it encoded.
        """
        new, failed = {}, {}
        device = next(self.encoder.parameters()).device
        for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=not todo):
            images, keys = [], []
            for key, path in todo[start : start + batch_size]:
                try:
                    images.append(load_image(path))
                    keys.append(key)
                except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable image"
                    failed[key] = f"{type(e).__name__}: {e}"
            if images:
                tokens = self.encoder(self.encoder.preprocess(images).to(device)).to("cpu", torch.float16)
                new.update({k: t.contiguous() for k, t in zip(keys, tokens)})
            if len(new) >= SHARD_IMAGES or (new and start + batch_size >= len(todo)):
                self._write_shard(new)
                new = {}
        return failed

    def _write_shard(self, features: dict[str, torch.Tensor]) -> None:
        shard = self.dir / f"shard-{time.time_ns()}-{os.getpid()}.safetensors"
        tmp = shard.with_suffix(".tmp")
        save_file(features, tmp)
        tmp.replace(shard)  # atomic: a shard is either whole or absent
        self._where.update({k: shard for k in features})

    def _read(self, hashes: list[str]) -> torch.Tensor:
        by_shard: dict[Path, list[int]] = {}
        for i, h in enumerate(hashes):
            by_shard.setdefault(self._where[h], []).append(i)
        out: list[torch.Tensor | None] = [None] * len(hashes)
        for shard, positions in by_shard.items():
            with safe_open(shard, "pt") as f:
                for i in positions:
                    out[i] = f.get_tensor(hashes[i])
        if not out:
            return torch.empty(0)
        return torch.stack(out)
