"""OpenAI-compatible serving of a static-KV artifact: continuous batching over its slots.

`kiln serve ARTIFACT` runs it. The pieces: schemas.py (request validation), prepare.py (prompt
ids and sampling params, model-dependent checks), scheduler.py (the engine thread and its
continuous batching), app.py (FastAPI routes, SSE, health, metrics), serve.py (uvicorn with a
draining shutdown). `make load` drives it from bench/loadtest.py.
"""

from __future__ import annotations

from kiln.runtime.server.app import ServerState, create_app
from kiln.runtime.server.serve import LiveServer, serve

__all__ = ["LiveServer", "ServerState", "create_app", "serve"]
