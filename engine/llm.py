"""`LLM`: the single-process engine (prefill and decode colocated), the reference and the baseline."""

from __future__ import annotations

import uuid
from collections.abc import Sequence as SequenceABC

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    """Offline generation over a batch of prompts.

    `LLM(model_dir, dtype="auto", device="cpu", block_size=16, num_blocks=None, kv_cache_memory=None,
    max_model_len=None, max_num_seqs=256, max_num_batched_tokens=2048, enable_prefix_caching=True,
    enable_chunked_prefill=True, tensor_parallel_size=1)`; see `EngineConfig.from_model_dir`. With
    tensor_parallel_size N > 1, N rank processes are spawned (one GPU each on CUDA); `shutdown()` or leaving a
    `with LLM(...) as llm:` block stops them.
    """

    def __init__(self, model_dir: str, **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig.from_model_dir(model_dir, **kwargs))

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | SequenceABC[str | list[int]],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists), batched together; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = params if params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; give one or one each")
        ids = [f"gen-{uuid.uuid4().hex}" for _ in prompts]
        finals: dict[str, RequestOutput] = {}
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                self.engine.add_request(rid, prompt, p)
            while len(finals) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
        except BaseException:
            for rid in ids:
                if rid not in finals:
                    self.engine.abort_request(rid)
            self.engine.step()  # drain the abort notices
            raise
        return [finals[rid] for rid in ids]
