"""Helpers for KV transfer tests: wiring a prefill engine to a decode engine, and a sender that dies mid-way."""

from __future__ import annotations

import os

from engine import EngineConfig, LLMEngine, SamplingParams
from kv_transfer.connector import KVConnector

CONNECTOR = "kv_transfer.connector:KVConnector"


def engine(model_dir: str, tp: int = 1, extension: str = CONNECTOR, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig.from_model_dir(model_dir, tensor_parallel_size=tp, worker_extension=extension,
                                                 **kw))


def wire(prefill: LLMEngine, prefill_name: str, decode: LLMEngine, decode_name: str) -> None:
    """Decode ranks open channels for the prefill worker; the prefill ranks connect to them."""
    p_tp = prefill.config.parallel.tensor_parallel_size
    d_tp = decode.config.parallel.tensor_parallel_size
    addresses = decode.call_extension("listen", prefill_name, p_tp)
    prefill.call_extension("connect", decode_name, d_tp, addresses)


def run_until_done(eng: LLMEngine, ids: set[str], max_steps: int = 10_000) -> dict:
    finals = {}
    for _ in range(max_steps):
        for o in eng.step():
            if o.finished and o.request_id in ids:
                finals[o.request_id] = o
        if ids <= finals.keys():
            return finals
    s = eng.scheduler
    raise AssertionError(f"requests {ids - finals.keys()} did not finish: waiting {list(s.waiting)}, running "
                         f"{s.running}, remote {list(s.remote)}, free blocks {eng.num_free_blocks}")


def disaggregated_generate(prefill: LLMEngine, decode: LLMEngine, prompts: list[list[int]],
                           params: SamplingParams, prefill_name: str = "p0", decode_name: str = "d0") -> dict:
    """The request lifecycle without the router: reserve on decode, prefill+send, first token, decode."""
    p_tp = prefill.config.parallel.tensor_parallel_size
    ids = [f"req{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        reservation = decode.reserve_remote_prefill(rid, prompt, params, prefill_name, p_tp)
        assert reservation is not None
        prefill.add_request(rid, prompt, params,
                            transfer={"peer": decode_name, "skip_blocks": reservation.num_cached_blocks})
    firsts = run_until_done(prefill, set(ids))
    for rid, o in firsts.items():
        assert o.finish_reason == "prefilled" and o.error is None, (o.finish_reason, o.error)
        decode.set_first_token(rid, o.token_ids[0])
    return run_until_done(decode, set(ids))


class DyingConnector(KVConnector):
    """Sends layer 0 of its first transfer, then kills its process (a prefill rank crashing mid-transfer)."""

    def on_layer(self, layer: int) -> None:
        if layer == 1 and self.step_sends:
            for chans in self.out.values():
                for ch in chans.values():
                    for w in ch.works:
                        w.wait()
            os._exit(17)
        super().on_layer(layer)


class ShortIdleConnector(KVConnector):
    """Receivers give up on a silent sender after 2 s (instead of an hour), so tests can see idle expiry."""

    idle_timeout_s = 2.0
