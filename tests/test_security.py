"""Nobody gets in: no unsafe deserialisation, no SQL built from values, no password shown,
and a row written straight into the table cannot make a worker run unregistered code."""

from __future__ import annotations

import ast
import base64
import json
import logging
import os
import pickle
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cloudpickle
import pytest
import sqlalchemy as sa

from kronix_data import DatabaseQueueDriver, Job, JobStatus, LocalWorkers, Worker, start_local_workers, task

from helpers import (REPOSITORY, SERVER_URLS, cli_environment, database_url, define_in_main, drop_table,
                     kill_session, kronix_in_parallel, session_id, unique_table, wait_until)

PACKAGE = REPOSITORY / "kronix_data"
#: Modules that turn bytes into objects or run commands: none belongs in a queue of JSON.
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle",
                  "yaml", "subprocess", "pty"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__", "breakpoint"}
UNSAFE_OS_CALLS = ("system", "popen", "exec", "spawn", "fork", "posix_spawn")
#: Importing by name is fine only where the name comes from the operator (``-m``), never from a row.
#: isolation_child.py imports the module of a task the *worker* has registered (the worker sends
#: ``job.task.function.__module__``, a module the operator's ``-m`` imported), never a name from a row:
#: a row naming a task the worker lacks is dead-lettered before any child hears of it (proven below).
IMPORTS_BY_NAME_ALLOWED = {"cli.py", "local.py", "isolation_child.py"}
#: The exceptions, each proven below: local.py starts its workers as ``python -m kronix_data worker``
#: and isolation.py its slots' children as ``python -m kronix_data.isolation_child`` (fixed command lines,
#: no value from a row), and kernel_tasks.py unpickles only what the kernel that started the worker sent
#: over their private socketpair (it cannot even reach the table).
UNSAFE_MODULES_ALLOWED = {("local.py", "subprocess"), ("isolation.py", "subprocess"), ("kernel_tasks.py", "cloudpickle")}


# -- the code itself -------------------------------------------------------------------

def package_trees() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def test_the_package_never_imports_a_deserialiser_or_a_command_runner():
    found = []
    for name, tree in package_trees().items():
        for node in ast.walk(tree):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{name}:{node.lineno} imports {module}" for module in modules
                      if module.split(".")[0] in UNSAFE_MODULES and (name, module) not in UNSAFE_MODULES_ALLOWED]
    assert found == []
    assert len(package_trees()) >= 10  # the check really read the package


def test_the_package_never_evaluates_or_executes_text_and_imports_by_name_only_from_the_operator():
    found = []
    for name, tree in package_trees().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            function = node.func
            called = function.id if isinstance(function, ast.Name) else getattr(function, "attr", "")
            owner = function.value.id if isinstance(function, ast.Attribute) and isinstance(function.value,
                                                                                           ast.Name) else None
            if (isinstance(function, ast.Name) and called in UNSAFE_BUILTINS) or (
                    owner in ("os", "builtins") and called.startswith(UNSAFE_OS_CALLS + tuple(UNSAFE_BUILTINS))):
                found.append(f"{name}:{node.lineno} calls {called}")
            if called == "import_module" and name not in IMPORTS_BY_NAME_ALLOWED:
                found.append(f"{name}:{node.lineno} imports a module by name")
    assert found == []


def test_stored_text_is_only_ever_decoded_as_json():
    """Every decode of a payload or result goes through json.loads (the grep that proves no other path)."""
    sources = {path.name: path.read_text() for path in PACKAGE.glob("*.py")}
    assert "json.loads" in sources["job.py"]
    for name, source in sources.items():
        if name == "kernel_tasks.py":  # its channel, not the table: see the next test
            source = source.replace("cloudpickle.dumps(", "").replace("cloudpickle.loads(", "")
        for forbidden in ("pickle.", "marshal.", "yaml.", "literal_eval", "eval(", "exec("):
            assert forbidden not in source, f"{name} uses {forbidden}"


