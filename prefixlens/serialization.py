"""Atomic safetensors files with JSON metadata, shared by prefixes and training checkpoints.

Every file :func:`save_tensors` writes carries a sha256 of its tensors and metadata
(``prefixlens_sha256``), which :func:`load_tensors` verifies: a damaged file is refused by name
(:class:`CorruptFileError`), never read as different numbers. Writes are atomic (temp file in the
destination's directory, then rename); a symlink is written *through* (its target is replaced, the
link stays), and an existing file keeps its permission bits.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["save_tensors", "load_tensors", "atomic_write_text", "atomic_write_bytes", "CorruptFileError", "CHECKSUM_KEY", "tensors_checksum"]

CHECKSUM_KEY = "prefixlens_sha256"


class CorruptFileError(ValueError):
    """A file that is not a readable safetensors file, or whose content fails its checksum."""


def tensors_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, and every metadata item (except
    the checksum itself), in sorted order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"tensor:{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for key in sorted(metadata):
        if key != CHECKSUM_KEY:
            h.update(f"meta:{key}={metadata[key]!r};".encode())
    return h.hexdigest()


def _umask_permissions(path: str) -> None:
    """``mkstemp`` creates private (0600) files; give the final file the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_replace(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp)`` on a temp file next to the destination, then rename it over the
    destination. A symlink is resolved first, so its target gets the new content and the link is
    kept (renaming over the link would replace it with a file and leave the target stale); an
    existing destination keeps its permission bits, a new one gets the umask's."""
    path = Path(path)
    dest = path.resolve() if path.is_symlink() else path
    if dest.is_dir():
        raise IsADirectoryError(f"cannot write {path}: {dest} is a directory.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(dest.stat().st_mode) if dest.exists() else None
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if mode is None:
            _umask_permissions(tmp)
        else:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` and string ``metadata`` to ``path`` atomically (temp file, then rename),
    with a checksum of both under ``metadata["prefixlens_sha256"]``."""
    bad = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise TypeError(f"save_tensors: {bad} are not tensors; only torch tensors can be saved.")
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, CHECKSUM_KEY: tensors_checksum(plain, metadata)}
    return _atomic_replace(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read back what :func:`save_tensors` wrote: ``(tensors, metadata)``, checksum verified.

    Raises ``FileNotFoundError`` for a missing path and :class:`CorruptFileError` (naming the
    file) for a directory, a file that is not safetensors (or is truncated), or content that does
    not match its checksum. Files without a checksum (written before checksums existed) load
    unverified; ``metadata`` then has no ``"prefixlens_sha256"``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such file: {path}")
    if path.is_dir():
        raise CorruptFileError(f"{path} is a directory, not a safetensors file; pass the path of the file itself.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError for bad files
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it may be truncated, "
            f"damaged or of another format. Re-create it (or restore it from a copy)."
        ) from e
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None:
        actual = tensors_checksum(tensors, metadata)
        if actual != stored:
            raise CorruptFileError(
                f"{path} is corrupt: its content does not match the checksum stored when it was written "
                f"(sha256 {stored[:16]}… stored vs {actual[:16]}… now). The file was modified or damaged after "
                f"saving; re-create it (or restore it from a copy)."
            )
    return tensors, metadata


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text to ``path`` atomically (through a symlink, as :func:`save_tensors`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return _atomic_replace(path, write)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` atomically (through a symlink, as :func:`save_tensors`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic_replace(path, write)
