"""The job state machine, exhaustively: every (flavor, state, trigger), deadlines, failure reasons.

The expected table is written out here on its own, from PRODUCT.md "Job states", not copied from
`gateway.states.TRANSITIONS`, so a change to either shows up as a failing case.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import AlreadyFinal, IllegalTransition, NotReady
from gateway.states import (
    TERMINAL_STATES,
    Change,
    Deadlines,
    FailureReason,
    Flavor,
    Kind,
    Lifecycle,
    State,
    Trigger,
    advance,
    entry_deadlines,
    initial_state,
)

NOW = 1_800_000_000.0
E, S, A = Flavor.EXTERNAL, Flavor.SCRIPT, Flavor.ASYNC_SCRIPT
CREATED, PENDING, RUNNING, WAITING = State.CREATED, State.PENDING, State.RUNNING, State.WAITING
SUCCESS, FAILED, CANCELED, SKIPPED = State.SUCCESS, State.FAILED, State.CANCELED, State.SKIPPED
LIVE_STATES = (CREATED, PENDING, RUNNING, WAITING)
CONTINUE_TRIGGERS = {
    Trigger.START,
    Trigger.HEARTBEAT,
    Trigger.CALLBACK_SUCCEEDED,
    Trigger.CALLBACK_FAILED,
}


def _expected_table() -> dict[tuple[Flavor, State, Trigger], State]:
    table: dict[tuple[Flavor, State, Trigger], State] = {}
    for flavor in Flavor:
        table[flavor, CREATED, Trigger.NEEDS_MET] = PENDING
        table[flavor, CREATED, Trigger.NEEDS_FAILED] = SKIPPED
        for state in LIVE_STATES:
            table[flavor, state, Trigger.CANCEL] = CANCELED
            table[flavor, state, Trigger.DEADLINE] = FAILED
    # external: started (optionally) and finished through its continue URL
    table[E, PENDING, Trigger.START] = RUNNING
    table[E, RUNNING, Trigger.START] = RUNNING
    table[E, PENDING, Trigger.HEARTBEAT] = PENDING
    table[E, RUNNING, Trigger.HEARTBEAT] = RUNNING
    for state in (PENDING, RUNNING):
        table[E, state, Trigger.CALLBACK_SUCCEEDED] = SUCCESS
        table[E, state, Trigger.CALLBACK_FAILED] = FAILED
    # script: handed out to a runner, confirmed by it; it pings and reports the exit
    for flavor in (S, A):
        table[flavor, PENDING, Trigger.HAND_OUT] = PENDING
        table[flavor, RUNNING, Trigger.RUNNER_PING] = RUNNING
    table[S, PENDING, Trigger.CONFIRM] = RUNNING
    table[S, RUNNING, Trigger.SCRIPT_SUCCEEDED] = SUCCESS
    table[S, RUNNING, Trigger.SCRIPT_FAILED] = FAILED
    # async script: exit 0 parks it in waiting; the continue URL finishes it
    table[A, PENDING, Trigger.CONFIRM] = RUNNING
    table[A, RUNNING, Trigger.SCRIPT_SUCCEEDED] = WAITING
    table[A, RUNNING, Trigger.SCRIPT_FAILED] = FAILED
    table[A, WAITING, Trigger.HEARTBEAT] = WAITING
    table[A, WAITING, Trigger.CALLBACK_SUCCEEDED] = SUCCESS
    table[A, WAITING, Trigger.CALLBACK_FAILED] = FAILED
    return table


EXPECTED = _expected_table()
SAME_STATE = {key for key, target in EXPECTED.items() if key[1] is target}
ALL_CASES = list(itertools.product(Flavor, State, Trigger))


def _lifecycle(flavor: Flavor, state: State, **fields: object) -> Lifecycle:
    kind = Kind.EXTERNAL if flavor is E else Kind.SCRIPT
    return Lifecycle(kind=kind, is_async=flavor is A, state=state, **fields)  # type: ignore[arg-type]


def _reason_for(trigger: Trigger, state_after: State) -> FailureReason | None:
    if state_after is not FAILED:
        return None
    return {
        Trigger.SCRIPT_FAILED: FailureReason.SCRIPT_FAILURE,
        Trigger.CALLBACK_FAILED: FailureReason.CALLBACK_FAILURE,
        # the case table's jobs carry one due deadline: the execution one
        Trigger.DEADLINE: FailureReason.JOB_EXECUTION_TIMEOUT,
    }[trigger]


def _case_id(case: tuple[Flavor, State, Trigger]) -> str:
    return "-".join(part.value for part in case)


def test_the_case_table_covers_every_combination() -> None:
    """The parametrized cases below are the full product of flavors, states and triggers."""
    assert len(ALL_CASES) == len(Flavor) * len(State) * len(Trigger)
    assert {key[1] for key in EXPECTED} == set(LIVE_STATES)


@pytest.mark.parametrize(("flavor", "state", "trigger"), ALL_CASES, ids=map(_case_id, ALL_CASES))
def test_every_flavor_state_trigger_has_its_expected_outcome(
    flavor: Flavor, state: State, trigger: Trigger
) -> None:
    """Each combination moves to the expected state or raises exactly the expected error."""
    reason = FailureReason.CALLBACK_TIMEOUT if state is FAILED else None
    job = _lifecycle(
        flavor, state, deadlines=Deadlines(execution=NOW - 1), failure_reason=reason, timeout_s=60
    )
    target = EXPECTED.get((flavor, state, trigger))
    if state.terminal:
        with pytest.raises(AlreadyFinal) as final:
            advance(job, trigger, NOW)
        assert final.type is AlreadyFinal
        assert final.value.state == state
        assert final.value.failure_reason == reason
        assert final.value.extra() == {"state": state.value, "failure_reason": reason}
    elif target is None and state is CREATED and trigger in CONTINUE_TRIGGERS:
        with pytest.raises(NotReady) as not_ready:
            advance(job, trigger, NOW)
        assert not_ready.type is NotReady
        assert not_ready.value.state == CREATED
    elif target is None:
        with pytest.raises(IllegalTransition) as illegal:
            advance(job, trigger, NOW)
        assert illegal.type is IllegalTransition
        assert illegal.value.state == state
        assert illegal.value.trigger == trigger
    else:
        change = advance(job, trigger, NOW)
        assert change.previous_state is state
        assert change.state is target
        assert change.transitioned is (target is not state)
        assert change.failure_reason == _reason_for(trigger, target)
        assert change.sets_finished_at is target.terminal
        assert change.sets_parked_at is (target is WAITING and state is not WAITING)
        assert change.sets_started_at is (target is RUNNING and state is not RUNNING)
        if target.terminal:
            assert change.deadlines == Deadlines()


def test_terminal_states_are_exactly_the_four_final_ones() -> None:
    """success, failed, canceled and skipped are terminal; nothing else is."""
    assert {s for s in State if s.terminal} == {SUCCESS, FAILED, CANCELED, SKIPPED}
    assert set(TERMINAL_STATES) == {s for s in State if s.terminal}
    assert [s.value for s in State] == [
        "created",
        "pending",
        "running",
        "waiting",
        "success",
        "failed",
        "canceled",
        "skipped",
    ]


@pytest.mark.parametrize("flavor", list(Flavor))
def test_continue_url_is_live_exactly_where_a_callback_can_finish_the_job(flavor: Flavor) -> None:
    """continue_url_live is true only in the states that accept the terminal call."""
    for state in State:
        live = _lifecycle(flavor, state).continue_url_live
        assert live is ((flavor, state, Trigger.CALLBACK_SUCCEEDED) in EXPECTED), state


def test_initial_state_depends_on_needs() -> None:
    """A job is born pending when its needs are met, created otherwise."""
    assert initial_state(needs_met=True) is PENDING
    assert initial_state(needs_met=False) is CREATED


def test_flavor_follows_kind_and_async() -> None:
    """External jobs are one flavor whatever `async` says; script jobs split on it."""
    assert Lifecycle(kind=Kind.EXTERNAL, is_async=False, state=PENDING).flavor is E
    assert Lifecycle(kind=Kind.SCRIPT, is_async=False, state=PENDING).flavor is S
    assert Lifecycle(kind=Kind.SCRIPT, is_async=True, state=PENDING).flavor is A


# --- deadlines -------------------------------------------------------------------------------


def test_external_pending_gets_callback_and_heartbeat_deadlines_from_creation() -> None:
    """A new external job's callback and heartbeat clocks start when it is created."""
    job = _lifecycle(E, PENDING, callback_timeout_s=3600, heartbeat_timeout_s=60, timeout_s=5)
    assert entry_deadlines(job, NOW) == Deadlines(callback=NOW + 3600, heartbeat=NOW + 60)