def test_only_bytes_from_the_kernels_channel_are_ever_unpickled():
    """kernel_tasks.py imports nothing that reaches the database, and unpickles in one place what it
    received on its connection; local.py runs one fixed command, with no password on it."""
    tree = package_trees()["kernel_tasks.py"]
    package_imports = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert package_imports == {"tasks"}  # not store, driver, job, schema: no way to read a row
    loads = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("loads")
             and "pickle" in ast.unparse(node.func)]
    assert [ast.unparse(node) for node in loads] == ["cloudpickle.loads(blobs[answer['blob']])"]
    source = (PACKAGE / "kernel_tasks.py").read_text()
    assert "blobs = [self.connection.recv_bytes() for answer in answers.values()" in source

    workers = LocalWorkers(DatabaseQueueDriver(url_with_password("postgresql"), table="app.jobs"), 1,
                           modules=["etl_jobs"])
    assert workers.command(7) == [sys.executable, "-m", "kronix_data", "worker", "--table", "app.jobs",
                                  "--local-channel", "7", "-m", "etl_jobs"]
    assert PASSWORD in workers.environment()["KRONIX_DATABASE_URL"]  # in the environment, which only its user reads


# -- values are bound, identifiers validated ----------------------------------------------------

MARKER = "KRONIX_INJECTED_9f4e"
HOSTILE = f"{MARKER}'); DROP TABLE kronix_jobs; --\"`\\"


def test_hostile_values_reach_the_database_only_as_bound_parameters(db_url, table_name):
    """Every driver method runs with hostile text in every value; none of it appears in any SQL text."""
    statements, parameters = [], []
    driver = DatabaseQueueDriver(db_url, table=table_name, worker_id=f"worker {HOSTILE}")
    driver.create_table()

    @sa.event.listens_for(driver.engine, "before_cursor_execute")
    def capture(_conn, _cursor, statement, params, _context, _executemany):
        statements.append(statement)
        parameters.append(repr(params))

    queue = f"q {HOSTILE}"[:128]
    ids = driver.push_many([Job(f"name {HOSTILE}", {HOSTILE: [HOSTILE]}, queue=queue, id=f"id {HOSTILE} {i}")
                            for i in range(4)])
    first, second, third, fourth = driver.pop_many(4, queue)
    first.result = {HOSTILE: HOSTILE}
    driver.complete(first)
    second.last_error = HOSTILE
    driver.release(second, delay=0)
    third.last_error = HOSTILE
    driver.fail(third)
    driver.heartbeat([fourth])
    driver.unclaim([fourth])
    driver.retry_dead_letter(third.id)
    driver.retry_dead_letters(queue=queue, name=third.name)
    driver.size(queue)
    driver.get_job(ids[0])
    driver.fetch_stats()
    driver.dead_letter_jobs(queue)
    driver.recover_stale_jobs(0)
    driver.clear_dead_letters(queue)
    driver.clear(queue)
    driver.close()

    assert len(statements) >= 15
    assert [statement for statement in statements if MARKER in statement] == []
    assert sum(MARKER in params for params in parameters) >= 10  # the values were really sent, as parameters


def test_a_malicious_table_name_never_reaches_the_database(db_url, driver, table_name):
    driver.push(Job("precious"))
    engine = sa.create_engine(db_url)
    statements = []
    sa.event.listen(engine, "before_cursor_execute", lambda _c, _cur, statement, *_: statements.append(statement))
    for name in (f"{table_name}; DROP TABLE {table_name}", f"x\"; DROP TABLE \"{table_name}", f"{table_name} --"):
        with pytest.raises(ValueError, match="invalid table name"):
            DatabaseQueueDriver(engine, table=name).create_table()
    engine.dispose()
    assert statements == [] and driver.size() == 1


# -- passwords ---------------------------------------------------------------------------

PASSWORD = "Pa55-w0rd-kr0nix"


def url_with_password(backend: str, password: str = PASSWORD) -> str:
    return sa.make_url(SERVER_URLS[backend]).set(password=password).render_as_string(hide_password=False)


@pytest.mark.parametrize("url", [url_with_password("postgresql"), url_with_password("mariadb"),
                                 url_with_password("postgresql").replace("postgresql+psycopg", "postgresql"),
                                 "mysql://app:Pa55-w0rd-kr0nix@db.example:3306/jobs"])
def test_reprs_never_show_the_password(url):
    driver = DatabaseQueueDriver(url, table="app.jobs")
    worker = Worker(driver)
    shown = [repr(driver), str(driver.engine.url), repr(driver.engine), repr(worker), repr(driver.engine.pool)]
    assert [PASSWORD in text for text in shown] == [False] * len(shown)
    assert "***" in repr(driver)


