"""Webhook event types, subscription patterns, and the body of one event."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from typing import Any

from gateway.clock import rfc3339
from gateway.pipelines import PipelineState
from gateway.states import State

EVENT_TYPES = frozenset(
    [f"job.{s.value}" for s in State] + [f"pipeline.{s.value}" for s in PipelineState]
)


def check_patterns(patterns: Sequence[str]) -> str | None:
    """Why a subscription's `events` list is refused, or None. A pattern is an event type, or
    uses `*` (`job.*`, `*`); each must match at least one known type."""
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(t, pattern) for t in EVENT_TYPES):
            return f"`{pattern}` matches no event type (known: job.<state>, pipeline.<state>)"
    return None


def matches(patterns: Sequence[str], event_type: str) -> bool:
    """An empty list means every event."""
    return not patterns or any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


def message_id(kind: str, owner_id: str, sequence: int) -> str:
    """The `webhook-id`: the same for every attempt and redelivery of one event; no dots."""
    return f"{kind}_{owner_id}_{sequence}"


def body(event_type: str, at: float, data: dict[str, Any]) -> bytes:
    """The exact bytes every attempt sends (and signs)."""
    document = {"type": event_type, "timestamp": rfc3339(at), "data": data}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
