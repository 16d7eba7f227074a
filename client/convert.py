"""The client's one protobuf boundary: Python arguments -> `kvrelay.v1` requests, responses -> dataclasses."""

from __future__ import annotations

from typing import Any

from client.types import Chunk, Final, ModelInfo, Timings, TokenLogprob, Usage
from protos import generation_pb2 as pb
from protos import generation_pb2_grpc as pb_grpc

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                   "logprobs", "skip_special_tokens")

Stub = pb_grpc.GenerationStub


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying the API key, as the router checks it."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def credentials(tls: bool, ca_cert: str | None) -> Any:
    """TLS channel credentials (trusting `ca_cert`, a PEM file, else the system's roots), or None for
    plaintext."""
    if not tls and ca_cert is None:
        return None
    import grpc

    roots = None
    if ca_cert is not None:
        with open(ca_cert, "rb") as f:
            roots = f.read()
    return grpc.ssl_channel_credentials(root_certificates=roots)


def generate_request(prompt: str | list[int], request_id: str | None, sampling: dict[str, Any]) -> pb.GenerateRequest:
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}; valid: {', '.join(SAMPLING_FIELDS)}")
    params = {k: v for k, v in sampling.items() if v is not None}
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**params), request_id=request_id or "")
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
        if not prompt:
            req.token_ids.SetInParent()  # an empty id list is still a token-id prompt (the server rejects it)
    return req


def chunk(msg: pb.TokenChunk) -> Chunk:
    lps = [TokenLogprob(lp.logprob, list(zip(lp.top_token_ids, lp.top_logprobs))) for lp in msg.logprobs]
    return Chunk(list(msg.token_ids), msg.text, lps)


def final(msg: pb.Final) -> Final:
    u, t = msg.usage, msg.timings
    return Final(msg.request_id, msg.finish_reason, Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens,
                                                           u.decode_cached_prompt_tokens),
                 Timings(t.queued_ms, t.first_token_ms, t.kv_landed_ms, t.total_ms))


def response(msg: pb.GenerateResponse) -> Chunk | Final:
    return chunk(msg.chunk) if msg.WhichOneof("kind") == "chunk" else final(msg.final)


def model_info_request() -> pb.GetModelInfoRequest:
    return pb.GetModelInfoRequest()


def model_info(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(msg.model, msg.architecture, msg.vocab_size, msg.max_model_len, msg.has_tokenizer,
                     msg.prefill_workers, msg.decode_groups, msg.decode_tensor_parallel_size)
