from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetPlacementRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class BlockPlacement(_message.Message):
    __slots__ = ("collection", "block", "worker", "tier", "frequency")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_FIELD_NUMBER: _ClassVar[int]
    collection: str
    block: int
    worker: str
    tier: str
    frequency: float
    def __init__(self, collection: _Optional[str] = ..., block: _Optional[int] = ..., worker: _Optional[str] = ..., tier: _Optional[str] = ..., frequency: _Optional[float] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("revision", "blocks")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockPlacement]
    def __init__(self, revision: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockPlacement, _Mapping]]] = ...) -> None: ...
