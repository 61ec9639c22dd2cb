#!/usr/bin/env python3
"""An emulated Ray cluster on one Linux machine: each host a network namespace with a private disk.

    sudo .venv/bin/python cluster/local_cluster.py up --workers 2      # prints the head's addresses
    sudo .venv/bin/python cluster/local_cluster.py submit -- python jobs/pipeline.py ...
    sudo .venv/bin/python cluster/local_cluster.py down                # every process, every namespace

What a host is (root needed, as for ``ip netns``):
- its own **network namespace**, joined to the others by a veth link to a bridge that lives in a namespace of its
  own (``eimfc-<id>-net``). No namespace gets a default route: nothing reaches or leaves the machine's network.
  The bridge namespace holds the cluster's client address; ``exec_client`` runs commands there, outside every
  host, the way a laptop reaches a cluster.
- its own **mount namespace**: ``/tmp``, ``/dev/shm``, ``$HOME`` (so ``~/.ray``) and ``EIMF_HOME`` are the host's
  own folders, and ``/etc/hosts`` names every host as DNS would. Only the repository with its virtualenv is shared,
  read-only, as every node of a real cluster installs the same environment.
- its own **PID and UTS namespaces** (``unshare --pid --fork --mount-proc --uts``): its processes see only each
  other, so ``ray stop`` on a host stops that host alone, and killing its first process kills every process in
  it (a lost machine). Outside a host, processes are ended by their ids only.

The head runs the S3 endpoint (moto's server; the cluster's only shared storage), the MLflow tracking server
(``cluster/mlflow_server.sh``: basic auth, artifacts on that S3) and ``ray start --head`` with token auth. The head
generates the Ray token and the MLflow job credentials; they are copied to each worker host's ``$HOME`` before it
starts, as ``ray_cluster.yaml``'s ``cluster_synced_files`` does, and every Ray process of a host has them in its
environment. The MLflow admin password stays on the head's disk.

State lives in ``<dir>/cluster.json`` (default ``/var/tmp/eimf-cluster/<id>``); ``down`` reads it, so a cluster left
by a crashed test is still removed by ``down --all``. Tests use :class:`LocalCluster` as their fixture.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
ROOT = Path(os.environ.get("EIMF_CLUSTER_ROOT", "/var/tmp/eimf-cluster"))
PREFIX = "eimfc-"
SUBNET = "10.213.0"  # every cluster has network namespaces of its own: two clusters never share this subnet
CLIENT_IP = f"{SUBNET}.1"
#: S3 (moto) itself, and the fault proxy in front of it through which every host reaches it (cluster/s3_fault_proxy.py).
S3_PORT, S3_PROXY_PORT, MLFLOW_PORT, RAY_PORT, DASHBOARD_PORT = 9000, 9001, 5000, 6379, 8265
BUCKET = "eimf-cluster"
#: Variables of the caller that must not leak into a host (it would join another cluster, log elsewhere).
_DROPPED_ENV = ("RAY_", "MLFLOW_", "AWS_", "EIMF_", "VIRTUAL_ENV", "PYTHONPATH")


@dataclass
class Host:
    name: str
    ip: str
    netns: str
    #: Bridge-side name of the host's veth link (its ``tc`` settings live on that end).
    link: str
    #: Outer pid of the ``unshare`` process; its child is PID 1 of the host. None: not running.
    pid: Optional[int] = None
    cpus: int = 0


@dataclass
class ClusterState:
    id: str
    dir: str
    bridge_ns: str
    hosts: Dict[str, Host] = field(default_factory=dict)
    s3_access_key: str = ""
    s3_secret_key: str = ""

    def save(self) -> None:
        Path(self.dir, "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "ClusterState":
        raw = json.loads(Path(directory, "cluster.json").read_text())
        raw["hosts"] = {k: Host(**v) for k, v in raw["hosts"].items()}
        return cls(**raw)


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def _ns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def _ns_pids(name: str) -> List[int]:
    r = _run("ip", "netns", "pids", name, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _pid1(unshare_pid: int) -> Optional[int]:
    """The outer pid of a host's PID 1: the child that ``unshare --fork`` made."""
    try:
        kids = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class LocalCluster:
    """A running emulated cluster, from :meth:`up` or :meth:`attach`."""

    def __init__(self, state: ClusterState):
        self.state = state

    # ------------------------------------------------------------------------------------------ addresses
    @property
    def dir(self) -> Path:
        return Path(self.state.dir)

    @property
    def head_ip(self) -> str:
        return self.state.hosts["head"].ip

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.head_ip}:{S3_PORT}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.head_ip}:{MLFLOW_PORT}"

    @property
    def workers(self) -> List[str]:
        return [n for n in self.state.hosts if n != "head"]

    @property
    def live_workers(self) -> List[str]:
        """Worker hosts that are running (a killed host keeps its entry, disk and namespace)."""
        return [n for n, h in self.state.hosts.items() if n != "head" and h.pid is not None]

    def disk(self, host: str) -> Path:
        """A host's private disk, seen from outside the hosts: ``tmp/``, ``home/``, ``eimf/``."""
        return self.dir / "hosts" / host

    def s3_env(self, through_proxy: bool = True) -> Dict[str, str]:
        """S3 settings: the hosts go through the fault proxy (no faults until :meth:`set_s3_faults`); a client
        outside the hosts checks S3 directly."""
        url = f"http://{self.head_ip}:{S3_PROXY_PORT}" if through_proxy else self.s3_endpoint
        return {"AWS_ACCESS_KEY_ID": self.state.s3_access_key, "AWS_SECRET_ACCESS_KEY": self.state.s3_secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url}

    def set_s3_faults(self, slowdown: float = 0.0, reset: float = 0.0) -> None:
        """The share of S3 requests from the hosts answered ``503 SlowDown``, and of connections dropped."""
        path = self.disk("head") / "home" / "s3_faults.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"slowdown": slowdown, "reset": reset}))
        os.replace(tmp, path)

    def s3_fault_counts(self) -> Dict[str, int]:
        """Requests the proxy saw, and the faults it injected (each one a request a client retried)."""
        path = self.disk("head") / "home" / "s3_faults.json.counts.json"
        return json.loads(path.read_text()) if path.exists() else {"requests": 0, "slowdowns": 0, "resets": 0}

    def mlflow_job_credentials(self) -> Dict[str, str]:
        """The jobs' MLflow account (head's ``~/.eimf/mlflow.env``): ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``."""
        text = (self.disk("head") / "home" / ".eimf" / "mlflow.env").read_text()
        return dict(line.split("=", 1) for line in text.split() if "=" in line)

    def mlflow_admin(self) -> tuple:
        import configparser

        c = configparser.ConfigParser()
        c.read(self.disk("head") / "home" / "mlflow" / "basic_auth.ini")
        return c["mlflow"]["admin_username"], c["mlflow"]["admin_password"]

    def client_env(self, **extra: str) -> Dict[str, str]:
        """Environment of a client outside the hosts: the Ray token (copied out of the head, as
        ``ray rsync-down`` does on AWS), the S3 endpoint and keys."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
        env.update(self.s3_env(through_proxy=False), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.dir / "client" / "auth_token"),
                   RAY_ADDRESS=self.dashboard_url, RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
        return env

    # ------------------------------------------------------------------------------------------- commands
    def exec_client(self, cmd: Sequence[str], env: Optional[Dict[str, str]] = None, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` outside every host, on the cluster's network (the bridge namespace), with the client env."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.state.bridge_ns, *cmd], env=env or self.client_env(), **kw)

    def exec_host(self, host: str, cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside a host (its network, disk, PID and UTS namespaces, its environment)."""
        h = self.state.hosts[host]
        pid1 = _pid1(h.pid) if h.pid else None
        if not pid1:
            raise RuntimeError(f"host {host} is not running")
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        env = _host_env(self, h)
        return subprocess.run(["nsenter", f"--target={pid1}", "--mount", "--pid", "--net", "--uts", "--",
                               "env", "-i", *[f"{k}={v}" for k, v in env.items()], *cmd], **kw)

    def python_on_client(self, code: str, timeout: float = 120, **env: str) -> str:
        r = self.exec_client([str(VENV_BIN / "python"), "-c", code], env=self.client_env(**env), timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"client python failed: {r.stderr[-3000:]}")
        return r.stdout

    # ------------------------------------------------------------------------------------------- lifecycle
    @classmethod
    def up(cls, workers: int = 2, directory: Optional[str] = None, cpus_per_worker: int = 2,
           timeout: float = 240) -> "LocalCluster":
        if os.geteuid() != 0:
            raise SystemExit("local_cluster: network namespaces need root")
        cid = secrets.token_hex(2)
        d = Path(directory or ROOT / cid)
        d.mkdir(parents=True, exist_ok=True)
        (d / "client").mkdir(exist_ok=True)
        state = ClusterState(id=cid, dir=str(d), bridge_ns=f"{PREFIX}{cid}-net",
                             s3_access_key=f"eimf-{cid}", s3_secret_key=secrets.token_urlsafe(24))
        state.save()  # from here on, `down` can find and remove whatever exists
        cluster = cls(state)
        try:
            _run("ip", "netns", "add", state.bridge_ns)
            _run("ip", "-n", state.bridge_ns, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", state.bridge_ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "br0")
            for dev in ("br0", "lo"):
                _run("ip", "-n", state.bridge_ns, "link", "set", dev, "up")
            _prebuild_deepspeed_ops()
            cluster._add_host("head", f"{SUBNET}.10", cpus=0)
            cluster._wait_ready("head", timeout)
            (d / "client" / "auth_token").write_bytes((cluster.disk("head") / "home" / ".ray" / "auth_token").read_bytes())
            os.chmod(d / "client" / "auth_token", 0o600)
            for _ in range(workers):
                cluster.add_worker(cpus=cpus_per_worker, timeout=timeout)
        except BaseException:
            cluster.down()
            raise
        return cluster

    @classmethod
    def attach(cls, directory: Optional[str] = None) -> "LocalCluster":
        if directory is None:
            found = sorted(ROOT.glob("*/cluster.json"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise SystemExit(f"local_cluster: no cluster under {ROOT}")
            directory = str(found[-1].parent)
        return cls(ClusterState.load(directory))

    def add_worker(self, name: Optional[str] = None, cpus: int = 2, timeout: float = 240) -> str:
        """Start a worker host that joins the head (a fresh machine: an empty disk but for the synced files)."""
        n = len(self.state.hosts)
        name = name or f"w{n}"
        while name in self.state.hosts:
            n += 1
            name = f"w{n}"
        ip = f"{SUBNET}.{10 + n}"
        while ip in {h.ip for h in self.state.hosts.values()}:
            n += 1
            ip = f"{SUBNET}.{10 + n}"
        # cluster_synced_files: the head's Ray token and MLflow job credentials, same paths on the worker
        home = self.disk(name) / "home"
        for rel in (".ray/auth_token", ".eimf/mlflow.env"):
            (home / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.disk("head") / "home" / rel, home / rel)
        self._add_host(name, ip, cpus=cpus)
        self._wait_ready(name, timeout)
        return name

    def _add_host(self, name: str, ip: str, cpus: int) -> None:
        st = self.state
        netns, link = f"{PREFIX}{st.id}-{name}", f"{st.id}-{name}"[:15]
        host = Host(name=name, ip=ip, netns=netns, link=link, cpus=cpus)
        st.hosts[name] = host
        st.save()
        _run("ip", "netns", "add", netns)
        _run("ip", "-n", st.bridge_ns, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "-n", st.bridge_ns, "link", "set", link, "master", "br0")
        _run("ip", "-n", st.bridge_ns, "link", "set", link, "up")
        _run("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        for dev in ("eth0", "lo"):
            _run("ip", "-n", netns, "link", "set", dev, "up")
        disk = self.disk(name)
        for sub in ("tmp", "home", "eimf", "logs"):
            (disk / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(disk / "tmp", 0o1777)
        (disk / "etc_hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{h.ip} eimf-{h.name}\n" for h in st.hosts.values())
            + f"{CLIENT_IP} eimf-client\n")
        script = disk / "init.sh"
        script.write_text(_init_script(self, host))
        log = open(disk / "logs" / "init.log", "w")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "--mount-proc", "--uts", "--kill-child=SIGKILL", "bash", str(script)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_host_env(self, host),
            start_new_session=True)
        host.pid = proc.pid
        st.save()
        # Other hosts learn the new name as DNS would.
        for other in st.hosts.values():
            if other.name != name and (self.disk(other.name) / "etc_hosts").exists():
                with open(self.disk(other.name) / "etc_hosts", "a") as f:
                    f.write(f"{ip} eimf-{name}\n")

    def _wait_ready(self, name: str, timeout: float) -> None:
        host, ready = self.state.hosts[name], self.disk(name) / "home" / "ready"
        deadline = time.time() + timeout
        while not ready.exists():
            if not _alive(host.pid) or time.time() > deadline:
                log = (self.disk(name) / "logs" / "init.log").read_text()[-4000:]
                raise RuntimeError(f"host {name} did not come up ({'exited' if not _alive(host.pid) else 'timeout'}):\n{log}")
            time.sleep(0.5)

    def kill_host(self, name: str) -> None:
        """A lost machine: SIGKILL to the host's PID 1, which takes every process of its PID namespace with it.
        Its disk and network namespace stay (the machine is gone, not deleted)."""
        host = self.state.hosts[name]
        pid1 = _pid1(host.pid) if host.pid else None
        for pid in (pid1, host.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        for pid in _ns_pids(host.netns):  # a process that escaped the PID namespace would still be on its network
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30
        while (_alive(host.pid) or _ns_pids(host.netns)) and time.time() < deadline:
            try:
                os.waitpid(host.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        host.pid = None
        self.state.save()

    def mlflow_server(self, action: str) -> None:
        """``--stop`` or ``--background`` (restart) the head's MLflow server, as an operator on the head would."""
        env = [f"{k}={v}" for k, v in _mlflow_server_env(self).items()]
        r = self.exec_host("head", ["env", *env, str(REPO / "cluster" / "mlflow_server.sh"), action], timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"mlflow_server.sh {action} on the head failed: {r.stderr[-2000:]}")

    def set_link(self, name: str, rate: Optional[str] = None, loss_pct: float = 0.0) -> None:
        """A worse link for a host: ``rate`` (``tc tbf``, e.g. ``"20mbit"``) on both ends, and ``loss_pct`` of its
        packets dropped each way (nftables in the host's namespace). No arguments: a clean link again. (``tc
        netem``, for delay, is not in every kernel: not in the one these tests were written on.)"""
        host = self.state.hosts[name]
        for ns, dev in ((self.state.bridge_ns, host.link), (host.netns, "eth0")):
            _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if rate:
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kbit",
                     "latency", "100ms")
        nft = ["ip", "netns", "exec", host.netns, "nft"]
        _run(*nft, "delete", "table", "inet", "eimf_faults", check=False)
        if loss_pct:
            if not shutil.which("nft"):
                raise RuntimeError("set_link(loss_pct=...) needs nftables: apt-get install nftables")
            per_10k = str(int(round(loss_pct * 100)))
            _run(*nft, "add", "table", "inet", "eimf_faults")
            for hook in ("input", "output"):
                _run(*nft, "add", "chain", "inet", "eimf_faults", hook,
                     f"{{ type filter hook {hook} priority 0; }}")
                _run(*nft, "add", "rule", "inet", "eimf_faults", hook, "iifname" if hook == "input" else "oifname",
                     "eth0", "numgen", "random", "mod", "10000", "<", per_10k, "drop")

    def down(self) -> None:
        """End every process of every host, remove the namespaces and the state folder."""
        for name in list(self.state.hosts):
            self.kill_host(name)
        for name in [h.netns for h in self.state.hosts.values()] + [self.state.bridge_ns]:
            if _ns_exists(name):
                _run("ip", "netns", "del", name, check=False)
        shutil.rmtree(self.state.dir, ignore_errors=True)


def _prebuild_deepspeed_ops() -> None:
    """DeepSpeed JIT-compiles its CPU op into TORCH_EXTENSIONS_DIR on first use. The hosts share the venv
    read-only, as nodes share an image, so the op is built into the image here once (a no-op when it exists) and
    each host copies it onto its own disk."""
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "get_accelerator().create_op_builder('ShareMemCommBuilder').load()\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions"), "DS_ACCELERATOR": "cpu"}
    subprocess.run([str(VENV_BIN / "python"), "-c", code], env=env, capture_output=True, timeout=600)


def _mlflow_server_env(cluster: LocalCluster) -> Dict[str, str]:
    """cluster/mlflow_server.sh's settings on the head: its files in the head's ~/mlflow, artifacts on the S3."""
    return {"EIMF_MLFLOW_DIR": str(Path(cluster.state.dir) / "hosts" / "home" / "mlflow"),
            "EIMF_MLFLOW_HOST": cluster.head_ip, "EIMF_MLFLOW_PORT": str(MLFLOW_PORT),
            "EIMF_MLFLOW_ARTIFACTS": f"s3://{BUCKET}/mlflow-artifacts"}


def _host_env(cluster: LocalCluster, host: Host) -> Dict[str, str]:
    mounted = Path(cluster.state.dir) / "hosts"  # inside a host, its own disk is mounted here
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
    env.update(cluster.s3_env(), HOME=str(mounted / "home"), EIMF_HOME=str(mounted / "eimf"), TMPDIR="/tmp",
               PATH=f"{VENV_BIN}{os.pathsep}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_TRACKING_URI=cluster.mlflow_url, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=str(mounted / "home" / ".cache" / "torch_extensions"), DS_ACCELERATOR="cpu",
               PYTHONUNBUFFERED="1", EIMF_HOST=host.name, EIMF_HOST_IP=host.ip)
    return env


def _init_script(cluster: LocalCluster, host: Host) -> str:
    """PID 1 of a host: private mounts, then the host's services, then it waits (reaping orphans) forever."""
    d = Path(cluster.state.dir)
    q = shlex.quote
    ray = q(str(VENV_BIN / "ray"))
    lines = [
        "set -euo pipefail",
        "mount --make-rprivate /",
        # Only this host's disk is visible under <dir>/hosts; it holds $HOME and EIMF_HOME.
        f"mount --bind {q(str(d / 'hosts' / host.name))} {q(str(d / 'hosts'))}",
        f"mount --bind {q(str(d / 'hosts' / 'tmp'))} /tmp",
        "mount -t tmpfs -o size=2g,mode=1777 tmpfs /dev/shm",
        f"mount --bind {q(str(d / 'hosts' / 'etc_hosts'))} /etc/hosts",
        # The repository and its virtualenv: shared and read-only, like a node image.
        f"mount --bind {q(str(REPO))} {q(str(REPO))}",
        f"mount -o remount,bind,ro {q(str(REPO))}",
        f"hostname eimf-{host.name}",
        # The node image's prebuilt DeepSpeed op, onto the host's disk: torch takes a lock in that folder even to
        # load a built op, and the image is read-only (timestamps kept, so nothing is rebuilt).
        f"mkdir -p $HOME/.cache && {{ [ ! -d {q(str(REPO / '.venv' / 'torch_extensions'))} ] || "
        f"cp -a {q(str(REPO / '.venv' / 'torch_extensions'))} $TORCH_EXTENSIONS_DIR; }}",
        'LOGS=$HOME/../logs',
        'echo "host $(hostname) $EIMF_HOST_IP up"',
    ]
    start = [f"--node-ip-address={host.ip}", f"--num-cpus={host.cpus}", "--object-store-memory=300000000",
             "--disable-usage-stats", "--min-worker-port=20000", "--max-worker-port=20999"]
    if host.name == "head":
        lines += [
            f"{q(str(VENV_BIN / 'moto_server'))} -H {host.ip} -p {S3_PORT} > $LOGS/s3.log 2>&1 &",
            f"python {q(str(REPO / 'cluster' / 's3_fault_proxy.py'))} --listen {host.ip}:{S3_PROXY_PORT} "
            f"--upstream {cluster.s3_endpoint} --control $HOME/s3_faults.json > $LOGS/s3_proxy.log 2>&1 &",
            f"for i in $(seq 60); do python -c \"import socket; socket.create_connection(('{host.ip}', {S3_PROXY_PORT}), 1)\""
            " 2>/dev/null && break; sleep 0.5; done",
            # the bucket, once the endpoint answers
            f"for i in $(seq 60); do python -c \"import s3fs; s3fs.S3FileSystem(endpoint_url='{cluster.s3_endpoint}')"
            f".mkdir('{BUCKET}')\" 2>/dev/null && break; sleep 0.5; done",
            " ".join(f"{k}={q(v)}" for k, v in _mlflow_server_env(cluster).items())
            + f" {q(str(REPO / 'cluster' / 'mlflow_server.sh'))} --background",
            "mkdir -p $HOME/.eimf && install -m 600 $HOME/mlflow/job.env $HOME/.eimf/mlflow.env",
            "set -a; . $HOME/.eimf/mlflow.env; set +a",
            f"{ray} get-auth-token --generate > /dev/null",
            f"{ray} start --head --port={RAY_PORT} --dashboard-host={host.ip} --dashboard-port={DASHBOARD_PORT} "
            + " ".join(start),
        ]
    else:
        lines += [
            "set -a; . $HOME/.eimf/mlflow.env; set +a",
            f"{ray} start --address={cluster.head_ip}:{RAY_PORT} " + " ".join(start),
        ]
    lines += ["touch $HOME/ready", "echo ready", "trap '' TERM INT", "while :; do sleep 3600 & wait $! || true; done"]
    return "\n".join(lines) + "\n"


def down_all() -> int:
    """Remove every emulated cluster under the state root, and any namespace of ours left without one."""
    n = 0
    for state in ROOT.glob("*/cluster.json"):
        LocalCluster.attach(str(state.parent)).down()
        n += 1
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            for pid in _ns_pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _run("ip", "netns", "del", name, check=False)
    return n


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start a head and N worker hosts")
    u.add_argument("--workers", type=int, default=2)
    u.add_argument("--cpus-per-worker", type=int, default=2, help="logical CPUs Ray sees on each worker host")
    u.add_argument("--dir", help=f"state folder (default {ROOT}/<id>)")
    d = sub.add_parser("down", help="end every process of the cluster and remove its namespaces")
    d.add_argument("--dir")
    d.add_argument("--all", action="store_true", help=f"every cluster under {ROOT}")
    s = sub.add_parser("status", help="hosts, addresses, and `ray status` on the head")
    s.add_argument("--dir")
    for name, helptext in (("submit", "ray job submit to the head from outside the hosts"),
                           ("client", "run a command outside the hosts, on the cluster network")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--dir")
        c.add_argument("argv", nargs=argparse.REMAINDER)
    e = sub.add_parser("exec", help="run a command inside a host")
    e.add_argument("--dir")
    e.add_argument("host")
    e.add_argument("argv", nargs=argparse.REMAINDER)
    k = sub.add_parser("kill", help="SIGKILL every process of a host")
    k.add_argument("--dir")
    k.add_argument("host")
    a = sub.add_parser("add-worker", help="start one more worker host")
    a.add_argument("--dir")
    args = p.parse_args(argv)

    if args.cmd == "up":
        c = LocalCluster.up(args.workers, args.dir, args.cpus_per_worker)
        print(json.dumps({"dir": c.state.dir, "hosts": {h.name: h.ip for h in c.state.hosts.values()},
                          "dashboard": c.dashboard_url, "s3": c.s3_endpoint, "mlflow": c.mlflow_url}, indent=2))
        return 0
    if args.cmd == "down":
        if args.all:
            print(f"removed {down_all()} cluster(s)")
        else:
            LocalCluster.attach(args.dir).down()
        return 0
    c = LocalCluster.attach(args.dir)
    rest = [a for a in getattr(args, "argv", []) if a != "--"] if args.cmd in ("submit", "client", "exec") else []
    if args.cmd == "status":
        for h in c.state.hosts.values():
            print(f"{h.name:6} {h.ip:12} {'running' if _alive(h.pid) else 'down'}")
        print(c.exec_host("head", ["ray", "status"]).stdout)
        return 0
    if args.cmd == "submit":
        return c.exec_client(["ray", "job", "submit", "--address", c.dashboard_url, "--working-dir", ".", "--",
                              *rest], capture_output=False).returncode
    if args.cmd == "client":
        return c.exec_client(rest, capture_output=False).returncode
    if args.cmd == "exec":
        return c.exec_host(args.host, rest, capture_output=False).returncode
    if args.cmd == "kill":
        c.kill_host(args.host)
        return 0
    if args.cmd == "add-worker":
        print(c.add_worker())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
