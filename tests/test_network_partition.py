"""Workers on separate hosts: each in its own network namespace, reaching the database over a veth link.

One host's link is cut mid-run (the cable pulled: packets vanish, nothing is reset), and the
other host completes the jobs the cut host held once their lease has expired.  The database is a
private server of the test session (``helpers.PrivateServer``), not the shared one, listening on
this machine's end of each link: the cut host's sessions stay open on it, holding row locks,
until the server drops them.  Namespaces need root and ``ip``; where they cannot be made the test
is skipped with the reason, except in CI.

Every check reads what the database and the workers recorded (lease and claim times in the jobs
table, start and end times of each run in the runs table), never how long the test slept: the
other host kept completing jobs after the cut and before it took over the cut host's jobs, and it
took each of them over no earlier than a full lease after that job's last heartbeat.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

import chaos_jobs
from helpers import IN_CI, SERVERS, TESTS, drop_table, select, unique_table, wait_until
from kronix_data import DatabaseQueueDriver, Job

LEASE_SECONDS = 3.0


def ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, timeout=30)


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"kxprobe{os.getpid()}"
    try:
        ip("netns", "add", probe)
        ip("netns", "del", probe)
    except subprocess.CalledProcessError as error:
        return f"'ip netns add' failed: {error.stderr.decode().strip()} (needs root or CAP_SYS_ADMIN)"
    return None


class Host:
    """A network namespace joined to this machine by a veth pair: ``address`` on this side, ``peer`` on its side."""

    def __init__(self, name: str, address: str, peer: str):
        self.namespace, self.link = name, f"{name}h"
        self.address, self.peer = address, peer
        ip("netns", "add", self.namespace)
        ip("link", "add", self.link, "type", "veth", "peer", "name", f"{name}n")
        ip("link", "set", f"{name}n", "netns", self.namespace)
        ip("addr", "add", f"{self.address}/30", "dev", self.link)
        ip("link", "set", self.link, "up")
        ip("-n", self.namespace, "addr", "add", f"{self.peer}/30", "dev", f"{name}n")
        ip("-n", self.namespace, "link", "set", f"{name}n", "up")
        ip("-n", self.namespace, "link", "set", "lo", "up")

    def url(self, server_url: str) -> str:
        """The server as this host reaches it: at this machine's end of the link."""
        return sa.make_url(server_url).set(host=self.address).render_as_string(hide_password=False)

    def cut(self) -> None:
        """Pull the cable at the host's end: what either side sends from now on vanishes (nothing is reset)."""
        ip("-n", self.namespace, "link", "set", f"{self.namespace}n", "down")

    def mend(self) -> None:
        ip("-n", self.namespace, "link", "set", f"{self.namespace}n", "up")

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.link], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)


@pytest.fixture
def hosts(private_server):
    """Two hosts, and the private server listening on this machine's end of each one's link."""
    reason = namespaces_unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"network namespaces are needed in CI: {reason}")
        pytest.skip(f"cannot make network namespaces: {reason}")
    tag, subnet = uuid.uuid4().hex[:6], f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    made = []
    try:
        for index, letter in enumerate("ab"):
            made.append(Host(f"kx{tag}{letter}", f"{subnet}.{index * 4 + 1}", f"{subnet}.{index * 4 + 2}"))
        private_server.listen_also([host.address for host in made])
        yield made
    finally:
        try:
            if private_server.extra_addresses:
                private_server.listen_also([])
        finally:
            for host in made:
                host.remove()


def held_by(driver: DatabaseQueueDriver, worker_prefix: str) -> dict:
    """The jobs a worker holds, with the time of each one's lease (its last heartbeat, or its claim)."""
    c = driver.table.c
    with driver.engine.connect() as conn:
        rows = conn.execute(sa.select(c.id, c.heartbeat_at).where(
            c.status == "processing", c.reserved_by.startswith(worker_prefix)))
        return dict(rows.all())


