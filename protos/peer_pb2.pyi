from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scales", "block", "outlier_index", "outlier_values")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_VALUES_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scales: bytes
    block: int
    outlier_index: bytes
    outlier_values: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., block: _Optional[int] = ..., outlier_index: _Optional[bytes] = ..., outlier_values: _Optional[bytes] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("peer_id", "address", "start", "end", "session_id", "push_token", "certificate", "relay_maddrs")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    RELAY_MADDRS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    start: int
    end: int
    session_id: str
    push_token: bytes
    certificate: bytes
    relay_maddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., session_id: _Optional[str] = ..., push_token: _Optional[bytes] = ..., certificate: _Optional[bytes] = ..., relay_maddrs: _Optional[_Iterable[str]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "start", "end", "max_length", "batch_size", "dtype", "next_hops", "report_outputs", "push_token", "adapter")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOPS_FIELD_NUMBER: _ClassVar[int]
    REPORT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int
    dtype: str
    next_hops: _containers.RepeatedCompositeFieldContainer[Hop]
    report_outputs: bool
    push_token: bytes
    adapter: str
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., max_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., dtype: _Optional[str] = ..., next_hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., report_outputs: _Optional[bool] = ..., push_token: _Optional[bytes] = ..., adapter: _Optional[str] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("session_id", "step_id", "position", "hidden", "position_ids", "beam_indices", "rollback_to", "local_only", "timeout_ms", "attention_mask", "carried", "report_outputs", "carried_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    BEAM_INDICES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_TO_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    CARRIED_FIELD_NUMBER: _ClassVar[int]
    REPORT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CARRIED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    position: int
    hidden: Tensor
    position_ids: Tensor
    beam_indices: Tensor
    rollback_to: int
    local_only: bool
    timeout_ms: int
    attention_mask: Tensor
    carried: _containers.RepeatedCompositeFieldContainer[Tensor]
    report_outputs: bool
    carried_seconds: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., position: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position_ids: _Optional[_Union[Tensor, _Mapping]] = ..., beam_indices: _Optional[_Union[Tensor, _Mapping]] = ..., rollback_to: _Optional[int] = ..., local_only: _Optional[bool] = ..., timeout_ms: _Optional[int] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., carried: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., report_outputs: _Optional[bool] = ..., carried_seconds: _Optional[_Iterable[float]] = ...) -> None: ...