def test_logs_never_show_the_password_even_when_the_connection_fails(tmp_path, caplog):
    """PostgreSQL here trusts local logins, so a URL with a password connects; its session is then killed."""
    url = url_with_password("postgresql")
    database_url("postgresql", tmp_path)
    table = unique_table()
    caplog.set_level(logging.DEBUG)
    driver = DatabaseQueueDriver(url, table=table)
    try:
        driver.create_table()
        killed = []

        @sa.event.listens_for(driver.engine, "before_cursor_execute")
        def kill_before_first_completion(conn, _cursor, statement, *_):
            if statement.startswith("UPDATE") and "result" in statement and not killed:
                killed.append(session_id(conn.connection.driver_connection))
                kill_session(SERVER_URLS["postgresql"], killed[0])

        @task(name="security.log_me")
        def log_me(payload):
            logging.getLogger("security.job").warning("job sees %s", payload)
            return payload

        driver.push_many([log_me.job(i) for i in range(3)])
        worker = Worker(driver, burst=True, lease_timeout=10)
        worker.run()
        assert worker.stats.completed == 3 and worker.stats.database_errors >= 1
    finally:
        driver.close()
        drop_table(SERVER_URLS["postgresql"], table)
    assert "database error" in caplog.text and "job sees 2" in caplog.text  # the logs did capture the trouble
    assert PASSWORD not in caplog.text
    assert all(PASSWORD not in str(record.args) for record in caplog.records)


def test_the_cli_never_prints_the_password(tmp_path):
    """Every command, verbose, against a server that accepts the URL, one that refuses it, and a failing job."""
    database_url("postgresql", tmp_path)
    database_url("mariadb", tmp_path)
    (tmp_path / "secret_jobs.py").write_text(
        "import kronix_data\n\n"
        "@kronix_data.task(name='security.fails', max_retries=0)\n"
        "def fails(payload):\n    raise RuntimeError('could not reach the warehouse')\n")
    url = url_with_password("postgresql")
    escaped = url_with_password("postgresql", "p@ss:w0rd-kr0nix")  # written p%40ss%3Aw0rd-kr0nix in the URL
    assert "p%40ss%3Aw0rd-kr0nix@" in escaped
    table = unique_table()
    with DatabaseQueueDriver(url, table=table) as driver:
        driver.create_table()
        driver.push_many([Job("security.fails"), Job("security.fails")])
    try:
        commands = [["-v", "--db", url, "worker", "-m", "secret_jobs", "--burst"]]
        commands += [["-v", "--db", db, *command] for db in (url, escaped) for command in (
            ["init"], ["stats"], ["dead-letters"], ["retry", "no-such-id"], ["recover"])]
        commands += [["--db", url_with_password("mariadb"), "-v", "stats"],  # MariaDB refuses this password
                     ["--db", url.replace("127.0.0.1", "no-such-host.invalid"), "-v", "stats"]]
        results = kronix_in_parallel(*commands[:1], cwd=tmp_path, environment=cli_environment(KRONIX_TABLE=table))
        results += kronix_in_parallel(*commands[1:], cwd=tmp_path, environment=cli_environment(KRONIX_TABLE=table))
    finally:
        drop_table(SERVER_URLS["postgresql"], table)

    codes = [result.returncode for result in results]
    assert codes == [0] + [0, 0, 0, 1, 0] * 2 + [4, 4], [(r.args[3:], r.returncode, r.stderr) for r in results]
    assert "RuntimeError" in results[3].stdout and "***@" in results[0].stderr
    assert "Access denied" in results[-2].stderr
    for result in results:
        shown = result.stdout + result.stderr
        assert PASSWORD not in shown and "p@ss:w0rd" not in shown and "p%40ss" not in shown, result.args


# -- rows written by an attacker -------------------------------------------------------------

EVIL_MODULE = "kronix_evil_{tag}"


