"""The pure pipeline logic: DAG checks, stages, downstream, readiness and the derived state.

The derived state is checked rule by rule against PRODUCT.md "Pipeline state", and by hypothesis
against an oracle written here from the same rules (first rule that holds wins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidField
from gateway.pipelines import (
    JobStatus,
    PipelineState,
    Readiness,
    check_dag,
    derive_state,
    downstream,
    readiness,
    stages,
)
from gateway.states import TERMINAL_STATES, Kind, State

CREATED, PENDING, RUNNING, WAITING = State.CREATED, State.PENDING, State.RUNNING, State.WAITING
SUCCESS, FAILED, CANCELED, SKIPPED = State.SUCCESS, State.FAILED, State.CANCELED, State.SKIPPED
EXT, SCRIPT = Kind.EXTERNAL, Kind.SCRIPT


def _assert_order(needs: Mapping[str, Sequence[str]], order: list[str]) -> None:
    assert sorted(order) == sorted(needs)
    position = {name: i for i, name in enumerate(order)}
    for name, wanted in needs.items():
        for need in wanted:
            assert position[need] < position[name], (need, name, order)


# --- check_dag ---------------------------------------------------------------------------


def test_unknown_need_is_named() -> None:
    """A need that is not a job of the pipeline is refused, naming the job and the need."""
    with pytest.raises(InvalidField) as caught:
        check_dag({"build": [], "deploy": ["biuld"]})
    assert "`deploy`" in caught.value.detail
    assert "`biuld`" in caught.value.detail
    assert "not in the pipeline" in caught.value.detail


def test_self_need_is_refused() -> None:
    """A job that needs itself is refused, naming it."""
    with pytest.raises(InvalidField) as caught:
        check_dag({"a": [], "loop": ["a", "loop"]})
    assert caught.value.detail == "job `loop` needs itself"


def test_duplicate_need_is_refused() -> None:
    """A need listed twice is refused, naming the job and the need."""
    with pytest.raises(InvalidField) as caught:
        check_dag({"a": [], "b": ["a", "a"]})
    assert caught.value.detail == "job `b` lists `a` twice in `needs`"


def test_cycle_of_two_is_named_with_its_path() -> None:
    """A 2-cycle is refused and the error spells the cycle's path."""
    with pytest.raises(InvalidField) as caught:
        check_dag({"a": ["b"], "b": ["a"]})
    detail = caught.value.detail
    assert "cycle" in detail
    assert "`a` -> `b` -> `a`" in detail or "`b` -> `a` -> `b`" in detail


def test_cycle_of_three_is_named_with_its_path() -> None:
    """A 3-cycle behind a valid root is refused; the error names every job of the cycle, in
    order, and not the root outside it."""
    with pytest.raises(InvalidField) as caught:
        check_dag({"root": [], "x": ["root", "z"], "y": ["x"], "z": ["y"]})
    detail = caught.value.detail
    rotations = ["`x` -> `z` -> `y` -> `x`", "`z` -> `y` -> `x` -> `z`", "`y` -> `x` -> `z` -> `y`"]
    assert any(r in detail for r in rotations), detail
    assert "`root`" not in detail


def test_valid_dag_gives_an_order_with_needs_first() -> None:
    """A valid DAG comes back as an order in which every job follows all it needs."""
    needs = {
        "deploy": ["test", "provision"],
        "test": ["build"],
        "build": [],
        "provision": [],
        "notify": ["deploy", "build"],
    }
    order = check_dag(needs)
    _assert_order(needs, order)


def test_jobs_without_needs_keep_definition_order() -> None:
    """Independent jobs come back in the order they were defined."""
    assert check_dag({"c": [], "a": [], "b": []}) == ["c", "a", "b"]


def test_long_chain_defined_last_first_is_checked_without_recursion() -> None:
    """A chain of 5000 needs, defined from its end, is ordered and its closing cycle named
    (regression: a recursive walk hit the recursion limit past ~1000 jobs)."""
    length = 5000
    chain = {f"j{i}": [f"j{i - 1}"] if i else [] for i in reversed(range(length))}
    assert check_dag(chain) == [f"j{i}" for i in range(length)]
    assert stages(chain)[f"j{length - 1}"] == length - 1
    with pytest.raises(InvalidField, match="cycle"):
        check_dag({**chain, "j0": [f"j{length - 1}"]})


@st.composite
def dags(draw: st.DrawFn, max_jobs: int = 7) -> dict[str, list[str]]:
    """A random DAG: job i may need any of the jobs before it; names shuffled in the map."""
    count = draw(st.integers(min_value=1, max_value=max_jobs))
    names = [f"j{i}" for i in range(count)]
    needs = {
        name: draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
        for i, name in enumerate(names)
    }
    order = draw(st.permutations(names))
    return {name: needs[name] for name in order}


