"""An unmodified `tritonclient.http` client against `kdguard serve` running as a process.

The teacher is the fake OIP teacher (another process): sure of the class of the largest
feature, so a low-confidence row it answers has confidence ≈ 0.9999.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support.models import CLASSES, instance
from tests.support.processes import FakeTeacherProcess, KdguardProcess, fake_teacher, kdguard_server

pytestmark = pytest.mark.slow

STUDENT_SCALE = 4.0  # make_tiny_registry: the student's logits are 4·x[:, :3]
TEACHER_LOGIT = 10.0  # the fake teacher: 10 for the largest feature, 0 elsewhere
Floats = npt.NDArray[np.float32]


def softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: npt.NDArray[np.float64] = e / e.sum(axis=1, keepdims=True)
    return out


def student_probs(x: Floats) -> npt.NDArray[np.float64]:
    return softmax(STUDENT_SCALE * x[:, :CLASSES].astype(np.float64))


def teacher_probs(x: Floats) -> npt.NDArray[np.float64]:
    logits = np.zeros((len(x), CLASSES))
    logits[np.arange(len(x)), x[:, :CLASSES].argmax(axis=1)] = TEACHER_LOGIT
    return softmax(logits)


def rows(*values: tuple[float, int]) -> Floats:
    return np.array([instance(v, c) for v, c in values], dtype=np.float32)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeTeacherProcess]:
    with fake_teacher(tmp_path_factory.mktemp("teacher")) as process:
        yield process


@pytest.fixture(scope="module")
def kdguard(
    tmp_path_factory: pytest.TempPathFactory, teacher: FakeTeacherProcess
) -> Iterator[KdguardProcess]:
    with kdguard_server(tmp_path_factory.mktemp("kdguard"), teacher_url=teacher.url) as process:
        yield process


@pytest.fixture
def client(kdguard: KdguardProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{kdguard.port}", network_timeout=10.0)
    try:
        yield client
    finally:
        client.close()
    kdguard.assert_alive()


def infer_input(x: Floats, *, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    if binary:
        tensor.set_data_from_numpy(x)  # the default: binary tensor extension
    else:
        tensor.set_data_from_numpy(x, binary_data=False)
    return tensor


def provenance(result: triton.InferResult) -> dict[str, Any]:
    response: dict[str, Any] = result.get_response()
    params: dict[str, Any] = response["parameters"]
    return params


def test_health_and_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    assert client.is_model_ready("tiny") is True
    assert client.is_model_ready("no-such-model") is False


def test_model_metadata(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("tiny")
    assert metadata["name"] == "tiny"
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs == {
        "label": ("INT64", [-1]),
        "confidence": ("FP32", [-1]),
        "probabilities": ("FP32", [-1, CLASSES]),
        "served_by": ("BYTES", [-1]),
        "degraded": ("BOOL", [-1]),
    }


def test_infer_with_client_defaults_uses_binary_tensors(
    client: triton.InferenceServerClient,
) -> None:
    x = rows((1.0, 0))  # confident: the student answers
    result = client.infer("tiny", [infer_input(x)], request_id="req-binary-1")
    response = result.get_response()
    # No outputs requested: the client asks for binary_data_output, and gets binary tensors.
    assert [o["name"] for o in response["outputs"]] == ["label", "confidence", "probabilities"]
    assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
    assert "data" not in response["outputs"][0]
    assert response["model_name"] == "tiny"
    assert response["model_version"] == "1"

    expected = student_probs(x)
    assert expected[0, 0] == pytest.approx(0.9647, abs=1e-4)  # the tiny student, as documented
    label = result.as_numpy("label")
    confidence = result.as_numpy("confidence")
    probabilities = result.as_numpy("probabilities")
    assert label is not None and confidence is not None and probabilities is not None
    assert label.dtype == np.int64 and label.tolist() == [0]
    assert confidence.dtype == np.float32
    np.testing.assert_allclose(confidence, expected.max(axis=1), rtol=1e-5)
    assert probabilities.shape == (1, CLASSES)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)
    assert provenance(result) == {
        "served_by": "student",
        "degraded": "false",
        "model_version": "1",
        "request_id": "req-binary-1",
    }


def test_infer_json_inputs_and_outputs_for_a_batch(client: triton.InferenceServerClient) -> None:
    # Confident rows (student) and low-confidence rows (teacher), in a mixed order.
    x = rows((1.0, 0), (0.05, 1), (2.0, 2), (0.05, 2), (1.5, 1))
    by_teacher = np.array([False, True, False, True, False])
    outputs = [
        triton.InferRequestedOutput(name, binary_data=False)
        for name in ("label", "confidence", "probabilities")
    ]
    result = client.infer("tiny", [infer_input(x, binary=False)], outputs=outputs)
    response = result.get_response()
    assert all("data" in o and "parameters" not in o for o in response["outputs"])

    expected = np.where(by_teacher[:, None], teacher_probs(x), student_probs(x))
    assert student_probs(x)[by_teacher].max() < 0.6  # these really are below τ
    label = result.as_numpy("label")
    confidence = result.as_numpy("confidence")
    probabilities = result.as_numpy("probabilities")
    assert label is not None and confidence is not None and probabilities is not None
    assert label.tolist() == [0, 1, 2, 2, 1]
    np.testing.assert_allclose(confidence, expected.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)

    params = provenance(result)
    assert params["served_by"].split(",") == ["teacher" if t else "student" for t in by_teacher]
    assert params["degraded"].split(",") == ["false"] * len(x)
    assert params["model_version"] == "1"
    ids = params["request_id"].split(",")
    assert len(ids) == len(x) and len(set(ids)) == len(x) and all(ids)


def test_binary_input_json_outputs_match_binary_outputs(
    client: triton.InferenceServerClient,
) -> None:
    x = rows((0.7, 1), (0.05, 0), (3.0, 2))
    as_json = client.infer(
        "tiny",
        [infer_input(x)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)],
    )
    as_binary = client.infer(
        "tiny", [infer_input(x)], outputs=[triton.InferRequestedOutput("probabilities")]
    )
    assert "data" in as_json.get_response()["outputs"][0]
    assert "binary_data_size" in as_binary.get_response()["outputs"][0]["parameters"]
    json_probs = as_json.as_numpy("probabilities")
    binary_probs = as_binary.as_numpy("probabilities")
    assert json_probs is not None and binary_probs is not None
    np.testing.assert_allclose(json_probs, binary_probs, rtol=1e-6)
    assert json_probs.argmax(axis=1).tolist() == [1, 0, 2]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_and_bool_outputs(client: triton.InferenceServerClient, binary: bool) -> None:
    x = rows((1.0, 0), (0.05, 1))
    outputs = [
        triton.InferRequestedOutput("served_by", binary_data=binary),
        triton.InferRequestedOutput("degraded", binary_data=binary),
    ]
    result = client.infer("tiny", [infer_input(x)], outputs=outputs)
    served_by = result.as_numpy("served_by")
    degraded = result.as_numpy("degraded")
    assert served_by is not None and degraded is not None
    # BYTES come back as bytes from binary data and as str from JSON.
    texts = [v.decode() if isinstance(v, bytes) else v for v in served_by.tolist()]
    assert texts == ["student", "teacher"]
    assert degraded.dtype == np.bool_
    assert degraded.tolist() == [False, False]


def test_degraded_is_true_when_the_teacher_fails(
    client: triton.InferenceServerClient, teacher: FakeTeacherProcess
) -> None:
    x = rows((1.0, 0), (0.05, 1))
    outputs = [
        triton.InferRequestedOutput("served_by"),
        triton.InferRequestedOutput("degraded"),
        triton.InferRequestedOutput("probabilities", binary_data=False),
    ]
    teacher.control("http500")
    try:
        result = client.infer("tiny", [infer_input(x)], outputs=outputs)
    finally:
        teacher.control("ok")
    served_by = result.as_numpy("served_by")
    degraded = result.as_numpy("degraded")
    probabilities = result.as_numpy("probabilities")
    assert served_by is not None and degraded is not None and probabilities is not None
    assert served_by.tolist() == [b"student", b"student"]
    assert degraded.tolist() == [False, True]
    np.testing.assert_allclose(probabilities, student_probs(x), rtol=1e-5)
    assert provenance(result)["degraded"] == "false,true"


def test_unknown_model_raises_our_error(client: triton.InferenceServerClient) -> None:
    x = rows((1.0, 0))
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no-such-model", [infer_input(x)])
    assert raised.value.status() == "404"
    assert raised.value.message() == "unknown model 'no-such-model'; this server serves 'tiny'"
    with pytest.raises(InferenceServerException) as raised:
        client.get_model_metadata("no-such-model")
    assert raised.value.status() == "404"
    assert "unknown model 'no-such-model'" in str(raised.value.message())


def test_bad_input_raises_a_400_that_says_what_is_wrong(
    client: triton.InferenceServerClient,
) -> None:
    x = np.ones((2, 5), np.float32)  # 5 features, the model takes 4
    with pytest.raises(InferenceServerException) as raised:
        client.infer("tiny", [infer_input(x)])
    assert raised.value.status() == "400"
    assert "[n, 4]" in str(raised.value.message())
