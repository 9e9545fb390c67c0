"""KServe v2 (Triton's gRPC protocol) on the router, so tritonclient and perf_analyzer work.

The servicer reuses the stubs that ship inside ``tritonclient`` rather than a copy of the
proto. ModelInfer translates a ``ModelInferRequest`` into an ``infermesh.v1.InferRequest`` and
runs it through ``RouterServicer.infer`` (the path Router.Infer takes), so validation, the
deadline, batching and routing are the same. BYTES inputs of a text model become texts;
numeric inputs become tensors; outputs return as ``raw_output_contents``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from services.router.handlers import RouterServicer
from shared import streams
from shared.errors import InfermeshError, InvalidArgument, NotFound, Unimplemented, message_of
from shared.events import ModelSpec
from shared.pb.infermesh.v1 import common_pb2, router_pb2
from shared.tensors import DTYPES, check_shape

SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: Input names taken as the text of a text model (any other BYTES input also is, when the
#: model declares no BYTES tensor input of that name).
TEXT_INPUTS = ("text", "TEXT")

# KServe v2 datatype -> the typed ``InferTensorContents`` field that carries it. FP16 and
# BF16 have none: the protocol allows them only as raw contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_CONFIG_TYPES = {
    name: model_config_pb2.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")
    for name in [*DTYPES, "BYTES"]
}
_LENGTH = struct.Struct("<I")

# Methods of the protocol the mesh does not offer (answered UNIMPLEMENTED with their name).
UNOFFERED = (
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


def decode_bytes(raw: bytes, count: int, what: str) -> list[bytes]:
    """Split Triton's BYTES wire format (4-byte little-endian length, then bytes) per element."""
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"{what}: BYTES contents end inside a length prefix")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidArgument(
                f"{what}: BYTES element {len(items)} claims {size} bytes, "
                f"{len(raw) - offset} remain"
            )
        items.append(bytes(view[offset : offset + size]))
        offset += size
    if len(items) != count:
        raise InvalidArgument(f"{what}: BYTES shape needs {count} elements, got {len(items)}")
    return items