@settings(max_examples=200, deadline=None)
@given(needs=dags())
def test_any_dag_is_accepted_in_a_valid_order(needs: dict[str, list[str]]) -> None:
    """Every acyclic needs map is accepted and ordered needs-first."""
    _assert_order(needs, check_dag(needs))


@settings(max_examples=200, deadline=None)
@given(needs=dags(), data=st.data())
def test_any_back_edge_makes_a_cycle(needs: dict[str, list[str]], data: st.DataObject) -> None:
    """Adding an edge from a job to one of its downstream jobs is always refused as a cycle."""
    candidates = [(name, d) for name in needs for d in sorted(downstream(needs, name))]
    if not candidates:
        return
    upstream, below = data.draw(st.sampled_from(candidates))
    cyclic = {**needs, upstream: [*needs[upstream], below]}
    with pytest.raises(InvalidField, match="cycle"):
        check_dag(cyclic)


# --- stages, downstream, readiness ---------------------------------------------------------


def test_stage_is_the_longest_needs_path() -> None:
    """A job's stage is the length of the longest needs path to it, not the shortest."""
    needs = {
        "build": [],
        "lint": [],
        "test": ["build"],
        "package": ["test"],
        "deploy": ["package", "lint"],  # lint is stage 0, but package is stage 2
    }
    assert stages(needs) == {"build": 0, "lint": 0, "test": 1, "package": 2, "deploy": 3}


@settings(max_examples=200, deadline=None)
@given(needs=dags())
def test_stages_are_one_past_the_deepest_need(needs: dict[str, list[str]]) -> None:
    """Roots are stage 0; every other job is one past the highest stage among its needs."""
    stage = stages(needs)
    for name, wanted in needs.items():
        assert stage[name] == (1 + max(stage[n] for n in wanted) if wanted else 0)


def test_downstream_is_transitive_and_excludes_the_job() -> None:
    """downstream() follows needs edges transitively and leaves out unrelated jobs."""
    needs = {"a": [], "b": ["a"], "c": ["b"], "d": ["a", "c"], "e": []}
    assert downstream(needs, "a") == {"b", "c", "d"}
    assert downstream(needs, "c") == {"d"}
    assert downstream(needs, "d") == set()
    assert downstream(needs, "e") == set()


@pytest.mark.parametrize(
    ("need_states", "expected"),
    [
        ([], Readiness.READY),
        ([SUCCESS], Readiness.READY),
        ([SUCCESS, SUCCESS], Readiness.READY),
        ([SUCCESS, RUNNING], Readiness.BLOCKED),
        ([CREATED], Readiness.BLOCKED),
        ([PENDING], Readiness.BLOCKED),
        ([WAITING], Readiness.BLOCKED),
        ([FAILED], Readiness.DOOMED),
        ([CANCELED], Readiness.DOOMED),
        ([SKIPPED], Readiness.DOOMED),
        ([RUNNING, FAILED], Readiness.DOOMED),
        ([SUCCESS, SKIPPED], Readiness.DOOMED),
    ],
)
def test_readiness(need_states: list[State], expected: Readiness) -> None:
    """Ready when every need succeeded, doomed as soon as one failed, was canceled or skipped,
    else blocked."""
    assert readiness(need_states) is expected


# --- derive_state, rule by rule ---------------------------------------------------------


def job(
    name: str,
    state: State,
    *,
    kind: Kind = SCRIPT,
    is_async: bool = False,
    needs: tuple[str, ...] = (),
    started: bool | None = None,
) -> JobStatus:
    if started is None:
        started = state in (RUNNING, WAITING)
    return JobStatus(
        name=name, kind=kind, is_async=is_async, state=state, started=started, needs=needs
    )


def test_canceled_wins_over_everything_after_a_cancel() -> None:
    """After a pipeline cancel the state is canceled, even if every job succeeded or one
    failed."""
    for jobs in (
        [job("a", SUCCESS)],
        [job("a", FAILED), job("b", SKIPPED, needs=("a",))],
        [job("a", RUNNING)],
        [job("a", PENDING, kind=EXT)],
    ):
        assert derive_state(jobs, canceled=True) is PipelineState.CANCELED


def test_all_succeeded_is_success() -> None:
    """Every job ended in success -> success."""
    jobs = [job("a", SUCCESS, started=True), job("b", SUCCESS, needs=("a",), started=True)]
    assert derive_state(jobs, canceled=False) is PipelineState.SUCCESS


