"""KServe v2 on the router: an unmodified tritonclient talks to the mesh over real gRPC/NATS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tests_support import eventually
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.inference_worker.text import TextEncoder
from services.router.kserve import decode_bytes, encode_bytes
from shared.errors import InvalidArgument

from .mesh import Running, echo_mesh, start_batcher, start_router, start_worker

SENTENCES = ["The cat sits on the mat.", "Quarterly revenue grew by nine percent."]


async def call(fn, *args, **kwargs):
    """Run a sync tritonclient call off the loop that serves the in-process mesh."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def model_ready(client: triton.InferenceServerClient, model: str) -> bool:
    return bool(await call(client.is_model_ready, model))


def fp32_input(name: str, array: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.fixture
async def mesh(nats_server, tmp_path: Path) -> AsyncIterator[dict[str, Running]]:
    async with echo_mesh(nats_server.url, tmp_path) as parts:
        yield parts


@pytest.fixture
def stub(mesh: dict[str, Running]) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    """The raw protocol, for requests tritonclient never sends (typed contents, bad sizes)."""
    with grpc.insecure_channel(mesh["router"].endpoint) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
async def client(mesh: dict[str, Running]) -> AsyncIterator[triton.InferenceServerClient]:
    kserve = triton.InferenceServerClient(mesh["router"].endpoint)
    try:
        await eventually(lambda: model_ready(kserve, "echo"), what="echo ready over KServe")
        yield kserve
    finally:
        kserve.close()


async def test_server_and_model_metadata_describe_the_mesh(
    client: triton.InferenceServerClient,
) -> None:
    assert await call(client.is_server_live)
    assert await call(client.is_server_ready)
    server = await call(client.get_server_metadata)
    assert server.name == "infermesh"
    meta = await call(client.get_model_metadata, "echo")
    assert meta.name == "echo" and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "FP32", [-1, -1]),
        ("TEXT", "BYTES", [-1, 1]),
    ]
    config = (await call(client.get_model_config, "echo")).config
    assert config.max_batch_size == 64
    assert [i.name for i in config.input] == ["INPUT0", "TEXT"]
    assert config.input[0].data_type == triton.model_config_pb2.TYPE_FP32
    assert not await call(client.is_model_ready, "no-such-model")


async def test_echo_returns_fp32_tensors_bit_exact_with_the_request_id(
    client: triton.InferenceServerClient,
) -> None:
    data = np.random.default_rng(7).standard_normal((1, 16)).astype(np.float32)
    result = await call(
        client.infer,
        "echo",
        [fp32_input("INPUT0", data)],
        outputs=[triton.InferRequestedOutput("OUTPUT0")],
        request_id="req-42",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    response = result.get_response()
    assert response.id == "req-42" and response.model_name == "echo"


async def test_typed_contents_are_accepted_like_raw_contents(
    client: triton.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    # tritonclient always sends raw contents, so build the typed variant by hand.
    values = [0.5, -1.25, 3.0, 1e-8]
    request = service_pb2.ModelInferRequest(model_name="echo")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(values)
    reply = await call(stub.ModelInfer, request)
    out = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
    np.testing.assert_array_equal(out, np.array(values, dtype=np.float32))


async def test_text_goes_in_as_bytes_and_comes_back_as_bytes(
    client: triton.InferenceServerClient,
) -> None:
    text = triton.InferInput("TEXT", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"hello"], ["wörld".encode()]], dtype=object))
    result = await call(client.infer, "echo", [text])
    assert [t.decode() for t in result.as_numpy("TEXT").reshape(-1)] == ["hello", "wörld"]


async def test_an_unknown_model_is_not_found_and_named(
    client: triton.InferenceServerClient,
) -> None:
    data = np.zeros((1, 4), np.float32)
    with pytest.raises(InferenceServerException) as info:
        await call(client.infer, "no-such-model", [fp32_input("INPUT0", data)])
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in info.value.message()
    with pytest.raises(InferenceServerException) as meta:
        await call(client.get_model_metadata, "no-such-model")
    assert meta.value.status() == "StatusCode.NOT_FOUND"


async def test_a_wrong_dtype_is_invalid_argument_saying_what(
    client: triton.InferenceServerClient,
) -> None:
    wrong = triton.InferInput("INPUT0", [1, 16], "INT32")
    wrong.set_data_from_numpy(np.zeros((1, 16), np.int32))
    with pytest.raises(InferenceServerException) as info:
        await call(client.infer, "echo", [wrong])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must be FP32, got INT32" in info.value.message()


