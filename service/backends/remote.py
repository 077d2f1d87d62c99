"""A teacher on a remote model server that speaks the Open Inference Protocol v2 over HTTP.

Works with Triton, KServe/MLServer or another kdguard. The request is plain JSON (every
OIP server accepts it); the response is validated like a client request would be, since a
remote teacher is untrusted input.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import orjson

from service.backends.onnx import Array
from service.backends.teacher import validate_probabilities
from service.errors import TeacherError
from service.settings import RemoteTeacherSettings


class RemoteTeacher:
    def __init__(
        self,
        settings: RemoteTeacherSettings,
        *,
        num_classes: int,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._num_classes = num_classes
        path = f"/v2/models/{settings.model_name}"
        if settings.model_version:
            path += f"/versions/{settings.model_version}"
        self._path = path + "/infer"
        headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
        headers["Content-Type"] = "application/json"
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = httpx.AsyncClient(
            base_url=settings.url, headers=headers, limits=limits, transport=transport
        )

    @property
    def version(self) -> str:
        return self._settings.version_label

    async def probabilities(self, x: Array, timeout_s: float) -> Array:
        body = {
            "inputs": [
                {
                    "name": self._settings.input_name,
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ],
            "outputs": [{"name": self._settings.output_name}],
        }
        try:
            response = await self._client.post(
                self._path, content=orjson.dumps(body), timeout=timeout_s
            )
        except httpx.TimeoutException as exc:
            raise TeacherError("timeout", f"remote teacher exceeded {timeout_s:.3f}s") from exc
        except httpx.TransportError as exc:
            raise TeacherError("connect", f"remote teacher unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise TeacherError("http_status", f"remote teacher answered {response.status_code}")
        values = self._parse(response.content)
        return validate_probabilities(
            values,
            rows=x.shape[0],
            num_classes=self._num_classes,
            are_logits=self._settings.output_kind == "logits",
        )

    def _parse(self, content: bytes) -> Array:
        try:
            payload: Any = orjson.loads(content)
            outputs = payload["outputs"]
            (tensor,) = [o for o in outputs if o.get("name") == self._settings.output_name]
            shape = [int(d) for d in tensor["shape"]]
            wide = np.asarray(tensor["data"], dtype=np.float64)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise TeacherError("malformed", f"unreadable teacher response: {exc!r}") from exc
        with np.errstate(over="ignore"):  # out-of-range values become Inf: refused below
            data = wide.astype(np.float32)
        if data.ndim != 1 and data.ndim != len(shape):
            raise TeacherError("wrong_shape", "teacher data does not match its declared shape")
        try:
            return data.reshape(shape)
        except ValueError as exc:
            raise TeacherError("wrong_shape", f"teacher data does not fit {shape}") from exc

    async def warm_up(self, features: int) -> None:
        """One real call: opens the connection and checks the teacher's shape and classes."""
        await self.probabilities(np.zeros((1, features), np.float32), timeout_s=5.0)

    async def aclose(self) -> None:
        await self._client.aclose()
