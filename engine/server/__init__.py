"""The OpenAI-compatible HTTP server over LLM.submit (needs the `serve` extra: fastapi, uvicorn, jinja2)."""