def test_skipped_jobs_are_aside_for_success() -> None:
    """Skipped jobs do not spoil success: success and skipped only -> success."""
    jobs = [job("a", SUCCESS, started=True), job("b", SKIPPED)]
    assert derive_state(jobs, canceled=False) is PipelineState.SUCCESS


def test_one_failed_among_ended_is_failed() -> None:
    """All ended and one failed -> failed (a canceled job beside it does not change that)."""
    jobs = [
        job("a", SUCCESS, started=True),
        job("b", FAILED, started=True),
        job("c", SKIPPED, needs=("b",)),
        job("d", CANCELED),
    ]
    assert derive_state(jobs, canceled=False) is PipelineState.FAILED


def test_a_canceled_job_without_failure_ends_canceled() -> None:
    """All ended, none failed, one job canceled on its own -> canceled (a cancel happened), not
    success."""
    jobs = [job("a", SUCCESS, started=True), job("b", CANCELED), job("c", SKIPPED, needs=("b",))]
    assert derive_state(jobs, canceled=False) is PipelineState.CANCELED


def test_failed_job_with_unfinished_others_is_not_terminal() -> None:
    """A failure does not end the pipeline while another job is still running."""
    jobs = [job("a", FAILED, started=True), job("b", RUNNING)]
    assert derive_state(jobs, canceled=False) is PipelineState.RUNNING


@pytest.mark.parametrize(
    "parked",
    [
        job("ext", PENDING, kind=EXT),
        job("ext", RUNNING, kind=EXT),
        job("async", WAITING, is_async=True),
    ],
    ids=["external-pending", "external-running", "async-waiting"],
)
def test_only_parked_jobs_left_is_waiting(parked: JobStatus) -> None:
    """Every unfinished job parked (external pending/running, async waiting) -> waiting."""
    jobs = [job("build", SUCCESS, started=True), parked]
    assert derive_state(jobs, canceled=False) is PipelineState.WAITING


def test_jobs_behind_a_parked_one_still_count_as_waiting() -> None:
    """Created jobs behind a parked one, directly or through other created jobs -> waiting."""
    jobs = [
        job("build", SUCCESS, started=True),
        job("provision", WAITING, is_async=True, needs=("build",)),
        job("deploy", CREATED, needs=("provision",)),
        job("smoke", CREATED, needs=("deploy",)),
    ]
    assert derive_state(jobs, canceled=False) is PipelineState.WAITING


def test_external_jobs_alone_are_waiting_from_the_start() -> None:
    """A pipeline of one external job and its downstream is waiting from creation (the
    waiting rule comes before pending)."""
    jobs = [job("approve", PENDING, kind=EXT), job("deploy", CREATED, needs=("approve",))]
    assert derive_state(jobs, canceled=False) is PipelineState.WAITING


@pytest.mark.parametrize(
    "others",
    [
        [job("tests", PENDING)],
        [job("tests", RUNNING)],
        [job("tests", RUNNING, is_async=True)],
        [job("tests", PENDING, is_async=True)],
        [job("tests", RUNNING), job("report", CREATED, needs=("tests",))],
    ],
    ids=["script-pending", "script-running", "async-running", "async-pending", "created-behind"],
)
def test_an_unparked_unfinished_job_prevents_waiting(others: list[JobStatus]) -> None:
    """A parked job beside an unfinished job that is neither parked nor behind one is not
    waiting."""
    jobs = [job("approve", RUNNING, kind=EXT, started=True), *others]
    assert derive_state(jobs, canceled=False) is PipelineState.RUNNING


def test_created_behind_an_unparked_job_is_not_waiting_even_with_parked_elsewhere() -> None:
    """A created job that needs only a running script job is not behind a parked one."""
    jobs = [
        job("approve", RUNNING, kind=EXT, started=True),
        job("build", RUNNING),
        job("deploy", CREATED, needs=("build",)),
    ]
    assert derive_state(jobs, canceled=False) is PipelineState.RUNNING


def test_pending_while_no_job_started() -> None:
    """Script jobs pending or created and none started -> pending."""
    jobs = [job("build", PENDING), job("test", CREATED, needs=("build",))]
    assert derive_state(jobs, canceled=False) is PipelineState.PENDING


def test_an_ended_job_counts_as_started() -> None:
    """Once a job ended (even one that never ran), the pipeline is no longer pending."""
    jobs = [job("a", SUCCESS, kind=EXT, started=False), job("b", PENDING, needs=("a",))]
    assert derive_state(jobs, canceled=False) is PipelineState.RUNNING


