"""Host-side layout of scoring requests into fixed-shape arrays (used by ``score_continuations``).

A request is a token sequence (context followed by continuation) and the index of its first
continuation token. Both layouts give every batch the same number of rows (the last one is
filled with copies of a real row), bucket the padded lengths, and use one continuation width C
(a multiple of 4 fitting the longest continuation) for all batches of a call, so only a few
shapes compile:

- :func:`shared_prefix_batches`: requests grouped by identical context; each distinct context
  is prefilled once and only the continuation tokens run per request.
- :func:`full_sequence_batches`: every context + continuation runs whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_CONT_BUCKET = 4  # continuation widths are multiples of this (one width per call)


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def full_sequence_batches(
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    batch_size: int,
    length_bucket: int,
    pad_id: int,
) -> Iterator[tuple[list[int], tuple[np.ndarray, ...]]]:
    """Fixed-shape batches of whole sequences, longest first (the full-sequence scoring path).

    Args:
      seqs: token ids of each request, context followed by continuation.
      starts: index in ``seqs[j]`` of its first continuation token (>= 1).
      batch_size: rows per batch; the last batch is filled with copies of its first row.
      length_bucket: the sequence width of a batch is a multiple of this.
      pad_id: id written into padding.

    Returns:
      An iterator of ``(rows, (ids_BxL, mask_BxL, pos_BxC, valid_BxC))``: ``rows`` are the
      request indices of the first ``len(rows)`` batch rows; sequences are RIGHT-padded;
      ``pos[b, c]`` is the position predicting continuation token ``c`` (``valid`` marks real
      ones); C, one bucket of 4 for every batch, fits the longest continuation.

    Example:
      >>> [(rows, ids.shape) for rows, (ids, *_) in
      ...  full_sequence_batches([[5, 6, 7], [8, 9]], [2, 1], 4, 8, 0)]
      [([0, 1], (4, 8))]
    """
    n = len(seqs)
    order = sorted(range(n), key=lambda j: -len(seqs[j]))
    cont_width = _bucket(max(len(seqs[j]) - starts[j] for j in range(n)), _CONT_BUCKET)
    for s in range(0, n, batch_size):
        rows = order[s : s + batch_size]
        width = _bucket(max(len(seqs[j]) for j in rows), length_bucket)
        ids = np.full((batch_size, width), pad_id, dtype=np.int32)
        mask = np.zeros((batch_size, width), dtype=np.int32)
        pos = np.zeros((batch_size, cont_width), dtype=np.int32)
        valid = np.zeros((batch_size, cont_width), dtype=np.int32)
        for b in range(batch_size):
            j = rows[b] if b < len(rows) else rows[0]  # pad the batch with copies of a real row
            seq, c = seqs[j], len(seqs[j]) - starts[j]
            ids[b, : len(seq)] = seq
            mask[b, : len(seq)] = 1
            pos[b, :c] = np.arange(starts[j] - 1, len(seq) - 1)
            valid[b, :c] = 1
        yield rows, (ids, mask, pos, valid)


def shared_prefix_batches(
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    batch_size: int,
    length_bucket: int,
    pad_id: int,
) -> Iterator[tuple[list[int], tuple[np.ndarray, ...]]]:
    """Fixed-shape batches that prefill each distinct context once (the shared-prefix path).

    Requests with identical context ids (``seqs[j][:starts[j]]``) form a group; whole groups are
    packed into batches of at most ``batch_size`` rows, longest context first (a group larger
    than a batch is split, each part with its own context row). Each context row holds the
    context minus its last token, RIGHT-padded (cache slot == position); each request row feeds
    that last token and its continuation but the last, and scores the continuation.

    Args:
      seqs: token ids of each request, context followed by continuation.
      starts: index in ``seqs[j]`` of its first continuation token (>= 1).
      batch_size: request rows per batch (padded with copies of the first row).
      length_bucket: the context width of a batch is a multiple of this.
      pad_id: id written into padding.

    Returns:
      An iterator of ``(rows, (ctx_GxP, ctx_mask_GxP, group_B, ids_BxC, pos_BxC, tok_BxC,
      valid_BxC))``: ``rows`` are the request indices of the first ``len(rows)`` batch rows,
      ``group[b]`` the context row of batch row ``b``, ``pos`` the RoPE positions of ``ids``,
      ``tok`` the continuation tokens scored where ``valid``. G (context rows) is a multiple of
      how many of the largest groups fit a batch, so few shapes compile.

    Example:
      >>> seqs = [[5, 6, 7, 1], [9, 2, 3], [5, 6, 7, 4, 4]]  # contexts [5, 6, 7], [9], [5, 6, 7]
      >>> [(rows, ctx.shape, group.tolist()) for rows, (ctx, _, group, *_) in
      ...  shared_prefix_batches(seqs, [3, 1, 3], 4, 8, 0)]
      [([0, 2, 1], (2, 8), [0, 0, 1, 0])]
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        groups.setdefault(tuple(seq[:start]), []).append(j)
    chunks = [
        (ctx, members[s : s + batch_size])
        for ctx, members in sorted(groups.items(), key=lambda kv: -len(kv[0]))
        for s in range(0, len(members), batch_size)
    ]
    # Context rows per call: a multiple of how many of the largest groups fit in a batch.
    per_batch = max(1, batch_size // max(len(m) for _, m in chunks))
    packed: list[list[tuple[tuple[int, ...], list[int]]]] = [[]]
    for chunk in chunks:
        if sum(len(m) for _, m in packed[-1]) + len(chunk[1]) > batch_size:
            packed.append([])
        packed[-1].append(chunk)
    cont_width = _bucket(max(len(s) - st for s, st in zip(seqs, starts, strict=True)), _CONT_BUCKET)
    logger.debug(
        "score_continuations: %d requests, %d distinct contexts, %d batches",
        len(seqs),
        len(groups),
        len(packed),
    )
    for batch in packed:
        n_ctx = min(_bucket(len(batch), per_batch), batch_size)
        width = _bucket(max(1, max(len(ctx) - 1 for ctx, _ in batch)), length_bucket)
        ctx_ids = np.full((n_ctx, width), pad_id, dtype=np.int32)
        ctx_mask = np.zeros((n_ctx, width), dtype=np.int32)
        for g in range(n_ctx):
            ctx = batch[g][0] if g < len(batch) else batch[0][0]  # pad with copies
            ctx_ids[g, : len(ctx) - 1] = ctx[:-1]
            ctx_mask[g, : len(ctx) - 1] = 1
        rows = [j for _, members in batch for j in members]
        row_group = [g for g, (_, members) in enumerate(batch) for _ in members]
        group = np.zeros(batch_size, dtype=np.int32)
        ids = np.full((batch_size, cont_width), pad_id, dtype=np.int32)
        pos = np.zeros((batch_size, cont_width), dtype=np.int32)
        tok = np.full((batch_size, cont_width), pad_id, dtype=np.int32)
        valid = np.zeros((batch_size, cont_width), dtype=np.int32)
        for b in range(batch_size):
            r = b if b < len(rows) else 0  # pad the batch with copies of a real row
            seq, start = seqs[rows[r]], starts[rows[r]]
            c = len(seq) - start
            group[b] = row_group[r]
            ids[b, :c] = seq[start - 1 : -1]
            pos[b] = start - 1 + np.arange(cont_width)
            tok[b, :c] = seq[start:]
            valid[b, :c] = 1
        yield rows, (ctx_ids, ctx_mask, group, ids, pos, tok, valid)
