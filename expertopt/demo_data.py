"""Real text every Python install has: the standard library's own source, as byte-level tokens.

The demo trains on the ``.py`` files under ``sysconfig.get_path("stdlib")`` (test suites and
third-party ``site-packages`` left out), one token per byte (vocab 256), so nothing is downloaded
and no tokenizer is needed. A file is held out when ``crc32`` of its path relative to the
stdlib root is ``0 mod HELDOUT_MODULUS``: the split depends on the file alone, not on which other
files exist, so it is the same on every rank and every run (and differs only across Python
versions, whose stdlibs differ).

Batches are drawn from the global batch down: step ``s`` of seed ``k`` picks the same
``global_batch`` windows whatever the world size, and rank ``r`` trains on rows
``r * global_batch / world`` onwards. Runs at different world sizes therefore see the same data.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["HELDOUT_MODULUS", "VOCAB_SIZE", "ByteCorpus", "load_stdlib_corpus", "stdlib_files"]

VOCAB_SIZE = 256
# One file in ten (by path hash) is held out.
HELDOUT_MODULUS = 10
# Byte 0 never occurs in Python source: it marks file boundaries in the concatenated stream.
FILE_SEPARATOR = b"\x00"
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The stdlib's ``.py`` files, sorted by relative path, without tests and third-party packages."""
    root = Path(root if root is not None else sysconfig.get_path("stdlib"))
    if not root.is_dir():
        raise ValueError(
            f"standard library directory {root} does not exist; pass root= a directory of .py files"
        )
    files = [
        path
        for path in root.rglob("*.py")
        if not _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _is_heldout(relative: str) -> bool:
    return zlib.crc32(relative.encode()) % HELDOUT_MODULUS == 0


@dataclass(frozen=True)
class ByteCorpus:
    """Train and held-out byte streams (uint8, files joined by :data:`FILE_SEPARATOR`)."""

    train: Tensor
    heldout: Tensor
    train_files: int
    heldout_files: int

    def windows(self, stream: Tensor, starts: Tensor, length: int) -> Tensor:
        """``[len(starts), length]`` int64 token windows of ``stream`` beginning at ``starts``."""
        index = starts.unsqueeze(1) + torch.arange(length)
        return stream[index].long()

    def train_batch(self, step: int, seed: int, global_batch: int, length: int) -> Tensor:
        """The whole global batch of ``step``: ``[global_batch, length]`` windows of the train stream."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, self.train.numel() - length, (global_batch,), generator=generator)
        return self.windows(self.train, starts, length)

    def heldout_batches(self, seed: int, batches: int, global_batch: int, length: int) -> list[Tensor]:
        """``batches`` fixed global batches of held-out windows (the same for every step and run)."""
        generator = torch.Generator().manual_seed(seed * 1_000_003 - 1)
        starts = torch.randint(0, self.heldout.numel() - length, (batches, global_batch), generator=generator)
        return [self.windows(self.heldout, row, length) for row in starts]


def _join(paths: list[Path]) -> Tensor:
    data = FILE_SEPARATOR.join(path.read_bytes() for path in paths)
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def load_stdlib_corpus(root: str | Path | None = None, *, min_bytes: int = 1 << 16) -> ByteCorpus:
    """Read the stdlib (or ``root``) and split it by file; both streams must hold ``min_bytes``."""
    root = Path(root if root is not None else sysconfig.get_path("stdlib"))
    files = stdlib_files(root)
    heldout = [path for path in files if _is_heldout(path.relative_to(root).as_posix())]
    train = [path for path in files if not _is_heldout(path.relative_to(root).as_posix())]
    corpus = ByteCorpus(_join(train), _join(heldout), len(train), len(heldout))
    for name, stream in (("train", corpus.train), ("held-out", corpus.heldout)):
        if stream.numel() < min_bytes:
            raise ValueError(
                f"{root} gives only {stream.numel()} {name} bytes (need {min_bytes}); point root= at a "
                "directory with more .py files"
            )
    return corpus
