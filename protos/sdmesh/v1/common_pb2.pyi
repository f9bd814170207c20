from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total_steps")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total_steps: int
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("service", "model", "weights_dtype", "activations_dtype", "devices", "mesh", "compiled_shapes", "facts")
    class MeshEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class FactsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    MESH_FIELD_NUMBER: _ClassVar[int]
    COMPILED_SHAPES_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    service: str
    model: str
    weights_dtype: str
    activations_dtype: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    mesh: _containers.ScalarMap[str, int]
    compiled_shapes: _containers.RepeatedCompositeFieldContainer[CompiledShape]
    facts: _containers.ScalarMap[str, str]
    def __init__(self, service: _Optional[str] = ..., model: _Optional[str] = ..., weights_dtype: _Optional[str] = ..., activations_dtype: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., mesh: _Optional[_Mapping[str, int]] = ..., compiled_shapes: _Optional[_Iterable[_Union[CompiledShape, _Mapping]]] = ..., facts: _Optional[_Mapping[str, str]] = ...) -> None: ...

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
