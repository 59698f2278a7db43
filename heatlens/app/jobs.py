"""One computation per model at a time: a queue of jobs, one worker thread, progress and cancel.

Every piece of work on the model (the top-5 of an upload, a map, its faithfulness scores) is a
:class:`Job`, run in the order it came by the queue's single worker thread, so requests never
share the model at the same moment and a result belongs to the job that made it. A job reports
its steps through :func:`heatlens.engine.budget.watched`, which is also where cancelling stops a
running job (at its next step); a queued job that is cancelled never starts.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from heatlens.engine.budget import watched

KEPT_JOBS = 256
"""Finished jobs remembered for their owners to collect; older ones are forgotten first."""


class Cancelled(Exception):
    """The job was cancelled by its owner."""


@dataclass
class Job:
    """A piece of work on the model and what is known of it.

    Attributes:
        id: the job's name in the API.
        kind: what it computes (``"explain"``, ``"trust"``, ``"image"``).
        state: ``"queued"``, ``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``.
        done, total: steps of its longest loop so far (``total`` 0 when it has none).
        future: resolves to the result, or raises the job's error.
    """

    id: str
    kind: str
    work: Callable[[], Any] = field(repr=False)
    number: int = 0
    state: str = "queued"
    done: int = 0
    total: int = 0
    stage: str = ""
    started: float = 0.0
    seconds: float = 0.0
    cancel_requested: bool = False
    future: Future[Any] = field(default_factory=Future, repr=False)

    def status(self, position: int) -> dict[str, Any]:
        """What the API says of the job (its result is added by the caller when done)."""
        status: dict[str, Any] = {"job": self.id, "kind": self.kind, "state": self.state,
                                  "done": self.done, "total": self.total, "stage": self.stage,
                                  "seconds": round(self.seconds if self.state != "running"
                                                   else time.perf_counter() - self.started, 3)}
        if self.state == "queued":
            status["position"] = position
        if self.state == "failed":
            status["error"] = str(self.future.exception())
        return status


class JobQueue:
    """Jobs run one at a time, in order, by one worker thread (started with the queue)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._finished = 0
        self._worker = threading.Thread(target=self._run, name="heatlens-model", daemon=True)
        self._worker.start()

    def submit(self, kind: str, work: Callable[[], Any]) -> Job:
        """Queue ``work`` (called with no arguments on the worker thread); returns its job."""
        job = Job(uuid.uuid4().hex, kind, work, next(self._numbers))
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        """The job called ``job_id``, if it is still known."""
        with self._lock:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """How many jobs run before ``job`` starts (0: it is next or running)."""
        with self._lock:
            return sum(1 for other in self._jobs.values()
                       if other.state in ("queued", "running") and other.number < job.number)

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a queued job never starts, a running one stops at its next step."""
        job.cancel_requested = True
        if job.state == "queued" and job.future.cancel():
            job.state = "cancelled"

    def close(self) -> None:
        """Cancel what is queued and let the worker thread end after its current job."""
        with self._lock:
            waiting = [job for job in self._jobs.values() if job.state == "queued"]
        for job in waiting:
            self.cancel(job)
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _forget_old(self) -> None:
        finished = [key for key, job in self._jobs.items()
                    if job.state in ("done", "failed", "cancelled")]
        for key in finished[:max(0, len(finished) - KEPT_JOBS)]:
            del self._jobs[key]

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            job.state, job.started = "running", time.perf_counter()
            try:
                with watched(lambda done, total, stage, job=job: self._step(job, done, total,
                                                                           stage)):
                    result = job.work()
            except Cancelled as exc:
                job.state = "cancelled"
                job.future.set_exception(exc)
            except Exception as exc:  # the job's error is its owner's answer
                job.state = "failed"
                job.future.set_exception(exc)
            else:
                job.state = "done"
                job.future.set_result(result)
            finally:
                job.seconds = time.perf_counter() - job.started
                job.work = _spent  # drop what the work held (the upload, the model's tensors)

    @staticmethod
    def _step(job: Job, done: int, total: int, stage: str) -> None:
        job.done, job.total, job.stage = done, total, stage
        if job.cancel_requested:
            raise Cancelled(f"the {job.kind} job was cancelled")


def _spent() -> None:
    """The work of a finished job, which must not run again."""
    raise RuntimeError("this job has already run")