def attacker_rows(marker: Path, evil_module: str) -> dict[str, tuple[str, str]]:
    """Rows an attacker with write access to the table could insert: id -> (name, payload text)."""
    touch = f"touch {marker}"

    class Exploit:
        def __reduce__(self):
            return (__import__("os").system, (touch,))

    pickled = pickle.dumps(Exploit(), protocol=0).decode("latin-1")  # protocol 0 is text: fits the column
    return {
        "os-system": ("os.system", json.dumps(touch)),
        "posix-system": ("posix.system", json.dumps(touch)),
        "subprocess": ("subprocess.run", json.dumps(["touch", str(marker)])),
        "builtins-eval": ("builtins.eval", json.dumps(f"__import__('os').system({touch!r})")),
        "builtins-exec": ("exec", json.dumps(f"open({str(marker)!r}, 'w')")),
        "dotted-import": (f"{evil_module}.run", json.dumps({"path": str(marker)})),
        "module-path": (evil_module, "null"),
        "module-colon": (f"{evil_module}:run", "null"),
        "kronix-internals": ("kronix_data.cli.main", json.dumps(["--help"])),
        "lookalike": ("security.cаnary", "{}"),  # Cyrillic 'а'
        "trailing-space": ("security.canary ", "{}"),
        "pickled-payload": ("security.canary", pickled),
        "pickle-base64": ("security.canary", "gASVIAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAV0b3VjaJSFlFKULg=="),
    }


def insert_rows_with_sql(driver: DatabaseQueueDriver, rows: dict[str, tuple[str, str]]) -> None:
    """Write rows straight into the table, bypassing push and its validation, as an attacker would."""
    due = datetime.now(timezone.utc) - timedelta(minutes=5)
    with driver.engine.begin() as conn:
        conn.execute(driver.table.insert(), [
            {"id": job_id, "name": name, "queue": "default", "status": "pending", "attempts": 0, "max_retries": 3,
             "payload": payload, "created_at": due, "available_at": due} for job_id, (name, payload) in rows.items()])


def expected_reason(name: str, payload: str) -> str:
    try:
        json.loads(payload)
    except ValueError:
        return f"could not rebuild job {name!r}: JSONDecodeError"
    return f"LookupError: no task or job factory is registered for {name!r}"


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module whose import, or whose run(), leaves a marker file."""
    name = EVIL_MODULE.format(tag=uuid.uuid4().hex[:8])
    marker = tmp_path / "PWNED"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n\n"
        f"def run(payload=None):\n    open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield name, marker
    sys.modules.pop(name, None)


def check_attack_failed(driver: DatabaseQueueDriver, rows, marker: Path, evil_module: str, canary_ids) -> None:
    assert not marker.exists(), f"an attacker's row ran code: {marker.read_text()}"
    assert evil_module not in sys.modules
    dead = driver.dead_letter_jobs().set_index("id")
    assert sorted(dead.index) == sorted(rows)
    for job_id, (name, payload) in rows.items():
        assert dead.loc[job_id, "last_error"].startswith(expected_reason(name, payload)), dead.loc[job_id, "last_error"]
    canaries = [driver.get_job(job_id) for job_id in canary_ids]
    assert [(job.status, job.result) for job in canaries] == [(JobStatus.COMPLETED, {"seen": i}) for i in range(3)]


@task(name="security.canary")
def canary(payload):
    """The one registered job: it only echoes its payload, so any other effect came from elsewhere."""
    return {"seen": payload}


def test_rows_crafted_in_the_table_cannot_run_unregistered_code_in_a_worker(driver, evil_module):
    name, marker = evil_module
    rows = attacker_rows(marker, name)
    insert_rows_with_sql(driver, rows)
    canary_ids = driver.push_many([canary.job(i) for i in range(3)])
    worker = Worker(driver, burst=True, lease_timeout=10, listen=False)
    worker.run()

    not_json = sum(expected_reason(name, payload).startswith("could not") for name, payload in rows.values())
    assert not_json == 2  # dead-lettered by pop itself; the worker dead-letters the rest
    assert (worker.stats.completed, worker.stats.dead_lettered) == (3, len(rows) - not_json)
    check_attack_failed(driver, rows, marker, name, canary_ids)


def test_rows_crafted_in_the_table_cannot_reach_a_process_pool_child(driver, evil_module):
    """Under pool="process" a child imports the module of a task the worker registered (its function's
    module), never a name from a row: the attacker's rows are dead-lettered before a child hears of them,
    and the canaries run in a child that imported only this module."""
    name, marker = evil_module
    rows = attacker_rows(marker, name)
    insert_rows_with_sql(driver, rows)
    canary_ids = driver.push_many([canary.job(i) for i in range(3)])
    worker = Worker(driver, burst=True, lease_timeout=10, listen=False, pool="process")
    worker.run()
    assert worker.stats.completed == 3
    check_attack_failed(driver, rows, marker, name, canary_ids)
    source = (PACKAGE / "isolation.py").read_text()
    assert '"module": job.task.function.__module__' in source  # what the child is told to import
    assert 'subprocess.Popen([sys.executable, "-m", "kronix_data.isolation_child"]' in source  # a fixed command


def test_rows_crafted_in_the_table_cannot_run_code_in_a_kronix_worker_command(driver, db_url, table_name,
                                                                              evil_module):
    """The command puts the current directory on sys.path: the attacker's module sits right there."""
    name, marker = evil_module
    rows = attacker_rows(marker, name)
    insert_rows_with_sql(driver, rows)
    (marker.parent / "security_jobs.py").write_text(
        "import kronix_data\n\n@kronix_data.task(name='security.canary')\n"
        "def canary(payload):\n    return {'seen': payload}\n")
    canary_ids = driver.push_many([canary.job(i) for i in range(3)])
    [result] = kronix_in_parallel(["--db", db_url, "--table", table_name, "worker", "-m", "security_jobs", "--burst"],
                                  cwd=marker.parent)
    assert result.returncode == 0, result.stderr
    check_attack_failed(driver, rows, marker, name, canary_ids)


