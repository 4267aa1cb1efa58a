"""The job state machine: states, failure reasons, one transition table. Pure: no I/O, no clock.

`advance(job, trigger, now)` returns the `Change` a trigger makes to a job, or raises
`IllegalTransition` (or `AlreadyFinal` on a terminal job). Deadlines are part of the change:
each is a stored column, so the sweeper finds them after a restart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum

from gateway.config import DEFAULT_CONFIRM_TIMEOUT_S, DEFAULT_RUNNER_HEARTBEAT_TIMEOUT_S
from gateway.errors import AlreadyFinal, IllegalTransition, NotReady


class State(StrEnum):
    CREATED = "created"
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELED = "canceled"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({State.SUCCESS, State.FAILED, State.CANCELED, State.SKIPPED})


class FailureReason(StrEnum):
    SCRIPT_FAILURE = "script_failure"
    CALLBACK_FAILURE = "callback_failure"
    JOB_EXECUTION_TIMEOUT = "job_execution_timeout"
    CALLBACK_TIMEOUT = "callback_timeout"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    RUNNER_SYSTEM_FAILURE = "runner_system_failure"
    QUEUE_TIMEOUT = "queue_timeout"


class Kind(StrEnum):
    EXTERNAL = "external"
    SCRIPT = "script"


class Flavor(StrEnum):
    """What decides a job's lifecycle: its kind, and for a script job whether it is async."""

    EXTERNAL = "external"
    SCRIPT = "script"
    ASYNC_SCRIPT = "async_script"


class Trigger(StrEnum):
    NEEDS_MET = "needs_met"
    NEEDS_FAILED = "needs_failed"
    START = "start"
    CONFIRM = "confirm"
    SCRIPT_SUCCEEDED = "script_succeeded"
    SCRIPT_FAILED = "script_failed"
    CALLBACK_SUCCEEDED = "callback_succeeded"
    CALLBACK_FAILED = "callback_failed"
    HEARTBEAT = "heartbeat"
    HAND_OUT = "hand_out"
    RUNNER_PING = "runner_ping"
    CANCEL = "cancel"
    DEADLINE = "deadline"


_NON_TERMINAL = (State.CREATED, State.PENDING, State.RUNNING, State.WAITING)
_E, _S, _A = Flavor.EXTERNAL, Flavor.SCRIPT, Flavor.ASYNC_SCRIPT

# (flavor, state, trigger) -> state after. Anything absent is illegal. A trigger that leaves the
# state as it is moves a deadline: heartbeat and a second start push the continue URL's
# heartbeat, a hand-out starts the confirmation clock, a runner ping pushes the runner's.
TRANSITIONS: dict[tuple[Flavor, State, Trigger], State] = {
    **{(f, State.CREATED, Trigger.NEEDS_MET): State.PENDING for f in Flavor},
    **{(f, State.CREATED, Trigger.NEEDS_FAILED): State.SKIPPED for f in Flavor},
    **{(f, s, Trigger.CANCEL): State.CANCELED for f in Flavor for s in _NON_TERMINAL},
    **{(f, s, Trigger.DEADLINE): State.FAILED for f in Flavor for s in _NON_TERMINAL},
    # external: driven only through its continue URL
    (_E, State.PENDING, Trigger.START): State.RUNNING,
    (_E, State.RUNNING, Trigger.START): State.RUNNING,
    (_E, State.PENDING, Trigger.HEARTBEAT): State.PENDING,
    (_E, State.RUNNING, Trigger.HEARTBEAT): State.RUNNING,
    (_E, State.PENDING, Trigger.CALLBACK_SUCCEEDED): State.SUCCESS,
    (_E, State.RUNNING, Trigger.CALLBACK_SUCCEEDED): State.SUCCESS,
    (_E, State.PENDING, Trigger.CALLBACK_FAILED): State.FAILED,
    (_E, State.RUNNING, Trigger.CALLBACK_FAILED): State.FAILED,
    # script: handed out, then confirmed by a runner, which pings and reports the exit
    **{(f, State.PENDING, Trigger.HAND_OUT): State.PENDING for f in (_S, _A)},
    **{(f, State.RUNNING, Trigger.RUNNER_PING): State.RUNNING for f in (_S, _A)},
    (_S, State.PENDING, Trigger.CONFIRM): State.RUNNING,
    (_S, State.RUNNING, Trigger.SCRIPT_SUCCEEDED): State.SUCCESS,
    (_S, State.RUNNING, Trigger.SCRIPT_FAILED): State.FAILED,
    # async script: exit 0 parks it; the continue URL finishes it
    (_A, State.PENDING, Trigger.CONFIRM): State.RUNNING,
    (_A, State.RUNNING, Trigger.SCRIPT_SUCCEEDED): State.WAITING,
    (_A, State.RUNNING, Trigger.SCRIPT_FAILED): State.FAILED,
    (_A, State.WAITING, Trigger.HEARTBEAT): State.WAITING,
    (_A, State.WAITING, Trigger.CALLBACK_SUCCEEDED): State.SUCCESS,
    (_A, State.WAITING, Trigger.CALLBACK_FAILED): State.FAILED,
}

