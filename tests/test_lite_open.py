"""Opening Milvus Lite where it cannot work: one ``error:`` line with the cause and the documented
exit code, no milvus-lite traceback, and nothing created by a command that only reads.

Real Milvus Lite throughout. A database that another process holds is held by a subprocess
(Lite locks its directory for the life of the process that opened it); a database is always
made in a subprocess so that this process's embedded Lite server never caches it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import store_info
from knnlm_vdb.cli import main
from knnlm_vdb.datastore import create_store, open_store
from knnlm_vdb.datastore.milvus import MilvusDatastore, list_domains
from knnlm_vdb.errors import BackendUnavailable, InvalidInput, NotFound
from knnlm_vdb.schema import preflight, status

INFO = store_info()
MAKE_DB = "from pymilvus import MilvusClient; import sys; MilvusClient(sys.argv[1]).close()"
HOLD_DB = ("from pymilvus import MilvusClient; import sys; c = MilvusClient(sys.argv[1]); print('held', flush=True); "
           "sys.stdin.read()")


def make_db(path) -> None:
    subprocess.run([sys.executable, "-c", MAKE_DB, str(path)], check=True, capture_output=True, timeout=120)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knnlm_vdb", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def assert_one_error_line(r: subprocess.CompletedProcess, code: int, says: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr


def tree(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), path) for d, dirs, files in os.walk(path) for n in dirs + files)


def test_a_regular_file_named_db(tmp_path):
    f = tmp_path / "notes.db"
    f.write_text("not a database")
    assert_one_error_line(run_cli("domains", "list", "--uri", f), 2, "is a file, not a Milvus Lite database")
    with pytest.raises(InvalidInput, match="is a file"):
        MilvusDatastore.create(str(f), "docs", INFO)
    assert f.read_text() == "not a database"


def test_a_database_path_below_a_file(tmp_path, corpus_file):
    (tmp_path / "some_file.txt").write_text("x")
    uri = tmp_path / "some_file.txt" / "x.db"
    with pytest.raises(InvalidInput, match="some_file.txt is a file, not a directory"):
        create_store("milvus", str(uri), INFO, domain="docs")
    with pytest.raises(InvalidInput, match="is a file, not a directory"):
        preflight(str(uri))
    # append checks it before loading a model (the model named here does not even exist)
    r = run_cli("append", "--uri", uri, "--domain", "docs", "--corpus", corpus_file, "--model", tmp_path / "no-model")
    assert_one_error_line(r, 2, "is a file, not a directory")
    assert (tmp_path / "some_file.txt").read_text() == "x"


@pytest.mark.parametrize("contents", ["empty", "foreign"])
def test_read_only_commands_create_nothing_in_a_directory_that_is_not_a_database(tmp_path, contents):
    junk = tmp_path / "junk.db"
    junk.mkdir()
    if contents == "foreign":
        (junk / "notes.txt").write_text("mine")
    before = tree(junk)
    for call in (lambda: list_domains(str(junk)), lambda: open_store("milvus", str(junk), domain="docs"),
                 lambda: status(str(junk))):
        with pytest.raises(InvalidInput, match="is a directory but not a Milvus Lite database"):
            call()
    for args in (["domains", "list"], ["domains", "describe", "docs"], ["migrate", "status"]):
        assert_one_error_line(run_cli(*args, "--uri", junk), 2, "not a Milvus Lite database")
    assert tree(junk) == before
    if contents == "empty":  # a command that creates a database may use an empty directory
        with MilvusDatastore.open_or_create(str(junk), "docs", INFO) as store:
            assert store.count() == 0
        assert "collections" in tree(junk)
    else:
        with pytest.raises(InvalidInput, match="holding other files"):
            MilvusDatastore.open_or_create(str(junk), "docs", INFO)
        assert tree(junk) == before


def test_eval_creates_nothing_in_a_foreign_directory(tmp_path, tiny_model_dirs, corpus_file):
    junk = tmp_path / "junk.db"
    junk.mkdir()
    r = CliRunner().invoke(main, ["eval", "--model", tiny_model_dirs["llama"], "--uri", str(junk), "--domain", "docs",
                                  "--corpus", str(corpus_file), "--ctx", "32", "--stride", "16"])
    assert r.exit_code == 2 and "not a Milvus Lite database" in r.output, r.output
    assert tree(junk) == []


def test_a_missing_database_is_not_found_and_not_created(tmp_path):
    with pytest.raises(NotFound, match="no Milvus Lite database"):
        open_store("milvus", str(tmp_path / "missing.db"), domain="docs")
    assert_one_error_line(run_cli("domains", "list", "--uri", tmp_path / "missing.db"), 2, "no Milvus Lite database")
    assert not (tmp_path / "missing.db").exists()


def test_a_database_open_in_another_process(tmp_path):
    db = tmp_path / "held.db"
    make_db(db)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_DB, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("domains", "list", "--uri", db)
        assert_one_error_line(r, 3, "is open in another process")
        with pytest.raises(BackendUnavailable, match="open in another process"):
            list_domains(str(db))
    finally:
        holder.stdin.close()
        holder.wait(60)


@pytest.fixture()
def read_only_dir(tmp_path):
    """A directory holding a Milvus Lite database (``db.db``) that cannot be written: chmod for a
    normal user; for root (whom chmod does not stop) a tmpfs remounted read-only, where allowed."""
    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0:
        make_db(where / "db.db")
        for d in (where, where / "db.db"):
            d.chmod(0o555)
        yield where
        for d in (where, where / "db.db"):
            d.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    try:
        make_db(where / "db.db")
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_read_only_location(read_only_dir):
    before = tree(read_only_dir)
    r = run_cli("domains", "list", "--uri", read_only_dir / "db.db")
    assert_one_error_line(r, 3, "read-only location")
    with pytest.raises(BackendUnavailable, match="read-only"):
        create_store("milvus", str(read_only_dir / "new.db"), INFO, domain="docs")
    r = run_cli("migrate", "--uri", read_only_dir / "new.db")
    assert_one_error_line(r, 3, "is read-only")
    assert tree(read_only_dir) == before
