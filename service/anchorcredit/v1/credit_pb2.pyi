from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sequence(_message.Message):
    __slots__ = ("prompt_ids", "response_ids")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    response_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., response_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class CreditParams(_message.Message):
    __slots__ = ("q", "gamma_amp", "alpha", "k", "tau_waad", "tau_delta", "seed", "window", "h_lo", "h_hi", "h_hi_to_end", "head_quantile")
    Q_FIELD_NUMBER: _ClassVar[int]
    GAMMA_AMP_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TAU_WAAD_FIELD_NUMBER: _ClassVar[int]
    TAU_DELTA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    H_LO_FIELD_NUMBER: _ClassVar[int]
    H_HI_FIELD_NUMBER: _ClassVar[int]
    H_HI_TO_END_FIELD_NUMBER: _ClassVar[int]
    HEAD_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    q: float
    gamma_amp: float
    alpha: float
    k: int
    tau_waad: float
    tau_delta: float
    seed: int
    window: int
    h_lo: int
    h_hi: int
    h_hi_to_end: bool
    head_quantile: float
    def __init__(self, q: _Optional[float] = ..., gamma_amp: _Optional[float] = ..., alpha: _Optional[float] = ..., k: _Optional[int] = ..., tau_waad: _Optional[float] = ..., tau_delta: _Optional[float] = ..., seed: _Optional[int] = ..., window: _Optional[int] = ..., h_lo: _Optional[int] = ..., h_hi: _Optional[int] = ..., h_hi_to_end: _Optional[bool] = ..., head_quantile: _Optional[float] = ...) -> None: ...

class Outputs(_message.Message):
    __slots__ = ("waad", "fai", "gamma", "entropy")
    WAAD_FIELD_NUMBER: _ClassVar[int]
    FAI_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    waad: bool
    fai: bool
    gamma: bool
    entropy: bool
    def __init__(self, waad: _Optional[bool] = ..., fai: _Optional[bool] = ..., gamma: _Optional[bool] = ..., entropy: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("sequences", "strategy", "params", "outputs", "expected_policy_version", "request_id")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    strategy: str
    params: CreditParams
    outputs: Outputs
    expected_policy_version: str
    request_id: str
    def __init__(self, sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., strategy: _Optional[str] = ..., params: _Optional[_Union[CreditParams, _Mapping]] = ..., outputs: _Optional[_Union[Outputs, _Mapping]] = ..., expected_policy_version: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class HeadRef(_message.Message):
    __slots__ = ("layer", "head")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head: int
    def __init__(self, layer: _Optional[int] = ..., head: _Optional[int] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("response_len", "waad", "fai", "gamma", "entropy", "local_heads", "global_heads")
    RESPONSE_LEN_FIELD_NUMBER: _ClassVar[int]
    WAAD_FIELD_NUMBER: _ClassVar[int]
    FAI_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_HEADS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_HEADS_FIELD_NUMBER: _ClassVar[int]
    response_len: int
    waad: bytes
    fai: bytes
    gamma: bytes
    entropy: bytes
    local_heads: _containers.RepeatedCompositeFieldContainer[HeadRef]
    global_heads: _containers.RepeatedCompositeFieldContainer[HeadRef]
    def __init__(self, response_len: _Optional[int] = ..., waad: _Optional[bytes] = ..., fai: _Optional[bytes] = ..., gamma: _Optional[bytes] = ..., entropy: _Optional[bytes] = ..., local_heads: _Optional[_Iterable[_Union[HeadRef, _Mapping]]] = ..., global_heads: _Optional[_Iterable[_Union[HeadRef, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results", "policy_version", "model_id", "request_id", "queue_seconds", "compute_seconds", "stat_version", "weights_digest")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SequenceResult]
    policy_version: str
    model_id: str
    request_id: str
    queue_seconds: float
    compute_seconds: float
    stat_version: str
    weights_digest: str
    def __init__(self, results: _Optional[_Iterable[_Union[SequenceResult, _Mapping]]] = ..., policy_version: _Optional[str] = ..., model_id: _Optional[str] = ..., request_id: _Optional[str] = ..., queue_seconds: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., stat_version: _Optional[str] = ..., weights_digest: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "revision", "architecture", "dtype", "device", "num_layers", "layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_positions", "max_batch_tokens", "max_request_sequences", "policy_version", "kernel_backend", "server_version", "stat_version", "max_request_tokens", "loaded_param_count", "total_param_count", "weights_digest")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    KERNEL_BACKEND_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    STAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOADED_PARAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    revision: str
    architecture: str
    dtype: str
    device: str
    num_layers: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    max_batch_tokens: int
    max_request_sequences: int
    policy_version: str
    kernel_backend: str
    server_version: str
    stat_version: str
    max_request_tokens: int
    loaded_param_count: int
    total_param_count: int
    weights_digest: str
    def __init__(self, model_id: _Optional[str] = ..., revision: _Optional[str] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., num_layers: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., num_heads: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_positions: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_request_sequences: _Optional[int] = ..., policy_version: _Optional[str] = ..., kernel_backend: _Optional[str] = ..., server_version: _Optional[str] = ..., stat_version: _Optional[str] = ..., max_request_tokens: _Optional[int] = ..., loaded_param_count: _Optional[int] = ..., total_param_count: _Optional[int] = ..., weights_digest: _Optional[str] = ...) -> None: ...

class WeightUpdate(_message.Message):
    __slots__ = ("version", "replaces", "partial")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    version: str
    replaces: str
    partial: bool
    def __init__(self, version: _Optional[str] = ..., replaces: _Optional[str] = ..., partial: _Optional[bool] = ...) -> None: ...

class TensorHeader(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("update", "tensor", "data")
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    update: WeightUpdate
    tensor: TensorHeader
    data: bytes
    def __init__(self, update: _Optional[_Union[WeightUpdate, _Mapping]] = ..., tensor: _Optional[_Union[TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("path", "version", "replaces")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: str
    replaces: str
    def __init__(self, path: _Optional[str] = ..., version: _Optional[str] = ..., replaces: _Optional[str] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("policy_version", "load_seconds", "tensors", "bytes")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    load_seconds: float
    tensors: int
    bytes: int
    def __init__(self, policy_version: _Optional[str] = ..., load_seconds: _Optional[float] = ..., tensors: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class JoinWeightGroupRequest(_message.Message):
    __slots__ = ("group", "address", "port", "world_size", "rank", "backend", "timeout_s")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    group: str
    address: str
    port: int
    world_size: int
    rank: int
    backend: str
    timeout_s: float
    def __init__(self, group: _Optional[str] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., backend: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class JoinWeightGroupResponse(_message.Message):
    __slots__ = ("group", "backend", "device")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    group: str
    backend: str
    device: str
    def __init__(self, group: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ReceiveWeightsRequest(_message.Message):
    __slots__ = ("group", "update", "tensors")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    group: str
    update: WeightUpdate
    tensors: _containers.RepeatedCompositeFieldContainer[TensorHeader]
    def __init__(self, group: _Optional[str] = ..., update: _Optional[_Union[WeightUpdate, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorHeader, _Mapping]]] = ...) -> None: ...

class LeaveWeightGroupRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class LeaveWeightGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
