from shared.pb.infermesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TargetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TARGET_KIND_UNSPECIFIED: _ClassVar[TargetKind]
    TARGET_KIND_MODEL: _ClassVar[TargetKind]
    TARGET_KIND_COLLECTION: _ClassVar[TargetKind]
TARGET_KIND_UNSPECIFIED: TargetKind
TARGET_KIND_MODEL: TargetKind
TARGET_KIND_COLLECTION: TargetKind

class SubmitRequest(_message.Message):
    __slots__ = ("target", "kind", "item", "priority", "call_id", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TARGET_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    target: str
    kind: TargetKind
    item: _common_pb2.WorkItem
    priority: int
    call_id: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, target: _Optional[str] = ..., kind: _Optional[_Union[TargetKind, str]] = ..., item: _Optional[_Union[_common_pb2.WorkItem, _Mapping]] = ..., priority: _Optional[int] = ..., call_id: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("result", "queue_ms", "exec_ms", "worker", "batch_size", "call_id")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    EXEC_MS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.WorkResult
    queue_ms: float
    exec_ms: float
    worker: str
    batch_size: int
    call_id: int
    def __init__(self, result: _Optional[_Union[_common_pb2.WorkResult, _Mapping]] = ..., queue_ms: _Optional[float] = ..., exec_ms: _Optional[float] = ..., worker: _Optional[str] = ..., batch_size: _Optional[int] = ..., call_id: _Optional[int] = ...) -> None: ...

class SubmitCalls(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[SubmitRequest]
    def __init__(self, calls: _Optional[_Iterable[_Union[SubmitRequest, _Mapping]]] = ...) -> None: ...

class SubmitAnswers(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[SubmitResponse]
    def __init__(self, answers: _Optional[_Iterable[_Union[SubmitResponse, _Mapping]]] = ...) -> None: ...

class QueueStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TargetQueue(_message.Message):
    __slots__ = ("target", "depth", "max_batch_size", "max_delay_ms", "capacity")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    target: str
    depth: int
    max_batch_size: int
    max_delay_ms: float
    capacity: int
    def __init__(self, target: _Optional[str] = ..., depth: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., capacity: _Optional[int] = ...) -> None: ...

class QueueStatusResponse(_message.Message):
    __slots__ = ("queues",)
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedCompositeFieldContainer[TargetQueue]
    def __init__(self, queues: _Optional[_Iterable[_Union[TargetQueue, _Mapping]]] = ...) -> None: ...