def test_external_pending_after_needs_met_starts_its_clocks_then() -> None:
    """An external job whose needs are met later gets its deadlines from that moment."""
    job = _lifecycle(E, CREATED, callback_timeout_s=3600, heartbeat_timeout_s=60)
    assert entry_deadlines(job, NOW) == Deadlines()
    change = advance(job, Trigger.NEEDS_MET, NOW + 500)
    assert change.deadlines == Deadlines(callback=NOW + 4100, heartbeat=NOW + 560)


def test_external_without_heartbeat_timeout_has_no_heartbeat_deadline() -> None:
    """heartbeat_timeout_s is optional: unset means no heartbeat deadline."""
    job = _lifecycle(E, PENDING, callback_timeout_s=100)
    assert entry_deadlines(job, NOW) == Deadlines(callback=NOW + 100)


def test_external_start_adds_execution_deadline_and_keeps_callback() -> None:
    """start: the execution deadline runs from now, heartbeat restarts, callback is kept."""
    job = _lifecycle(
        E,
        PENDING,
        deadlines=Deadlines(callback=NOW + 1000, heartbeat=NOW + 10),
        timeout_s=300,
        callback_timeout_s=1000,
        heartbeat_timeout_s=10,
    )
    change = advance(job, Trigger.START, NOW + 5)
    assert change.state is RUNNING
    assert change.sets_started_at
    assert change.deadlines == Deadlines(
        execution=NOW + 305, callback=NOW + 1000, heartbeat=NOW + 15
    )


