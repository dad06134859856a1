"""Several machines on this one, for scale-out tests and benchmarks: each process of the studio gets its
own network namespace on a bridge (``ip netns``) and its own hostname (a UTS namespace), and shares only
what it reaches over the network: PostgreSQL, Redis and an S3 server (moto), which listen on the
bridge's address alone. Every process also gets its own data directory.

    with Lab(tmp_dir) as lab:
        pg, redis, s3 = lab.postgres(), lab.redis(), lab.s3()
        web = lab.machine("web")                     # .ip, .argv(cmd) runs cmd "on" that machine

Where ``ip netns`` is refused (not root, no bridge support), ``lab.isolated`` is False and everything runs
on loopback with separate data directories; tests say which they got.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PG_BIN = Path(os.environ.get("NCS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


@dataclass
class Machine:
    name: str
    ip: str
    netns: str | None  # None: loopback, no namespace

    def argv(self, cmd: list[str]) -> list[str]:
        """``cmd`` run in this machine's network namespace under its own hostname (exec all the way
        down: the pid Popen reports is the command's own, so signals reach it)."""
        if self.netns is None:
            return cmd
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                f"ncs-{self.name}", *cmd]

    def pids(self) -> list[int]:
        """Every process in this machine's namespace (ours: the namespace was made for them)."""
        if self.netns is None:
            return []
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


class Lab:
    def __init__(self, tmp: str | os.PathLike):
        self.tmp = Path(tmp)
        self.tag = f"{os.getpid() % 1000:03d}{random.randrange(100):02d}"
        self.bridge = f"ncsb{self.tag}"
        self.netns: list[str] = []
        self.links: list[str] = []
        self.cleanups: list[Any] = []
        self.isolated = False
        self.host_ip = "127.0.0.1"
        self._next = 2

    # -- network --
    def __enter__(self) -> "Lab":
        if os.geteuid() == 0 and shutil.which("ip") and shutil.which("unshare"):
            used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
            subnets = [n for n in range(1, 255) if f"10.213.{n}." not in used]
            net = random.choice(subnets)
            try:
                _ip("link", "add", self.bridge, "type", "bridge")
                self.links.append(self.bridge)
                _ip("addr", "add", f"10.213.{net}.1/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
                self.subnet = f"10.213.{net}"
                self.host_ip = f"{self.subnet}.1"
                self.isolated = True
            except subprocess.CalledProcessError:
                self._drop_network()
        return self

    def machine(self, name: str) -> Machine:
        """A new machine: a network namespace with one address on the bridge (or loopback)."""
        if not self.isolated:
            return Machine(name, "127.0.0.1", None)
        ns, host_end, ns_end = f"ncs{self.tag}{name}"[:15], f"ncv{self.tag}{self._next}", f"ncp{self.tag}{self._next}"
        ip = f"{self.subnet}.{self._next}"
        self._next += 1
        _ip("netns", "add", ns)
        self.netns.append(ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        self.links.append(host_end)
        _ip("link", "set", ns_end, "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        for argv in (["addr", "add", f"{ip}/24", "dev", ns_end], ["link", "set", ns_end, "up"],
                     ["link", "set", "lo", "up"]):
            _ip("netns", "exec", ns, "ip", *argv)
        return Machine(name, ip, ns)

    # -- shared services, on the host's bridge address only --
    def postgres(self) -> "Postgres":
        pg = Postgres(self.host_ip, self.subnet + ".0/24" if self.isolated else None)
        self.cleanups.append(pg.stop)
        return pg

    def redis(self) -> str:
        """A Redis URL; off loopback Redis wants a password (its protected mode), as any real one should."""
        port, password = free_port(self.host_ip), uuid.uuid4().hex
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", self.host_ip, "--save", "",
                                 "--appendonly", "no", "--requirepass", password], stdout=subprocess.DEVNULL,
                                cwd=self.tmp)
        self.cleanups.append(lambda: (proc.terminate(), proc.wait(10)))
        wait_port(self.host_ip, port)
        return f"redis://:{password}@{self.host_ip}:{port}"

    def s3(self) -> "S3":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        server = ThreadedMotoServer(ip_address=self.host_ip, port=0, verbose=False)
        server.start()
        self.cleanups.append(server.stop)
        host, port = server.get_host_and_port()
        s3 = S3(f"http://{host}:{port}", f"b-{uuid.uuid4().hex[:10]}")
        import boto3

        boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=s3.bucket)
        return s3

    # -- teardown --
    def _drop_network(self) -> None:
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in reversed(self.links):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        self.netns, self.links = [], []

    def __exit__(self, *exc: Any) -> None:
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception:
                pass
        self._drop_network()


@dataclass
class S3:
    endpoint: str
    bucket: str

    @property
    def options(self) -> dict:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint}}


class Postgres:
    """A cluster of its own on ``host`` (initdb refuses root: it runs as the postgres user)."""

    def __init__(self, host: str, subnet: str | None):
        self.host, self.port = host, free_port(host)
        self.base = tempfile.mkdtemp(dir=os.environ.get("NCS_TEST_PG_DIR", "/tmp"), prefix="ncs-pg-")
        shutil.chown(self.base, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        data = f"{self.base}/data"
        subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8"],
                       check=True, capture_output=True)
        if subnet:
            with open(f"{data}/pg_hba.conf", "a") as hba:
                hba.write(f"host all all {subnet} trust\n")
        self.pg_ctl = [*as_pg, str(PG_BIN / "pg_ctl"), "-D", data]
        options = (f"-p {self.port} -k {self.base} -c listen_addresses={host} -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        subprocess.run([*self.pg_ctl, "-l", f"{self.base}/log", "-w", "-o", options, "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def new_database(self) -> str:
        import psycopg2

        name = "t_" + uuid.uuid4().hex[:12]
        conn = psycopg2.connect(host=self.host, port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {name}")
        conn.close()
        return f"postgresql://postgres@{self.host}:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self.pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
