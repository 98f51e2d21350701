"""Deterministic tar writing and streaming tar reading (WebDataset-compatible).

Why our own thin layer over `tarfile` rather than `webdataset.TarWriter`: we need byte-identical
output (fixed mtime/uid/mode), the byte offset of every member for the random-access index, and
a reader that reports *which* shard and key broke when a tar is truncated or corrupt.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterator

CHUNK = 1 << 20


class TarCorrupt(Exception):
    """A shard could not be read past some point; `last_key` is the last complete sample."""

    def __init__(self, path: Path, last_key: str | None, cause: Exception) -> None:
        super().__init__(f"{path}: unreadable after key {last_key!r} ({cause})")
        self.path, self.last_key, self.cause = path, last_key, cause


class DeterministicTarWriter:
    """Writes members with fixed metadata so the same inputs give byte-identical tars."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)

    def add(self, name: str, data: bytes) -> tuple[int, int]:
        """Add one member; return (offset of its data in the file, size)."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        # addfile leaves tar.offset after the 512-byte-padded payload; step back to its start
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return self._tar.offset - padded, len(data)

    def close(self) -> None:
        self._tar.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key is everything before the first '.' of the basename."""
    key, _, ext = name.partition(".")
    return key, ext


def iter_tar_groups(path: Path, fileobj: BinaryIO | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) groups of consecutive members; raise TarCorrupt on damage."""
    last: str | None = None
    cur_key: str | None = None
    cur: dict[str, bytes] = {}
    try:
        tf = tarfile.open(path if fileobj is None else None, fileobj=fileobj, mode="r|")
        for member in tf:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            f = tf.extractfile(member)
            data = f.read() if f is not None else b""
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} truncated")
            if key != cur_key:
                if cur_key is not None:
                    yield cur_key, cur
                    last = cur_key
                cur_key, cur = key, {}
            cur[ext] = data
        end = tf.offset
        tf.close()
        # tarfile ends silently at a truncated header; a complete archive has 2 zero blocks after
        if fileobj is None and os.path.getsize(path) < end + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError("archive ends inside a member header (truncated file)")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise TarCorrupt(Path(path), last, e) from None
    if cur_key is not None:
        yield cur_key, cur


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise TarCorrupt(Path(path), None, EOFError(f"short read at offset {offset}"))
    return data
