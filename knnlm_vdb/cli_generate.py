"""``knnlm-vdb generate``: continue a prompt with kNN-LM decoding, streaming text as it comes."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from knnlm_vdb.cli_common import (emit, knn_options, location_options, make_encoder, model_options, open_stores,
                                  resolve_locations)
from knnlm_vdb.errors import InvalidInput, NotFound


def sampling_options(f):
    for o in reversed([
        click.option("--max-new-tokens", type=int, default=64, show_default=True, help="tokens to generate"),
        click.option("--sample", "do_sample", is_flag=True, help="sample instead of greedy decoding"),
        click.option("--temperature-lm", type=float, default=1.0, show_default=True,
                     help="sampling temperature over the mixture (not the kNN temperature -T)"),
        click.option("--top-k", type=int, default=0, show_default=True, help="with --sample: keep the k most likely"),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="with --sample: nucleus mass"),
        click.option("--num-beams", type=int, default=1, show_default=True, help="beam search with this many beams"),
        click.option("--seed", type=int, default=None, help="random seed for --sample"),
        click.option("--stop", multiple=True, help="stop once the continuation contains this text (repeatable)"),
        click.option("--show-neighbours", "neighbours", type=int, default=0, flag_value=4, is_flag=False,
                     help="with each token, its nearest datastore entries (default 4 with the bare flag)"),
    ]):
        f = o(f)
    return f


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise InvalidInput("give the prompt as --prompt TEXT or --prompt-file FILE (one of them)")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise NotFound(f"prompt file not found: {prompt_file}")
        try:
            prompt = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{prompt_file} is not UTF-8 text") from None
    if not prompt.strip():
        raise InvalidInput("the prompt is empty")
    return prompt


@click.command()
@model_options
@location_options(multiple=True)
@knn_options
@click.option("--prompt", default=None, help="text to continue")
@click.option("--prompt-file", type=click.Path(), default=None, help="file whose text to continue")
@sampling_options
@click.option("--server", default=None, help="host:port of a `knnlm-vdb serve` to generate through")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (no streaming)")
def generate(model, key_type, ctx, stride, batch_size, device, dtype, datastores, backend, uri, domains, consistency,
             k, temperature, lmbda, skip_below, cache, prompt, prompt_file, max_new_tokens, do_sample, temperature_lm,
             top_k, top_p, num_beams, seed, stop, neighbours, server, as_json):
    """Continue a prompt with kNN-LM decoding; text streams to stdout as it is produced."""
    from knnlm_vdb.api import KnnLM, check_sampling
    from knnlm_vdb.knn_settings import parse_lambda

    text = read_prompt(prompt, prompt_file)
    check_sampling(max_new_tokens, temperature_lm, top_k, top_p, num_beams, do_sample)
    lmbda = parse_lambda(lmbda)
    decoding = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature_lm=temperature_lm, top_k=top_k,
                    top_p=top_p, seed=seed, stop=list(stop), neighbours=neighbours)
    knn = dict(k=k, temperature=temperature, lmbda=lmbda)
    if server is not None:
        if cache is not None:
            raise InvalidInput("--cache/--no-cache is the server's setting (serve --cache), not a request's")
        return _through_server(server, text, list(domains or []), decoding, knn, skip_below, num_beams, as_json)
    backend, locations = resolve_locations(datastores, backend, uri, domains)
    encoder = make_encoder(model, key_type, ctx, stride, batch_size, device, dtype)
    stores = open_stores(backend, locations, uri, consistency, encoder)
    with KnnLM(encoder, stores, skip_below=skip_below, cache=cache, **knn) as lm:
        if as_json or num_beams > 1:
            out = lm.generate(text, num_beams=num_beams, **decoding)
            emit(out.to_dict(), as_json, [out.text])
            return
        steps = []
        for piece, step in lm.stream(text, **decoding):
            steps.append(step)
            if neighbours:
                click.echo(f"{piece!r:>14}  p={step.prob:.3f} (LM {step.base_prob:.3f}, kNN {step.knn_prob:.3f}, "
                           f"λ={step.lmbda:.2f})")
                for h in step.neighbours:
                    click.echo(f"{'':16}{h['distance']:9.2f}  {h['token']!r:>10}  {h['domain']}:{h['doc_id']}"
                               f"@{h['position']}")
            else:
                click.echo(piece, nl=False)
                sys.stdout.flush()
        if not neighbours:
            click.echo()


def _through_server(server, text, domains, decoding, knn, skip_below, num_beams, as_json):
    """The same command through a `knnlm-vdb serve` (Generate RPC); TLS and tokens as for `score`."""
    import grpc

    from knnlm_vdb.service.client import KnnlmClient

    if num_beams > 1 or skip_below is not None:
        raise InvalidInput("--num-beams and --skip-below are not available through --server")
    lmbda = knn.pop("lmbda")
    adaptive = True if lmbda == "auto" else None
    decoding["temperature_lm"] = decoding["temperature_lm"] if decoding["do_sample"] else None
    tokens, pieces = [], []
    with KnnlmClient(server, token=_client_token(), timeout=None) as client:
        try:
            for r in client.generate(text, domains=domains, lmbda=None if adaptive else lmbda, adaptive=adaptive,
                                     **knn, **decoding):
                tokens.append({"token_id": r.token_id, "token": r.token, "prob": r.prob, "base_prob": r.base_prob,
                               "knn_prob": r.knn_prob, "lmbda": r.lmbda, "searched": r.searched,
                               "neighbours": [{"domain": h.domain, "doc_id": h.doc_id, "position": h.position,
                                               "distance": h.distance, "token": h.token} for h in r.neighbours]})
                pieces.append(r.text)
                if not as_json:
                    click.echo(r.text, nl=False)
                    sys.stdout.flush()
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None
    if as_json:
        emit({"text": "".join(pieces), "steps": tokens}, True, [])
    else:
        click.echo()


def _client_token():
    from knnlm_vdb.service import security

    return security.read_secret(None, security.READ_TOKEN_ENV)


def _rpc_error(exc):
    from knnlm_vdb.errors import BackendUnavailable, KnnlmError

    code = exc.code()
    text = f"server: {code.name}: {exc.details()}"
    if code in (code.UNAVAILABLE, code.DEADLINE_EXCEEDED):
        return BackendUnavailable(text)
    return KnnlmError(text)
