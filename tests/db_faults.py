"""Database faults the worker tests inject: sessions terminated as an operator or a failover would."""

from __future__ import annotations

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
