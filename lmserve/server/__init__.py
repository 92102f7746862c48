"""The OpenAI-compatible HTTP server: `build_app(engine_config, served_model_name, api_key, ...)`.

Routes: /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize, /health, /version, /metrics.
Request fields are checked strictly: unknown fields get 400 "Unrecognized request argument supplied", fields
lmserve does not support yet (tools, response_format, suffix, best_of != n, ...) get 400 naming them, and `user`,
`metadata`, `store`, `service_tier`, `parallel_tool_calls`, `safety_identifier` and `prompt_cache_key` are accepted
and ignored (they cannot change the output).
"""

from lmserve.server.app import build_app

__all__ = ["build_app"]
