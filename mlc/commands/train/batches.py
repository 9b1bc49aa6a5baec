"""Packed samples, a deterministic shuffle, and which samples each process reads at each step.

The token stream is cut into windows of seq_len + 1 tokens that overlap by one (every token is a target exactly
once). Samples are visited in a seeded permutation per epoch. Optimizer step s consumes the global positions
[s * B, (s + 1) * B) of that order, whatever the number of processes: process r of W takes, in micro-batch m,
the positions s*B + (m*W + r)*mb ... + mb - 1. The data position in a checkpoint is therefore just the step, and a
run resumed on another number of processes reads exactly the samples the uninterrupted run would have read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlc.commands.train.tokens import TokenFile


@dataclass
class PackedSamples:
    """Windows [i*seq_len, i*seq_len + seq_len + 1) of a token file, for i in [first, first + count)."""

    data: TokenFile
    seq_len: int
    first: int = 0
    count: int = -1

    def __post_init__(self) -> None:
        total = max(0, (len(self.data) - 1) // self.seq_len)
        if self.count < 0:
            self.count = total - self.first

    def __len__(self) -> int:
        return self.count

    def split(self, fraction: float) -> tuple["PackedSamples", "PackedSamples"]:
        """(train, validation): the validation part is the last `fraction` of the windows, never shuffled in."""
        n_val = int(round(self.count * fraction))
        if fraction > 0 and self.count > 1:
            n_val = max(1, n_val)
        return (
            PackedSamples(self.data, self.seq_len, self.first, self.count - n_val),
            PackedSamples(self.data, self.seq_len, self.first + self.count - n_val, n_val),
        )

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, target mask) for the given sample indices, each (len(indices), seq_len)."""
        rows = np.stack([self._window(i) for i in indices]).astype(np.int64)
        masks = np.stack([self._window(i, self.data.mask) for i in indices])
        inputs = torch.from_numpy(rows[:, :-1].copy())
        targets = torch.from_numpy(rows[:, 1:].copy())
        mask = torch.from_numpy(masks[:, 1:].astype(np.bool_))
        return inputs, targets, mask

    def units(self, batch: tuple[torch.Tensor, ...]) -> int:
        """What a global batch's loss is averaged over: target tokens."""
        return int(batch[2].sum())

    def _window(self, i: int, array: np.ndarray | None = None) -> np.ndarray:
        start = (self.first + i) * self.seq_len
        return np.asarray((self.data.tokens if array is None else array)[start : start + self.seq_len + 1])


class SampleOrder:
    """Global position -> sample index: a fresh seeded permutation each epoch (or the identity without shuffle)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator).tolist()
        return self._perm[offset]


def micro_batch_positions(step: int, micro: int, rank: int, world: int, micro_batch_size: int, batch_size: int) -> range:
    """The global positions process `rank` reads in micro-batch `micro` of optimizer step `step`."""
    start = step * batch_size + (micro * world + rank) * micro_batch_size
    return range(start, start + micro_batch_size)


def eval_shard(n_eval: int, max_sequences: int, rank: int, world: int) -> list[int]:
    """The held-out samples this process evaluates: the first max_sequences, dealt round-robin."""
    return list(range(min(n_eval, max_sequences)))[rank::world]
