"""One source per setting: serve's defaults are the service's ``Limits``, consistency levels are
listed once, option names mean one thing in every command."""
from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from knnlm_vdb.cli import main
from knnlm_vdb.datastore.milvus.index import check_consistency
from knnlm_vdb.errors import InvalidInput
from knnlm_vdb.service.server import Limits
from knnlm_vdb.settings import CONSISTENCY_LEVELS

# Limits field -> serve option (max_top_n and max_response_bytes have no flag)
SERVE_FLAGS = {"max_text_tokens": "max_text_tokens", "max_k": "max_k", "max_request_bytes": "max_request_bytes",
               "max_new_tokens": "max_new_tokens", "request_timeout_s": "request_timeout"}


def params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands[command].params}


def test_limits_defaults_are_serve_defaults():
    serve, limits = params("serve"), Limits()
    for field, flag in SERVE_FLAGS.items():
        assert serve[flag].default == getattr(limits, field), flag
    # --max-concurrent defaults to --max-workers
    assert serve["max_concurrent"].default is None and serve["max_workers"].default == limits.max_concurrent
    assert set(SERVE_FLAGS) | {"max_concurrent", "max_top_n", "max_response_bytes"} == \
        {f.name for f in dataclasses.fields(Limits)}  # a new limit gets a flag here or a reason to have none


@pytest.mark.parametrize("command", ["build", "append", "eval", "tune", "serve", "generate"])
def test_consistency_levels_listed_once(command):
    assert tuple(params(command)["consistency"].type.choices) == CONSISTENCY_LEVELS
    for level in CONSISTENCY_LEVELS:
        assert check_consistency(level) == level
    with pytest.raises(InvalidInput, match=", ".join(CONSISTENCY_LEVELS)):
        check_consistency("Sometimes")


def test_build_takes_datastore_and_out_as_one_option():
    opt = params("build")["datastores"]
    assert {"--datastore", "--out"} <= set(opt.opts)
    for flag in ("--datastore", "--out"):  # either fails the same way on a missing corpus, before any model load
        r = CliRunner().invoke(main, ["build", "--corpus", "/nonexistent/c.txt", flag, "/tmp/never-made-ds"])
        assert r.exit_code == 2 and "/nonexistent/c.txt" in r.output


@pytest.mark.parametrize("command, counts", [("build", "entries"), ("append", "entries"), ("eval", "tokens"),
                                             ("tune", "tokens")])
def test_max_tokens_says_what_it_counts(command, counts):
    assert counts in params(command)["max_tokens"].help
    assert counts in CliRunner().invoke(main, [command, "--help"]).output
