"""The streaming ``Generate`` RPC: kNN-LM decoding through ``KnnLM.stream``, one message per token.

A generation holds the model for its whole length (the batcher's lock, shared with Score,
NextToken and Append), so concurrent Generate calls take turns; each honours its deadline
and stops decoding as soon as its client cancels — the lock is then free for the next call.
"""
from __future__ import annotations

import logging
import time

import grpc

from knnlm_vdb.errors import KnnlmError
from knnlm_vdb.knn_settings import Adaptive, Fixed
from knnlm_vdb.service import knnlm_pb2 as pb
from knnlm_vdb.service.batcher import ShuttingDown
from knnlm_vdb.service.status import DeadlineExceeded, RequestError, invalid, status_of

log = logging.getLogger(__name__)


def cache_of(domains) -> object:
    """The in-document cache's calibration for a request over ``domains``: the first one served."""
    return next((d.cache for d in domains if d.cache is not None), None)

DEFAULT_NEW_TOKENS = 64


class GenerateRpc:
    """The ``Generate`` method of ``server.KnnlmService`` (which supplies domains, settings, limits)."""

    def _decoding(self, r: pb.GenerateRequest) -> dict:
        n = r.max_new_tokens or DEFAULT_NEW_TOKENS
        if n > self.limits.max_new_tokens:
            raise invalid(f"max_new_tokens must be at most {self.limits.max_new_tokens} (the server's "
                          f"--max-new-tokens), got {n}")
        from knnlm_vdb.api import check_sampling, neighbour_count

        temperature = r.temperature if r.HasField("temperature") else 1.0
        top_p = r.top_p if r.HasField("top_p") else 1.0
        # the library's own checks (InvalidInput -> INVALID_ARGUMENT by errors.ERROR_TABLE)
        check_sampling(n, temperature, r.top_k, top_p, 1, r.do_sample)
        neighbour_count(r.neighbours)
        return dict(max_new_tokens=n, do_sample=r.do_sample, temperature_lm=temperature, top_k=r.top_k, top_p=top_p,
                    seed=r.seed if r.HasField("seed") else None, stop=list(r.stop), neighbours=r.neighbours)

    def _prompt(self, r: pb.GenerateRequest) -> list[int]:
        if r.prompt:
            return self._tokens(r.prompt, "prompt", minimum=1)
        if not r.prompt_token_ids:
            raise invalid("the prompt is empty: set prompt or prompt_token_ids")
        ids = list(r.prompt_token_ids)
        vocab = self.encoder.lm.vocab_size
        if len(ids) > self.limits.max_text_tokens or not all(0 <= i < vocab for i in ids):
            raise invalid(f"prompt_token_ids must be at most {self.limits.max_text_tokens} ids in [0, {vocab})")
        return ids

    def Generate(self, request: pb.GenerateRequest, context):
        from knnlm_vdb.api import KnnLM

        if not self._slots.acquire(blocking=False):
            self.metrics.request("Generate", "RESOURCE_EXHAUSTED", 0.0)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"the server is at its limit of {self.limits.max_concurrent} concurrent requests "
                          "(--max-concurrent); retry with backoff")
        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        code, message, tokens, searched = grpc.StatusCode.OK, "", 0, 0
        try:
            domains = self._domains(request.domains)
            ids = self._prompt(request)
            decoding = self._decoding(request)
            k, temperature, lmbda, calibrations = self._settings(request.settings, domains)
            settings = Adaptive(calibrations, cache_of(domains)) if calibrations is not None \
                else Fixed(k, temperature, lmbda)
            deadline = time.monotonic() + self._timeout(context)
            if not self.batcher.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise DeadlineExceeded("the deadline passed while waiting for the model")
            try:
                if self.batcher.closed:
                    raise ShuttingDown("the server is shutting down")
                lm = KnnLM(self.encoder, [d.store for d in domains])
                stream = lm.stream(ids, settings=settings, **decoding)
                try:
                    for piece, step in stream:
                        if not context.is_active() or time.monotonic() > deadline:
                            break  # closing the stream below cancels the decoding
                        first = tokens == 0
                        tokens += 1
                        searched += step.searched
                        yield pb.GenerateResponse(
                            token_id=step.token_id, token=self._token_str(step.token_id), text=piece, prob=step.prob,
                            base_prob=step.base_prob, knn_prob=step.knn_prob, lmbda=step.lmbda,
                            searched=step.searched, neighbours=[neighbour_message(h) for h in step.neighbours],
                            settings=_settings_pb(settings) if first else None,
                            domains=[d.name for d in domains] if first else [])
                finally:
                    stream.close()
            finally:
                self.batcher.lock.release()
            if context.is_active() and time.monotonic() > deadline:
                raise DeadlineExceeded(f"the deadline passed after {tokens} generated token(s)")
        except (RequestError, KnnlmError) as exc:  # expected failures: the code from errors.ERROR_TABLE
            code, message = status_of(exc)
        except Exception:  # a bug, never control flow
            log.exception("Generate failed")
            code, message = grpc.StatusCode.INTERNAL, "internal error in Generate; see the server log"
        finally:
            self._slots.release()
            self.metrics.in_flight.dec()
            self.metrics.request("Generate", code.name, time.perf_counter() - t0)
            self.metrics.searches.labels("searched").inc(searched)
            self.metrics.searches.labels("skipped").inc(tokens - searched)
            log.debug("Generate %s, %d token(s) in %.1f ms", code.name, tokens, 1e3 * (time.perf_counter() - t0))
        if code != grpc.StatusCode.OK:
            context.abort(code, message)


def _settings_pb(s) -> pb.KnnSettings:
    if s.adaptive:
        return pb.KnnSettings(k=s.k, temperature=s.temperature, adaptive=True)
    return pb.KnnSettings(k=s.k, temperature=s.temperature, lmbda=s.lmbda, adaptive=False)


def neighbour_message(h: dict) -> pb.Neighbour:
    return pb.Neighbour(domain=h["domain"], doc_id=h["doc_id"], position=h["position"], distance=h["distance"],
                        token_id=h["target"], token=h["token"])
