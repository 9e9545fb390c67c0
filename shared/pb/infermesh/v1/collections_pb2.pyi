from shared.pb.infermesh.v1 import common_pb2 as _common_pb2
from shared.pb.infermesh.v1 import retrieval_worker_pb2 as _retrieval_worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpsertRequest(_message.Message):
    __slots__ = ("collection", "ids", "vectors", "texts", "metadata_json", "model")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _common_pb2.Tensor
    vectors: _common_pb2.Tensor
    texts: _containers.RepeatedScalarFieldContainer[str]
    metadata_json: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., vectors: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., texts: _Optional[_Iterable[str]] = ..., metadata_json: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _common_pb2.Tensor
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("seq", "first_seq", "count", "messages", "embed_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    first_seq: int
    count: int
    messages: int
    embed_ms: float
    def __init__(self, seq: _Optional[int] = ..., first_seq: _Optional[int] = ..., count: _Optional[int] = ..., messages: _Optional[int] = ..., embed_ms: _Optional[float] = ...) -> None: ...
