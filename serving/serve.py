"""`counterpoint serve`: check the models, start the engine thread and uvicorn, say when it is
ready, and exit with code 2 if a model cannot be loaded.

The engine loads in its own thread while uvicorn already answers (/health is 503 until then); a
model that fails to load ends the process with one line naming it, not a server left up answering
503.
"""

import logging
import sys
import threading
import time

import uvicorn

from counterpoint.serving.api.async_engine import AsyncEngine
from counterpoint.serving.api.metrics import Metrics
from counterpoint.serving.api.server import build_app
from counterpoint.serving.engine.config import EngineConfig
from counterpoint.serving.engine.engine import Engine
from counterpoint.serving.models.loader import read_hf_config

logger = logging.getLogger("counterpoint")


def serve(config: EngineConfig, host: str, port: int, api_key: str | None, max_queue: int | None,
          shutdown_timeout: float) -> int:
    """Runs the server until it stops; returns the process's exit code."""
    _configure_logging()
    for _, path in config.models:
        read_hf_config(path)  # NOTE: a missing model is a one-line error before anything starts
    failed: list[BaseException] = []

    def load_error(err: BaseException) -> None:
        failed.append(err)
        logger.error(f"loading the models failed: {err}")

    # NOTE: the engine thread and the event loop share the GIL; a short switch interval keeps the
    # engine from waiting out the default 5 ms slice (measured: +8% served tokens/s at 8 clients).
    sys.setswitchinterval(0.0002)
    engine = AsyncEngine(lambda: Engine(config), max_queue, Metrics(), on_load_error=load_error)
    app = build_app(engine, [name for name, _ in config.models], api_key, shutdown_timeout)
    # NOTE: uvicorn's own limit is a backstop: the engine ends every request by the drain timeout.
    uv_config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=int(shutdown_timeout) + 5)
    server = _DrainingServer(uv_config, engine, shutdown_timeout)
    threading.Thread(target=_announce_ready, args=(engine, server, failed, f"http://{host}:{port}"),
                     daemon=True).start()
    server.run()
    return 2 if failed else 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server, which on SIGTERM or SIGINT also starts the engine's drain at once: new
    requests get 503, those in flight have `timeout` seconds to finish, and then each ends with
    an error (an error event and [DONE] in a stream), so every connection closes cleanly and the
    process exits within the timeout."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, timeout: float):
        super().__init__(config)
        self.engine, self.timeout = engine, timeout

    def handle_exit(self, sig, frame) -> None:
        self.engine.begin_shutdown(self.timeout)
        super().handle_exit(sig, frame)


def _announce_ready(engine, server, failed: list, url: str) -> None:
    """One line once the models are loaded and the socket listens (either may come first); if
    loading failed, stop the server instead."""
    while not (engine.is_alive and server.started):
        if failed:
            server.should_exit = True
            return
        if server.should_exit:
            return
        time.sleep(0.05)
    logger.info(f"ready: serving {', '.join(engine.engine.slots)} on {url}")


def _configure_logging() -> None:
    """The engine's log lines in uvicorn's style, on stderr beside uvicorn's own."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