class Reroute(_message.Message):
    __slots__ = ("next_hops",)
    NEXT_HOPS_FIELD_NUMBER: _ClassVar[int]
    next_hops: _containers.RepeatedCompositeFieldContainer[Hop]
    def __init__(self, next_hops: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "step", "close", "reroute")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    REROUTE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    close: Close
    reroute: Reroute
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., reroute: _Optional[_Union[Reroute, _Mapping]] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("session_id", "max_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "hidden", "position", "peer_id", "carried", "carried_seconds", "seconds")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CARRIED_FIELD_NUMBER: _ClassVar[int]
    CARRIED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    position: int
    peer_id: str
    carried: _containers.RepeatedCompositeFieldContainer[Tensor]
    carried_seconds: _containers.RepeatedScalarFieldContainer[float]
    seconds: float
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., peer_id: _Optional[str] = ..., carried: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., carried_seconds: _Optional[_Iterable[float]] = ..., seconds: _Optional[float] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("step_id", "code", "message", "peer_id")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    code: int
    message: str
    peer_id: str
    def __init__(self, step_id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., peer_id: _Optional[str] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("opened", "result", "error")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    result: StepResult
    error: StepError
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("step", "push_token")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PUSH_TOKEN_FIELD_NUMBER: _ClassVar[int]
    step: Step
    push_token: bytes
    def __init__(self, step: _Optional[_Union[Step, _Mapping]] = ..., push_token: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PushNack(_message.Message):
    __slots__ = ("session_id", "step_id", "code", "message")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_id: int
    code: int
    message: str
    def __init__(self, session_id: _Optional[str] = ..., step_id: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class LoraModule(_message.Message):
    __slots__ = ("block", "module", "lora_a", "lora_b", "scaling")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    LORA_A_FIELD_NUMBER: _ClassVar[int]
    LORA_B_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    block: int
    module: str
    lora_a: Tensor
    lora_b: Tensor
    scaling: float
    def __init__(self, block: _Optional[int] = ..., module: _Optional[str] = ..., lora_a: _Optional[_Union[Tensor, _Mapping]] = ..., lora_b: _Optional[_Union[Tensor, _Mapping]] = ..., scaling: _Optional[float] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("start", "end", "hidden", "prompts", "attention_mask", "adapter", "lora", "keep_for_backward")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    KEEP_FOR_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    hidden: Tensor
    prompts: Tensor
    attention_mask: Tensor
    adapter: str
    lora: _containers.RepeatedCompositeFieldContainer[LoraModule]
    keep_for_backward: bool
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ..., lora: _Optional[_Iterable[_Union[LoraModule, _Mapping]]] = ..., keep_for_backward: _Optional[bool] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("hidden", "lora_modules", "backward_token")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LORA_MODULES_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    lora_modules: int
    backward_token: bytes
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., lora_modules: _Optional[int] = ..., backward_token: _Optional[bytes] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("start", "end", "hidden", "grad_output", "prompts", "attention_mask", "adapter", "lora", "forward_token")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TOKEN_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    hidden: Tensor
    grad_output: Tensor
    prompts: Tensor
    attention_mask: Tensor
    adapter: str
    lora: _containers.RepeatedCompositeFieldContainer[LoraModule]
    forward_token: bytes
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., prompts: _Optional[_Union[Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ..., lora: _Optional[_Iterable[_Union[LoraModule, _Mapping]]] = ..., forward_token: _Optional[bytes] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("grad_input", "grad_prompts", "grad_lora")
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_LORA_FIELD_NUMBER: _ClassVar[int]
    grad_input: Tensor
    grad_prompts: Tensor
    grad_lora: _containers.RepeatedCompositeFieldContainer[LoraModule]
    def __init__(self, grad_input: _Optional[_Union[Tensor, _Mapping]] = ..., grad_prompts: _Optional[_Union[Tensor, _Mapping]] = ..., grad_lora: _Optional[_Iterable[_Union[LoraModule, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model_id", "peer_id", "start", "end", "num_blocks", "dtype", "version", "free_cache_tokens", "max_cache_tokens", "num_sessions", "throughput", "max_batch_size", "max_length", "max_message_bytes", "page_tokens", "queued", "steps_computed", "step_batches", "preempted", "step_seconds", "cpu_seconds", "quantization", "device", "adapters", "max_lora_rank")
    class StepSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FREE_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STEPS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    STEP_BATCHES_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    peer_id: str
    start: int
    end: int
    num_blocks: int
    dtype: str
    version: str
    free_cache_tokens: int
    max_cache_tokens: int
    num_sessions: int
    throughput: float
    max_batch_size: int
    max_length: int
    max_message_bytes: int
    page_tokens: int
    queued: int
    steps_computed: int
    step_batches: int
    preempted: int
    step_seconds: _containers.ScalarMap[str, float]
    cpu_seconds: float
    quantization: str
    device: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    max_lora_rank: int
    def __init__(self, model_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., num_blocks: _Optional[int] = ..., dtype: _Optional[str] = ..., version: _Optional[str] = ..., free_cache_tokens: _Optional[int] = ..., max_cache_tokens: _Optional[int] = ..., num_sessions: _Optional[int] = ..., throughput: _Optional[float] = ..., max_batch_size: _Optional[int] = ..., max_length: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., page_tokens: _Optional[int] = ..., queued: _Optional[int] = ..., steps_computed: _Optional[int] = ..., step_batches: _Optional[int] = ..., preempted: _Optional[int] = ..., step_seconds: _Optional[_Mapping[str, float]] = ..., cpu_seconds: _Optional[float] = ..., quantization: _Optional[str] = ..., device: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., max_lora_rank: _Optional[int] = ...) -> None: ...