_FIXED_REASON = {
    Trigger.SCRIPT_FAILED: FailureReason.SCRIPT_FAILURE,
    Trigger.CALLBACK_FAILED: FailureReason.CALLBACK_FAILURE,
}
# What a runner may say of a failed script (its own timeout kill, its own shutdown).
RUNNER_REPORTABLE_REASONS = frozenset(
    {
        FailureReason.SCRIPT_FAILURE,
        FailureReason.JOB_EXECUTION_TIMEOUT,
        FailureReason.RUNNER_SYSTEM_FAILURE,
    }
)


@dataclass(frozen=True)
class Deadlines:
    """Every live deadline of a job (epoch seconds), None when not running.

    Field order is the tie-break when two deadlines fall at the same instant.
    """

    execution: float | None = None
    callback: float | None = None
    heartbeat: float | None = None
    runner: float | None = None
    queue: float | None = None
    confirm: float | None = None

    def earliest(self) -> tuple[float, FailureReason | None] | None:
        """The deadline that fires first, with the failure reason it gives (None for the
        confirmation deadline of a hand-out, which puts the job back in the queue)."""
        best: tuple[float, FailureReason | None] | None = None
        for name, reason in _DEADLINE_REASON.items():
            at = getattr(self, name)
            if at is not None and (best is None or at < best[0]):
                best = (at, reason)
        return best


_DEADLINE_REASON: dict[str, FailureReason | None] = {
    "execution": FailureReason.JOB_EXECUTION_TIMEOUT,
    "callback": FailureReason.CALLBACK_TIMEOUT,
    "heartbeat": FailureReason.HEARTBEAT_TIMEOUT,
    "runner": FailureReason.RUNNER_SYSTEM_FAILURE,
    "queue": FailureReason.QUEUE_TIMEOUT,
    "confirm": None,
}


@dataclass(frozen=True)
class Lifecycle:
    """What the state machine needs to know of a job."""

    kind: Kind
    is_async: bool
    state: State
    deadlines: Deadlines = Deadlines()
    failure_reason: FailureReason | None = None
    timeout_s: int | None = None
    callback_timeout_s: int | None = None
    heartbeat_timeout_s: int | None = None
    queue_timeout_s: int | None = None
    confirm_timeout_s: int = DEFAULT_CONFIRM_TIMEOUT_S
    runner_timeout_s: int = DEFAULT_RUNNER_HEARTBEAT_TIMEOUT_S

    @property
    def flavor(self) -> Flavor:
        if self.kind is Kind.EXTERNAL:
            return Flavor.EXTERNAL
        return Flavor.ASYNC_SCRIPT if self.is_async else Flavor.SCRIPT

    @property
    def continue_url_live(self) -> bool:
        """Whether a terminal call on the continue URL can finish the job now."""
        return (self.flavor, self.state, Trigger.CALLBACK_SUCCEEDED) in TRANSITIONS

    @property
    def takes_early_callback(self) -> bool:
        """An async script job not yet parked: a terminal call is kept and applied on exit 0."""
        return self.flavor is Flavor.ASYNC_SCRIPT and self.state in (State.PENDING, State.RUNNING)

    @property
    def handed_out(self) -> bool:
        return self.state is State.PENDING and self.deadlines.confirm is not None


@dataclass(frozen=True)
class Change:
    """The result of one trigger: the new state and deadlines, and which timestamps to set."""

    previous_state: State
    state: State
    deadlines: Deadlines
    failure_reason: FailureReason | None = None
    sets_started_at: bool = False
    sets_parked_at: bool = False
    sets_finished_at: bool = False
    requeued: bool = False

    @property
    def transitioned(self) -> bool:
        """False for a trigger that only refreshed deadlines (heartbeat, a second start)."""
        return self.state is not self.previous_state


def initial_state(needs_met: bool) -> State:
    """The state a new job is born in."""
    return State.PENDING if needs_met else State.CREATED


