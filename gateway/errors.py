"""One exception hierarchy; each error carries a stable machine code.

    GatewayError
    ├── ConfigError            bad configuration at start (never an HTTP answer)
    ├── RequestError           the caller's fault
    │   ├── MalformedRequest       400 malformed (bad JSON, bad cursor, bad limit)
    │   ├── Unauthorized           401 unauthorized
    │   ├── Forbidden              403 forbidden
    │   ├── NotFound               404 not_found
    │   ├── Gone                   410 gone (an artifact link past its expiry)
    │   ├── InvalidField           422 invalid
    │   ├── PayloadTooLarge        413 too_large
    │   ├── RangeNotSatisfiable    416 range_not_satisfiable (carries the trace size)
    │   └── StateConflict          409 (a code per cause)
    │       ├── AlreadyFinal           409 already_final (job is terminal)
    │       ├── NotReady               409 not_ready (job's needs not met yet)
    │       ├── NotParked              409 not_parked (async script still running)
    │       ├── NotLatestAttempt       409 not_latest_attempt (retry of a retried job)
    │       └── ConcurrentChange       409 conflict (a compare-and-set missed; stores retry)
    └── StoreError             the store cannot serve (schema newer than code, key mismatch)
        └── TransferRefused        `gateway export`/`import` refused (non-empty target, versions)

HTTP statuses live in one table in `gateway.app`; error messages never carry a token or secret.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    code = "error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.added_headers: dict[str, str] = {}

    def extra(self) -> dict[str, Any]:
        """Fields added to the JSON error body beside `error` and `detail`."""
        return {}

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries (a route may add some, such as `Job-Status`)."""
        return dict(self.added_headers)


class ConfigError(GatewayError):
    code = "config"


class StoreError(GatewayError):
    code = "store"


class TransferRefused(StoreError):
    """`gateway import` (or `export`) will not run: the target is not empty, the schema versions
    differ, or the file is not a whole gateway export. Nothing was changed."""

    code = "transfer_refused"


class RequestError(GatewayError):
    code = "bad_request"


class MalformedRequest(RequestError):
    code = "malformed"


class Unauthorized(RequestError):
    code = "unauthorized"


class Forbidden(RequestError):
    code = "forbidden"


class NotFound(RequestError):
    code = "not_found"


class Gone(RequestError):
    code = "gone"


class InvalidField(RequestError):
    code = "invalid"


class PayloadTooLarge(RequestError):
    code = "too_large"


class RangeNotSatisfiable(RequestError):
    """A trace append that does not start where the stored trace ends."""

    code = "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"the trace holds {size} bytes; send from offset {size}")
        self.size = size

    def extra(self) -> dict[str, Any]:
        return {"size": self.size}

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Range": f"0-{self.size}"}


class StateConflict(RequestError):
    code = "conflict"


class ConcurrentChange(StateConflict):
    """A compare-and-set write missed: another transaction changed the row first. A store
    retries the whole verb; only when retries run out does the caller see a 409."""


class AlreadyFinal(StateConflict):
    """The job is terminal: nothing changes; the caller learns the outcome."""

    code = "already_final"

    def __init__(self, state: str, failure_reason: str | None) -> None:
        super().__init__(f"the job already ended: {state}")
        self.state = state
        self.failure_reason = failure_reason

    def extra(self) -> dict[str, Any]:
        return {"state": self.state, "failure_reason": self.failure_reason}


class NotReady(StateConflict):
    code = "not_ready"

    def __init__(self, state: str) -> None:
        super().__init__("the job's needs are not met yet; call again once it is pending")
        self.state = state

    def extra(self) -> dict[str, Any]:
        return {"state": self.state}


class NotParked(StateConflict):
    """A progress call on an async job whose script has not exited yet."""

    code = "not_parked"

    def __init__(self, state: str) -> None:
        super().__init__(
            "the job's script has not exited yet; call again once the job is waiting"
            " (a terminal call is kept and applied at its exit)"
        )
        self.state = state

    def extra(self) -> dict[str, Any]:
        return {"state": self.state}


class NotLatestAttempt(StateConflict):
    code = "not_latest_attempt"


class IllegalTransition(StateConflict):
    """The state machine refuses the event in the job's current state."""

    code = "illegal_transition"

    def __init__(self, state: str, trigger: str) -> None:
        super().__init__(f"{trigger} is not allowed while the job is {state}")
        self.state = state
        self.trigger = trigger

    def extra(self) -> dict[str, Any]:
        return {"state": self.state}
