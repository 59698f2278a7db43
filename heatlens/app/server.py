"""The web app: one page (``heatlens/app/static``) and a JSON API, documented at ``/docs``.

Routes (all answers JSON; an error is ``{"error": "..."}`` with a 4xx status that says what
kind: 400 a bad request, 403 a file outside its folder, 404 an unknown image, job, run or row,
413 an upload over the limits, 415 not an image, 422 a wrong method, class or layer)::

    GET    /api/info                    the model, its methods by family, layers, limits
    GET    /api/sample                  the packaged sample photo
    POST   /api/images                  an image file's bytes as the body: its top-5 classes
    POST   /api/explain                 a map (waits for it)
    POST   /api/trust                   its deletion and insertion scores, and a random map's
    POST   /api/jobs                    a map or its scores as a job: progress, cancel
    GET    /api/jobs/{job}              the job's progress, and its result when done
    DELETE /api/jobs/{job}              cancel it
    GET    /api/runs                    the data-set runs of --runs
    GET    /api/runs/{run}/rows         a run's rows, filtered, sorted, a page at a time
    GET    /api/runs/{run}/rows/{row}   a row with its image and every method's map of it

Computations on the model run one at a time on the queue of :mod:`heatlens.app.jobs`; the
server's event loop only waits for them, so the page, the job polls and the run browser stay
responsive while a Score-CAM runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from heatlens import __version__
from heatlens.app.jobs import Job
from heatlens.app.runs import PAGE, RunShelf
from heatlens.app.workbench import DEFAULT_METHODS, FAMILIES, TRUST_METRICS, TRUST_STEP, Workbench
from heatlens.loading.images import ImageError, sample_image_path
from heatlens.pictures.overlays import colormap

STATIC = Path(__file__).parent / "static"
COLORMAPS = ("jet", "turbo", "viridis", "inferno", "magma", "gray")
"""Colour maps offered by the page, sent as 256-entry tables (matplotlib's) so the page colours
maps exactly as ``Explanation.overlay`` does."""
MAX_WAIT = 30.0
"""Longest a job request waits for its result before answering with the job's progress."""


class MapRequest(BaseModel):
    """A map to compute: an uploaded image, a method, a class (default: the top class) and a
    layer (``"auto"``: the method's automatic choice; only CAM methods take a layer)."""

    image: str = Field(description="the id returned by POST /api/images")
    method: str = Field("gradcam", description="a method name or alias (see /api/info)")
    target: int | None = Field(None, description="a class index; default: the top class")
    layer: str = Field("auto", description="a layer name from /api/info, or 'auto'")


class JobRequest(MapRequest):
    """A map (``kind="explain"``) or its faithfulness scores (``kind="trust"``) as a job."""

    kind: Literal["explain", "trust"] = "explain"
    wait: float = Field(0.0, ge=0.0, le=MAX_WAIT,
                        description="seconds to wait for the result before answering")


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def create_app(workbench: Workbench, runs: RunShelf | None = None, *,
               hosts: Sequence[str] | None = None) -> FastAPI:
    """The app around a started :class:`~heatlens.app.workbench.Workbench` (and the runs of
    ``--runs``).

    ``hosts``: the only names a request's ``Host`` header may give (``heatlens serve`` on
    loopback passes :data:`LOOPBACK_NAMES`), so that a web page whose name was pointed at this
    machine (DNS rebinding) cannot read the app's answers; ``None`` accepts any."""
    app = FastAPI(title="heatlens", version=__version__,
                  summary="Why did the vision model say that? Maps, side by side, and how "
                          "faithful each is.")
    if hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))
    app.state.workbench = workbench
    _errors(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        """The model, the methods by family, the layers, the limits and the colour maps."""
        return {
            "version": __version__, "model": workbench.loaded.name,
            "input_size": workbench.loaded.preset.crop,
            "methods": workbench.methods(), "families": list(FAMILIES),
            "default_methods": list(DEFAULT_METHODS), "layers": workbench.layers,
            "limits": {"bytes": workbench.max_bytes, "pixels": workbench.max_pixels},
            "trust": {"metrics": list(TRUST_METRICS), "step": TRUST_STEP},
            "colormaps": {name: _table(name) for name in COLORMAPS},
            "runs": runs is not None,
        }

    @app.get("/api/sample", response_class=FileResponse)
    async def sample() -> FileResponse:
        """The packaged sample photo (scikit-image's cat "chelsea")."""
        return FileResponse(sample_image_path(), media_type="image/jpeg")

    @app.post("/api/images", status_code=201, openapi_extra={"requestBody": {
        "required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}})
    async def upload(request: Request, name: str = Query("upload", max_length=255)
                     ) -> dict[str, Any]:
        """Send an image file's bytes as the body (``curl --data-binary @cat.jpg``); the
        answer names the upload (``image``) and its top-5 classes. Decoded in memory, never
        written; refused over the byte or pixel limit, or when it is not an image."""
        data = await _body(request, workbench.max_bytes)
        image = await run_in_threadpool(workbench.decode, data)
        job = workbench.jobs.submit("image", lambda: workbench.upload(image, name))
        return (await asyncio.wrap_future(job.future)).as_json()

    @app.post("/api/explain")
    async def explain(body: MapRequest) -> dict[str, Any]:
        """The map of a method for an uploaded image and class: float32 values in [0, 1] at
        the model's input size, base64-encoded (little-endian, row by row)."""
        request = workbench.request(body.image, body.method, body.target, body.layer)
        return await _answer(workbench.jobs.submit("explain",
                                                   lambda: workbench.map_of(request)))

    @app.post("/api/trust")
    async def trust(body: MapRequest) -> dict[str, Any]:
        """Deletion (lower is better) and insertion (higher is better) scores of the map, and
        a random map's, at 5 % a step."""
        request = workbench.request(body.image, body.method, body.target, body.layer)
        return await _answer(workbench.jobs.submit("trust",
                                                   lambda: workbench.trust_of(request)))

    @app.post("/api/jobs", status_code=202)
    async def submit(body: JobRequest) -> dict[str, Any]:
        """Queue a map or its scores; the answer is the job's progress (with the result when
        it finished within ``wait`` seconds)."""
        request = workbench.request(body.image, body.method, body.target, body.layer)
        work: Callable[[], Any] = (workbench.map_of if body.kind == "explain"
                                   else workbench.trust_of)
        job = workbench.jobs.submit(body.kind, lambda: work(request))
        return await _status(workbench, job, body.wait)

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: str, wait: float = Query(0.0, ge=0.0, le=MAX_WAIT)
                         ) -> dict[str, Any]:
        """A job's progress (``done`` of ``total`` steps), and its result once done."""
        return await _status(workbench, _job(workbench, job_id), wait)

    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one never starts, a running one stops at its next step."""
        job = _job(workbench, job_id)
        workbench.jobs.cancel(job)
        return await _status(workbench, job, 0.0)

    @app.get("/api/runs")
    async def run_list() -> list[dict[str, Any]]:
        """The data-set runs being browsed (``heatlens serve --runs DIR``)."""
        return await run_in_threadpool(_shelf(runs).listing)

    @app.get("/api/runs/{run}/rows")
    async def run_rows(run: str, label: str | None = None, predicted: str | None = None,
                       correct: bool | None = None, method: str | None = None,
                       sort: str | None = None, descending: bool = False,
                       offset: int = Query(0, ge=0),
                       limit: int = Query(PAGE, ge=1, le=1000)) -> dict[str, Any]:
        """A page of the run's rows: filter by true or predicted class, right or wrong and
        method; sort by a metric."""
        return await run_in_threadpool(
            lambda: _shelf(runs).rows(run, label=label, predicted=predicted, correct=correct,
                                      method=method, sort=sort, descending=descending,
                                      offset=offset, limit=limit))

    @app.get("/api/runs/{run}/rows/{row}")
    async def run_entry(run: str, row: int) -> dict[str, Any]:
        """One row with its image (as the model saw it) and every method's map of it."""
        return await run_in_threadpool(lambda: _shelf(runs).entry(run, row))

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 as soon as it is over ``limit`` bytes (by its
    declared length before reading, and while reading)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send the image file's bytes as the body (curl --data-binary "
                                 "@cat.jpg), not a form")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the upload is {int(declared):,} bytes, more than the limit "
                                 f"of {limit:,}")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HTTPException(413, f"the upload is more than the limit of {limit:,} bytes")
    return bytes(data)


async def _answer(job: Job) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.wrap_future(job.future)
    return result


async def _status(workbench: Workbench, job: Job, wait: float) -> dict[str, Any]:
    if wait > 0 and not job.future.done():
        await asyncio.wait({asyncio.wrap_future(job.future)}, timeout=wait)
    status = job.status(workbench.jobs.position(job))
    if job.state == "done":
        status["result"] = job.future.result()
    return status


def _job(workbench: Workbench, job_id: str) -> Job:
    job = workbench.jobs.get(job_id)
    if job is None:
        raise KeyError(f"no job {job_id!r} (finished jobs are kept while recent)")
    return job


def _shelf(runs: RunShelf | None) -> RunShelf:
    if runs is None:
        raise KeyError("no runs are served: start the app with `heatlens serve --runs DIR`")
    return runs


def _table(name: str) -> list[list[int]]:
    """A colour map's 256 RGB entries, as ``Explanation.overlay`` uses them."""
    return colormap(name)(range(256), bytes=True)[:, :3].tolist()


def _errors(app: FastAPI) -> None:
    """Errors become ``{"error": message}`` with the status that says what kind."""

    def handler(status: int | Callable[[Exception], int]) -> Callable[..., Any]:
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            code = status(exc) if callable(status) else status
            return JSONResponse({"error": " ".join(_message(exc).split())}, status_code=code)
        return handle

    app.add_exception_handler(HTTPException, handler(lambda exc: exc.status_code))
    app.add_exception_handler(RequestValidationError, handler(422))
    app.add_exception_handler(ImageError, handler(
        lambda exc: 413 if exc.kind == "too many pixels" else 415))
    app.add_exception_handler(KeyError, handler(404))
    app.add_exception_handler(IndexError, handler(404))
    app.add_exception_handler(PermissionError, handler(403))
    app.add_exception_handler(ValueError, handler(422))
    app.add_exception_handler(TypeError, handler(422))
    app.add_exception_handler(RuntimeError, handler(422))  # a method that cannot run here


def _message(exc: Exception) -> str:
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    if isinstance(exc, RequestValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                         for error in exc.errors())
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)
