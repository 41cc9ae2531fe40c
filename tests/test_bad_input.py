"""Bad input on SQLite, PostgreSQL and MariaDB: a clear error naming what is wrong, and nothing written.

Every refusal is checked against the stored rows: the table holds exactly what
it held before.  The payload round trip is also checked property-based
(hypothesis) on each database.
"""

from __future__ import annotations

import math
from datetime import datetime
import threading
import traceback

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kronix_data import DatabaseQueueDriver, Job, JobStatus, Worker, task
from kronix_data.job import MAX_JSON_BYTES, encode_payload

from helpers import SERVER_URLS, database_url, run_burst

SECRET = "Wr0ngSecret-4711"


def snapshot(driver: DatabaseQueueDriver) -> list[tuple]:
    """Every stored row, in id order: what 'nothing was written' is checked against."""
    with driver.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.select(driver.table).order_by(driver.table.c.id))]


@pytest.fixture
def seeded(driver):
    """A driver whose table already holds a pending, a running and a dead-lettered job."""
    driver.push_many([Job("seed.running", {"n": 1}), Job("seed.dead", {"n": 2}), Job("seed.pending", {"n": 3})])
    assert driver.pop().name == "seed.running"
    dead = driver.pop()
    dead.last_error = "seeded"
    assert dead.name == "seed.dead" and driver.fail(dead)
    return driver


# -- table names -------------------------------------------------------------------

def bad_table_names(existing: str) -> list:
    """Names that try to break out of an identifier, several of them aimed at ``existing``."""
    return [f"{existing}; DROP TABLE {existing}", f'{existing}"; DROP TABLE "{existing}', f"{existing}' --",
            f"{existing} x", f"{existing}--", f"(SELECT * FROM {existing})", f"{existing}`", "jobs\x00",
            "jobs\n", "jöbs", "", "x" * 49, "x" * 100_000, "a.b.c", ".jobs", "jobs.", "1jobs", None, 42]


def test_bad_table_names_are_refused_before_any_connection_or_sql(seeded, db_url, table_name):
    before = snapshot(seeded)
    engine = sa.create_engine(db_url)
    activity = []
    sa.event.listen(engine, "connect", lambda *_: activity.append("connect"))
    sa.event.listen(engine, "before_cursor_execute", lambda _conn, _cursor, sql, *_: activity.append(sql))
    try:
        for name in bad_table_names(table_name):
            with pytest.raises(ValueError, match="table name") as refused:
                DatabaseQueueDriver(engine, table=name)
            assert repr(name)[:20] in str(refused.value) or not isinstance(name, str) or len(name) > 20
    finally:
        engine.dispose()
    assert activity == []  # not one connection, not one statement
    assert snapshot(seeded) == before


# -- queue, job and id names ---------------------------------------------------------

BAD_NAMES = [
    ("", ValueError, "1 to"),
    ("a\x00b", ValueError, "control characters"),
    ("tab\there", ValueError, "control characters"),
    ("new\nline", ValueError, "control characters"),
    ("escape\x1b[31m", ValueError, "control characters"),
    ("line\u2028separator", ValueError, "control characters"),
    ("zero\u200bwidth", ValueError, "control characters"),
    ("lone\ud800surrogate", ValueError, "control characters"),
    ("x" * 1_000_000, ValueError, "1 to"),
    (None, TypeError, "must be a str"),
    (7, TypeError, "must be a str"),
    (b"bytes", TypeError, "must be a str"),
]


@pytest.mark.parametrize("bad, error, message", BAD_NAMES, ids=lambda value: repr(value)[:16])
def test_bad_job_and_queue_names_and_ids_are_refused_and_nothing_is_written(seeded, bad, error, message):
    before = snapshot(seeded)
    for field, job in (("job name", Job(bad)), ("queue name", Job("ok", queue=bad)), ("job id", Job("ok", id=bad))):
        if field == "job id" and bad is None:
            continue  # id=None means "make one up"
        with pytest.raises(error, match=f"{field}.*{message}"):
            seeded.push_many([Job("fine"), job])  # the good job in the same batch is not written either
    if bad is not None:  # queue=None means "the job's own queue"
        with pytest.raises(error, match=f"queue name.*{message}"):
            seeded.push(Job("ok"), queue=bad)
    assert snapshot(seeded) == before


