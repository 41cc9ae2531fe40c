"""Workers on separate hosts: each in its own network namespace, reaching the database over a veth link.

One host's link is cut mid-run (the cable pulled: packets vanish, nothing is reset), and the
other host completes the jobs the cut host held once their lease has expired.  Namespaces need
root and ``ip``; where they cannot be made the test is skipped with the reason, except in CI.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

import chaos_jobs
from helpers import IN_CI, drop_table
from kronix_data import DatabaseQueueDriver, Job

TESTS = Path(__file__).resolve().parent
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


class Relay:
    """Forwards TCP connections from an address on a host's link to the database on 127.0.0.1.

    The servers here listen on 127.0.0.1 only; the relay stands in for the route to them.  When
    the link goes down it keeps the database side open, as a real network partition does.
    """

    def __init__(self, listen_host: str, target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server((listen_host, 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class Host:
    """A network namespace joined to this machine by a veth pair, with a relay to the database."""

    def __init__(self, name: str, address: str, peer: str, database: tuple[str, int]):
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
        self.relay = Relay(self.address, database)

    def url(self, server_url: str) -> str:
        return sa.make_url(server_url).set(host=self.address, port=self.relay.port).render_as_string(
            hide_password=False)

    def cut(self) -> None:
        ip("link", "set", self.link, "down")

    def mend(self) -> None:
        ip("link", "set", self.link, "up")

    def remove(self) -> None:
        self.relay.close()
        subprocess.run(["ip", "link", "del", self.link], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)


@pytest.fixture
def hosts(db_url):
    reason = namespaces_unavailable()
    if reason:
        if IN_CI:
            pytest.fail(f"network namespaces are needed in CI: {reason}")
        pytest.skip(f"cannot make network namespaces: {reason}")
    server = sa.make_url(db_url)
    tag, subnet = uuid.uuid4().hex[:6], f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    made = []
    try:
        for index, letter in enumerate("ab"):
            made.append(Host(f"kx{tag}{letter}", f"{subnet}.{index * 4 + 1}", f"{subnet}.{index * 4 + 2}",
                             (server.host, server.port)))
        yield made
    finally:
        for host in made:
            host.remove()


def held_by(driver: DatabaseQueueDriver, worker_prefix: str) -> dict[str, int]:
    c = driver.table.c
    with driver.engine.connect() as conn:
        rows = conn.execute(sa.select(c.id, c.attempts).where(
            c.status == "processing", c.reserved_by.startswith(worker_prefix)))
        return dict(rows.all())


def unfinished(driver: DatabaseQueueDriver) -> list:
    c = driver.table.c
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(c.id, c.status, c.attempts, c.reserved_by, c.heartbeat_at, c.last_error).where(
            c.status != "completed")).all()


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return result


def drop_silent_sessions(url: str, seconds: int) -> str:
    """The URL with the server told to end this client's sessions once idle in a transaction for ``seconds``.

    The setting a deployment should have: a worker cut off mid-transaction keeps its row locks
    (and so its jobs) until the server drops the session, which TCP keepalives do only after hours.
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        setting = {"options": f"-c idle_in_transaction_session_timeout={seconds * 1000}"}
    else:
        setting = {"init_command": f"SET SESSION idle_transaction_timeout = {seconds}"}
    return parsed.update_query_dict(setting).render_as_string(hide_password=False)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_jobs_of_a_host_cut_off_mid_run_are_completed_by_another_once_the_lease_expires(
        db_url, table_name, hosts, tmp_path):
    runs = f"runs_{table_name}"
    driver = DatabaseQueueDriver(db_url, table=table_name)
    driver.create_table()
    chaos_jobs.create_runs_table(db_url, runs)
    driver.push_many(Job(chaos_jobs.NAME, {"n": n, "url": db_url, "runs": runs, "sleep": 0.2},
                         id=f"c{n:07d}", max_retries=chaos_jobs.MAX_RETRIES) for n in range(200)
                     if not chaos_jobs.always_fails(n) and not chaos_jobs.fails_first_attempt(n))
    total = driver.size()
    workers = {}
    log = open(tmp_path / "workers.log", "w")
    try:
        for host in hosts:
            url = drop_silent_sessions(host.url(db_url), seconds=4)
            workers[host.namespace] = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, sys.executable, "-m", "chaos_jobs", url, table_name,
                 str(tmp_path), str(LEASE_SECONDS)], cwd=TESTS, stdout=log, stderr=log,
                env={**os.environ, "CHAOS_RUNS_URL": url})
        cut_host, other_host = hosts
        victim, survivor = (f"chaos-{workers[host.namespace].pid}-" for host in hosts)
        wait_until(lambda: held_by(driver, victim), 60, "the host to be cut to hold jobs")
        time.sleep(random.uniform(0.0, 0.5))
        cut_host.cut()
        cut_at = time.monotonic()
        held = held_by(driver, victim)  # what it holds when the cable is pulled
        completed = lambda: int(driver.fetch_stats()["completed"].sum())  # noqa: E731
        at_cut = completed()
        time.sleep(1.0)
        kept_going = completed() - at_cut  # the other host does not wait for the cut one

        try:
            wait_until(lambda: completed() == total, 90, "the other host to finish")
        except AssertionError as error:
            raise AssertionError(f"{error}; unfinished: {unfinished(driver)}") from None
        recovered_after = time.monotonic() - cut_at
        c = driver.table.c
        with driver.engine.connect() as conn:
            finished = dict(conn.execute(sa.select(c.id, c.reserved_by).where(c.id.in_(list(held)))).all())
        print(f"\n{len(held)} jobs held by the cut host, the other host completed {kept_going} in the first second "
              f"after the cut, all {total} done {recovered_after:.1f}s after it")

        assert held and set(finished) == set(held)
        assert all(worker.startswith(survivor) for worker in finished.values())
        assert kept_going > 0
        assert recovered_after >= LEASE_SECONDS  # not before the lease expired
        assert workers[cut_host.namespace].poll() is None  # the cut host did not crash; it is waiting
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
        drop_table(db_url, runs)


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
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