def test_script_pending_has_only_a_queue_deadline() -> None:
    """A script job waits for a runner under queue_timeout_s only."""
    job = _lifecycle(S, PENDING, queue_timeout_s=120, timeout_s=60, callback_timeout_s=99)
    assert entry_deadlines(job, NOW) == Deadlines(queue=NOW + 120)
    assert entry_deadlines(_lifecycle(A, PENDING), NOW) == Deadlines()


@pytest.mark.parametrize("flavor", [S, A])
def test_script_confirm_replaces_queue_with_execution_deadline(flavor: Flavor) -> None:
    """Once a runner confirms, the queue deadline is gone; timeout_s and the runner's
    heartbeat clock run from now."""
    job = _lifecycle(
        flavor,
        PENDING,
        deadlines=Deadlines(queue=NOW + 10),
        queue_timeout_s=10,
        timeout_s=600,
        heartbeat_timeout_s=30,
        callback_timeout_s=900,
        runner_timeout_s=200,
    )
    change = advance(job, Trigger.CONFIRM, NOW + 3)
    assert change.deadlines == Deadlines(execution=NOW + 603, runner=NOW + 203)
    assert change.sets_started_at


def test_running_without_timeout_has_no_execution_deadline() -> None:
    """timeout_s unset: a running script job is bounded only by its runner's heartbeat."""
    job = _lifecycle(S, PENDING, queue_timeout_s=10, runner_timeout_s=300)
    assert advance(job, Trigger.CONFIRM, NOW).deadlines == Deadlines(runner=NOW + 300)


def test_async_parking_starts_callback_and_heartbeat_clocks() -> None:
    """Exit 0 of an async script: execution deadline ends, callback and heartbeat start now."""
    job = _lifecycle(
        A,
        RUNNING,
        deadlines=Deadlines(execution=NOW + 50),
        timeout_s=100,
        callback_timeout_s=7200,
        heartbeat_timeout_s=45,
    )
    change = advance(job, Trigger.SCRIPT_SUCCEEDED, NOW + 20)
    assert change.state is WAITING
    assert change.sets_parked_at
    assert not change.sets_started_at
    assert change.deadlines == Deadlines(callback=NOW + 7220, heartbeat=NOW + 65)