def encode_bytes(items: list[bytes]) -> bytes:
    """Triton's BYTES wire format for a list of elements."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` answered by the mesh."""

    def __init__(
        self,
        router: RouterServicer,
        serving: Callable[[], bool],
        model_ready: Callable[[str], bool],
        max_tensor_elements: int,
    ) -> None:
        self._router = router
        self._serving = serving
        self._model_ready = model_ready
        self._max_elements = max_tensor_elements
        try:
            self._version = metadata.version("infermesh")
        except metadata.PackageNotFoundError:
            self._version = "0"

    # -- health and metadata --------------------------------------------------------------

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self._serving())

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelReadyResponse:
        # As in Triton, an unknown model is "not ready" rather than an error.
        try:
            self._spec(request.name, request.version)
        except NotFound:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=self._model_ready(request.name))

    async def ServerMetadata(
        self, request: service_pb2.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ServerMetadataResponse:
        return service_pb2.ServerMetadataResponse(
            name="infermesh", version=self._version, extensions=["model_configuration"]
        )

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelMetadataResponse:
        spec = self._spec(request.name, request.version)
        meta = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name=spec.name,
            versions=[spec.version],
            platform=spec.backend,
            # The batch dimension leads, as Triton reports it for models that batch.
            inputs=[meta(name=t.name, datatype=t.dtype, shape=[-1, *t.shape]) for t in spec.inputs]
            # The same optional TEXT input ModelConfig declares: clients (perf_analyzer among
            # them) refuse a config input that the metadata does not list.
            + (
                [meta(name="TEXT", datatype="BYTES", shape=[-1, 1])]
                if spec.accepts_text and not any(t.name in TEXT_INPUTS for t in spec.inputs)
                else []
            ),
            outputs=[
                meta(name=t.name, datatype=t.dtype, shape=[-1, *t.shape]) for t in spec.outputs
            ],
        )

    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelConfigResponse:
        spec = self._spec(request.name, request.version)
        inputs = [
            # A text model takes either text or all its tensors, so none is strictly required.
            model_config_pb2.ModelInput(
                name=t.name,
                data_type=_CONFIG_TYPES[t.dtype],
                dims=t.shape,
                optional=spec.accepts_text,
            )
            for t in spec.inputs
        ]
        if spec.accepts_text and not any(t.name in TEXT_INPUTS for t in spec.inputs):
            inputs.append(
                model_config_pb2.ModelInput(
                    name="TEXT", data_type=model_config_pb2.TYPE_STRING, dims=[1], optional=True
                )
            )
        config = model_config_pb2.ModelConfig(
            name=spec.name,
            backend=spec.backend,
            max_batch_size=spec.max_batch_size,
            input=inputs,
            output=[
                model_config_pb2.ModelOutput(
                    name=t.name, data_type=_CONFIG_TYPES[t.dtype], dims=t.shape
                )
                for t in spec.outputs
            ],
            dynamic_batching=model_config_pb2.ModelDynamicBatching(
                preferred_batch_size=spec.preferred_batch_sizes,
                max_queue_delay_microseconds=int(spec.max_delay_ms * 1000),
            ),
        )
        return service_pb2.ModelConfigResponse(config=config)

    # -- inference ------------------------------------------------------------------------

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        return await self.infer(request, context.time_remaining())

    async def infer(
        self, request: service_pb2.ModelInferRequest, remaining: float | None
    ) -> service_pb2.ModelInferResponse:
        """One KServe request through the router's path; the reply carries raw outputs."""
        spec = self._spec(request.model_name, request.model_version)
        reply = await self._router.infer(self._to_router(request, spec), remaining)
        outputs = {t.name: t for t in reply.outputs}
        if request.outputs:
            wanted = [o.name for o in request.outputs]
            missing = [name for name in wanted if name not in outputs]
            if missing:
                raise InvalidArgument(
                    f"model {spec.name!r} has no output {missing[0]!r} "
                    f"(outputs: {', '.join(outputs) or 'none'})"
                )
        else:
            wanted = list(outputs)
        response = service_pb2.ModelInferResponse(
            model_name=spec.name, model_version=spec.version, id=request.id
        )
        for name in wanted:
            tensor = outputs[name]
            response.outputs.add(name=name, datatype=tensor.dtype, shape=tensor.shape)
            response.raw_output_contents.append(
                encode_bytes(list(tensor.strings)) if tensor.dtype == "BYTES" else tensor.data
            )
        return response

    async def ModelStreamInfer(
        self,
        requests: AsyncIterator[service_pb2.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Requests run concurrently; a failed one is answered inline, the stream stays open."""

        async def handle(
            req: service_pb2.ModelInferRequest,
        ) -> service_pb2.ModelStreamInferResponse:
            return service_pb2.ModelStreamInferResponse(infer_response=await self.infer(req, None))

        def inline(
            req: service_pb2.ModelInferRequest, exc: BaseException
        ) -> service_pb2.ModelStreamInferResponse | None:
            # Triton reports a request's own failure inline and keeps the stream; anything
            # unexpected ends the stream with its status.
            if not isinstance(exc, InfermeshError):
                return None
            return service_pb2.ModelStreamInferResponse(
                error_message=message_of(exc),
                infer_response=service_pb2.ModelInferResponse(model_name=req.model_name, id=req.id),
            )

        async for reply in streams.answer_concurrently(requests, handle, inline):
            yield reply

    # -- translation ----------------------------------------------------------------------

    def _spec(self, name: str, version: str) -> ModelSpec:
        spec = self._router.spec(name)
        if version and version != spec.version:
            raise NotFound(f"model {name!r} has no version {version!r} (served: {spec.version!r})")
        return spec

    def _to_router(
        self, request: service_pb2.ModelInferRequest, spec: ModelSpec
    ) -> router_pb2.InferRequest:
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(
                f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
                "send raw contents for every input or for none"
            )
        declared = {t.name: t.dtype for t in spec.inputs}
        out = router_pb2.InferRequest(model=spec.name, request_id=request.id)
        _apply_parameters(request.parameters, out)
        text_from = ""
        for i, tensor in enumerate(request.inputs):
            wire = self._tensor(tensor, raw[i] if raw else None)
            is_text = (
                wire.dtype == "BYTES" and spec.accepts_text and declared.get(wire.name) != "BYTES"
            )
            if not is_text:
                out.inputs.append(wire)
                continue
            if text_from:
                raise InvalidArgument(
                    f"inputs {text_from!r} and {wire.name!r} both carry text; send one"
                )
            text_from = wire.name
            try:
                out.texts.extend(s.decode() for s in wire.strings)
            except UnicodeDecodeError as exc:
                raise InvalidArgument(
                    f"input {wire.name!r}: text element is not UTF-8 ({exc.reason})"
                ) from None
        return out

    def _tensor(
        self, tensor: service_pb2.ModelInferRequest.InferInputTensor, raw: bytes | None
    ) -> common_pb2.Tensor:
        """One KServe input as a wire tensor, its contents checked against dtype and shape."""
        what = f"input {tensor.name!r}"
        dtype = tensor.datatype
        if dtype != "BYTES" and dtype not in DTYPES:
            raise InvalidArgument(
                f"{what}: unsupported datatype {dtype!r} "
                f"(expected one of {', '.join([*DTYPES, 'BYTES'])})"
            )
        shape = check_shape(tensor.shape, what, self._max_elements)
        count = math.prod(shape)
        wire = common_pb2.Tensor(name=tensor.name, dtype=dtype, shape=shape)
        if raw is not None:
            if dtype == "BYTES":
                wire.strings.extend(decode_bytes(raw, count, what))
                return wire
            expected = count * DTYPES[dtype].itemsize
            if len(raw) != expected:
                raise InvalidArgument(
                    f"{what}: {dtype} shape {list(shape)} needs {expected} bytes, got {len(raw)}"
                )
            wire.data = raw
            return wire
        field = _CONTENTS_FIELD.get(dtype)
        if field is None:
            raise InvalidArgument(f"{what}: {dtype} travels only in raw_input_contents")
        values: Any = getattr(tensor.contents, field)
        if len(values) != count:
            raise InvalidArgument(
                f"{what}: shape {list(shape)} needs {count} {field} values, got {len(values)}"
            )
        if dtype == "BYTES":
            wire.strings.extend(values)
            return wire
        wire.data = _narrow(np.asarray(values), DTYPES[dtype], what).tobytes()
        return wire


def _narrow(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Typed contents arrive widened (int32 for INT8, ...); refuse values the dtype cannot hold."""
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidArgument(f"{what}: a value does not fit in {dtype.name}")
    return values.astype(dtype, copy=False)


def _apply_parameters(parameters: Any, out: router_pb2.InferRequest) -> None:
    """Triton's request parameters ``priority`` and ``timeout`` (microseconds), where set."""
    if "priority" in parameters:
        out.priority = _int_parameter(parameters["priority"], "priority")
    if "timeout" in parameters:
        micros = _int_parameter(parameters["timeout"], "timeout")
        out.timeout_ms = max(1, math.ceil(micros / 1000)) if micros else 0


def _int_parameter(value: service_pb2.InferParameter, name: str) -> int:
    kind = value.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"parameter {name!r} must be an integer, got {kind}")
    number = int(getattr(value, kind))
    if not 0 <= number < 1 << 32:
        raise InvalidArgument(f"parameter {name!r} out of range: {number}")
    return number


def _unoffered(method: str) -> Callable[..., Any]:
    async def handler(self: KServeServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented(f"{method} is not offered by infermesh's KServe v2 endpoint")

    handler.__name__ = method
    handler.__doc__ = f"{method}: not offered (UNIMPLEMENTED)."
    return handler


for _method in UNOFFERED:
    setattr(KServeServicer, _method, _unoffered(_method))
