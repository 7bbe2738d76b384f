"""A small Python client for ``knnlm-vdb serve``.

    with KnnlmClient("localhost:50051") as c:
        r = c.score("some text", domains=["wiki"])
        print(r.base_ppl, r.knnlm_ppl)

TLS: pass ``tls_ca`` (PEM file of the CA that signed the server's certificate; ``tls=True``
alone uses the system roots) and, for mutual TLS, ``tls_cert``/``tls_key``. A bearer
token goes in ``token`` (read it with ``security.read_secret``, never from argv). Calls
raise ``grpc.RpcError``; ``code()`` and ``details()`` say what went wrong.
"""
from __future__ import annotations

from typing import Iterable

import grpc

from knnlm_vdb.corpus import Document
from knnlm_vdb.settings import REQUEST_TIMEOUT_S
from knnlm_vdb.service import knnlm_pb2 as pb
from knnlm_vdb.service import knnlm_pb2_grpc as pb_grpc


def _optional(message, **fields):
    """Set the fields that are not None: an unset optional field means "the server's default"."""
    for name, value in fields.items():
        if value is not None:
            setattr(message, name, value)
    return message


def _settings(k=None, temperature=None, lmbda=None, adaptive=None) -> pb.KnnSettings:
    return _optional(pb.KnnSettings(), adaptive=adaptive, k=k, temperature=temperature, lmbda=lmbda)


def _read(path) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


class KnnlmClient:
    """One channel to a server; methods mirror the RPCs and return their response messages."""

    def __init__(self, target: str, *, tls: bool = False, tls_ca=None, tls_cert=None, tls_key=None,
                 server_name: str | None = None, token: str | None = None, timeout: float | None = REQUEST_TIMEOUT_S,
                 max_message_bytes: int = 64 << 20):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        if tls or tls_ca is not None or tls_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                                 certificate_chain=_read(tls_cert))
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.KnnlmStub(self.channel)

    def _kw(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}

    def score(self, text: str, domains: Iterable[str] = (), k: int | None = None, temperature: float | None = None,
              lmbda: float | None = None, adaptive: bool | None = None, neighbours: int = 0,
              timeout: float | None = None) -> pb.ScoreResponse:
        """Settings left as None take the server's defaults; ``adaptive=True``: the domain's per-token λ;
        ``neighbours`` > 0: each scored token's nearest datastore entries (``response.neighbours``)."""
        req = pb.ScoreRequest(text=text, domains=list(domains), settings=_settings(k, temperature, lmbda, adaptive),
                              neighbours=neighbours)
        return self.stub.Score(req, **self._kw(timeout))

    def next_token(self, context: str, top_n: int = 10, domains: Iterable[str] = (), k: int | None = None,
                   temperature: float | None = None, lmbda: float | None = None, adaptive: bool | None = None,
                   timeout: float | None = None) -> pb.NextTokenResponse:
        req = pb.NextTokenRequest(context=context, top_n=top_n, domains=list(domains),
                                  settings=_settings(k, temperature, lmbda, adaptive))
        return self.stub.NextToken(req, **self._kw(timeout))

    def append(self, domain: str, documents: Iterable[Document | tuple[str, str]], replace: bool = False,
               timeout: float | None = None) -> pb.AppendResponse:
        """Stream ``documents`` (``Document`` or ``(id, text)``) into ``domain``.

        ``replace``: a document id stored with another text gets the new text's entries
        (otherwise it is kept and listed in the response's ``changed``).
        """

        def messages():
            for doc in documents:
                doc_id, text = (doc.doc_id, doc.text) if isinstance(doc, Document) else doc
                yield pb.AppendRequest(domain=domain, document=pb.Document(id=doc_id, text=text), replace=replace)

        return self.stub.Append(messages(), **self._kw(timeout))

    def generate(self, prompt: str | list[int], domains: Iterable[str] = (), max_new_tokens: int = 0,
                 do_sample: bool = False, temperature_lm: float | None = None, top_k: int = 0,
                 top_p: float | None = None, seed: int | None = None, stop: Iterable[str] = (), neighbours: int = 0,
                 k: int | None = None, temperature: float | None = None, lmbda: float | None = None,
                 adaptive: bool | None = None, timeout: float | None = None):
        """Yield ``GenerateResponse`` messages, one per token, as the server produces them. Stopping
        the iteration early (``close()``, ``break``) cancels the call and the server's decoding."""
        req = pb.GenerateRequest(domains=list(domains), settings=_settings(k, temperature, lmbda, adaptive),
                                 max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=top_k, stop=list(stop),
                                 neighbours=neighbours)
        if isinstance(prompt, str):
            req.prompt = prompt
        else:
            req.prompt_token_ids.extend(prompt)
        _optional(req, temperature=temperature_lm, top_p=top_p, seed=seed)
        call = self.stub.Generate(req, **self._kw(timeout))
        try:
            yield from call
        finally:
            call.cancel()

    def list_domains(self, timeout: float | None = None) -> list[pb.DomainInfo]:
        return list(self.stub.ListDomains(pb.ListDomainsRequest(), **self._kw(timeout)).domains)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The grpc.health.v1 status name (SERVING, NOT_SERVING, ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
