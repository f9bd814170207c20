from sdmesh.v1 import common_pb2 as _common_pb2
from sdmesh.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("prompts", "negative_prompts", "unconditional", "loras")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    UNCONDITIONAL_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    negative_prompts: _containers.RepeatedScalarFieldContainer[str]
    unconditional: bool
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.Lora]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., negative_prompts: _Optional[_Iterable[str]] = ..., unconditional: _Optional[bool] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.Lora, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("cond", "uncond", "truncated")
    COND_FIELD_NUMBER: _ClassVar[int]
    UNCOND_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    cond: _tensor_pb2.Tensor
    uncond: _tensor_pb2.Tensor
    truncated: _containers.RepeatedCompositeFieldContainer[Truncation]
    def __init__(self, cond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., uncond: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., truncated: _Optional[_Iterable[_Union[Truncation, _Mapping]]] = ...) -> None: ...

class Truncation(_message.Message):
    __slots__ = ("prompt_index", "removed_text", "negative")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    REMOVED_TEXT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    removed_text: str
    negative: bool
    def __init__(self, prompt_index: _Optional[int] = ..., removed_text: _Optional[str] = ..., negative: _Optional[bool] = ...) -> None: ...