def entry_deadlines(job: Lifecycle, now: float) -> Deadlines:
    """Deadlines of a job just entered into its current state (used at creation)."""
    return _deadlines_on_entry(job, job.state, Deadlines(), now)


def advance(
    job: Lifecycle, trigger: Trigger, now: float, *, reason: FailureReason | None = None
) -> Change:
    """Apply `trigger` to `job` at `now`.

    A DEADLINE trigger needs a deadline due by `now`; the earliest due one names the failure
    reason, or puts a hand-out nobody confirmed back in the queue. `reason` may name why a
    script failed (one of RUNNER_REPORTABLE_REASONS; SCRIPT_FAILED only). Raises AlreadyFinal on
    a terminal job, NotReady for a continue call before the job's needs are met,
    IllegalTransition otherwise.
    """
    if job.state.terminal:
        raise AlreadyFinal(job.state, job.failure_reason)
    target = TRANSITIONS.get((job.flavor, job.state, trigger))
    if target is None or (trigger is Trigger.HAND_OUT and job.handed_out):
        if job.state is State.CREATED and trigger in _CONTINUE_TRIGGERS:
            raise NotReady(job.state)
        raise IllegalTransition(job.state, trigger)
    failure = _FIXED_REASON.get(trigger)
    if trigger is Trigger.SCRIPT_FAILED and reason is not None:
        if reason not in RUNNER_REPORTABLE_REASONS:
            raise IllegalTransition(job.state, f"{trigger} with {reason}")
        failure = reason
    if trigger is Trigger.DEADLINE:
        due = job.deadlines.earliest()
        if due is None or due[0] > now:
            raise IllegalTransition(job.state, trigger)
        if due[1] is None:
            return Change(
                previous_state=job.state,
                state=job.state,
                deadlines=dataclasses.replace(job.deadlines, confirm=None),
                requeued=True,
            )
        failure = due[1]
    if target is job.state:
        deadlines = _same_state_deadlines(job, trigger, now)
    else:
        deadlines = _deadlines_on_entry(job, target, job.deadlines, now)
    return Change(
        previous_state=job.state,
        state=target,
        deadlines=deadlines,
        failure_reason=failure,
        sets_started_at=target is State.RUNNING and job.state is not State.RUNNING,
        sets_parked_at=target is State.WAITING and job.state is not State.WAITING,
        sets_finished_at=target.terminal,
    )


_CONTINUE_TRIGGERS = frozenset(
    {Trigger.START, Trigger.HEARTBEAT, Trigger.CALLBACK_SUCCEEDED, Trigger.CALLBACK_FAILED}
)


def _after(now: float, seconds: int | None) -> float | None:
    return None if seconds is None else now + seconds


def _same_state_deadlines(job: Lifecycle, trigger: Trigger, now: float) -> Deadlines:
    """A trigger that keeps the state moves one clock."""
    if trigger is Trigger.HAND_OUT:
        return dataclasses.replace(job.deadlines, confirm=now + job.confirm_timeout_s)
    if trigger is Trigger.RUNNER_PING:
        return dataclasses.replace(job.deadlines, runner=now + job.runner_timeout_s)
    if job.deadlines.heartbeat is None:
        return job.deadlines
    return dataclasses.replace(job.deadlines, heartbeat=_after(now, job.heartbeat_timeout_s))


def _deadlines_on_entry(job: Lifecycle, target: State, old: Deadlines, now: float) -> Deadlines:
    """Deadlines once `job` enters `target`; a continue URL's clocks start when it goes live."""
    if target.terminal or target is State.CREATED:
        return Deadlines()
    flavor = job.flavor
    if target is State.PENDING:
        if flavor is Flavor.EXTERNAL:
            return Deadlines(
                callback=_after(now, job.callback_timeout_s),
                heartbeat=_after(now, job.heartbeat_timeout_s),
            )
        return Deadlines(queue=_after(now, job.queue_timeout_s))
    if target is State.RUNNING:
        if flavor is Flavor.EXTERNAL:
            return dataclasses.replace(
                old,
                execution=_after(now, job.timeout_s),
                heartbeat=_after(now, job.heartbeat_timeout_s),
            )
        return Deadlines(execution=_after(now, job.timeout_s), runner=now + job.runner_timeout_s)
    # WAITING: the script exited 0; the callback clocks start now.
    return Deadlines(
        callback=_after(now, job.callback_timeout_s),
        heartbeat=_after(now, job.heartbeat_timeout_s),
    )
