"""The step-level engine: add requests, step, abort, and read streamed outputs.

Workers drive this API; `LLM.generate` is a loop over it. One `step()` = schedule, one forward pass, update the
scheduler with the sampled tokens, then detokenize and apply stop strings for the requests that advanced.

With async scheduling (`RuntimeConfig.async_scheduling`, on by default with CUDA) a step schedules and queues step
n+1 before it collects step n, so the host's scheduling and output work runs while the device computes; tokens
of step n feed step n+1 on the device. A stop (EOS, stop id, stop string) is then seen one step late: the extra
token is dropped, never emitted, and a request's blocks return to the pool only once no step in flight writes
them. Outputs are per-step deltas (`RequestOutput`), whatever the requests' lengths.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque

from torch.distributed import DistError

from engine.config import EngineConfig
from engine.executor import Executor, LocalExecutor, MultiprocExecutor, WorkerError
from engine.kv_connector import RemoteReservation
from engine.output_processor import OutputState
from engine.outputs import Logprob, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import TransferEvents, TransferSpec
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer


def _check_tp_shapes(config: EngineConfig) -> None:
    """Fail before spawning ranks when the model cannot be split tp ways."""
    m, tp = config.model, config.parallel.tensor_parallel_size
    for what, n in (("num_attention_heads", m.num_heads), ("intermediate_size", m.intermediate_size)):
        if n % tp:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size {tp}")
    if m.num_kv_heads % tp and tp % m.num_kv_heads:
        raise ValueError(f"num_key_value_heads ({m.num_kv_heads}) and tensor_parallel_size {tp} must divide one "
                         "another (KV heads are split, or replicated when there are fewer than ranks)")


class _RequestState:
    """A request's sequence and its output side (text, stop strings, what was streamed)."""

    def __init__(self, seq: Sequence, tokenizer: Tokenizer | None) -> None:
        self.seq = seq
        self.out = OutputState(seq.token_ids, seq.params, tokenizer)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        """`executor` runs the model's ranks; by default a local one (TP 1) or one process per rank (TP > 1).
        A decode worker passes one whose ranks were started elsewhere (Ray actors, see engine.executor)."""
        self.config = config
        self.tokenizer = Tokenizer.from_model_dir(config.model.model_dir)
        self._out_tokenizer = self.tokenizer if config.detokenize else None
        _check_tp_shapes(config)
        if executor is None:
            executor = (MultiprocExecutor(config) if config.parallel.tensor_parallel_size > 1
                        else LocalExecutor(config))
        self.executor: Executor = executor
        self.num_blocks = self.executor.num_blocks
        self.scheduler = Scheduler(config.scheduler, config.cache, self.num_blocks,
                                   eos_token_ids=config.model.eos_token_ids,
                                   tp_size=config.parallel.tensor_parallel_size)
        self._kv = self.scheduler.kv  # the KV connector's scheduler side
        self._states: dict[str, _RequestState] = {}
        self._aborted: list[RequestOutput] = []
        self._arrivals = itertools.count()
        self.async_scheduling = bool(config.runtime.resolved(config.device).async_scheduling)
        self._inflight: deque = deque()  # (SchedulerOutput, executor handle), oldest first
        self.wait_s = 0.0  # seconds step() spent waiting for the device's results (the rest is host work)
        # A serving loop (engine_loop) sets this: reservations made between two steps are registered on the ranks
        # in one batched call (`flush_expects`) instead of one broadcast each.
        self.defer_expects = False
        self._expects: list[tuple[str, list[int], str, int]] = []

    # ---- requests -----------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.config.model.model_dir} has no tokenizer.json: give prompts as token ids")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        vocab = self.config.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    transfer: TransferSpec | dict | None = None) -> None:
        """Queue a request. Raises ValueError (nothing queued) for an empty/too-long prompt or a reused id.

        With `transfer` (a TransferSpec, or its fields as a dict), this engine only prefills: the worker extension
        sends the prompt's KV chunk by chunk as it is computed, except the first `skip_blocks` blocks (the decode
        group holds them already), and the request ends at its first token with finish_reason "prefilled" (or
        "abort" with `error` if a transfer failed).
        """
        if params.stop and self._out_tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none (use stop_token_ids)"
                             if self.config.detokenize else "this engine does not detokenize: stop strings are "
                             "applied by its router")
        seq = Sequence(request_id, self.tokenize(prompt), params, arrival=next(self._arrivals))
        if isinstance(transfer, dict):  # {"peer": ..., "skip_blocks": ...} from callers that build it by hand
            transfer = TransferSpec(**transfer)
        seq.transfer = transfer
        if transfer is not None:
            if transfer.skip_blocks * self.config.cache.block_size >= seq.num_prompt_tokens:
                raise ValueError(f"skip_blocks {transfer.skip_blocks} leaves nothing of a {seq.num_prompt_tokens}-"
                                 f"token prompt to send (blocks of {self.config.cache.block_size} tokens)")
            seq.transfer_sent = transfer.skip_blocks
        self.scheduler.add(seq)
        self._states[request_id] = _RequestState(seq, self._out_tokenizer)

    # ---- disaggregation: decode side ---------------------------------------------------------------------
    def reserve_remote_prefill(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                               peer: str, prefill_tp: int, timeout_s: float = 30.0) -> RemoteReservation | None:
        """Reserve blocks for a prompt that prefill worker `peer` will compute and send, sharing the prefix this
        engine's cache already holds; returns the reservation (the prefill side sends the prompt's blocks after
        `num_cached_blocks` into `missing_blocks`), or None when there is no room now (try later or elsewhere).
        Every rank expects the transfer before this returns, so the prefill side may start sending at once."""
        seq = Sequence(request_id, self.tokenize(prompt), params, arrival=next(self._arrivals))
        reservation = self.scheduler.reserve_remote(seq)
        if reservation is None:
            return None
        expect = (request_id, reservation.missing_blocks, peer, prefill_tp)
        self._states[request_id] = _RequestState(seq, self._out_tokenizer)
        self._kv.await_transfer(request_id, timeout_s)
        if self.defer_expects:
            self._expects.append(expect)
        else:
            error = self._register([expect]).get(request_id)
            if error is not None:
                raise RuntimeError(f"could not register the transfer on every rank: {error}")
        return dataclasses.replace(reservation, free_blocks=self.num_free_blocks)

    def flush_expects(self) -> dict[str, str]:
        """Register every deferred reservation (`defer_expects`) on every rank in one call; the engine loop does
        this after each batch of calls, before answering them. Returns {request id: error} for reservations that
        could not be registered (they are aborted and their blocks freed)."""
        batch, self._expects = self._expects, []
        return self._register(batch) if batch else {}

    def _register(self, batch: list[tuple[str, list[int], str, int]]) -> dict[str, str]:
        try:
            self.executor.call_extension("expect_many", batch)
            return {}
        except (DistError, WorkerError):
            raise  # a rank is gone: the engine is dead
        except Exception as e:
            rids = [b[0] for b in batch]
            try:  # ranks where they did register must forget them before the blocks are reused
                self.executor.call_extension("cancel", rids)
            finally:
                for rid in rids:
                    self._kv.discard(rid)
                    self.scheduler.finish(rid, "abort")
                    self._states.pop(rid, None)
            return {rid: str(e) for rid in rids}

    def call_extension(self, method: str, *args) -> list:
        """Call a worker-extension method on every rank (e.g. KV channel setup); results in rank order."""
        return self.executor.call_extension(method, *args)

    def set_first_token(self, request_id: str, token: int) -> None:
        """The token the prefill worker sampled; decoding starts once the KV has landed too."""
        if not 0 <= token < self.config.model.vocab_size:
            raise ValueError(f"first token id {token} is outside the vocabulary [0, {self.config.model.vocab_size})")
        self._kv.set_first_token(request_id, token)

    def _apply_landing(self, rank_events: list[TransferEvents]) -> list[RequestOutput]:
        """Fold the decode ranks' transfer events (landed / failed remote prefills) into the reservations."""
        ready, failed = self._kv.fold(rank_events)
        outputs = []
        if failed:
            self.executor.call_extension("cancel", list(failed))  # no byte lands after this: blocks reusable
        for rid, err in failed.items():
            self.scheduler.finish(rid, "abort")
            state = self._states.pop(rid)
            outputs.append(self._output(state, [], "", None, finished=True, error=err))
        for rid, token in ready:
            seq = self.scheduler.admit_remote(rid, token)
            outputs.append(self._emit(seq, {}))
        return outputs

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now (its blocks are freed once no step in flight writes them); the next `step()`
        reports it with finish_reason "abort"."""
        self._expects = [e for e in self._expects if e[0] != request_id]
        if self._kv.discard(request_id):
            self.executor.call_extension("cancel", [request_id])
        seq = self.scheduler.finish(request_id, "abort")
        state = self._states.pop(request_id, None)
        if seq is None or state is None:
            return False
        self._aborted.append(self._output(state, [], "", None, finished=True))
        return True

    def keepalive(self) -> None:
        """Call between steps every so often (a serving loop does, see engine_loop): keeps idle tensor-parallel
        ranks and idle KV channels from timing out."""
        self.executor.keepalive()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or bool(self._inflight)

    # ---- stepping -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that got a token, finished or was aborted. With
        async scheduling the tokens returned are those of the previous batch, collected once this one is queued."""
        outputs, self._aborted = self._aborted, []
        if self._expects:
            self.flush_expects()
        if self._kv.pending and not self._inflight and not (self.scheduler.running or self.scheduler.waiting):
            # Only transfers outstanding, so no step carries their events: ask the ranks directly.
            outputs += self._apply_landing(self.executor.call_extension("poll"))
        # Preemption frees blocks at once: never while a step that writes them is in flight.
        if self._inflight and self.scheduler.may_preempt():
            outputs += self._collect()
        sched = self.scheduler.schedule()
        if not sched.is_empty:
            self._inflight.append((sched, self.executor.submit(sched)))
        if len(self._inflight) > (1 if self.async_scheduling and not sched.is_empty else 0):
            outputs += self._collect()
        return outputs

    def _collect(self) -> list[RequestOutput]:
        """Wait for the oldest step in flight and account its tokens."""
        sched, handle = self._inflight.popleft()
        t = time.perf_counter()
        result = handle.result()
        self.wait_s += time.perf_counter() - t
        send_failed: dict[str, str] = {}
        landing = [ev for ev in result.ext_events if isinstance(ev, TransferEvents)]
        for ev in landing:
            send_failed.update(ev.send_failed)
        outputs = []
        for seq in self.scheduler.update(sched, result.token_ids):
            if seq.transfer is not None and not seq.is_finished:
                self.scheduler.finish(seq.request_id, "prefilled")  # decode continues on the decode group
            if seq.request_id in send_failed:
                seq.finish_reason = "abort"
            outputs.append(self._emit(seq, result.logprobs, send_failed.pop(seq.request_id, None)))
        for rid, error in send_failed.items():  # a chunk before the last failed to send: the request is lost
            seq = self.scheduler.finish(rid, "abort")
            state = self._states.pop(rid, None)
            if seq is not None and state is not None:
                outputs.append(self._output(state, [], "", None, finished=True, error=error))
        if self._kv.pending:  # landed, failed, or past their deadline
            outputs += self._apply_landing(landing)
        return outputs

    def _emit(self, seq: Sequence, logprobs: dict, error: str | None = None) -> RequestOutput:
        """Account the sequence's newest token: logprobs, text, stop strings; build its output."""
        state = self._states[seq.request_id]
        token = seq.token_ids[seq.num_resolved_tokens - 1]
        out = state.out
        if out.detok is None and out.logprobs is None and not seq.is_finished:
            # No text, stop strings or logprobs to account (a worker's engine): the token is the whole delta.
            out.token_ids.append(token)
            out.emitted_tokens += 1
            return RequestOutput(seq.request_id, [token], "", None, out.emitted_tokens, False, None,
                                 seq.num_cached_tokens, error)
        lp = logprobs.get(seq.request_id)
        stopped = state.out.add(token, Logprob(token, *lp) if lp else None)
        if seq.is_finished:
            stopped |= state.out.flush()
        if stopped:
            if not seq.is_finished:
                self.scheduler.finish(seq.request_id, "stop")
            seq.finish_reason = "stop"
        finished = seq.is_finished
        if finished:
            del self._states[seq.request_id]
        new_tokens, new_text = state.out.take(finished)
        return self._output(state, new_tokens, new_text, state.out.take_logprobs(), finished, error)

    def _output(self, state: _RequestState, new_tokens: list[int], new_text: str, new_logprobs: list | None,
                finished: bool, error: str | None = None) -> RequestOutput:
        seq, out = state.seq, state.out
        final = RequestOutput(
            request_id=seq.request_id, new_token_ids=new_tokens, new_text=new_text, new_logprobs=new_logprobs,
            num_output_tokens=len(out.token_ids), finished=finished,
            finish_reason=seq.finish_reason if finished else None, num_cached_tokens=seq.num_cached_tokens,
            error=error)
        if finished:  # the whole request, once: the prompt, every token, the text and every logprob
            final.prompt_token_ids = seq.token_ids[: seq.num_prompt_tokens]
            final.token_ids = list(out.token_ids)
            final.text = out.text
            final.logprobs = list(out.logprobs) if out.logprobs is not None else None
        return final

    # ---- stats --------------------------------------------------------------------------------------------
    @property
    def prefix_cache_hit_rate(self) -> float:
        b = self.scheduler.blocks
        return b.prefix_hits / b.prefix_queries if b.prefix_queries else 0.0

    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.blocks.num_free_blocks

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes (no-op for a single-process engine)."""
        self.executor.shutdown()
