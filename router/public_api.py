"""The router's side of the public API (kvrelay.v1): the one place where client protobufs meet the router's
Python objects."""

from __future__ import annotations

from typing import Any

from protos import codec
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc
from router.client_stream import Chunk, Final
from router.requests import ModelLimits

GenerationServicer = pb_grpc.GenerationServicer
add_to_server = pb_grpc.add_GenerationServicer_to_server
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


def parse(msg: pb.GenerateRequest) -> tuple[str | list[int] | None, dict[str, Any], str]:
    """(prompt: text, token ids or None when unset; SamplingParams keyword arguments; request id)."""
    kind = msg.WhichOneof("prompt")
    prompt: str | list[int] | None = (msg.text if kind == "text" else list(msg.token_ids.ids) if kind == "token_ids"
                                      else None)
    return prompt, codec.sampling_kwargs(msg.sampling), msg.request_id


def response(item: Chunk | Final) -> pb.GenerateResponse:
    if isinstance(item, Chunk):
        return pb.GenerateResponse(chunk=pb.TokenChunk(
            token_ids=item.token_ids, text=item.text,
            logprobs=[codec.logprob_message(lp.logprob, lp.top) for lp in item.logprobs]))
    return pb.GenerateResponse(final=pb.Final(
        request_id=item.request_id, finish_reason=item.finish_reason,
        usage=pb.Usage(prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens,
                       cached_prompt_tokens=item.cached_prompt_tokens,
                       decode_cached_prompt_tokens=item.decode_cached_prompt_tokens),
        timings=pb.Timings(queued_ms=item.queued_ms, first_token_ms=item.first_token_ms,
                           kv_landed_ms=item.kv_landed_ms, total_ms=item.total_ms)))


def model_info(limits: ModelLimits, has_tokenizer: bool, prefill_workers: int, decode_groups: int,
               decode_tp: int) -> pb.ModelInfo:
    return pb.ModelInfo(model=limits.model, architecture=limits.architecture, vocab_size=limits.vocab_size,
                        max_model_len=limits.max_model_len, has_tokenizer=has_tokenizer,
                        prefill_workers=prefill_workers, decode_groups=decode_groups,
                        decode_tensor_parallel_size=decode_tp)
