"""The OpenAI-compatible HTTP server on AsyncEngine (`jaxinfer serve`; needs the `serve` extra).

protocol.py: request bodies -> checked engine requests, outputs -> response objects (plain Python);
app.py: the FastAPI routes; metrics.py: /metrics; serve.py: uvicorn with the SIGTERM drain. Nothing here is imported
by `import jaxinfer`; this file holds only what the command line reads before anything is loaded.
"""

DEFAULT_MAX_WAITING = 256  # requests queued beyond the engine's slots before new ones get a 429
