"""create_app(): the HTTP server over one loaded model; serve(): run it with uvicorn."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

import quantpress
from quantpress.errors import CheckpointError
from quantpress.prompts import chat_formatter
from quantpress.models.skeleton import keep_freed_memory_small
from quantpress.runtime.engine import Engine
from quantpress.runtime.loader import LoadedModel, load
from quantpress.server import openai_api, tgi
from quantpress.server.body import BodySizeLimit
from quantpress.server.errors import install_handlers
from quantpress.server.metrics import Metrics
from quantpress.server.settings import ServerSettings, resolve_limits
from quantpress.server.state import ServerState

log = logging.getLogger(__name__)


def create_app(loaded: LoadedModel, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `loaded`; its engine starts and stops with the app's lifespan."""
    settings = settings or ServerSettings()
    if loaded.tokenizer is None:
        raise CheckpointError(f"{loaded.path} has no tokenizer files; the server cannot encode prompts")
    limits = resolve_limits(loaded, settings)
    engine = Engine(loaded, max_batch_size=limits.max_batch_size,
                    max_concurrent_requests=limits.max_concurrent_requests, batch_invariant=settings.batch_invariant)
    metrics = Metrics(limits.max_input_tokens, limits.max_total_tokens, lambda: engine.stats)
    state = ServerState(loaded, limits, engine, chat_formatter(loaded, settings.template), metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        state.running = True
        log.info("serving %s (chat format %s)", limits.model_id, state.formatter.name)
        try:
            yield
        finally:
            state.running = False
            engine.close()

    app = FastAPI(title="quantpress", version=quantpress.__version__, lifespan=lifespan)
    app.state.quantpress = state
    app.include_router(tgi.build_router())
    app.include_router(openai_api.build_router())
    install_handlers(app, metrics.request_failed, limits.max_request_bytes)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_request_bytes)  # outermost: sees every body
    return app


def load_on_a_passing_thread(model_dir: str | Path) -> LoadedModel:
    """load() on a thread that then exits, taking its OpenMP pool with it: the engine's scheduler
    thread must be the only one that owns one, or every parallel region it runs pays a wake-up
    (see Engine's `inline`)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantpress-load") as pool:
        return pool.submit(load, model_dir).result()


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8080,
          settings: ServerSettings | None = None) -> None:
    """Load `model_dir` and serve it until interrupted."""
    import uvicorn

    keep_freed_memory_small()
    app = create_app(load_on_a_passing_thread(model_dir), settings)
    uvicorn.run(app, host=host, port=port, log_level="info")