def test_a_payload_shaped_like_an_object_reaches_a_registered_job_as_plain_data(driver, tmp_path):
    marker = tmp_path / "PWNED"
    shapes = [{"py/object": "os.system", "py/reduce": [f"touch {marker}"]},
              {"__reduce__": ["os.system", [f"touch {marker}"]]}, {"$type": "System.Diagnostics.Process"},
              {"__class__": "subprocess.Popen", "args": ["touch", str(marker)]}, "os.system", f"touch {marker}"]
    ids = driver.push_many([canary.job(shape) for shape in shapes])
    Worker(driver, burst=True, lease_timeout=10, listen=False).run()
    assert [driver.get_job(job_id).result for job_id in ids] == [{"seen": shape} for shape in shapes]
    assert not marker.exists()


# -- tasks defined in a notebook: the function comes from the kernel, never from a row -----------------

NOTEBOOK_CANARY = """
import kronix_data

@kronix_data.task(name="security.notebook_canary")
def notebook_canary(payload):
    return {"seen": payload}
"""


def test_rows_naming_a_notebook_task_or_carrying_a_pickled_function_run_nothing_on_local_workers(
        driver, evil_module):
    """The attacker's rows, plus rows naming the kernel's notebook task with pickles as payloads, and rows
    carrying a cloudpickled function: the local workers (the evil module importable from their working
    directory) run only the kernel's function, on the payload as plain JSON data."""
    name, marker = evil_module
    define_in_main(NOTEBOOK_CANARY)
    rows = attacker_rows(marker, name)
    pickled = rows["pickled-payload"][1]
    evil = define_in_main(f"def evil(payload=None):\n    open({str(marker)!r}, 'w').write('ran')\n")["evil"]
    function_text = base64.b64encode(cloudpickle.dumps(evil)).decode()
    rows.update({
        "notebook-pickled": ("security.notebook_canary", pickled),  # not JSON: dead-lettered unread
        "unknown-cloudpickled": ("security.notebook_evil", json.dumps({"function": function_text})),
        "unknown-raw-cloudpickle": ("security.notebook_evil", cloudpickle.dumps(evil, protocol=0).decode("latin-1")),
    })
    as_data = {"notebook-base64-pickle": ("security.notebook_canary", json.dumps(rows["pickle-base64"][1])),
               "notebook-cloudpickled": ("security.notebook_canary", json.dumps({"function": function_text}))}
    insert_rows_with_sql(driver, {**rows, **as_data})
    canary_ids = driver.push_many([canary.job(i) for i in range(3)])  # nobody imports canary's module: dead
    with start_local_workers(driver, 2, burst=True, lease_timeout=10, listen=False) as workers:
        workers.join(timeout=180)

    assert [process.exitcode for process in workers.processes] == [0, 0]
    assert not marker.exists(), f"a row ran code: {marker.read_text()}"
    for job_id, (_, payload) in as_data.items():
        assert driver.get_job(job_id).result == {"seen": json.loads(payload)}  # the kernel's function, on data
    dead = driver.dead_letter_jobs().set_index("id")
    assert sorted(dead.index) == sorted([*rows, *canary_ids])
    for job_id, (job_name, payload) in rows.items():
        assert dead.loc[job_id, "last_error"].startswith(expected_reason(job_name, payload)), job_id
    assert "nor in the kernel that started it" in dead.loc["unknown-cloudpickled", "last_error"]


