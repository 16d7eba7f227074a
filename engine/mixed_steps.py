"""Mixed steps through the decode graph: a step with decode rows (one new token after cached ones) next to prompt
rows or chunks runs its decode rows as a replay of the decode CUDA graph of their bucket and only the rest eagerly.

Why: served requests arrive out of step with each other, so under load nearly every step is mixed (requests end
and new prompts join every step). Run eagerly, such a step pays the host's launch cost of every layer's kernels for
the whole batch: on one H200 a 1B step of 256 decode rows plus a prompt or two took ~30 ms against 2.1 ms for the
same decode rows replayed. Split, the decode rows cost their replay, the prompts an eager forward of their own
tokens (weights read twice: once more than a single pass, which the launch cost saved dwarfs). The decode rows get
the same arithmetic as in a pure-decode step, so a request's tokens do not depend on what it was batched with.

Both parts write K/V into the same cache (disjoint slots) and run in stream order; only steps without per-layer
hooks (no KV transfer) and with graphs captured are split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.input_batch import BATCH_SLOT, LENGTH, POSITION, SLOT, TOKEN, StepInputs, to_device
from engine.layers.attention_context import attention_context
from engine.scheduler_output import SchedulerOutput


def decode_mask(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[rows] bool: the rows that are decode rows (one new token after cached ones)."""
    return (counts == 1) & (starts > 0)


def row_tokens(query_start: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The step token indices of `rows`' tokens, row after row, and each row's first token among them."""
    counts = query_start[rows + 1] - query_start[rows]
    first = np.cumsum(counts) - counts
    return np.repeat(query_start[rows] - first, counts) + np.arange(int(counts.sum())), first


def decode_rows(out: SchedulerOutput, max_batch: int) -> np.ndarray | None:
    """Row indices of the step's decode rows when it has both decode rows and other rows (and the decode rows fit
    a graph), else None (the step runs as one forward)."""
    decode = decode_mask(np.asarray(out.starts, dtype=np.int64), np.asarray(out.num_tokens, dtype=np.int64))
    if decode.all() or not decode.any() or int(decode.sum()) > max_batch:
        return None
    return np.flatnonzero(decode)


def run_split(runner: Any, out: SchedulerOutput, inp: StepInputs, dec: np.ndarray) -> torch.Tensor:
    """Queue the step's forward in two parts (`dec`: its decode rows, from `decode_rows`); returns the logits of
    its sampling rows, [len(inp.sample_rows), vocab] float32 in row order, as one forward's would be."""
    graphs, device = runner.graphs, runner.device
    qs = inp.query_start
    counts = np.diff(qs)
    starts = np.asarray(out.starts, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(counts)), dec)
    rest_tokens, rest_first = row_tokens(qs, rest)
    sr = inp.sample_rows
    dec_sampled, rest_sampled = np.isin(dec, sr), np.isin(rest, sr)
    parts = [qs[dec], rest_tokens, rest_first, np.flatnonzero(dec_sampled), np.searchsorted(sr, dec[dec_sampled]),
             (rest_first + counts[rest] - 1)[rest_sampled], np.searchsorted(sr, rest[rest_sampled])]
    idx = torch.split(to_device(np.concatenate(parts), device), [len(p) for p in parts])
    dec_tok, rest_tok, rest_first_d, dec_keep, dec_pos, rest_last, rest_pos = idx

    # Decode rows: fill the bucket's static inputs (padding rows: slot -1, length 0) and replay.
    nd = len(dec)
    bucket = graphs.bucket_for(nd)
    static, tables = graphs.static_inputs(bucket)
    static[TOKEN, :nd] = inp.input_ids[dec_tok]
    static[POSITION:, :nd] = inp.packed[POSITION:LENGTH + 1][:, dec_tok]
    static[TOKEN:SLOT, nd:] = 0
    static[SLOT, nd:] = -1
    static[LENGTH, nd:] = 0
    torch.index_select(runner.batch.tables, 0, inp.packed[BATCH_SLOT][dec_tok], out=tables[:nd])
    dec_logits = graphs.replay(bucket, nd)  # [nd, vocab] float32, a view of the graph's output

    # The rest (prompts, chunks): one eager forward of their tokens alone.
    meta = runner.rows_metadata(inp.packed[SLOT][rest_tok], starts[rest], counts[rest],
                                 inp.packed[BATCH_SLOT][rest_tok][rest_first_d])
    with attention_context(meta):
        hidden = runner.model(inp.input_ids[rest_tok], inp.packed[POSITION][rest_tok])  # [n_rest, hidden]

    logits = torch.empty(len(sr), dec_logits.shape[1], dtype=dec_logits.dtype, device=dec_logits.device)
    logits[dec_pos] = dec_logits[dec_keep]
    if len(rest_pos):
        logits[rest_pos] = runner.model.compute_logits(hidden[rest_last])
    return logits