@pytest.mark.parametrize(
    ("flavor", "state", "trigger"),
    [
        (E, PENDING, Trigger.HEARTBEAT),
        (E, RUNNING, Trigger.HEARTBEAT),
        (E, RUNNING, Trigger.START),
        (A, WAITING, Trigger.HEARTBEAT),
    ],
)
def test_same_state_triggers_refresh_only_the_heartbeat(
    flavor: Flavor, state: State, trigger: Trigger
) -> None:
    """heartbeat (and a second start) push the heartbeat deadline and leave the others alone."""
    before = Deadlines(execution=NOW + 500, callback=NOW + 900, heartbeat=NOW + 20)
    job = _lifecycle(
        flavor,
        state,
        deadlines=before,
        timeout_s=1000,
        callback_timeout_s=5000,
        heartbeat_timeout_s=20,
    )
    change = advance(job, trigger, NOW + 15)
    assert not change.transitioned
    assert change.state is state
    assert change.deadlines == dataclasses.replace(before, heartbeat=NOW + 35)
    assert change.failure_reason is None
    assert not (change.sets_started_at or change.sets_parked_at or change.sets_finished_at)


def test_heartbeat_without_heartbeat_deadline_changes_nothing() -> None:
    """No heartbeat_timeout_s: a heartbeat is accepted and no deadline moves."""
    before = Deadlines(callback=NOW + 900)
    job = _lifecycle(E, PENDING, deadlines=before, callback_timeout_s=900)
    change = advance(job, Trigger.HEARTBEAT, NOW + 100)
    assert change.deadlines == before
    assert not change.transitioned


ALL_DEADLINES = Deadlines(
    execution=NOW + 1,
    callback=NOW + 2,
    heartbeat=NOW + 3,
    runner=NOW + 4,
    queue=NOW + 5,
    confirm=NOW + 6,
)
TERMINAL_MOVES = [
    (flavor, state, trigger)
    for (flavor, state, trigger), target in EXPECTED.items()
    if target.terminal and trigger is not Trigger.DEADLINE
]


@pytest.mark.parametrize(
    ("flavor", "state", "trigger"), TERMINAL_MOVES, ids=map(_case_id, TERMINAL_MOVES)
)
def test_a_terminal_transition_clears_every_deadline(
    flavor: Flavor, state: State, trigger: Trigger
) -> None:
    """Whatever ends a job, it ends with no live deadline."""
    job = _lifecycle(flavor, state, deadlines=ALL_DEADLINES, timeout_s=9, heartbeat_timeout_s=9)
    assert advance(job, trigger, NOW).deadlines == Deadlines()


def test_deadline_trigger_before_any_deadline_is_due_is_refused() -> None:
    """The sweeper cannot fail a job early: DEADLINE needs a deadline at or before now."""
    job = _lifecycle(E, PENDING, deadlines=Deadlines(callback=NOW + 10, heartbeat=NOW + 20))
    with pytest.raises(IllegalTransition):
        advance(job, Trigger.DEADLINE, NOW + 9.999)
    change = advance(job, Trigger.DEADLINE, NOW + 10)
    assert change.state is FAILED
    assert change.failure_reason is FailureReason.CALLBACK_TIMEOUT
    assert change.deadlines == Deadlines()
    assert change.sets_finished_at


@pytest.mark.parametrize("state", LIVE_STATES)
def test_deadline_trigger_without_deadlines_is_refused(state: State) -> None:
    """A job with no deadline at all can never time out."""
    with pytest.raises(IllegalTransition):
        advance(_lifecycle(E, state), Trigger.DEADLINE, NOW + 10**9)


@pytest.mark.parametrize(
    ("deadlines", "reason"),
    [
        (Deadlines(execution=NOW + 1, callback=NOW + 2), FailureReason.JOB_EXECUTION_TIMEOUT),
        (Deadlines(execution=NOW + 2, callback=NOW + 1), FailureReason.CALLBACK_TIMEOUT),
        (Deadlines(callback=NOW + 5, heartbeat=NOW + 4), FailureReason.HEARTBEAT_TIMEOUT),
        (Deadlines(queue=NOW + 1, execution=NOW + 3), FailureReason.QUEUE_TIMEOUT),
        (Deadlines(heartbeat=NOW + 3, queue=NOW + 2.5), FailureReason.QUEUE_TIMEOUT),
        (Deadlines(runner=NOW + 1, execution=NOW + 2), FailureReason.RUNNER_SYSTEM_FAILURE),
        (Deadlines(execution=NOW + 1, runner=NOW + 2), FailureReason.JOB_EXECUTION_TIMEOUT),
    ],
)
def test_when_several_deadlines_passed_the_earliest_names_the_reason(
    deadlines: Deadlines, reason: FailureReason
) -> None:
    """A sweep long after several deadlines fails the job for the one that came first."""
    job = _lifecycle(E, RUNNING, deadlines=deadlines)
    assert advance(job, Trigger.DEADLINE, NOW + 100).failure_reason is reason


