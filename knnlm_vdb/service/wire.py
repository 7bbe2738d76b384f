"""Registering the Knnlm servicer with deserializers that survive malformed bytes.

grpc's generated registration uses ``Message.FromString``: bytes that do not parse raise
inside grpc, which answers INTERNAL and logs an ERROR with a traceback per message, a cheap
way to flood the log. Here a message that does not parse becomes a ``Malformed`` marker; the
handler answers INVALID_ARGUMENT, and the log gets one line per ``LOG_EVERY_S`` with a count.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from knnlm_vdb.errors import InvalidInput
from knnlm_vdb.service import knnlm_pb2 as pb

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
SERVICE = pb.DESCRIPTOR.services_by_name["Knnlm"]


class MalformedRequest(InvalidInput):
    """A request message whose bytes are not a valid protobuf of the method's input type."""


class Malformed:
    """What a request that did not parse deserializes to."""

    def __init__(self, what: str):
        self.what = what


class _RateLimitedLog:
    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._next = 0.0

    def __call__(self, what: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now < self._next:
                return
            count, self._count, self._next = self._count, 0, now + LOG_EVERY_S
        log.warning("refused %d malformed request message(s) (latest: %s)", count, what)


note_malformed = _RateLimitedLog()


def _deserializer(cls, method: str):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            what = f"{method}: {type(exc).__name__}"
            note_malformed(what)
            return Malformed(what)
    return parse


def _message(request) -> str:
    return f"the request is not a valid {request.what.split(':')[0]} message (malformed protobuf)"


def _unary(behaviour):
    def handler(request, context):
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(request))
        return behaviour(request, context)
    return handler


def _checked_stream(requests):
    for r in requests:
        if isinstance(r, Malformed):
            raise MalformedRequest(_message(r))
        yield r


def _stream(behaviour):
    def handler(request_iterator, context):
        return behaviour(_checked_stream(request_iterator), context)
    return handler


def add_servicer(servicer, server) -> None:
    """``knnlm_pb2_grpc.add_KnnlmServicer_to_server`` with malformed-message-safe deserializers."""
    handlers = {}
    for m in SERVICE.methods:
        request_cls = getattr(pb, m.input_type.name)
        response_cls = getattr(pb, m.output_type.name)
        behaviour = getattr(servicer, m.name)
        kw = {"request_deserializer": _deserializer(request_cls, m.input_type.name),
              "response_serializer": response_cls.SerializeToString}
        if m.client_streaming and not m.server_streaming:
            handlers[m.name] = grpc.stream_unary_rpc_method_handler(_stream(behaviour), **kw)
        elif not m.client_streaming and not m.server_streaming:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(_unary(behaviour), **kw)
        elif m.server_streaming and not m.client_streaming:  # the handler returns the response iterator
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(_unary(behaviour), **kw)
        else:  # no such method in knnlm.v1 today; refuse to register what this module does not guard
            raise ValueError(f"unsupported streaming shape for {m.full_name}")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
