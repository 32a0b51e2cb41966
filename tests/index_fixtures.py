"""Fixtures for the post index: a real PostgreSQL server started from the Debian packages, and one fixture that
gives a fresh empty index on each backend, so every test of the index runs on both.

The server runs in a temporary folder on a Unix socket only (no TCP port to collide with), as the `postgres`
user when the tests run as root (PostgreSQL refuses to run as root). Tests on that backend skip, saying why,
when the binaries or psycopg are absent (`.ci/run` installs postgresql and murmur[postgres]).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile

import pytest

from murmur.index.postgres import PostgresIndex
from murmur.index.sqlite import SqliteIndex

BACKENDS = ["sqlite", "postgresql"]
_schemas = itertools.count()


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@pytest.fixture(scope="session")
def postgres_url():
    """The url of a throwaway PostgreSQL server (trust auth, fsync off), stopped at the end of the session."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'murmur[postgres]')")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql; .ci/run installs them)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    folder = tempfile.mkdtemp(prefix="murmur-pg-")
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data = os.path.join(folder, "data")
    port = "5432"  # Unix socket only: the port just names the socket file in `folder`
    run = dict(check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    subprocess.run(_as_server_user([f"{bin_dir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync",
                                    "-E", "UTF8", "--locale", "C"]), **run)
    subprocess.run(_as_server_user([f"{bin_dir}/pg_ctl", "-D", data, "-w", "-l", os.path.join(folder, "log"), "-o",
                                    f"-k {folder} -p {port} -c listen_addresses= -c fsync=off "
                                    "-c synchronous_commit=off -c full_page_writes=off", "start"]), **run)
    try:
        yield f"postgresql://postgres@/postgres?host={folder}&port={port}"
    finally:
        subprocess.run(_as_server_user([f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def fresh_schema() -> str:
    return f"t{os.getpid()}_{next(_schemas)}"


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make_index(backend, request, tmp_path):
    """make_index(**limits) -> an empty index on the test's backend; closed after the test."""
    opened = []

    def make(**limits):
        if backend == "sqlite":
            index = SqliteIndex(tmp_path / f"posts-{len(opened)}.sqlite", create=True, **limits)
        else:
            url = request.getfixturevalue("postgres_url")
            index = PostgresIndex(url, schema=fresh_schema(), create=True, **limits)
        opened.append(index)
        return index

    yield make
    for index in opened:
        try:
            index.close()
        except Exception:
            pass


def location_of(index) -> str:
    """What open_index / a follower subprocess is given to reach this index."""
    return str(index.path) if isinstance(index, SqliteIndex) else index.url