@pytest.mark.parametrize(
    ("deadlines", "reason"),
    [
        (Deadlines(NOW, NOW, NOW, NOW, NOW, NOW), FailureReason.JOB_EXECUTION_TIMEOUT),
        (Deadlines(callback=NOW, heartbeat=NOW, queue=NOW), FailureReason.CALLBACK_TIMEOUT),
        (Deadlines(heartbeat=NOW, runner=NOW, queue=NOW), FailureReason.HEARTBEAT_TIMEOUT),
        (Deadlines(runner=NOW, queue=NOW, confirm=NOW), FailureReason.RUNNER_SYSTEM_FAILURE),
        (Deadlines(queue=NOW, confirm=NOW), FailureReason.QUEUE_TIMEOUT),
        (Deadlines(execution=NOW, queue=NOW), FailureReason.JOB_EXECUTION_TIMEOUT),
        (Deadlines(callback=NOW, queue=NOW), FailureReason.CALLBACK_TIMEOUT),
    ],
)
def test_deadlines_at_the_same_instant_tie_break_in_field_order(
    deadlines: Deadlines, reason: FailureReason
) -> None:
    """Ties go execution, callback, heartbeat, runner, queue, confirm (Deadlines field order):
    a failure beats putting a hand-out back in the queue."""
    assert [f.name for f in dataclasses.fields(Deadlines)] == [
        "execution",
        "callback",
        "heartbeat",
        "runner",
        "queue",
        "confirm",
    ]
    assert deadlines.earliest() == (NOW, reason)
    job = _lifecycle(S, PENDING, deadlines=deadlines)
    assert advance(job, Trigger.DEADLINE, NOW).failure_reason is reason


def test_earliest_of_no_deadlines_is_none() -> None:
    """An empty Deadlines has nothing to fire."""
    assert Deadlines().earliest() is None


@pytest.mark.parametrize(
    ("flavor", "state", "trigger", "reason"),
    [
        (S, RUNNING, Trigger.SCRIPT_FAILED, FailureReason.SCRIPT_FAILURE),
        (A, RUNNING, Trigger.SCRIPT_FAILED, FailureReason.SCRIPT_FAILURE),
        (E, PENDING, Trigger.CALLBACK_FAILED, FailureReason.CALLBACK_FAILURE),
        (E, RUNNING, Trigger.CALLBACK_FAILED, FailureReason.CALLBACK_FAILURE),
        (A, WAITING, Trigger.CALLBACK_FAILED, FailureReason.CALLBACK_FAILURE),
    ],
)
def test_reported_failures_carry_their_reason(
    flavor: Flavor, state: State, trigger: Trigger, reason: FailureReason
) -> None:
    """A script's non-zero exit is script_failure; the external system's report is
    callback_failure."""
    change = advance(_lifecycle(flavor, state), trigger, NOW)
    assert change.state is FAILED
    assert change.failure_reason is reason


def test_cancel_carries_no_failure_reason() -> None:
    """canceled is not failed: no failure_reason."""
    for state in LIVE_STATES:
        assert advance(_lifecycle(A, state), Trigger.CANCEL, NOW).failure_reason is None


# --- hand-out, confirmation and the runner's heartbeat ----------------------------------------


@pytest.mark.parametrize("flavor", [S, A])
def test_hand_out_starts_the_confirmation_clock_and_keeps_the_job_pending(flavor: Flavor) -> None:
    """A hand-out leaves the job pending (queue deadline kept) with a confirmation deadline."""
    job = _lifecycle(flavor, PENDING, deadlines=Deadlines(queue=NOW + 100), confirm_timeout_s=60)
    change = advance(job, Trigger.HAND_OUT, NOW + 1)
    assert change.state is PENDING
    assert not change.transitioned
    assert change.deadlines == Deadlines(queue=NOW + 100, confirm=NOW + 61)
    assert not (change.sets_started_at or change.sets_parked_at or change.sets_finished_at)


