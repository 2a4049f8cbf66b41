"""Model-management routes for the console: catalog, local models, downloads, switch.

``add_model_routes(app, backend)`` adds ``GET /api/models``,
``POST /api/models/download`` (202; progress as SSE ``download`` events via
``backend.publish``), ``GET /api/downloads`` and ``POST /api/models/switch``.
Blocking work (hashing, HTTP) runs in threads. Add them to an app made by
``gateway.create_app``: its guard (security.py) lets only a logged-in
console (or a bearer of the console token) reach any of them, and only with
JSON bodies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from mesh_inference.api.openai import openai_error
from mesh_inference.models.download import DownloadProgress, download_model
from mesh_inference.models.refs import ModelError, list_local_models, load_catalog, resolve_model

log = logging.getLogger(__name__)
DOWNLOADS_KEY: web.AppKey[dict[str, DownloadProgress]] = web.AppKey("downloads")
TASKS_KEY: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("download_tasks")
MODELS_BACKEND_KEY: web.AppKey[Any] = web.AppKey("models_backend")


class ModelsBackend(Protocol):
    def models_dir(self) -> Path: ...
    def current_model(self) -> str | None: ...
    async def switch_model(self, ref: str) -> None: ...
    def publish(self, event: str, data: dict[str, Any]) -> None: ...


def _bad(message: str, param: str = "ref") -> web.Response:
    return openai_error(400, message, "invalid_request_error", "invalid_request", param)


async def _ref_from(request: web.Request) -> str | web.Response:
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, ValueError):
        return _bad("request body is not valid JSON", "body")
    if not isinstance(body, dict) or not isinstance(body.get("ref"), str) or not body["ref"]:
        return _bad("body must be an object with a non-empty string 'ref'")
    ref: str = body["ref"].strip()
    if len(ref) > 1024:
        return _bad("'ref' is too long")
    return ref


async def list_models(request: web.Request) -> web.Response:
    backend: ModelsBackend = request.app[MODELS_BACKEND_KEY]
    models_dir = backend.models_dir()

    def collect() -> dict[str, Any]:
        catalog = []
        for e in load_catalog():
            try:
                local = resolve_model(e.name, models_dir).path is not None
            except ModelError:
                local = False
            catalog.append({
                "name": e.name, "display_name": e.display_name, "size_bytes": e.size_bytes,
                "size_approx": e.size_approx, "quant": e.quant, "params": e.params,
                "license": e.license, "description": e.description, "local": local,
            })
        local_models = [{"name": m.name, "path": str(m.path), "size_bytes": m.size_bytes}
                        for m in list_local_models(models_dir)]
        return {"catalog": catalog, "local": local_models}

    data = await asyncio.to_thread(collect)
    data["current"] = backend.current_model()
    return web.json_response(data)


async def start_download(request: web.Request) -> web.Response:
    backend: ModelsBackend = request.app[MODELS_BACKEND_KEY]
    ref = await _ref_from(request)
    if isinstance(ref, web.Response):
        return ref
    try:
        resolved = resolve_model(ref, backend.models_dir())
    except ModelError as exc:
        return _bad(str(exc))
    if resolved.hf is None:
        return _bad(f"{ref!r} is a local file; there is nothing to download")
    downloads = request.app[DOWNLOADS_KEY]
    current = downloads.get(ref)
    if current is not None and not current.done:
        return openai_error(409, f"{ref} is already downloading", "invalid_request_error",
                            "already_downloading", "ref")
    loop = asyncio.get_running_loop()

    def report(p: DownloadProgress) -> None:
        # Called from the download thread: hop to the loop.
        loop.call_soon_threadsafe(publish, p)

    def publish(p: DownloadProgress) -> None:
        downloads[ref] = p
        backend.publish("download", {"ref": ref, **asdict(p)})

    async def run() -> None:
        publish(DownloadProgress(resolved.name, 0, resolved.size_bytes))
        try:
            await asyncio.to_thread(download_model, resolved, backend.models_dir(),
                                    progress=report)
        except ModelError as exc:
            log.warning("download of %s failed: %s", ref, exc)
            publish(DownloadProgress(resolved.name, 0, resolved.size_bytes, True, str(exc)))

    task = asyncio.ensure_future(run())
    request.app[TASKS_KEY].add(task)
    task.add_done_callback(request.app[TASKS_KEY].discard)
    downloads[ref] = DownloadProgress(resolved.name, 0, resolved.size_bytes)
    return web.json_response({"ref": ref, "status": "started"}, status=202)


async def list_downloads(request: web.Request) -> web.Response:
    return web.json_response(
        {ref: asdict(p) for ref, p in request.app[DOWNLOADS_KEY].items()}
    )


async def switch(request: web.Request) -> web.Response:
    backend: ModelsBackend = request.app[MODELS_BACKEND_KEY]
    ref = await _ref_from(request)
    if isinstance(ref, web.Response):
        return ref
    try:
        await backend.switch_model(ref)
    except ValueError as exc:
        return _bad(str(exc))
    return web.json_response({"ref": ref, "status": "switching"}, status=202)


def add_model_routes(app: web.Application, backend: ModelsBackend) -> None:
    app[MODELS_BACKEND_KEY] = backend
    app[DOWNLOADS_KEY] = {}
    app[TASKS_KEY] = set()

    async def cancel_downloads(app: web.Application) -> None:
        tasks: set[asyncio.Task[None]] = app[TASKS_KEY]
        for task in list(tasks):
            task.cancel()

    app.on_shutdown.append(cancel_downloads)
    app.router.add_get("/api/models", list_models)
    app.router.add_post("/api/models/download", start_download)
    app.router.add_get("/api/downloads", list_downloads)
    app.router.add_post("/api/models/switch", switch)
