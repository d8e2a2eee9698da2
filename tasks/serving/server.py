"""``strata serve``: run the model server (``strata.tasks.serving.app``) under uvicorn until interrupted."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import uvicorn

from strata.tasks.serving.app import ServeConfig, check_bind, create_app
from strata.tasks.serving.sources import ModelSource

API_KEY_ENV = "STRATA_SERVE_API_KEY"


def serve(source: ModelSource, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None) -> None:
    """Check the bind, load the first model (fails fast), then serve; the key comes from the env if not given."""
    config = config or ServeConfig()
    if config.api_key is None and os.environ.get(API_KEY_ENV):
        config = replace(config, api_key=os.environ[API_KEY_ENV])
    check_bind(host, config.api_key)
    _log_to_console()
    app = create_app(source, config)
    logging.getLogger(__name__).info("API key %s", "required" if config.api_key else "not required (loopback only)")
    uvicorn.run(app, host=host, port=port, log_level="info")


def _log_to_console() -> None:
    """Strata's own INFO lines (model loaded, provider in use, reloads) next to uvicorn's.

    Set on the ``strata`` logger (every module's logger is below it), not the root: importing Prefect has
    configured the root already.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger = logging.getLogger("strata")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