@pytest.mark.parametrize("flavor", [S, A])
def test_a_job_is_handed_out_once_until_confirmed_or_requeued(flavor: Flavor) -> None:
    """A second hand-out of a job awaiting confirmation is refused (exactly-once hand-out)."""
    job = _lifecycle(flavor, PENDING, deadlines=Deadlines(confirm=NOW + 60))
    assert job.handed_out
    with pytest.raises(IllegalTransition):
        advance(job, Trigger.HAND_OUT, NOW)


def test_an_unconfirmed_hand_out_goes_back_to_the_queue() -> None:
    """The confirmation deadline does not fail the job: it returns to pending, in the queue."""
    job = _lifecycle(S, PENDING, deadlines=Deadlines(queue=NOW + 500, confirm=NOW + 60))
    with pytest.raises(IllegalTransition):
        advance(job, Trigger.DEADLINE, NOW + 59)
    change = advance(job, Trigger.DEADLINE, NOW + 60)
    assert change.requeued
    assert change.state is PENDING
    assert not change.transitioned
    assert change.failure_reason is None
    assert change.deadlines == Deadlines(queue=NOW + 500)
    requeued = dataclasses.replace(job, deadlines=change.deadlines)
    assert not requeued.handed_out
    assert advance(requeued, Trigger.HAND_OUT, NOW + 61).deadlines.confirm == NOW + 121


def test_a_queue_deadline_before_the_confirmation_one_fails_the_job() -> None:
    """When the queue deadline came first, the job fails with queue_timeout, not a requeue."""
    job = _lifecycle(S, PENDING, deadlines=Deadlines(queue=NOW + 10, confirm=NOW + 60))
    change = advance(job, Trigger.DEADLINE, NOW + 100)
    assert change.state is FAILED
    assert change.failure_reason is FailureReason.QUEUE_TIMEOUT
    assert not change.requeued


@pytest.mark.parametrize("flavor", [S, A])
def test_confirm_ends_the_hand_out(flavor: Flavor) -> None:
    """Confirming clears the confirmation and queue deadlines."""
    job = _lifecycle(
        flavor,
        PENDING,
        deadlines=Deadlines(queue=NOW + 100, confirm=NOW + 60),
        runner_timeout_s=300,
    )
    change = advance(job, Trigger.CONFIRM, NOW + 5)
    assert change.deadlines == Deadlines(runner=NOW + 305)


@pytest.mark.parametrize("flavor", [S, A])
def test_runner_ping_pushes_only_the_runner_deadline(flavor: Flavor) -> None:
    """A keepalive from the runner moves its heartbeat deadline and nothing else."""
    before = Deadlines(execution=NOW + 50, runner=NOW + 300)
    job = _lifecycle(flavor, RUNNING, deadlines=before, timeout_s=50, runner_timeout_s=300)
    change = advance(job, Trigger.RUNNER_PING, NOW + 40)
    assert not change.transitioned
    assert change.deadlines == Deadlines(execution=NOW + 50, runner=NOW + 340)
    assert not change.sets_started_at


def test_a_silent_runner_fails_the_job_with_runner_system_failure() -> None:
    """Past the runner's heartbeat deadline the job fails as runner_system_failure."""
    job = _lifecycle(S, RUNNING, deadlines=Deadlines(execution=NOW + 900, runner=NOW + 300))
    change = advance(job, Trigger.DEADLINE, NOW + 300)
    assert change.failure_reason is FailureReason.RUNNER_SYSTEM_FAILURE


@pytest.mark.parametrize(
    "reason",
    [
        FailureReason.SCRIPT_FAILURE,
        FailureReason.JOB_EXECUTION_TIMEOUT,
        FailureReason.RUNNER_SYSTEM_FAILURE,
    ],
)
def test_a_runner_may_name_why_its_script_failed(reason: FailureReason) -> None:
    """The runner's own timeout kill or shutdown is reported with its reason."""
    change = advance(_lifecycle(S, RUNNING), Trigger.SCRIPT_FAILED, NOW, reason=reason)
    assert change.state is FAILED
    assert change.failure_reason is reason