def unix_sockets() -> dict[str, tuple[int, str]]:
    """Every Unix socket of the machine: inode -> (flags, path); flag 0x10000 is a listening socket."""
    sockets = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        sockets[fields[6]] = (int(fields[3], 16), fields[7] if len(fields) > 7 else "")
    return sockets


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets a process holds (a descriptor closed while they are listed is passed by)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd) if fd.name.isdigit() else ""
        except FileNotFoundError:  # closed between the listing and the read (the worker is running)
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    return inodes


def listening_inet_inodes() -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    return inodes


def test_the_channel_to_a_local_worker_has_no_address_anyone_could_connect_to(tmp_path):
    """Each worker's end of its socketpair is an unnamed, connected Unix socket: no path, no port, not
    listening; a process that was not handed the descriptor has nothing to connect to, so no secret is needed."""
    url = database_url("sqlite", tmp_path)
    with DatabaseQueueDriver(url, table=unique_table()) as driver:
        driver.create_table()
        with start_local_workers(driver, 2, poll_interval=0.1) as workers:
            inodes = wait_until(lambda: [inode for pid in workers.pids if (inode := socket_inodes(pid))], 60,
                                "the workers' sockets")
            assert len(inodes) == 2
            machine = unix_sockets()
            channels = set().union(*inodes)
            for inode in channels:
                flags, path = machine[inode]
                assert path == "" and not flags & 0x10000, (inode, flags, path)
            assert not channels & listening_inet_inodes()
            assert all(workers.processes[n].is_alive() for n in range(2))


# -- binary data written by an attacker (<table>_data) --------------------------------------------------


def test_stored_bytes_are_only_ever_read_as_parquet_by_pyarrow():
    """The binary data plane: columnar.py reads stored bytes with pyarrow's Parquet reader (and the
    categories of a categorical with its IPC reader, from the same file's metadata), nothing else."""
    source = (PACKAGE / "columnar.py").read_text()
    reads = sorted({call for call in ("pq.read_table(", "pa.ipc.open_stream(", "pq.read_schema(", "pa.ipc.open_file(",
                                      "pd.read_", "np.load(", "frombuffer(") if call in source})
    assert reads == ["pa.ipc.open_stream(", "pq.read_table("]
    import pyarrow

    version = tuple(int(part) for part in pyarrow.__version__.split(".")[:3])
    assert version >= (14, 0, 1)  # CVE-2023-47248: older pyarrow unpickled PyExtensionType data it read


@task(name="security.frame_canary", frame=True)
def frame_canary(frame):
    return {"rows": len(frame)}


def crafted_blobs(marker: Path) -> dict[int, bytes]:
    """Bytes an attacker with write access to ``<table>_data`` could put in place of a chunk's Parquet."""
    touch = f"touch {marker}"

    class Exploit:
        def __reduce__(self):
            return (__import__("os").system, (touch,))

    pickled = pickle.dumps(Exploit())
    return {0: b"\x00garbage" * 10, 1: pickled, 2: b"PAR1" + pickled + b"PAR1",
            3: cloudpickle.dumps(Exploit()), 4: json.dumps({"frame": touch}).encode()}


def test_a_crafted_data_row_fails_its_chunk_cleanly_and_runs_nothing(driver, tmp_path):
    import pandas as pd

    marker = tmp_path / "PWNED"
    blobs = crafted_blobs(marker)
    batch = driver.map(frame_canary, pd.DataFrame({"x": range(len(blobs) + 1)}), 1, max_retries=0)
    data = driver.store.tables.data
    claimed = driver.pop_many(100)
    keys = {job.payload["chunk"]: job.id for job in claimed}  # ids by chunk, then given back
    driver.unclaim(claimed)
    with driver.engine.begin() as conn:  # as an attacker would: straight into the side table
        for chunk, blob in blobs.items():
            conn.execute(data.update().where(data.c.job_id == keys[chunk]).values(data=blob))
    Worker(driver, burst=True, lease_timeout=10, listen=False).run()

    assert not marker.exists(), "a crafted data row ran code"
    failures = batch.failures().set_index("id")
    assert sorted(failures.index) == sorted(keys[chunk] for chunk in blobs)
    assert all("InvalidInputError" in error and "Parquet" in error for error in failures["last_error"])
    assert batch.results()["result"].tolist() == [{"rows": 1}]  # the one untouched chunk ran
