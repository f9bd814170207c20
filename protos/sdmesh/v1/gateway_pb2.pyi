from sdmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "num_images", "num_inference_steps", "guidance_scale", "guidance_rescale", "height", "width", "seed", "eta", "sampler", "priority", "init_image", "mask_image", "strength", "depth_map", "noise_level", "preview_every", "loras", "controls", "model", "guidance_cutoff")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    DEPTH_MAP_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    height: int
    width: int
    seed: int
    eta: float
    sampler: str
    priority: int
    init_image: bytes
    mask_image: bytes
    strength: float
    depth_map: bytes
    noise_level: int
    preview_every: int
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.Lora]
    controls: _containers.RepeatedCompositeFieldContainer[Control]
    model: str
    guidance_cutoff: float
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., guidance_rescale: _Optional[float] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., seed: _Optional[int] = ..., eta: _Optional[float] = ..., sampler: _Optional[str] = ..., priority: _Optional[int] = ..., init_image: _Optional[bytes] = ..., mask_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., depth_map: _Optional[bytes] = ..., noise_level: _Optional[int] = ..., preview_every: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.Lora, _Mapping]]] = ..., controls: _Optional[_Iterable[_Union[Control, _Mapping]]] = ..., model: _Optional[str] = ..., guidance_cutoff: _Optional[float] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("name", "image", "scale", "start", "end", "guess_mode", "preprocessor", "low_threshold", "high_threshold")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GUESS_MODE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSOR_FIELD_NUMBER: _ClassVar[int]
    LOW_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HIGH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    image: bytes
    scale: float
    start: float
    end: float
    guess_mode: bool
    preprocessor: str
    low_threshold: float
    high_threshold: float
    def __init__(self, name: _Optional[str] = ..., image: _Optional[bytes] = ..., scale: _Optional[float] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., guess_mode: _Optional[bool] = ..., preprocessor: _Optional[str] = ..., low_threshold: _Optional[float] = ..., high_threshold: _Optional[float] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    result: GenerateResult
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateResult, _Mapping]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("images", "seed", "truncation_notes", "model", "model_hash")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_NOTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    seed: int
    truncation_notes: _containers.RepeatedScalarFieldContainer[str]
    model: str
    model_hash: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., seed: _Optional[int] = ..., truncation_notes: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., model_hash: _Optional[str] = ...) -> None: ...