@pytest.mark.parametrize(
    "reason",
    [
        FailureReason.CALLBACK_FAILURE,
        FailureReason.CALLBACK_TIMEOUT,
        FailureReason.HEARTBEAT_TIMEOUT,
        FailureReason.QUEUE_TIMEOUT,
    ],
)
def test_a_runner_cannot_claim_reasons_that_are_not_its_own(reason: FailureReason) -> None:
    """Callback and queue reasons belong to the gateway, never to a runner's report."""
    with pytest.raises(IllegalTransition):
        advance(_lifecycle(A, RUNNING), Trigger.SCRIPT_FAILED, NOW, reason=reason)


# --- random walks ----------------------------------------------------------------------------

# Where a walk may start: every state the flavor can be in, with that state's entry deadlines.
REACHABLE = {
    E: [CREATED, PENDING, RUNNING],
    S: [CREATED, PENDING, RUNNING],
    A: [CREATED, PENDING, RUNNING, WAITING],
}
timeouts = st.one_of(st.none(), st.integers(min_value=1, max_value=300))


@st.composite
def jobs(draw: st.DrawFn) -> Lifecycle:
    flavor = draw(st.sampled_from(list(Flavor)))
    job = _lifecycle(
        flavor,
        draw(st.sampled_from(REACHABLE[flavor])),
        timeout_s=draw(timeouts),
        callback_timeout_s=draw(timeouts),
        heartbeat_timeout_s=draw(timeouts),
        queue_timeout_s=draw(timeouts),
        confirm_timeout_s=draw(st.integers(min_value=1, max_value=300)),
        runner_timeout_s=draw(st.integers(min_value=1, max_value=300)),
    )
    return dataclasses.replace(job, deadlines=entry_deadlines(job, NOW))


steps = st.lists(
    st.tuples(st.sampled_from(list(Trigger)), st.floats(min_value=0, max_value=200)),
    max_size=30,
)


def _apply(job: Lifecycle, change: Change) -> Lifecycle:
    reason = change.failure_reason if change.transitioned else job.failure_reason
    return dataclasses.replace(
        job, state=change.state, deadlines=change.deadlines, failure_reason=reason
    )


@settings(max_examples=1000, deadline=None)
@given(job=jobs(), walk=steps)
def test_random_walks_keep_the_machine_invariants(
    job: Lifecycle, walk: list[tuple[Trigger, float]]
) -> None:
    """Whatever triggers arrive, in whatever order and timing: one terminal transition at most,
    no live URL or deadline once terminal, fresh deadlines never in the past, failed always has
    a reason, and only same-state triggers report no transition."""
    now = NOW
    terminal_transitions = 0
    for trigger, step in walk:
        now += step
        before = job
        try:
            change = advance(job, trigger, now)
        except (AlreadyFinal, NotReady, IllegalTransition):
            assert job == before
            if (job.flavor, job.state, trigger) in EXPECTED:
                if trigger is Trigger.HAND_OUT:
                    assert job.handed_out
                else:
                    assert trigger is Trigger.DEADLINE
                    due = job.deadlines.earliest()
                    assert due is None or due[0] > now
            continue
        assert change.previous_state is job.state
        if change.requeued:
            assert trigger is Trigger.DEADLINE
            assert job.handed_out
            assert change.state is job.state
            assert change.deadlines.confirm is None
        else:
            assert change.state is EXPECTED[job.flavor, job.state, trigger]
        if not change.transitioned:
            assert (job.flavor, job.state, trigger) in SAME_STATE or change.requeued
        else:
            assert (job.flavor, job.state, trigger) not in SAME_STATE
            assert not change.requeued
        if change.sets_parked_at or change.sets_started_at or change.sets_finished_at:
            assert change.transitioned
        for field in dataclasses.fields(Deadlines):
            old, new = getattr(job.deadlines, field.name), getattr(change.deadlines, field.name)
            if new is not None and new != old:
                assert new >= now, field.name
        if change.state.terminal:
            terminal_transitions += 1
        job = _apply(job, change)
        if job.state is FAILED:
            assert job.failure_reason is not None
        if job.state.terminal:
            assert not job.continue_url_live
            assert job.deadlines == Deadlines()
            assert job.deadlines.earliest() is None
    assert terminal_transitions <= 1
    if job.state.terminal:
        for trigger in Trigger:
            with pytest.raises(AlreadyFinal):
                advance(job, trigger, now)