def statements_running(url: str, client: str) -> int:
    """How many sessions of the client at address ``client`` are executing a statement on the server."""
    if sa.make_url(url).get_backend_name() == "postgresql":
        return select(url, "SELECT count(*) FROM pg_stat_activity WHERE host(client_addr) = :client "
                           "AND state = 'active'", {"client": client})[0][0]
    # Not "Connect": a session still in its handshake (the host was opening it when cut) runs no statement.
    return sum(command in ("Query", "Execute") for host, command in select(
        url, "SELECT host, command FROM information_schema.processlist") if (host or "").rpartition(":")[0] == client)


def unfinished(driver: DatabaseQueueDriver) -> list:
    c = driver.table.c
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(c.id, c.status, c.attempts, c.reserved_by, c.heartbeat_at, c.last_error).where(
            c.status != "completed")).all()


def drop_silent_sessions(url: str, seconds: int) -> str:
    """The URL with the server told to end this client's sessions once idle in a transaction for ``seconds``.

    The setting a deployment should have: a worker cut off mid-transaction keeps its row locks
    (and so its jobs) until the server drops the session, which TCP keepalives do only after hours.

    On PostgreSQL that timeout alone is not enough.  psycopg runs ``executemany`` in pipeline mode
    (kronix completes a batch of jobs that way, in the transaction that claims the next), and it
    may send a Flush after the Sync; PostgreSQL arms the timeout only when it answers a Sync, so a
    host cut off right after such a batch leaves a session idle in its transaction, holding its
    row locks, for good: the other host then never gets those jobs (this test hung so, about one
    run in ten).  So the server is also told to give up on a client that stopped answering: TCP
    keepalives when nothing is in flight, ``tcp_user_timeout`` when its last bytes to the client
    went unacknowledged.  Either ends the session of a vanished host within ``seconds``, whatever
    state the session is in.
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        setting = {"options": f"-c idle_in_transaction_session_timeout={seconds * 1000} -c tcp_keepalives_idle=1 "
                              f"-c tcp_keepalives_interval=1 -c tcp_keepalives_count={max(1, seconds - 1)} "
                              f"-c tcp_user_timeout={seconds * 1000}"}
    else:
        setting = {"init_command": f"SET SESSION idle_transaction_timeout = {seconds}"}
    return parsed.update_query_dict(setting).render_as_string(hide_password=False)


@pytest.mark.parametrize("backend", SERVERS)
def test_jobs_of_a_host_cut_off_mid_run_are_completed_by_another_once_the_lease_expires(
        private_server, hosts, tmp_path):
    server_url = private_server.url
    table = unique_table()
    runs = f"runs_{table}"
    driver = DatabaseQueueDriver(server_url, table=table)
    driver.create_table()
    chaos_jobs.create_runs_table(server_url, runs)
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    workers = {}
    log = open(tmp_path / "workers.log", "w")
    try:
        for host in hosts:
            url = drop_silent_sessions(host.url(server_url), seconds=4)
            workers[host.namespace] = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, sys.executable, "-m", "chaos_jobs", url, table,
                 str(stats_dir), str(LEASE_SECONDS)], cwd=TESTS, stdout=log, stderr=log,
                env={**os.environ, "CHAOS_RUNS_URL": url})
        cut_host, other_host = hosts
        victim, survivor = (f"chaos-{workers[host.namespace].pid}-" for host in hosts)
        # Both hosts are up before there is work, so neither can drain the queue alone before the cut.
        wait_until(lambda: all((stats_dir / f"{worker.pid}.json").exists() for worker in workers.values()), 120,
                   "both workers to start")
        total = len(driver.push_many(
            Job(chaos_jobs.NAME, {"n": n, "url": server_url, "runs": runs, "sleep": 0.2}, id=f"c{n:07d}",
                max_retries=chaos_jobs.MAX_RETRIES) for n in range(200)
            if not chaos_jobs.always_fails(n) and not chaos_jobs.fails_first_attempt(n)))
        wait_until(lambda: held_by(driver, victim) and held_by(driver, survivor), 60, "both hosts to hold jobs")
        cut_host.cut()
        cut_at = time.time()  # the clock of the runs table: the hosts share this machine's
        # What reached the server before the cut is executed before the cut host's holdings are read.
        wait_until(lambda: statements_running(server_url, cut_host.peer) == 0, 60,
                   "the cut host's last statements to finish on the server")
        held = held_by(driver, victim)  # job -> its last lease, as the server has it
        assert held, f"the cut host held nothing {time.time() - cut_at:.2f}s after the cut: {unfinished(driver)}"
        completed = lambda: int(driver.fetch_stats()["completed"].sum())  # noqa: E731
        try:
            wait_until(lambda: completed() == total, 120, "the other host to finish")
        except AssertionError as error:
            raise AssertionError(f"{error}; unfinished: {unfinished(driver)}") from None
        c = driver.table.c
        with driver.engine.connect() as conn:
            taken_over = {row.id: row for row in conn.execute(
                sa.select(c.id, c.reserved_by, c.reserved_at).where(c.id.in_(list(held))))}
        survivor_runs = [(f"c{job:07d}", started, ended) for job, worker, started, ended in
                         select(server_url, f"SELECT job, worker, started, ended FROM {runs}")
                         if worker.startswith(survivor)]
        assert workers[cut_host.namespace].poll() is None  # the cut host did not crash; it is waiting

        assert set(taken_over) == set(held)
        assert all(row.reserved_by.startswith(survivor) for row in taken_over.values())
        # Not before the lease expired: each job was claimed again a full lease after its last heartbeat.
        early = {job: (row.reserved_at - held[job]).total_seconds() for job, row in taken_over.items()
                 if row.reserved_at - held[job] < timedelta(seconds=LEASE_SECONDS)}
        assert not early, f"claimed again sooner than {LEASE_SECONDS}s after the last heartbeat: {early}"
        # The other host did not wait for the cut one: it completed jobs of its own after the cut,
        # while the cut host's jobs were still stuck (before it started the first of them again).
        takeover_began = min(started for job, started, _ in survivor_runs if job in held)
        kept_going = [job for job, started, ended in survivor_runs
                      if job not in held and started >= cut_at and ended is not None and ended <= takeover_began]
        print(f"\n{len(held)} jobs held by the cut host, taken over {takeover_began - cut_at:.1f}s after the cut; "
              f"the other host completed {len(kept_going)} of its own jobs in between")
        assert kept_going

        cut_host.mend()  # its late writes now arrive and are refused: it no longer holds those attempts
        for worker in workers.values():
            worker.send_signal(signal.SIGTERM)
        assert [worker.wait(timeout=120) for worker in workers.values()] == [0, 0], (tmp_path / "workers.log").read_text()
        stats = driver.fetch_stats()
        assert (stats["completed"].sum(), stats["failed"].sum(), stats["processing"].sum()) == (total, 0, 0)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.kill()
        log.close()
        driver.close()
        for name in (table, runs):
            drop_table(server_url, name)


@pytest.mark.parametrize("backend", SERVERS)
def test_recovery_skips_jobs_locked_by_a_session_that_went_silent(driver, other_driver):
    """A worker cut off in the middle of a transaction keeps its row locks until the server drops its
    session (hours, with default TCP keepalives).  Recovery must pass its jobs by, not wait on them:
    it once blocked there, and with it the whole loop of every other worker."""
    driver.push_many([Job("n", 1, id="locked"), Job("n", 2, id="free")])
    driver.pop_many(2)
    time.sleep(0.05)
    silent = driver.engine.connect()
    transaction = silent.begin()
    silent.execute(driver.table.update().where(driver.table.c.id == "locked").values(last_error="cut off here"))
    recovered = []
    try:
        thread = threading.Thread(target=lambda: recovered.append(other_driver.recover_stale_jobs(0)), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "recovery waited on the silent session's lock"
        assert recovered == [1] and driver.get_job("free").status == "pending"
    finally:
        transaction.rollback()
        silent.close()
    assert other_driver.recover_stale_jobs(0) == 1  # once the server drops the session, its job comes back too
    assert driver.size() == 2

