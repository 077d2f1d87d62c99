"""The remote OIP teacher client, against httpx.MockTransport."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import orjson
import pytest

from service.backends.remote import RemoteTeacher
from service.errors import TeacherError
from service.settings import RemoteTeacherSettings

X = np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0]], np.float32)


def teacher(
    handler: Callable[[httpx.Request], httpx.Response], **settings: object
) -> RemoteTeacher:
    config = RemoteTeacherSettings.model_validate({"url": "http://teacher", **settings})
    return RemoteTeacher(
        config, num_classes=3, max_connections=2, transport=httpx.MockTransport(handler)
    )


def logits_response(data: object, shape: object = (2, 3), name: str = "logits") -> httpx.Response:
    body = {
        "model_name": "t",
        "outputs": [{"name": name, "datatype": "FP32", "shape": shape, "data": data}],
    }
    return httpx.Response(200, content=orjson.dumps(body))


async def test_sends_an_oip_request_and_softmaxes_logits() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return logits_response([5, 0, 0, 0, 5, 0])

    client = teacher(handler, model_version="3")
    probs = await client.probabilities(X, 1.0)
    await client.aclose()
    assert seen[0].url.path == "/v2/models/digits-teacher/versions/3/infer"
    body = orjson.loads(seen[0].content)
    assert body["inputs"][0] == {
        "name": "input",
        "shape": [2, 4],
        "datatype": "FP32",
        "data": X.ravel().tolist(),
    }
    assert probs.argmax(axis=1).tolist() == [0, 1]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


async def test_probability_outputs_are_checked_not_softmaxed() -> None:
    client = teacher(
        lambda r: logits_response([0.5, 0.5, 0, 0, 1, 0], name="p"),
        output_name="p",
        output_kind="probabilities",
    )
    probs = await client.probabilities(X, 1.0)
    assert probs.tolist() == [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]
    bad = teacher(
        lambda r: logits_response([0.5, 0.9, 0, 0, 1, 0], name="p"),
        output_name="p",
        output_kind="probabilities",
    )
    with pytest.raises(TeacherError) as err:
        await bad.probabilities(X, 1.0)
    assert err.value.reason == "invalid_probabilities"


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (httpx.Response(500, content=b"{}"), "http_status"),
        (httpx.Response(200, content=b'{"outputs": [{"name": "logits", "sha'), "malformed"),
        (httpx.Response(200, content=b'{"outputs": []}'), "malformed"),
        (logits_response([1, 2, 3, 4, 5, 6], shape=(3, 2)), "wrong_shape"),
        (logits_response([1, 2, 3, 4, 5], shape=(2, 3)), "wrong_shape"),
        (logits_response([1, 2, 3, 4, 5, 6, 7, 8], shape=(2, 4)), "wrong_classes"),
        (logits_response([1, 2, "x", 4, 5, 6]), "malformed"),
    ],
)
async def test_bad_responses_are_teacher_errors_by_reason(
    response: httpx.Response, reason: str
) -> None:
    client = teacher(lambda r: response)
    with pytest.raises(TeacherError) as err:
        await client.probabilities(X, 1.0)
    assert err.value.reason == reason


async def test_nan_in_the_teacher_output_is_refused() -> None:
    tensor = (
        b'{"name": "logits", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 1e39]}'
    )
    body = b'{"outputs": [' + tensor + b"]}"
    client = teacher(lambda r: httpx.Response(200, content=body))
    with pytest.raises(TeacherError) as err:
        await client.probabilities(X, 1.0)
    assert err.value.reason == "non_finite"


async def test_transport_failures_map_to_timeout_and_connect() -> None:
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for handler, reason in ((timeout, "timeout"), (refused, "connect")):
        with pytest.raises(TeacherError) as err:
            await teacher(handler).probabilities(X, 1.0)
        assert err.value.reason == reason