def test_running_otherwise() -> None:
    """A job running and others waiting for it -> running."""
    jobs = [job("build", RUNNING), job("test", CREATED, needs=("build",))]
    assert derive_state(jobs, canceled=False) is PipelineState.RUNNING


def test_terminal_property() -> None:
    """Only success, failed and canceled end a pipeline."""
    assert {s for s in PipelineState if s.terminal} == {
        PipelineState.SUCCESS,
        PipelineState.FAILED,
        PipelineState.CANCELED,
    }


# --- derive_state against an oracle over random DAGs ------------------------------------


def _parked(status: JobStatus) -> bool:
    if status.kind is EXT:
        return status.state in (PENDING, RUNNING)
    return status.is_async and status.state is WAITING


def expected_state(jobs: Sequence[JobStatus], canceled: bool) -> PipelineState:
    """PRODUCT.md "Pipeline state", first rule that holds, written independently."""
    if canceled:
        return PipelineState.CANCELED
    states = [j.state for j in jobs]
    if all(s in TERMINAL_STATES for s in states):
        if FAILED in states:
            return PipelineState.FAILED
        return PipelineState.CANCELED if CANCELED in states else PipelineState.SUCCESS
    by_name = {j.name: j for j in jobs}

    def upstream(name: str) -> set[str]:
        found: set[str] = set()
        stack = list(by_name[name].needs)
        while stack:
            current = stack.pop()
            if current not in found:
                found.add(current)
                stack.extend(by_name[current].needs)
        return found

    def behind_parked(j: JobStatus) -> bool:
        return j.state is CREATED and any(_parked(by_name[u]) for u in upstream(j.name))

    unfinished = [j for j in jobs if j.state not in TERMINAL_STATES]
    if all(_parked(j) or behind_parked(j) for j in unfinished):
        return PipelineState.WAITING
    if not any(j.started or j.state in TERMINAL_STATES for j in jobs):
        return PipelineState.PENDING
    return PipelineState.RUNNING


# The states each flavor can be in, and whether `started` (started_at set) can go with it.
_FLAVOR_STATES = {
    (EXT, False): [CREATED, PENDING, RUNNING, SUCCESS, FAILED, CANCELED, SKIPPED],
    (SCRIPT, False): [CREATED, PENDING, RUNNING, SUCCESS, FAILED, CANCELED, SKIPPED],
    (SCRIPT, True): [CREATED, PENDING, RUNNING, WAITING, SUCCESS, FAILED, CANCELED, SKIPPED],
}


@st.composite
def pipelines(draw: st.DrawFn) -> list[JobStatus]:
    needs = draw(dags(max_jobs=6))
    jobs = []
    for name, wanted in needs.items():
        kind, is_async = draw(st.sampled_from(sorted(_FLAVOR_STATES)))
        state = draw(st.sampled_from(_FLAVOR_STATES[kind, is_async]))
        if state in (RUNNING, WAITING):
            started = True
        elif state in (CREATED, PENDING, SKIPPED):
            started = False
        else:
            started = draw(st.booleans())
        jobs.append(
            JobStatus(
                name=name,
                kind=kind,
                is_async=is_async,
                state=state,
                started=started,
                needs=tuple(wanted),
            )
        )
    return jobs


@settings(max_examples=600, deadline=None)
@given(jobs=pipelines(), canceled=st.booleans())
def test_derived_state_follows_the_rules_in_order(jobs: list[JobStatus], canceled: bool) -> None:
    """For random DAGs and job states, derive_state equals the first PRODUCT.md rule that
    holds."""
    assert derive_state(jobs, canceled=canceled) is expected_state(jobs, canceled)


@settings(max_examples=300, deadline=None)
@given(jobs=pipelines())
def test_derived_state_precedence_invariants(jobs: list[JobStatus]) -> None:
    """Invariants of the precedence: terminal iff every job ended (or canceled); waiting
    implies some job is parked; pending implies nothing started or ended; a cancel wins."""
    state = derive_state(jobs, canceled=False)
    all_ended = all(j.state.terminal for j in jobs)
    assert state.terminal == all_ended
    if state is PipelineState.WAITING:
        assert any(_parked(j) for j in jobs)
    if state is PipelineState.PENDING:
        assert not any(j.started or j.state.terminal for j in jobs)
        assert not all(_parked(j) for j in jobs if not j.state.terminal)
    if state is PipelineState.SUCCESS:
        assert all(j.state in (SUCCESS, SKIPPED) for j in jobs)
    assert derive_state(jobs, canceled=True) is PipelineState.CANCELED
