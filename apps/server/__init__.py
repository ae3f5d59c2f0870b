"""The OpenAI-compatible HTTP server of ``flashtier serve`` (FastAPI + uvicorn) and its web chat page.

Modules: :mod:`.app` (the app factory), :mod:`.routes` (OpenAI endpoints), :mod:`.schemas`
(request bodies), :mod:`.planning` (checks against the model), :mod:`.worker` (the one thread
that runs the model), :mod:`.responses` (response objects and SSE), :mod:`.errors` (OpenAI
error shape), :mod:`.metrics` (counters, Prometheus text), :mod:`.config` (server settings).
"""

from flashtier.apps.server.app import create_app
from flashtier.apps.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
