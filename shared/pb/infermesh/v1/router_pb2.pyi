from shared.pb.infermesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InferRequest(_message.Message):
    __slots__ = ("model", "pipeline", "inputs", "texts", "request_id", "priority", "timeout_ms", "collection", "k", "nprobe", "omit_hits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    OMIT_HITS_FIELD_NUMBER: _ClassVar[int]
    model: str
    pipeline: str
    inputs: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    texts: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    priority: int
    timeout_ms: int
    collection: str
    k: int
    nprobe: int
    omit_hits: bool
    def __init__(self, model: _Optional[str] = ..., pipeline: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., texts: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., collection: _Optional[str] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., omit_hits: _Optional[bool] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "model", "outputs", "timings", "results", "error_code", "error_message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    outputs: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.StepTiming]
    results: _containers.RepeatedCompositeFieldContainer[HitList]
    error_code: int
    error_message: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.StepTiming, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[HitList, _Mapping]]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class HitList(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[_common_pb2.Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[_common_pb2.Hit, _Mapping]]] = ...) -> None: ...

class ListTargetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTargetsResponse(_message.Message):
    __slots__ = ("models", "pipelines", "collections")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    pipelines: _containers.RepeatedScalarFieldContainer[str]
    collections: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, models: _Optional[_Iterable[str]] = ..., pipelines: _Optional[_Iterable[str]] = ..., collections: _Optional[_Iterable[str]] = ...) -> None: ...