async def test_raw_contents_of_the_wrong_length_are_invalid_argument(
    client: triton.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    request = service_pb2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(b"\0" * 60)
    with pytest.raises(grpc.RpcError) as info:
        await call(stub.ModelInfer, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 64 bytes, got 60" in info.value.details()


async def test_an_unsupported_datatype_and_unoffered_methods_have_defined_codes(
    client: triton.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    request = service_pb2.ModelInferRequest(model_name="echo")
    request.inputs.add(name="INPUT0", datatype="BF16", shape=[1, 2])
    request.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(grpc.RpcError) as info:
        await call(stub.ModelInfer, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported datatype 'BF16'" in info.value.details()
    with pytest.raises(InferenceServerException) as stats:
        await call(client.get_inference_statistics, "echo")
    assert stats.value.status() == "StatusCode.UNIMPLEMENTED"


async def test_the_aio_client_infers_through_the_same_endpoint(
    mesh: dict[str, Running], client: triton.InferenceServerClient
) -> None:
    data = np.arange(16, dtype=np.float32).reshape(1, 16)
    async with triton_aio.InferenceServerClient(mesh["router"].endpoint) as aio:
        result = await aio.infer("echo", [fp32_input("INPUT0", data)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


async def test_the_stream_answers_every_request_and_reports_errors_inline(
    mesh: dict[str, Running], client: triton.InferenceServerClient
) -> None:
    answers: list[tuple[object, object]] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def callback(result: object, error: object) -> None:
        answers.append((result, error))
        if len(answers) == 4:
            loop.call_soon_threadsafe(done.set)

    await call(client.start_stream, callback)
    try:
        for i in range(3):
            data = np.full((1, 4), i, np.float32)
            await call(
                client.async_stream_infer, "echo", [fp32_input("INPUT0", data)], request_id=str(i)
            )
        data = np.zeros((1, 4), np.float32)
        await call(
            client.async_stream_infer, "missing", [fp32_input("INPUT0", data)], request_id="bad"
        )
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await call(client.stop_stream)
    good = {r.get_response().id: r.as_numpy("OUTPUT0") for r, e in answers if e is None}
    errors = [str(e) for _, e in answers if e is not None]
    assert sorted(good) == ["0", "1", "2"]
    np.testing.assert_array_equal(good["2"], np.full((1, 4), 2, np.float32))
    assert len(errors) == 1 and "missing" in errors[0]


def test_the_bytes_wire_format_round_trips_and_rejects_truncation() -> None:
    items = [b"", b"a", "ü".encode() * 3]
    assert decode_bytes(encode_bytes(items), 3, "x") == items
    with pytest.raises(InvalidArgument, match="claims 6 bytes, 2 remain"):
        decode_bytes(encode_bytes(items)[:-4], 3, "x")
    with pytest.raises(InvalidArgument, match="needs 2 elements, got 3"):
        decode_bytes(encode_bytes(items), 2, "x")


# -- MiniLM ------------------------------------------------------------------------------


@pytest.fixture
async def minilm_mesh(nats_server, tmp_path: Path) -> AsyncIterator[dict[str, Running]]:
    parts: dict[str, Running] = {}
    try:
        parts["worker"] = await start_worker(nats_server.url, tmp_path, models="echo,minilm-l6")
        parts["batcher"] = await start_batcher(nats_server.url, tmp_path)
        parts["router"] = await start_router(nats_server.url, tmp_path)
        yield parts
    finally:
        for name in ("router", "batcher", "worker"):
            if name in parts:
                await parts[name].stop()


def reference(model_path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Embeddings from onnxruntime directly on the model file the worker built."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {"input_ids": ids, "attention_mask": mask}
    (out,) = session.run(["embedding"], {n: feeds[n] for n in names})
    return np.asarray(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


async def test_minilm_embeds_text_and_pretokenized_ids_like_onnxruntime(
    minilm_mesh: dict[str, Running], tmp_path: Path
) -> None:
    model_path = tmp_path / "models" / "minilm-l6" / "model.onnx"
    ids, mask = TextEncoder(model_path.parent).encode(SENTENCES)
    ids, mask = ids.astype(np.int64), mask.astype(np.int64)
    expected = reference(model_path, ids, mask)
    client = triton.InferenceServerClient(minilm_mesh["router"].endpoint)
    try:
        await eventually(lambda: model_ready(client, "minilm-l6"), what="minilm ready")
        text = triton.InferInput("TEXT", [len(SENTENCES), 1], "BYTES")
        text.set_data_from_numpy(np.array([[s.encode()] for s in SENTENCES], dtype=object))
        by_text = (await call(client.infer, "minilm-l6", [text])).as_numpy("embedding")
        tokens = []
        for name, array in (("input_ids", ids), ("attention_mask", mask)):
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            tokens.append(tensor)
        by_ids = (await call(client.infer, "minilm-l6", tokens)).as_numpy("embedding")
    finally:
        client.close()
    assert by_text.shape == by_ids.shape == (len(SENTENCES), 384)
    assert cosines(by_text, expected).min() >= 0.999
    assert cosines(by_ids, expected).min() >= 0.999
    # Different sentences must not collapse onto one vector.
    assert cosines(by_text[:1], by_text[1:]).max() < 0.9
