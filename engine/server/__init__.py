"""The OpenAI-compatible HTTP server over LLM.submit (needs the `serve` extra: fastapi, uvicorn, jinja2)."""

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20  # --max-request-bytes (here: the CLI reads it without the serve extra)