@pytest.mark.parametrize("bad, error, message", BAD_NAMES, ids=lambda value: repr(value)[:16])
def test_reading_a_queue_no_job_can_have_names_the_queue(seeded, bad, error, message):
    """PostgreSQL cannot even compare a text with NUL in it: without a check it raised a DataError."""
    before = snapshot(seeded)
    for call in (lambda: seeded.pop(bad), lambda: seeded.pop_many(5, bad), lambda: seeded.size(bad),
                 lambda: seeded.clear(bad)):
        with pytest.raises(error, match=f"queue name.*{message}"):
            call()
    assert snapshot(seeded) == before


def test_a_worker_on_a_queue_no_job_can_have_is_refused_with_the_reason(driver):
    """It used to retry the PostgreSQL DataError as a lost connection, for ever; then it stopped at its
    first claim; now the worker is not even built."""
    with pytest.raises(ValueError, match="queue name 'bad.x00queue' contains control characters"):
        Worker(driver, queues=["bad\x00queue"], burst=True, listen=False)
    assert driver.size() == 0


def test_odd_but_printable_names_round_trip_exactly(driver):
    names = ["ünïcödé.jöb", "名前.仕事", "😀" * 255, "'; DROP TABLE x; --", 'a"b`c\\d', "ok " * 85]
    queue = "🚀" * 128
    ids = driver.push_many([Job(name, {"i": i}, queue=queue, id="🆔" * 64 if i == 0 else None)
                            for i, name in enumerate(names)])
    popped = sorted(driver.pop_many(len(names), queue), key=lambda job: job.payload["i"])
    assert [(job.id, job.name, job.queue, job.payload) for job in popped] == [
        (job_id, name, queue, {"i": i}) for i, (job_id, name) in enumerate(zip(ids, names))]


# -- payloads --------------------------------------------------------------------------

def nested(depth: int) -> list:
    payload: list = []
    for _ in range(depth):
        payload = [payload]
    return payload


class Circular(dict):
    pass


circular = Circular()
circular["self"] = circular

BAD_PAYLOADS = {
    "datetime": ({"when": datetime(2026, 1, 1)}, TypeError, "not JSON-serialisable"),
    "set": ({1, 2}, TypeError, "not JSON-serialisable"),
    "bytes": (b"\x80\x81", TypeError, "not JSON-serialisable"),
    "object": ([object()], TypeError, "not JSON-serialisable"),
    "tuple key": ({(1, 2): "x"}, TypeError, "not JSON-serialisable"),
    "nan": (float("nan"), ValueError, "not valid JSON"),
    "infinity": ({"x": [1, float("inf")]}, ValueError, "not valid JSON"),
    "-infinity": ({"deep": {"x": -math.inf}}, ValueError, "not valid JSON"),
    "circular": (circular, ValueError, "not valid JSON"),
    "10,000 levels": (nested(10_000), ValueError, "nested too deeply"),
    "20 MB": ({"blob": "x" * 20_000_000}, ValueError, f"over the limit of {MAX_JSON_BYTES:,}"),
    "20 MB of escapes": ("\\" * 10_000_000, ValueError, "20,000,002 bytes of JSON"),
}


@pytest.mark.parametrize("name", BAD_PAYLOADS)
def test_bad_payloads_are_refused_naming_the_job_and_nothing_is_written(seeded, name):
    payload, error, message = BAD_PAYLOADS[name]
    before = snapshot(seeded)
    with pytest.raises(error, match=f"payload of job 'etl.load'.*{message}"):
        seeded.push_many([Job("fine", 1), Job("etl.load", payload)])
    assert snapshot(seeded) == before


