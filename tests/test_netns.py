"""The virtual multi-host cluster (launch/netns-cluster, netns-rsh, netns-mpirun) on this Linux box.

Network namespaces pn1..pnN joined by shaped veths to a bridge; ranks started in them by OpenMPI through
the rsh agent must give the same tokens as one process, report their own host names, and really send their
bytes over the veths. Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN): skipped, with the reason, where network
namespaces cannot be created. These tests take over the box's netns cluster (pn1.., /etc/hosts lines) and
leave none behind; the hostfile goes to a temporary folder, not hostfiles/netns.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, mpi_env, run_json

CLUSTER = str(ROOT / "launch" / "netns-cluster")
RSH = str(ROOT / "launch" / "netns-rsh")
NETNS_MPIRUN = str(ROOT / "launch" / "netns-mpirun")
MARK = "# pipeline-netns"
pytestmark = pytest.mark.netns
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
N_TOKENS = 16


def _cannot_make_namespaces() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run the tests as root to include them"
    missing = [t for t in ("ip", "tc", "unshare") if shutil.which(t) is None]
    if missing:  # root on Linux: the cluster must run, so this is a failure, not a skip
        pytest.fail(f"{', '.join(missing)} not found: apt-get install iproute2 util-linux", pytrace=False)
    probe = f"pnprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace (no CAP_NET_ADMIN/CAP_SYS_ADMIN?): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="module")
def netns_ok():
    reason = _cannot_make_namespaces()
    if reason:
        print(f"\nskipping netns tests: {reason}")
        pytest.skip(reason)


def cluster(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLUSTER, *args], capture_output=True, text=True, timeout=60,
                          env=env or os.environ.copy(), cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def ours(names: set[str]) -> set[str]:
    return {n for n in names if re.fullmatch(r"pn[0-9]+|pnbr", n)}


def hosts_lines() -> list[str]:
    with open("/etc/hosts") as f:
        return [line for line in f if MARK in line]


def tx_bytes(node: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", node, "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def qdisc(ns: str, dev: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture
def netns_env(netns_ok, tmp_path):
    """Environment for the cluster scripts: the hostfile in a temporary folder."""
    env = mpi_env()
    env["PIPELINE_NETNS_HOSTFILE"] = str(tmp_path / "netns")
    return env


@pytest.fixture
def three_hosts(netns_env):
    """A 3-node cluster on the tb4 profile, taken down afterwards whatever happens."""
    cluster("up", "3", "--link", "tb4", env=netns_env)
    yield netns_env
    cluster("down", env=netns_env, check=False)


def netns_json(env: dict, np_: int, *args: str) -> dict:
    cmd = [NETNS_MPIRUN, "-np", str(np_), sys.executable, "-m", "pipeline", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("np_", [2, 3])
def test_ranks_across_namespaces_give_single_process_tokens(model_dir, three_hosts, np_):
    args = ("--model", str(model_dir("tiny-llama")), "--prompt", PROMPT, "--no-chat", "--temp", "0",
            "--max-tokens", str(N_TOKENS), "--ignore-eos")
    nodes = [f"pn{k}" for k in range(1, np_ + 1)]
    single = run_json(0, *args)  # one process, no mpirun
    before = {n: tx_bytes(n) for n in nodes}
    out = netns_json(three_hosts, np_, *args)
    after = {n: tx_bytes(n) for n in nodes}

    assert out["tokens"] == single["tokens"]
    assert len(out["tokens"]) == N_TOKENS
    assert [r["rank"] for r in out["ranks"]] == list(range(np_))
    # each rank ran in its own node, with that node's host name (own UTS namespace per node)
    assert [r["host"] for r in out["ranks"]] == nodes
    # the hidden states really crossed the veths: each node sent at least its rank's activations
    for r, node in zip(out["ranks"], nodes):
        assert r["bytes_sent"] > 0
        assert after[node] - before[node] >= r["bytes_sent"], (node, before[node], after[node], r)


def test_rsh_agent_runs_in_the_node(three_hosts):
    # OpenMPI calls the agent like ssh: options first, then the host, then the command words
    proc = subprocess.run([RSH, "-x", "-o", "StrictHostKeyChecking=no", "-p22", "-T", "root@pn2",
                           "echo", "$(hostname)", ";", "ip", "-4", "-o", "addr", "show", "dev", "eth0"],
                          capture_output=True, text=True, timeout=30, env=three_hosts)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "pn2"
    assert "198.18.0.12/24" in proc.stdout
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() != "pn2"
    bad = subprocess.run([RSH, "pn9", "true"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 255 and "no netns cluster node 'pn9'" in bad.stderr


def test_up_is_idempotent_and_down_leaves_nothing(netns_env):
    hostfile = netns_env["PIPELINE_NETNS_HOSTFILE"]
    try:
        cluster("up", "3", "--link", "tb4", env=netns_env)
        assert ours(namespaces()) == {"pn1", "pn2", "pn3", "pnbr"}
        assert "rate 20Gbit" in qdisc("pn1", "eth0") and "rate 20Gbit" in qdisc("pnbr", "p1")

        # again, smaller and slower: re-created cleanly, nothing of the 3-node cluster left
        cluster("up", "2", "--link", "1gbe", env=netns_env)
        assert ours(namespaces()) == {"pn1", "pn2", "pnbr"}
        assert "rate 1Gbit" in qdisc("pn2", "eth0") and "rate 1Gbit" in qdisc("pnbr", "p2")
        assert sorted(line.split()[:2] for line in hosts_lines()) == [
            ["198.18.0.1", "pn0"], ["198.18.0.11", "pn1"], ["198.18.0.12", "pn2"]]
        with open(hostfile) as f:
            text = f.read()
        assert text.startswith("#") and "generated" in text.splitlines()[0]
        assert [line for line in text.splitlines() if not line.startswith("#")] == [
            "pn1 slots=1", "pn2 slots=1"]
        status = cluster("status", env=netns_env)
        assert "2 nodes" in status.stdout and "pn2" in status.stdout
        # only the benchmark range: 198.18.0.0/24 in the nodes, and pn0 in the root namespace
        addrs = subprocess.run(["ip", "-n", "pn1", "-4", "-o", "addr"], capture_output=True,
                               text=True).stdout
        assert sorted(re.findall(r"inet (\S+)", addrs)) == ["127.0.0.1/8", "198.18.0.11/24"]
    finally:
        cluster("down", env=netns_env, check=False)

    assert ours(namespaces()) == set()
    assert subprocess.run(["ip", "link", "show", "pn0"], capture_output=True).returncode != 0
    assert hosts_lines() == []
    assert not os.path.exists(hostfile)
    assert cluster("status", env=netns_env, check=False).returncode == 1
    assert cluster("down", env=netns_env).returncode == 0  # down twice is fine


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the netns cluster is Linux only")
def test_clear_errors(tmp_path):
    netns_env = dict(os.environ, PIPELINE_NETNS_HOSTFILE=str(tmp_path / "netns"))
    before = namespaces() if shutil.which("ip") else set()
    # not root: one line, exit 2, nothing created
    as_user = [] if os.geteuid() != 0 else [shutil.which("setpriv") or "setpriv", "--reuid=65534",
                                            "--regid=65534", "--clear-groups"]
    if os.geteuid() != 0 or shutil.which("setpriv"):
        proc = subprocess.run([*as_user, CLUSTER, "up", "2"], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2
        if shutil.which("ip") and shutil.which("tc"):
            assert proc.stderr.strip().count("\n") == 0 and "must run as root" in proc.stderr
    # ip/tc missing
    env = dict(netns_env, PATH="/nonexistent")
    proc = subprocess.run(["/bin/bash", CLUSTER, "up", "2"], capture_output=True, text=True,
                          timeout=30, env=env)
    assert proc.returncode == 2 and "'ip' not found" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    proc = cluster("up", "2", "--link", "wifi", env=netns_env, check=False)
    assert proc.returncode == 2 and "unknown link 'wifi'" in proc.stderr
    assert not os.path.exists(netns_env["PIPELINE_NETNS_HOSTFILE"])
    if shutil.which("ip"):
        assert namespaces() == before


def test_memory_caps_force_an_uneven_split_with_single_process_tokens(model_dir, three_hosts,
                                                                        tmp_path):
    """Per-host caps (`# pipeline: mem=`) in the hostfile given to both mpirun and --hostfile:
    the capped node gets fewer layers, the tokens stay exact. The cap must bind whatever the
    bandwidth probe measures: 0.8 x 320.5 MiB leaves 1.75 layers of tiny-llama (weights + KV
    for 64 tokens, 164352 bytes a layer) above the 256 MiB headroom, 1 layer beside rank 0's
    head. (A 322M cap on rank 0 left room for 9 layers: the split then followed whichever
    namespace probed faster, and failed on a box where pn1 measured 20% faster.)"""
    args = ("--model", str(model_dir("tiny-llama")), "--prompt", PROMPT, "--no-chat", "--temp", "0",
            "--max-tokens", str(N_TOKENS), "--ignore-eos", "--max-context", "64")
    single = run_json(0, *args)
    for caps, smaller in ((("320.5M", "2G"), 0), (("2G", "320.5M"), 1)):
        hostfile = tmp_path / f"caps-{smaller}"
        hostfile.write_text("".join(f"pn{i + 1} slots=1   # pipeline: mem={m}\n"
                                    for i, m in enumerate(caps)))
        env = dict(three_hosts, PIPELINE_NETNS_HOSTFILE=str(hostfile))
        out = netns_json(env, 2, *args, "--hostfile", str(hostfile))
        layers = [end - start for start, end in (r["layer_range"] for r in out["ranks"])]
        assert sum(layers) == 7 and layers[smaller] < layers[1 - smaller], (caps, layers)
        assert [r["host"] for r in out["ranks"]] == ["pn1", "pn2"]
        assert out["tokens"] == single["tokens"], caps


SEND_WHILE_COMPUTING = """
import sys, time
import mlx.core as mx
import numpy as np
from mpi4py import MPI
from pipeline.exec.head import SUMMARY_COLS
from pipeline.wire.protocol import Flag, Message, Op
from pipeline.wire.ring import Ring
comm = MPI.COMM_WORLD
ring, progress, kind = Ring(comm), sys.argv[1] == "progress", sys.argv[2]
# a prefill chunk: 8 MiB, far above any eager limit; a decode step of 16 rows with the last
# rank's head summary: 64 KiB of activations (TCP's eager limit) and a 2.3 KiB summary
shape = (1, 2048, 1024) if kind == "chunk" else (16, 1, 1024)
if comm.Get_rank() == 0:
    h = mx.ones(shape); mx.eval(h)
    comm.Barrier()
    if kind == "chunk":
        ring.send(Message(Op.FORWARD, h=h))
    else:
        ring.send(Message(Op.FORWARD, flags=Flag.HEAD, h=h, part=np.zeros((16, SUMMARY_COLS))))
    start = time.perf_counter()
    while time.perf_counter() - start < 2.0:  # "compute the next chunk", layer by layer
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass
        if progress and ring.sending:
            ring.progress()  # what Stage.forward and the head call between layers, pieces
    ring.close()
else:
    comm.Barrier()
    start = time.perf_counter()
    msg = ring.recv()
    assert msg.h.shape == shape
    print(f"arrived {time.perf_counter() - start:.3f}")
"""


@pytest.mark.parametrize("kind", ["chunk", "decode"])
def test_a_send_moves_while_the_sender_computes(three_hosts, kind):
    """Over TCP (ranks on two hosts), Open MPI moves a message above the eager size only
    inside MPI calls; the ring's progress() between layers (and between pieces of the head)
    is what lets a prefill chunk or a decode step's activations arrive while the sender
    computes the next one, instead of a whole step's compute later."""
    arrival = {}
    for mode in ("progress", "none"):
        cmd = [NETNS_MPIRUN, "-np", "2", sys.executable, "-c", SEND_WHILE_COMPUTING, mode, kind]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=three_hosts,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        arrival[mode] = float(re.search(r"arrived ([\d.]+)", proc.stdout).group(1))
    print(f"\n{kind} over TCP arrived after {arrival}")
    assert arrival["progress"] < 1.0, arrival  # at tb4 speed: milliseconds
    assert arrival["none"] > 1.5, arrival  # held at the sender for its 2 s of compute
