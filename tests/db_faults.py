"""Database faults the worker tests inject: sessions terminated as an operator or a failover would,
and (the chaos test only) a server restart."""

from __future__ import annotations

import random
import subprocess
import time

import sqlalchemy as sa


def kill_session(url, session_id: int) -> None:
    """Terminate one database session from another connection, as an operator or a failover would."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": session_id})
        else:
            conn.exec_driver_sql(f"KILL CONNECTION {int(session_id)}")
    engine.dispose()


def session_id(dbapi_connection) -> int:
    """The server's id of a psycopg or PyMySQL connection."""
    info = getattr(dbapi_connection, "info", None)
    return info.backend_pid if hasattr(info, "backend_pid") else dbapi_connection.thread_id()


def kill_all_other_sessions(url) -> int:
    """Terminate every other client session of this database; returns how many were killed."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sessions = conn.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")).scalars().all()
        else:
            sessions = conn.execute(sa.text("SELECT id FROM information_schema.processlist "
                                            "WHERE id <> CONNECTION_ID() AND db = DATABASE()")).scalars().all()
    engine.dispose()
    killed = 0
    for session in sessions:
        try:
            kill_session(url, session)
            killed += 1
        except sa.exc.DBAPIError:  # it ended by itself meanwhile
            pass
    return killed


def kill_sessions_tagged(url, tag: str, fraction: float = 1.0) -> int:
    """Terminate the sessions one test made, and no one else's: on PostgreSQL those with
    ``application_name`` ``tag``, on MariaDB those of the user ``tag``.  Returns how many."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            sessions = conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE application_name = :tag "
                                            "AND pid <> pg_backend_pid()"), {"tag": tag}).scalars().all()
        else:
            sessions = conn.execute(sa.text("SELECT id FROM information_schema.processlist WHERE user = :tag"),
                                    {"tag": tag}).scalars().all()
    engine.dispose()
    killed = 0
    for session in random.sample(sessions, max(1, round(len(sessions) * fraction))) if sessions else []:
        try:
            kill_session(url, session)
            killed += 1
        except sa.exc.DBAPIError:  # it ended by itself meanwhile
            pass
    return killed


def restart_server(url, timeout: float = 90.0) -> float:
    """Restart the local database server (fast shutdown: sessions are cut); returns seconds it was away.

    Every client of the server loses its sessions, so only the chaos test calls this, once.
    """
    engine = sa.create_engine(url)
    postgres = engine.dialect.name == "postgresql"
    if postgres:
        with engine.connect() as conn:
            major = int(conn.execute(sa.text("SHOW server_version_num")).scalar_one()) // 10000
    engine.dispose()
    host = sa.make_url(url).host or "127.0.0.1"
    started = time.monotonic()
    if postgres:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", str(major), "main", "restart"],
                       check=True, timeout=timeout, capture_output=True)
        ready = ["pg_isready", "-h", host, "-p", str(sa.make_url(url).port or 5432)]
    else:
        ready = ["mysqladmin", "-uroot", "-h", host, "ping"]
        try:
            subprocess.run(["mysqladmin", "-uroot", "-h", host, "shutdown"], check=True, timeout=timeout,
                           capture_output=True)
        finally:  # whatever happened, the server must come back for everyone else
            _wait_for(lambda: subprocess.run(["pgrep", "-x", "mariadbd"], capture_output=True).returncode != 0,
                      timeout)
            subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background", "--exec",
                            "/usr/sbin/mariadbd"], check=True, timeout=timeout, capture_output=True)
    _wait_for(lambda: subprocess.run(ready, capture_output=True).returncode == 0, timeout)
    return time.monotonic() - started


def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout}s")
        time.sleep(0.1)
