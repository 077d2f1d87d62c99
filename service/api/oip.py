"""Open Inference Protocol v2 bodies: JSON and the binary tensor data extension.

With the extension (what `tritonclient.http` sends by default) the body is a JSON header
of `Inference-Header-Content-Length` bytes followed by raw little-endian tensors, in the
order of the inputs that declare `parameters.binary_data_size`. Responses use binary
outputs when the request asks for them (`binary_data_output`, or per output
`parameters.binary_data`), JSON otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.api.inputs import finite_float32, load_json, to_tensor
from service.backends.onnx import Array
from service.errors import BadInputError
from service.registry import Manifest
from service.routing.engine import Answer

_BINARY_DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
}
OUTPUTS = {
    "label": ("INT64", "the served class index per instance"),
    "confidence": ("FP32", "the served top-class probability per instance"),
    "probabilities": ("FP32", "the served class probabilities, [n, K]"),
    "served_by": ("BYTES", "'student' or 'teacher' per instance"),
    "degraded": ("BOOL", "true where the teacher should have answered but could not"),
}
DEFAULT_OUTPUTS = ("label", "confidence", "probabilities")


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    x: Array
    outputs: tuple[str, ...]
    binary: frozenset[str]  # outputs to return as binary data


def parse_infer(
    body: bytes, header_length: str | None, *, manifest: Manifest, max_batch: int
) -> InferRequest:
    """Parse and check an infer request for a model with one [n, features] input."""
    header, binary = _split(body, header_length)
    request = load_json(header)
    if not isinstance(request, dict):
        raise BadInputError("the request must be a JSON object")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadInputError(f"`inputs` must hold exactly one tensor, {manifest.input.name!r}")
    x = _input_tensor(inputs[0], binary, manifest=manifest, max_batch=max_batch)
    outputs, wants_binary = _requested_outputs(request)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadInputError("`id` must be a string")
    return InferRequest(id=request_id, x=x, outputs=outputs, binary=wants_binary)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise BadInputError("Inference-Header-Content-Length must be an integer") from None
    if not 0 < length <= len(body):
        raise BadInputError("Inference-Header-Content-Length does not fit the body")
    return body[:length], body[length:]


def _input_tensor(
    tensor: dict[str, Any], binary: bytes, *, manifest: Manifest, max_batch: int
) -> Array:
    spec = manifest.input
    if tensor.get("name") != spec.name:
        raise BadInputError(f"unknown input {tensor.get('name')!r}; this model takes {spec.name!r}")
    datatype = tensor.get("datatype")
    if datatype not in _BINARY_DTYPES:
        raise BadInputError(
            f"input datatype must be one of {sorted(_BINARY_DTYPES)}, got {datatype!r}"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1] != spec.features
        or not 0 < shape[0] <= max_batch
    ):
        raise BadInputError(
            f"input shape must be [n, {spec.features}] with 1 <= n <= {max_batch}, got {shape!r}"
        )
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is None:
        return to_tensor(tensor.get("data"), shape=(shape[0], shape[1]))
    dtype = _BINARY_DTYPES[datatype]
    if (
        not isinstance(size, int)
        or size != len(binary)
        or size != shape[0] * shape[1] * dtype.itemsize
    ):
        raise BadInputError(f"binary_data_size {size!r} does not match shape {shape} of {datatype}")
    raw = np.frombuffer(binary, dtype=dtype).reshape(shape)
    return finite_float32(raw, what="data")


def _requested_outputs(request: dict[str, Any]) -> tuple[tuple[str, ...], frozenset[str]]:
    params = request.get("parameters") or {}
    default_binary = bool(isinstance(params, dict) and params.get("binary_data_output"))
    wanted = request.get("outputs")
    if wanted is None:
        names = DEFAULT_OUTPUTS
        return names, frozenset(names) if default_binary else frozenset()
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise BadInputError('`outputs` must be a list of {"name": ...} objects')
    names_list: list[str] = []
    binary: set[str] = set()
    for output in wanted:
        name = output.get("name")
        if name not in OUTPUTS:
            raise BadInputError(f"unknown output {name!r}; available: {sorted(OUTPUTS)}")
        names_list.append(name)
        flag = (output.get("parameters") or {}).get("binary_data", default_binary)
        if flag:
            binary.add(name)
    return tuple(names_list), frozenset(binary)


def _tensor_values(name: str, answer: Answer) -> tuple[np.ndarray | list[str], list[int]]:
    n = len(answer)
    if name == "label":
        return answer.labels.astype("<i8", copy=False), [n]
    if name == "confidence":
        return answer.confidence.astype("<f4", copy=False), [n]
    if name == "probabilities":
        probs = answer.probabilities.astype("<f4", copy=False)
        return probs, list(probs.shape)
    if name == "degraded":
        return answer.degraded, [n]
    return answer.served_by(), [n]


def encode_infer(request: InferRequest, answer: Answer, *, model: str) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when binary outputs follow it."""
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in request.outputs:
        values, shape = _tensor_values(name, answer)
        tensor: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name][0], "shape": shape}
        if name in request.binary:
            raw = _binary(values)
            chunks.append(raw)
            tensor["parameters"] = {"binary_data_size": len(raw)}
        else:
            tensor["data"] = values if isinstance(values, list) else values.ravel().tolist()
        tensors.append(tensor)
    response: dict[str, Any] = {
        "model_name": model,
        "model_version": answer.model_version,
        "outputs": tensors,
        "parameters": provenance(answer),
    }
    if request.id is not None:
        response["id"] = request.id
    header = orjson.dumps(response)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def provenance(answer: Answer) -> dict[str, Any]:
    """Per-instance provenance as comma-joined strings (OIP parameters are scalars)."""
    return {
        "request_id": ",".join(answer.request_ids),
        "served_by": ",".join(answer.served_by()),
        "degraded": ",".join("true" if d else "false" for d in answer.degraded.tolist()),
        "model_version": answer.model_version,
    }


def _binary(values: np.ndarray | list[str]) -> bytes:
    if isinstance(values, np.ndarray):
        return values.tobytes()
    # BYTES: each element is a 4-byte little-endian length, then the bytes.
    out = bytearray()
    for text in values:
        encoded = text.encode()
        out += len(encoded).to_bytes(4, "little") + encoded
    return bytes(out)


def metadata(manifest: Manifest, versions: Sequence[str]) -> dict[str, Any]:
    return {
        "name": manifest.name,
        "versions": list(versions),
        "platform": "kdguard_cascade",
        "inputs": [
            {"name": manifest.input.name, "datatype": "FP32", "shape": list(manifest.input.shape)}
        ],
        "outputs": [
            {
                "name": name,
                "datatype": dtype,
                "shape": [-1, manifest.num_classes] if name == "probabilities" else [-1],
            }
            for name, (dtype, _) in OUTPUTS.items()
        ],
        "parameters": {
            "class_names": ",".join(manifest.class_names),
            "temperature": manifest.temperature,
        },
    }
