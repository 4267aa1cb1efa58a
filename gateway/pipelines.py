"""Pipelines as a DAG of named jobs: validation, stages, readiness and the derived state. Pure.

A job runs once every job it `needs` succeeded; a failed, canceled or skipped need skips it.
The pipeline's state is derived from its jobs' latest attempts (PRODUCT.md "Pipeline state").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import InvalidField
from gateway.states import Kind, State


class PipelineState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (PipelineState.SUCCESS, PipelineState.FAILED, PipelineState.CANCELED)


class Readiness(StrEnum):
    READY = "ready"  # every need succeeded
    BLOCKED = "blocked"  # a need has not finished yet
    DOOMED = "doomed"  # a need failed, was canceled or skipped


def check_dag(needs: Mapping[str, Sequence[str]]) -> list[str]:
    """The job names in an order where every job comes after what it needs.

    Raises InvalidField naming the culprit for an unknown need, a job needing itself, a need
    listed twice, or a cycle (with its path).
    """
    for name, wanted in needs.items():
        seen: set[str] = set()
        for need in wanted:
            if need == name:
                raise InvalidField(f"job `{name}` needs itself")
            if need not in needs:
                raise InvalidField(f"job `{name}` needs `{need}`, which is not in the pipeline")
            if need in seen:
                raise InvalidField(f"job `{name}` lists `{need}` twice in `needs`")
            seen.add(need)
    order: list[str] = []
    done: set[str] = set()
    # Depth-first without recursion: a long chain of needs must not hit the recursion limit.
    for root in needs:
        if root in done:
            continue
        path, on_path, unvisited = [root], {root}, [iter(needs[root])]
        while path:
            upstream = next(unvisited[-1], None)
            if upstream is None:
                finished = path.pop()
                unvisited.pop()
                on_path.discard(finished)
                done.add(finished)
                order.append(finished)
            elif upstream in on_path:
                cycle = [*path[path.index(upstream) :], upstream]
                path_text = " -> ".join(f"`{n}`" for n in cycle)
                raise InvalidField(f"job `{upstream}` is in a cycle of needs: {path_text}")
            elif upstream not in done:
                path.append(upstream)
                on_path.add(upstream)
                unvisited.append(iter(needs[upstream]))
    return order


def stages(needs: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each job's stage: the length of the longest `needs` path leading to it (0 for roots)."""
    stage: dict[str, int] = {}
    for name in check_dag(needs):
        stage[name] = 1 + max((stage[need] for need in needs[name]), default=-1)
    return stage


def downstream(needs: Mapping[str, Sequence[str]], name: str) -> set[str]:
    """Every job that needs `name`, directly or not."""
    found: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for other, wanted in needs.items():
            if current in wanted and other not in found:
                found.add(other)
                frontier.append(other)
    return found


def readiness(need_states: Sequence[State]) -> Readiness:
    """Whether a `created` job can become pending, given the states of what it needs."""
    if any(s in (State.FAILED, State.CANCELED, State.SKIPPED) for s in need_states):
        return Readiness.DOOMED
    if all(s is State.SUCCESS for s in need_states):
        return Readiness.READY
    return Readiness.BLOCKED


@dataclass(frozen=True)
class JobStatus:
    """What the pipeline's state needs to know of one job (its latest attempt)."""

    name: str
    kind: Kind
    is_async: bool
    state: State
    started: bool
    needs: tuple[str, ...] = ()

    @property
    def parked(self) -> bool:
        """Waiting on a callback: an external job pending or running, an async job waiting."""
        if self.kind is Kind.EXTERNAL:
            return self.state in (State.PENDING, State.RUNNING)
        return self.state is State.WAITING


def derive_state(jobs: Sequence[JobStatus], *, canceled: bool) -> PipelineState:
    """The pipeline's state; the first rule that holds wins."""
    if canceled:
        return PipelineState.CANCELED
    unfinished = [job for job in jobs if not job.state.terminal]
    if not unfinished:
        if any(job.state is State.FAILED for job in jobs):
            return PipelineState.FAILED
        if any(job.state is State.CANCELED for job in jobs):
            return PipelineState.CANCELED
        return PipelineState.SUCCESS
    behind = _behind_parked(jobs)
    if all(job.parked or (job.state is State.CREATED and behind[job.name]) for job in unfinished):
        return PipelineState.WAITING
    if not any(job.started or job.state.terminal for job in jobs):
        return PipelineState.PENDING
    return PipelineState.RUNNING


def _behind_parked(jobs: Sequence[JobStatus]) -> dict[str, bool]:
    """For every job, whether something it needs (directly or not) is parked; one pass over
    the DAG in needs-first order, so a pipeline costs linear time."""
    by_name = {job.name: job for job in jobs}
    needs = {job.name: [n for n in job.needs if n in by_name] for job in jobs}
    behind: dict[str, bool] = {}
    for name in check_dag(needs):
        behind[name] = any(by_name[n].parked or behind[n] for n in needs[name])
    return behind
