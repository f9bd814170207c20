from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "preview")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total_steps: int
    preview: bytes
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., preview: _Optional[bytes] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("service", "model", "weights_dtype", "activations_dtype", "devices", "mesh", "compiled_shapes", "model_facts", "batching", "denoiser_load", "gateway_stages", "latent_preview", "adapters", "model_hash", "models")
    class MeshEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    MESH_FIELD_NUMBER: _ClassVar[int]
    COMPILED_SHAPES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FACTS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    DENOISER_LOAD_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_STAGES_FIELD_NUMBER: _ClassVar[int]
    LATENT_PREVIEW_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    service: str
    model: str
    weights_dtype: str
    activations_dtype: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    mesh: _containers.ScalarMap[str, int]
    compiled_shapes: _containers.RepeatedCompositeFieldContainer[CompiledShape]
    model_facts: ModelFacts
    batching: Batching
    denoiser_load: DenoiserLoad
    gateway_stages: GatewayStages
    latent_preview: LatentPreview
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    model_hash: str
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    def __init__(self, service: _Optional[str] = ..., model: _Optional[str] = ..., weights_dtype: _Optional[str] = ..., activations_dtype: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., mesh: _Optional[_Mapping[str, int]] = ..., compiled_shapes: _Optional[_Iterable[_Union[CompiledShape, _Mapping]]] = ..., model_facts: _Optional[_Union[ModelFacts, _Mapping]] = ..., batching: _Optional[_Union[Batching, _Mapping]] = ..., denoiser_load: _Optional[_Union[DenoiserLoad, _Mapping]] = ..., gateway_stages: _Optional[_Union[GatewayStages, _Mapping]] = ..., latent_preview: _Optional[_Union[LatentPreview, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., model_hash: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("name", "hash", "source", "model_facts", "stages")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FACTS_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    hash: str
    source: str
    model_facts: ModelFacts
    stages: GatewayStages
    def __init__(self, name: _Optional[str] = ..., hash: _Optional[str] = ..., source: _Optional[str] = ..., model_facts: _Optional[_Union[ModelFacts, _Mapping]] = ..., stages: _Optional[_Union[GatewayStages, _Mapping]] = ...) -> None: ...

class Lora(_message.Message):
    __slots__ = ("name", "weight", "unet_weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNET_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    unet_weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., unet_weight: _Optional[float] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("name", "kind", "resident", "rank", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    resident: bool
    rank: int
    error: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., resident: _Optional[bool] = ..., rank: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class LatentPreview(_message.Message):
    __slots__ = ("weights", "bias")
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    weights: _containers.RepeatedScalarFieldContainer[float]
    bias: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, weights: _Optional[_Iterable[float]] = ..., bias: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelFacts(_message.Message):
    __slots__ = ("kind", "vae_scale_factor", "latent_channels", "default_height", "default_width", "max_steps", "samplers", "default_sampler", "hidden_size", "max_length", "prediction_type", "extra_channels", "has_class_labels", "class_labels_shape", "max_noise_level", "max_images", "scaling_factor", "controlnets")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VAE_SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    LATENT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    HAS_CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SCALING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    vae_scale_factor: int
    latent_channels: int
    default_height: int
    default_width: int
    max_steps: int
    samplers: _containers.RepeatedScalarFieldContainer[str]
    default_sampler: str
    hidden_size: int
    max_length: int
    prediction_type: str
    extra_channels: int
    has_class_labels: bool
    class_labels_shape: _containers.RepeatedScalarFieldContainer[int]
    max_noise_level: int
    max_images: int
    scaling_factor: float
    controlnets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., vae_scale_factor: _Optional[int] = ..., latent_channels: _Optional[int] = ..., default_height: _Optional[int] = ..., default_width: _Optional[int] = ..., max_steps: _Optional[int] = ..., samplers: _Optional[_Iterable[str]] = ..., default_sampler: _Optional[str] = ..., hidden_size: _Optional[int] = ..., max_length: _Optional[int] = ..., prediction_type: _Optional[str] = ..., extra_channels: _Optional[int] = ..., has_class_labels: _Optional[bool] = ..., class_labels_shape: _Optional[_Iterable[int]] = ..., max_noise_level: _Optional[int] = ..., max_images: _Optional[int] = ..., scaling_factor: _Optional[float] = ..., controlnets: _Optional[_Iterable[str]] = ...) -> None: ...

class Batching(_message.Message):
    __slots__ = ("policy", "max_batch", "buckets", "batch_wait_ms", "chunk_steps")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_STEPS_FIELD_NUMBER: _ClassVar[int]
    policy: str
    max_batch: int
    buckets: _containers.RepeatedScalarFieldContainer[int]
    batch_wait_ms: float
    chunk_steps: int
    def __init__(self, policy: _Optional[str] = ..., max_batch: _Optional[int] = ..., buckets: _Optional[_Iterable[int]] = ..., batch_wait_ms: _Optional[float] = ..., chunk_steps: _Optional[int] = ...) -> None: ...

class DenoiserLoad(_message.Message):
    __slots__ = ("running_slots", "waiting_requests", "peak_slots", "peak_requests", "chunks", "shared_chunks", "preempted")
    RUNNING_SLOTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PEAK_SLOTS_FIELD_NUMBER: _ClassVar[int]
    PEAK_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHARED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    running_slots: int
    waiting_requests: int
    peak_slots: int
    peak_requests: int
    chunks: int
    shared_chunks: int
    preempted: int
    def __init__(self, running_slots: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., peak_slots: _Optional[int] = ..., peak_requests: _Optional[int] = ..., chunks: _Optional[int] = ..., shared_chunks: _Optional[int] = ..., preempted: _Optional[int] = ...) -> None: ...

class GatewayStages(_message.Message):
    __slots__ = ("encoder_replicas", "denoiser_replicas", "decoder_replicas", "max_inflight")
    ENCODER_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DENOISER_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DECODER_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    encoder_replicas: _containers.RepeatedScalarFieldContainer[str]
    denoiser_replicas: _containers.RepeatedScalarFieldContainer[str]
    decoder_replicas: _containers.RepeatedScalarFieldContainer[str]
    max_inflight: int
    def __init__(self, encoder_replicas: _Optional[_Iterable[str]] = ..., denoiser_replicas: _Optional[_Iterable[str]] = ..., decoder_replicas: _Optional[_Iterable[str]] = ..., max_inflight: _Optional[int] = ...) -> None: ...

class CompiledShape(_message.Message):
    __slots__ = ("program", "batch", "height", "width")
    PROGRAM_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    program: str
    batch: int
    height: int
    width: int
    def __init__(self, program: _Optional[str] = ..., batch: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...
