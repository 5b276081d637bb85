"""The FastAPI layer: JSON API + the static page; every error becomes a 4xx JSON message.

Endpoints (all JSON unless noted): ``GET /`` the page; ``GET /api/config``; ``GET /api/cases``;
``GET /api/state`` (progress and the current edit, polled by the page while an edit runs);
``POST /api/edit``; ``POST /api/probe``; ``POST /api/revert``; ``GET /api/download/{edit,
adapters,model}`` (files: ``.safetensors`` or a zip of the exported model directory).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from repedit.errors import RepeditError
from repedit.serve.limits import EditParams, ProbeParams
from repedit.serve.session import Playground

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise RepeditError(f"request body larger than {MAX_BODY} bytes")
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RepeditError(f"malformed JSON: {exc}") from None


def _download(pg: Playground, what: str) -> FileResponse:
    """Write the current edit's ``what`` to a temp dir; the response deletes it when sent."""
    from repedit.rep import export_with_rep, save_adapters

    tmp = Path(tempfile.mkdtemp(prefix="repedit-serve-"))
    cleanup = BackgroundTask(shutil.rmtree, tmp, ignore_errors=True)
    with pg.lock:
        cur = pg.current
        if cur is None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RepeditError("no current edit to download")
        if what == "edit":
            path = cur.result.save(tmp / "edit.safetensors")
        elif what == "adapters":
            if not cur.adapters:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RepeditError("the current edit has no REP adapters (edit with REP on)")
            path = save_adapters(
                tmp / "edit.rep.safetensors", cur.adapters, fingerprint=pg.lm.fingerprint
            )
        else:
            out = tmp / "edited-model"
            if cur.adapters:
                export_with_rep(pg.lm, cur.result, cur.adapters, out)
            else:
                cur.result.export(pg.lm, out)
            path = Path(shutil.make_archive(str(tmp / "edited-model"), "zip", out))
    return FileResponse(path, filename=path.name, background=cleanup)


def create_app(pg: Playground) -> FastAPI:
    """The app serving ``pg`` (sync endpoints run in a thread pool; ``pg.lock`` orders them)."""
    app = FastAPI(title="repedit playground", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RepeditError)
    async def _bad_input(request: Request, exc: RepeditError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {exc.__class__.__name__}: {exc}")

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return pg.config()

    @app.get("/api/cases")
    def cases() -> list[dict[str, Any]]:
        return pg.case_list()

    @app.get("/api/state")
    def state() -> dict[str, Any]:
        return pg.state()

    @app.post("/api/edit")
    async def edit(request: Request) -> Any:
        params = EditParams.parse(await _body(request))
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(pg.edit, params)

    @app.post("/api/probe")
    async def probe(request: Request) -> Any:
        params = ProbeParams.parse(await _body(request))
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(pg.probe, params)

    @app.post("/api/revert")
    async def revert(request: Request) -> Any:
        body = await _body(request)
        if body not in (None, {}):
            raise RepeditError("/api/revert takes no fields (send {} or nothing)")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(pg.revert)

    @app.get("/api/download/{what}")
    def download(what: str) -> FileResponse:
        if what not in ("edit", "adapters", "model"):
            raise RepeditError("download 'edit', 'adapters' or 'model'")
        return _download(pg, what)

    return app