def test_payloads_just_under_the_limit_round_trip_on_every_database(driver):
    """The worst case for MariaDB: escapes that the client doubles again in the INSERT (~16 MB on the wire)."""
    payloads = ["\\\"'" * ((MAX_JSON_BYTES - 2) // 5), {"rows": [[i, "é" * 10] for i in range(60_000)]}]
    sizes = [len(encode_payload(Job("n", payload))) for payload in payloads]
    assert MAX_JSON_BYTES - 5 <= sizes[0] <= MAX_JSON_BYTES and sizes[1] > 4_000_000, sizes
    driver.push_many([Job("big", payload) for payload in payloads])
    assert [job.payload == payload for job, payload in zip(driver.pop_many(2), payloads)] == [True, True]


def test_nesting_that_json_can_take_round_trips(driver):
    driver.push(Job("deep", nested(500)))
    assert driver.pop().payload == nested(500)


def test_a_result_too_big_to_store_fails_the_job_and_the_worker_completes_the_rest(driver):
    """On MariaDB such a result used to drop the connection on every write, wedging the worker for ever."""
    @task(name="bad_input.big_result", max_retries=0)
    def big_result(payload):
        return "x" * 20_000_000 if payload == 0 else payload

    ids = driver.push_many([big_result.job(i) for i in range(6)])
    thread = threading.Thread(target=lambda: run_burst(driver, concurrency=3, listen=False), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the worker never finished"
    jobs = [driver.get_job(job_id) for job_id in ids]
    assert [job.status for job in jobs] == [JobStatus.FAILED] + [JobStatus.COMPLETED] * 5
    assert jobs[0].last_error.startswith(
        "InvalidInputError: result of job 'bad_input.big_result' is 20,000,002 bytes")
    assert [job.result for job in jobs[1:]] == [1, 2, 3, 4, 5]


# -- the worker and dead letters ---------------------------------------------------------

def test_unknown_job_names_are_dead_lettered_with_the_reason_and_the_rest_complete(driver):
    @task(name="bad_input.known")
    def known(payload):
        return payload * 10

    strangers = ["nobody.registered.this", "os.system", "builtins.eval", "bad_input.Known"]
    jobs = [known.job(i) for i in range(40)]
    for i, name in enumerate(strangers):  # interleaved with the good ones
        jobs.insert(i * 10, Job(name, {"cmd": "true"}))
    driver.push_many(jobs)
    worker = run_burst(driver, concurrency=4, listen=False)

    assert (worker.stats.completed, worker.stats.dead_lettered, worker.stats.retried) == (40, len(strangers), 0)
    dead = driver.dead_letter_jobs().set_index("name")
    assert sorted(dead.index) == sorted(strangers)
    for name in strangers:
        assert dead.loc[name, "last_error"].startswith(f"LookupError: no task or job factory is registered for {name!r}")
        assert dead.loc[name, "attempts"] == 1  # not retried: a missing registration does not heal by waiting
    assert sorted(driver.get_job(job.id).result for job in jobs if job.name == "bad_input.known") == [
        i * 10 for i in range(40)]


@pytest.mark.parametrize("job_id", ["no-such-id", "", "x" * 100_000, "nul\x00id", "' OR '1'='1", "%", "*"])
def test_retrying_an_unknown_dead_letter_returns_false_and_changes_nothing(seeded, job_id):
    before = snapshot(seeded)
    assert seeded.retry_dead_letter(job_id) is False
    assert seeded.get_job(job_id) is None
    assert snapshot(seeded) == before


def test_retrying_a_job_that_is_not_a_dead_letter_returns_false_and_changes_nothing(seeded):
    before = snapshot(seeded)
    for job_id, status in [(row[0], row[3]) for row in before]:
        assert seeded.retry_dead_letter(job_id) is (status == "failed")
    after = {row[0]: row for row in snapshot(seeded)}
    assert [after[row[0]] == row for row in before] == [row[3] != "failed" for row in before]


@pytest.mark.parametrize("job_id", [None, 12, b"id"])
def test_retrying_a_dead_letter_by_something_that_is_no_id_names_the_type(seeded, job_id):
    before = snapshot(seeded)
    with pytest.raises(TypeError, match="job id must be a str"):
        seeded.retry_dead_letter(job_id)
    assert snapshot(seeded) == before


# -- database URLs -------------------------------------------------------------------------

def wrong_credentials(backend: str) -> str:
    """The test server's URL with a password it refuses.

    PostgreSQL here trusts local TCP logins (any password is accepted), so an
    unknown role stands in for it; MariaDB really checks the password.
    """
    url = sa.make_url(SERVER_URLS[backend])
    if backend == "postgresql":
        url = url.set(username="kronix_no_such_role")
    return url.set(password=SECRET).render_as_string(hide_password=False)


def wrong_host(backend: str) -> str:
    return sa.make_url(SERVER_URLS[backend]).set(host="no-such-host.invalid", password=SECRET).render_as_string(
        hide_password=False)


def refused_port(backend: str) -> str:
    return sa.make_url(SERVER_URLS[backend]).set(port=1, password=SECRET).render_as_string(hide_password=False)


CONNECTION_FAILURES = {
    ("postgresql", "credentials"): (wrong_credentials, 'role "kronix_no_such_role" does not exist'),
    ("mariadb", "credentials"): (wrong_credentials, "Access denied for user"),
    ("postgresql", "host"): (wrong_host, "no-such-host.invalid"),
    ("mariadb", "host"): (wrong_host, "no-such-host.invalid"),
    ("postgresql", "port"): (refused_port, "port 1 failed: Connection refused"),
    ("mariadb", "port"): (refused_port, "Connection refused"),
}


@pytest.mark.parametrize("backend, fault", CONNECTION_FAILURES)
def test_a_wrong_password_or_host_is_a_clear_error_that_never_shows_the_password(backend, fault, tmp_path):
    database_url(backend, tmp_path)  # the real server must be up, or the test proves nothing
    make_url, expected = CONNECTION_FAILURES[backend, fault]
    driver = DatabaseQueueDriver(make_url(backend))
    with pytest.raises(sa.exc.OperationalError) as failure:
        driver.create_table()
    driver.close()

    text = "".join(traceback.format_exception(failure.value))
    assert expected in str(failure.value)
    assert SECRET not in text and SECRET not in repr(failure.value) and SECRET not in repr(driver)


def test_a_sqlite_file_that_cannot_be_opened_is_a_clear_error(tmp_path):
    driver = DatabaseQueueDriver(f"sqlite:///{tmp_path / 'no_such_directory' / 'jobs.db'}")
    with pytest.raises(sa.exc.OperationalError, match="unable to open database file"):
        driver.create_table()
    assert not (tmp_path / "no_such_directory").exists()


# -- property: whatever JSON goes in comes out ----------------------------------------------

def json_values() -> st.SearchStrategy:
    text = st.text(st.characters(exclude_categories=()), max_size=40)  # every code point, astral and surrogates too
    scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
               | st.floats(allow_nan=False, allow_infinity=False) | text)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(text, inner, max_size=6),
                        max_leaves=40)


def same(a, b) -> bool:
    """Equal and of the same JSON types all the way down (``True == 1`` and ``1 == 1.0`` do not count)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, float):  # -0.0 == 0.0, but the sign must survive too
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return a == b


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=json_values())
def test_any_json_payload_and_result_round_trip_exactly(driver, payload):
    job_id = driver.push(Job("prop", payload))
    popped = driver.pop()
    assert popped.id == job_id and same(popped.payload, payload)
    popped.result = payload
    assert driver.complete(popped)
    assert same(driver.get_job(job_id).result, payload)
