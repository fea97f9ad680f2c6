"""The OpenAI-compatible HTTP server on AsyncEngine (`jaxinfer serve`; needs the `serve` extra).

protocol.py: request bodies -> checked engine requests, outputs -> response objects (plain Python);
app.py: the FastAPI routes. Nothing here is imported by `import jaxinfer`.
"""
