from sdmesh.v1 import common_pb2 as _common_pb2
from sdmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("cond", "uncond", "seed", "latents", "num_inference_steps", "guidance_scale", "guidance_rescale", "eta", "height", "width", "noise_seed", "sampler", "priority", "init_latents", "strength", "extra", "blend_mask", "class_labels", "tenant", "preview_every", "preview_projection", "loras", "controls", "guidance_cutoff")
    COND_FIELD_NUMBER: _ClassVar[int]
    UNCOND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_RESCALE_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    NOISE_SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    INIT_LATENTS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    BLEND_MASK_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABELS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PROJECTION_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_CUTOFF_FIELD_NUMBER: _ClassVar[int]
    cond: _tensor_pb2.Tensor
    uncond: _tensor_pb2.Tensor
    seed: int
    latents: _tensor_pb2.Tensor
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    eta: float
    height: int
    width: int
    noise_seed: int
    sampler: str
    priority: int
    init_latents: _tensor_pb2.Tensor
    strength: float
    extra: _tensor_pb2.Tensor
    blend_mask: _tensor_pb2.Tensor
    class_labels: _tensor_pb2.Tensor
    tenant: str
    preview_every: int
    preview_projection: _common_pb2.LatentPreview
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.Lora]
    controls: _containers.RepeatedCompositeFieldContainer[ControlInput]
    guidance_cutoff: float
    def __init__(self, cond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., uncond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., seed: _Optional[int] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., guidance_rescale: _Optional[float] = ..., eta: _Optional[float] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., noise_seed: _Optional[int] = ..., sampler: _Optional[str] = ..., priority: _Optional[int] = ..., init_latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., strength: _Optional[float] = ..., extra: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., blend_mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., class_labels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., tenant: _Optional[str] = ..., preview_every: _Optional[int] = ..., preview_projection: _Optional[_Union[_common_pb2.LatentPreview, _Mapping]] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.Lora, _Mapping]]] = ..., controls: _Optional[_Iterable[_Union[ControlInput, _Mapping]]] = ..., guidance_cutoff: _Optional[float] = ...) -> None: ...

class ControlInput(_message.Message):
    __slots__ = ("name", "image", "scale", "start", "end", "guess_mode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GUESS_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    image: _tensor_pb2.Tensor
    scale: float
    start: float
    end: float
    guess_mode: bool
    def __init__(self, name: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., scale: _Optional[float] = ..., start: _Optional[float] = ..., end: _Optional[float] = ..., guess_mode: _Optional[bool] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("progress", "latents")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    progress: _common_pb2.Progress
    latents: _tensor_pb2.Tensor
    def __init__(self, progress: _Optional[_Union[_common_pb2.Progress, _Mapping]] = ..., latents: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...
