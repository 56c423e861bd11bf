"""Padded, bucketed, deterministically shuffled batches with a resumable position.

Batches are dicts of int32 NumPy arrays, RIGHT-padded:

- ``input_ids [B, L]``; ``attention_mask [B, L]`` (1 real, 0 pad); ``loss_mask [B, L]`` (1 iff
  the token is an assistant target; a loss uses ``logits[:, :-1]`` against ``input_ids[:, 1:]``
  with ``loss_mask[:, 1:]``).
- Preference batches stack the ``B`` chosen rows first, then the ``B`` rejected rows of the same
  pairs, in the same order: ``2B`` rows.

``L`` is the smallest bucket length that fits the longest row, so jit sees few shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ogpsa_jax.data.encode import tokenize_sft
from ogpsa_jax.data.examples import Encoded, EncodedPair, PreferencePair, SFTExample
from ogpsa_jax.data.sources import load_sft

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


def bucket_lengths(max_length: int, *, min_length: int = 64) -> tuple[int, ...]:
    """Powers of two from ``min_length`` below ``max_length``, then ``max_length`` itself.

    Args:
      max_length: the longest sequence length.
      min_length: the smallest bucket.

    Returns:
      Increasing bucket lengths ending with ``max_length``.

    Example:
      >>> bucket_lengths(300)
      (64, 128, 256, 300)
    """
    if max_length < 1 or min_length < 1:
        raise ValueError(f"max_length and min_length must be >= 1, got {max_length}, {min_length}")
    out, b = [], min_length
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"buckets must be strictly increasing positive ints, got {buckets}")
    return buckets


def _bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def pad_batch(rows: Sequence[Encoded | None], length: int, pad_id: int) -> Batch:
    """Right-pads encoded rows into a batch dict; ``None`` rows are all padding.

    Args:
      rows: the rows (``None`` for an empty filler row).
      length: the padded length ``L``.
      pad_id: the padding token id.

    Returns:
      ``{"input_ids", "attention_mask", "loss_mask"}``, int32 ``[len(rows), length]``.

    Example:
      >>> pad_batch([Encoded(np.array([5, 6]), np.array([False, True]))], 4, 0)["input_ids"]
      array([[5, 6, 0, 0]], dtype=int32)
    """
    n = len(rows)
    ids = np.full((n, length), pad_id, dtype=np.int32)
    attn = np.zeros((n, length), dtype=np.int32)
    loss = np.zeros((n, length), dtype=np.int32)
    for b, row in enumerate(rows):
        if row is None:
            continue
        t = len(row.ids)
        if t > length:
            raise ValueError(f"row {b} has {t} tokens > padded length {length}")
        ids[b, :t] = row.ids
        attn[b, :t] = 1
        loss[b, :t] = row.loss_mask
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


class Batches:
    """An endless, resumable iterator of micro-batches over encoded examples or pairs.

    Each epoch visits a permutation of the examples drawn from ``(seed, epoch)`` alone (no
    hidden RNG state), in ``len(examples) // batch_size`` micro-batches (the remainder of an
    epoch is skipped). ``state()`` / ``restore()`` save and restore the position, so a resumed
    run sees exactly the batches an uninterrupted one would.

    Example:
      >>> it = Batches(encoded, batch_size=4, pad_id=0, buckets=(32, 64), seed=0)  # doctest: +SKIP
      >>> step = it.next_step(accum_steps=2)  # doctest: +SKIP
      >>> saved = it.state()  # doctest: +SKIP
      >>> it2 = Batches(encoded, batch_size=4, pad_id=0, buckets=(32, 64), seed=0)  # doctest: +SKIP
      >>> it2.restore(saved)  # doctest: +SKIP
    """

    def __init__(
        self,
        examples: Sequence[Encoded] | Sequence[EncodedPair],
        *,
        batch_size: int,
        pad_id: int,
        buckets: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        """Builds the iterator.

        Args:
          examples: ``Encoded`` examples (SFT batches) or ``EncodedPair`` pairs (preference
            batches, ``2 * batch_size`` rows: chosen then rejected).
          batch_size: examples (or pairs) per micro-batch.
          pad_id: the padding token id.
          buckets: allowed padded lengths; None uses powers of two from 64 up to the first
            that fits the longest example (pass ``bucket_lengths(max_length)`` to fix them).
          seed: the shuffling seed.
          shuffle: False keeps the given order every epoch.
        """
        if not examples:
            raise ValueError("examples is empty")
        first = examples[0]
        self.pairs = isinstance(first, EncodedPair)
        kind = EncodedPair if self.pairs else Encoded
        for i, ex in enumerate(examples):
            if not isinstance(ex, kind):
                raise ValueError(
                    f"example {i} is a {type(ex).__name__}; expected all {kind.__name__}"
                )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size > len(examples):
            raise ValueError(f"batch_size={batch_size} > number of examples {len(examples)}")
        rows = [r for ex in examples for r in (ex if self.pairs else (ex,))]
        longest = max(len(r.ids) for r in rows)
        if buckets is None:  # powers of two from 64 up to the first one that fits everything
            buckets = bucket_lengths(max(64, 1 << (longest - 1).bit_length()))
        self.buckets = _check_buckets(buckets)
        if longest > self.buckets[-1]:
            i = next(
                i
                for i, ex in enumerate(examples)
                if any(len(r.ids) == longest for r in (ex if self.pairs else (ex,)))
            )
            raise ValueError(
                f"example {i} has {longest} tokens > largest bucket {self.buckets[-1]}"
            )
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0  # current epoch
        self.index = 0  # next micro-batch within the epoch
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch."""
        return len(self.examples) // self.batch_size

    def steps_per_epoch(self, accum_steps: int = 1) -> int:
        """Optimizer steps per epoch with ``accum_steps`` micro-batches per step (rounded down)."""
        return self.batches_per_epoch // accum_steps

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            n = len(self.examples)
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _next_indices(self) -> np.ndarray:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order_for(self.epoch)
        idx = order[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return idx

    def _rows(self, idx: np.ndarray) -> list[Encoded]:
        if not self.pairs:
            return [self.examples[i] for i in idx]
        pairs = [self.examples[i] for i in idx]
        return [p.chosen for p in pairs] + [p.rejected for p in pairs]

    def next_batch(self) -> Batch:
        """The next micro-batch: arrays ``[B, L]`` (``[2B, L]`` for pairs)."""
        rows = self._rows(self._next_indices())
        return pad_batch(
            rows, _bucket_for(max(len(r.ids) for r in rows), self.buckets), self.pad_id
        )

    def next_step(self, accum_steps: int) -> Batch:
        """The next ``accum_steps`` micro-batches, padded to one bucket: arrays ``[A, B, L]``.

        Args:
          accum_steps: micro-batches per optimizer step.

        Returns:
          The batch dict with a leading accumulation axis.
        """
        if not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
        groups = [self._rows(self._next_indices()) for _ in range(accum_steps)]
        length = _bucket_for(max(len(r.ids) for g in groups for r in g), self.buckets)
        parts = [pad_batch(g, length, self.pad_id) for g in groups]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def state(self) -> dict[str, int]:
        """The position, as plain ints (for a checkpoint): epoch, index, seed and sizes."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Moves to a position saved by ``state()``; the data and settings must match.

        Args:
          state: a dict from ``state()`` (values may be NumPy/JAX scalars).

        Raises:
          ValueError: if the seed, number of examples or batch size differ, or the position is
            out of range.
        """
        state = {k: int(v) for k, v in state.items()}
        mine = self.state()
        for key in ("seed", "num_examples", "batch_size"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot restore: saved {key}={state.get(key)} but this has {mine[key]}"
                )
        if state["epoch"] < 0 or not 0 <= state["index"] <= self.batches_per_epoch:
            raise ValueError(f"cannot restore: position out of range: {state}")
        self.epoch, self.index = state["epoch"], state["index"]


def reference_batches(
    sources_or_examples: Sequence[Any],
    *,
    tokenizer: Any,
    batch_size: int,
    max_length: int,
    n: int = 200,
    system_prompt: str | None = None,
    truncation: str = "right",
    buckets: Sequence[int] | None = None,
) -> list[list[Batch]]:
    """Reference sets for the capability basis: one group of batches per source.

    Each source is a data set id or file path (its first ``n`` SFT rows are read with
    ``load_sft``), a list of ``SFTExample`` (the first ``n`` are used), or a list of
    ``PreferencePair`` (the first ``n`` pairs give ``2n`` examples: all chosen replies, then all
    rejected ones, as for the DPO-stage NLL). Batches keep the rows' order; a last partial batch
    is filled with all-padding rows (zero masks), so every batch has ``batch_size`` rows.

    Args:
      sources_or_examples: the sources, one group each (k = number of groups).
      tokenizer: a fast transformers tokenizer with a chat template.
      batch_size: rows per batch.
      max_length: the longest allowed length.
      n: rows taken from each source.
      system_prompt: optional system message.
      truncation: the truncation policy (``"right"`` by default for reference data).
      buckets: padded lengths; None uses ``bucket_lengths(max_length)``.

    Returns:
      ``groups[g][j]``: batch ``j`` of group ``g``, a batch dict ``[batch_size, L]``.

    Example:
      >>> sources = [assets_path("general.jsonl")]  # doctest: +SKIP
      >>> groups = reference_batches(sources, tokenizer=tok,  # doctest: +SKIP
      ...                            batch_size=4, max_length=128, n=16)
    """
    if not sources_or_examples:
        raise ValueError("need at least one reference source")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
    buckets = _check_buckets(buckets if buckets is not None else bucket_lengths(max_length))
    from ogpsa_jax.data.chat import pad_token_id

    pad_id = pad_token_id(tokenizer)
    groups = []
    for g, src in enumerate(sources_or_examples):
        if isinstance(src, (str, os.PathLike)):
            examples = load_sft(src, limit=n)
        elif isinstance(src, Sequence) and src and all(isinstance(e, SFTExample) for e in src):
            examples = list(src[:n])
        elif isinstance(src, Sequence) and src and all(isinstance(e, PreferencePair) for e in src):
            pairs = list(src[:n])
            examples = [p.as_sft("chosen") for p in pairs] + [p.as_sft("rejected") for p in pairs]
        else:
            raise ValueError(
                f"reference source {g} must be a path/id or a non-empty list of SFTExample or "
                f"PreferencePair, got {type(src).__name__}"
            )
        encoded = tokenize_sft(
            tokenizer,
            examples,
            max_length=max_length,
            truncation=truncation,
            system_prompt=system_prompt,
        )
        batches = []
        for start in range(0, len(encoded), batch_size):
            rows: list[Encoded | None] = list(encoded[start : start + batch_size])
            rows += [None] * (batch_size - len(rows))
            length = _bucket_for(max(len(r.ids) for r in rows if r is not None), buckets)
            batches.append(pad_batch(rows, length, pad_id))
        log.info("reference group %d: %d examples in %d batches", g, len(encoded), len(batches))
        groups.append(batches)
    return groups
