"""What one request may ask for. These dataclass defaults are also ``serve``'s click defaults
(service/commands.py reads them), so the library and the command cannot disagree."""
from __future__ import annotations

from dataclasses import dataclass

from knnlm_vdb.settings import REQUEST_TIMEOUT_S

DEFAULT_MAX_WORKERS = 8  # serve --max-workers; --max-concurrent defaults to it


@dataclass
class Limits:
    """Each field is a ``serve`` flag of the same name (``request_timeout_s``: --request-timeout)."""

    max_text_tokens: int = 8192  # Score text, NextToken context, one appended document
    max_k: int = 4096
    max_top_n: int = 1000
    max_request_bytes: int = 4 << 20  # gRPC refuses larger messages with RESOURCE_EXHAUSTED
    max_response_bytes: int = 64 << 20
    max_concurrent: int = DEFAULT_MAX_WORKERS  # Knnlm RPCs in progress; more get RESOURCE_EXHAUSTED
    max_new_tokens: int = 512  # Generate: tokens one request may ask for
    request_timeout_s: float = REQUEST_TIMEOUT_S  # a request's deadline when it sets none, and the cap on longer ones
