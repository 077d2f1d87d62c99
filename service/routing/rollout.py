"""A candidate student beside the incumbent: shadow and A/B assignment, paired outputs.

In the *shadow* stage the incumbent serves every request and the candidate also runs on a
sampled share of them; in *A/B* a fixed share of routing keys (sticky: a key hashes to the
same arm every time) is served by the candidate, and the other student runs on a sampled
share as its pair. Either way each sampled request yields one pair of answers on the same
input, which is what the promotion gate compares.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.backends.onnx import Array, OnnxModel

Stage = Literal["shadow", "ab"]
BUCKETS = 10_000


def candidate_arm(routing_key: str, share: float) -> bool:
    """Sticky A/B assignment: the same key lands in the same arm for a given share."""
    return zlib.crc32(routing_key.encode()) % BUCKETS < share * BUCKETS


@dataclass
class RolloutPlan:
    """What the engine needs to know about the open rollout (replaced, never mutated)."""

    rollout_id: int
    candidate: OnnxModel
    stage: Stage
    ab_share: float
    sample_rate: float
    max_buffered: int = 100_000
    pairs: deque[dict[str, Any]] = field(default_factory=deque)
    dropped: int = 0

    def serves_candidate(self, routing_key: str | None, rng: np.random.Generator) -> bool:
        if self.stage != "ab":
            return False
        if routing_key is None:
            return bool(rng.random() < self.ab_share)
        return candidate_arm(routing_key, self.ab_share)

    def record_pairs(
        self,
        request_ids: list[str],
        *,
        arm: str,
        incumbent: Array,
        candidate: Array,
        incumbent_seconds: float,
        candidate_seconds: float,
    ) -> None:
        """Both students' probabilities for the same rows; kept until the next flush."""
        if len(self.pairs) + len(request_ids) > self.max_buffered:
            self.dropped += len(request_ids)
            return
        now = time.time()
        i_label, c_label = incumbent.argmax(axis=1).tolist(), candidate.argmax(axis=1).tolist()
        i_conf, c_conf = incumbent.max(axis=1).tolist(), candidate.max(axis=1).tolist()
        for k, request_id in enumerate(request_ids):
            self.pairs.append(
                {
                    "rollout_id": self.rollout_id, "request_id": request_id, "created_at": now,
                    "arm": arm, "incumbent_label": i_label[k],
                    "incumbent_confidence": i_conf[k], "candidate_label": c_label[k],
                    "candidate_confidence": c_conf[k], "incumbent_seconds": incumbent_seconds,
                    "candidate_seconds": candidate_seconds,
                }
            )  # fmt: skip

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while self.pairs:
            out.append(self.pairs.popleft())
        return out
