from protos import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "decode_group", "skip_blocks", "output_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_GROUP_FIELD_NUMBER: _ClassVar[int]
    SKIP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    decode_group: str
    skip_blocks: int
    output_offset: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., decode_group: _Optional[str] = ..., skip_blocks: _Optional[int] = ..., output_offset: _Optional[int] = ...) -> None: ...

class PrefillResult(_message.Message):
    __slots__ = ("first_token_id", "first_logprob", "cached_prompt_tokens", "finish_reason")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: _generation_pb2.TokenLogprob
    cached_prompt_tokens: int
    finish_reason: str
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[_Union[_generation_pb2.TokenLogprob, _Mapping]] = ..., cached_prompt_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class ChannelAddress(_message.Message):
    __slots__ = ("decode_rank", "prefill_rank", "host", "port")
    DECODE_RANK_FIELD_NUMBER: _ClassVar[int]
    PREFILL_RANK_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    decode_rank: int
    prefill_rank: int
    host: str
    port: int
    def __init__(self, decode_rank: _Optional[int] = ..., prefill_rank: _Optional[int] = ..., host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("decode_group", "decode_tensor_parallel_size", "channels", "decode_layout")
    DECODE_GROUP_FIELD_NUMBER: _ClassVar[int]
    DECODE_TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DECODE_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    decode_group: str
    decode_tensor_parallel_size: int
    channels: _containers.RepeatedCompositeFieldContainer[ChannelAddress]
    decode_layout: KVLayout
    def __init__(self, decode_group: _Optional[str] = ..., decode_tensor_parallel_size: _Optional[int] = ..., channels: _Optional[_Iterable[_Union[ChannelAddress, _Mapping]]] = ..., decode_layout: _Optional[_Union[KVLayout, _Mapping]] = ...) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("model", "architecture", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "dtype", "block_size", "wire_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    block_size: int
    wire_version: int
    def __init__(self, model: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., wire_version: _Optional[int] = ...) -> None: ...

class ConnectReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListenRequest(_message.Message):
    __slots__ = ("prefill_worker", "prefill_tensor_parallel_size")
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    prefill_worker: str
    prefill_tensor_parallel_size: int
    def __init__(self, prefill_worker: _Optional[str] = ..., prefill_tensor_parallel_size: _Optional[int] = ...) -> None: ...

class ListenReply(_message.Message):
    __slots__ = ("channels",)
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedCompositeFieldContainer[ChannelAddress]
    def __init__(self, channels: _Optional[_Iterable[_Union[ChannelAddress, _Mapping]]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "prefill_worker", "prefill_tensor_parallel_size", "transfer_timeout_s", "output_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    prefill_worker: str
    prefill_tensor_parallel_size: int
    transfer_timeout_s: float
    output_offset: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., prefill_worker: _Optional[str] = ..., prefill_tensor_parallel_size: _Optional[int] = ..., transfer_timeout_s: _Optional[float] = ..., output_offset: _Optional[int] = ...) -> None: ...

class Reserved(_message.Message):
    __slots__ = ("num_blocks", "free_blocks", "num_cached_blocks")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    free_blocks: int
    num_cached_blocks: int
    def __init__(self, num_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., num_cached_blocks: _Optional[int] = ...) -> None: ...

class DecodeTokens(_message.Message):
    __slots__ = ("start_index", "token_ids", "logprobs")
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    start_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_generation_pb2.TokenLogprob]
    def __init__(self, start_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_generation_pb2.TokenLogprob, _Mapping]]] = ...) -> None: ...

class DecodeFinished(_message.Message):
    __slots__ = ("finish_reason", "error", "cached_prompt_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    error: str
    cached_prompt_tokens: int
    def __init__(self, finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class LocalRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "output_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generation_pb2.SamplingParams
    output_offset: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., output_offset: _Optional[int] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("request_id", "token_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ...) -> None: ...

class SessionCommands(_message.Message):
    __slots__ = ("commands",)
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[SessionCommand]
    def __init__(self, commands: _Optional[_Iterable[_Union[SessionCommand, _Mapping]]] = ...) -> None: ...

class SessionCommand(_message.Message):
    __slots__ = ("decode", "generate", "first_token", "cancel")
    DECODE_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    decode: DecodeRequest
    generate: LocalRequest
    first_token: FirstToken
    cancel: str
    def __init__(self, decode: _Optional[_Union[DecodeRequest, _Mapping]] = ..., generate: _Optional[_Union[LocalRequest, _Mapping]] = ..., first_token: _Optional[_Union[FirstToken, _Mapping]] = ..., cancel: _Optional[str] = ...) -> None: ...

class SessionEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[SessionEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[SessionEvent, _Mapping]]] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("request_id", "reserved", "tokens", "finished", "refused")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reserved: Reserved
    tokens: DecodeTokens
    finished: DecodeFinished
    refused: Refused
    def __init__(self, request_id: _Optional[str] = ..., reserved: _Optional[_Union[Reserved, _Mapping]] = ..., tokens: _Optional[_Union[DecodeTokens, _Mapping]] = ..., finished: _Optional[_Union[DecodeFinished, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("name", "num_blocks", "free_blocks", "block_size", "running", "waiting", "prefix_cache_hit_rate", "healthy", "error", "max_num_seqs", "num_preemptions", "kv_layout", "draining")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_blocks: int
    free_blocks: int
    block_size: int
    running: int
    waiting: int
    prefix_cache_hit_rate: float
    healthy: bool
    error: str
    max_num_seqs: int
    num_preemptions: int
    kv_layout: KVLayout
    draining: bool
    def __init__(self, name: _Optional[str] = ..., num_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., healthy: _Optional[bool] = ..., error: _Optional[str] = ..., max_num_seqs: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., kv_layout: _Optional[_Union[KVLayout, _Mapping]] = ..., draining: _Optional[bool] = ...) -> None: ...
