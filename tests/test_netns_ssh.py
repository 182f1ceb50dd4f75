"""Real ssh in the netns cluster: the README's Mac steps (passwordless ssh, the same path on every
host, a non-interactive shell whose PATH lacks the venv) on one Linux box.

`launch/netns-cluster up 2 --ssh` starts an sshd in each node; launch/mpirun, run from a shell whose
PATH lacks the venv, starts the ranks with mpirun's own ssh launcher (only the client config is ours).
The nodes' shells cannot find the venv's prted: the job runs because launch/mpirun passes --prefix.
Needs root and openssh-server (.ci/run installs it); skipped without root, like tests/test_netns.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, ROOT, launch_checkout, run_json
from test_netns import N_TOKENS, PROMPT, cluster, netns_env, netns_ok  # noqa: F401 (fixtures)

pytestmark = pytest.mark.netns

SSH_DIR = Path("/run/pipeline-netns/ssh")  # where `up --ssh` keeps keys, configs, pid files, logs
SSH_CONFIG = SSH_DIR / "ssh_config"
NODES = ["pn1", "pn2"]
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"  # a login's PATH, no venv in it
# each rank: its node and its ancestors' command lines (parent first)
ANCESTRY = """
import json, os, socket
chain, pid = [], os.getppid()
while pid > 1:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        chain.append(f.read().replace(b"\\0", b" ").decode().strip())
    with open(f"/proc/{pid}/stat") as f:
        pid = int(f.read().rsplit(")", 1)[1].split()[1])
print(json.dumps({"rank": int(os.environ["OMPI_COMM_WORLD_RANK"]), "host": socket.gethostname(),
                  "chain": chain}), flush=True)
"""


def sshd_pids() -> list[int]:
    return [int((SSH_DIR / f"{node}.pid").read_text()) for node in NODES]


def is_sshd(pid: int) -> bool:
    """A running sshd (a zombie has ended: only its parent's wait is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            comm, state = re.fullmatch(r"\d+ \((.*)\) (\S) .*", f.read().strip(), re.S).groups()
    except OSError:
        return False
    return comm == "sshd" and state != "Z"


@pytest.fixture
def ssh_cluster(netns_env):
    """2 nodes with an sshd each; taken down afterwards whatever happens, the sshds checked gone."""
    missing = [t for t in ("ssh", "ssh-keygen") if shutil.which(t) is None]
    if shutil.which("sshd") is None and not os.access("/usr/sbin/sshd", os.X_OK):
        missing.append("sshd")
    if missing:  # root on Linux (netns_ok passed): the test must run, so a failure, not a skip
        pytest.fail(f"{', '.join(missing)} not found: apt-get install openssh-server openssh-client",
                    pytrace=False)
    pids = []
    try:
        cluster("up", str(len(NODES)), "--link", "none", "--ssh", env=netns_env)
        pids = sshd_pids()
        assert all(is_sshd(pid) for pid in pids), pids
        yield netns_env
    finally:
        cluster("down", env=netns_env, check=False)
    assert not any(is_sshd(pid) for pid in pids), f"sshd left running after down: {pids}"
    assert not SSH_DIR.exists()


def ssh(node: str, command: str) -> str:
    proc = subprocess.run(["ssh", "-F", str(SSH_CONFIG), node, command], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_ranks_start_through_sshd_with_single_process_tokens(model_dir, ssh_cluster, tmp_path):
    # the checkout as on a Mac: launch/ beside .venv (the path mpirun gives as --prefix)
    launch = launch_checkout(tmp_path / "checkout", BIN.parent)
    venv = tmp_path / "checkout" / ".venv"
    env = {k: v for k, v in ssh_cluster.items() if k not in ("VIRTUAL_ENV", "LD_LIBRARY_PATH")}
    env.update(PATH=PLAIN_PATH, PIPELINE_IFACE="198.18.0.0/24")
    mpirun = [str(launch), "-np", str(len(NODES)), "-hostfile", env["PIPELINE_NETNS_HOSTFILE"],
              "--mca", "plm_rsh_agent", f"ssh -F {SSH_CONFIG}"]

    # passwordless, and the nodes' non-interactive shells do not find the venv's daemon themselves
    assert ssh("pn2", "hostname").splitlines()[-1] == "pn2"
    assert ssh("pn1", "command -v prted || echo none").splitlines()[-1] == "none", \
        "the nodes' shells find prted on their own (a PATH set in ~/.bashrc?): nothing left to prove"

    args = ("--model", str(model_dir("tiny-llama")), "--prompt", PROMPT, "--no-chat", "--temp", "0",
            "--max-tokens", str(N_TOKENS), "--ignore-eos")
    single = run_json(0, *args)  # one process, no mpirun
    logs = {node: SSH_DIR / f"{node}.log" for node in NODES}
    seen = {node: log.stat().st_size for node, log in logs.items()}
    proc = subprocess.run([*mpirun, sys.executable, "-m", "pipeline", *args, "--json"],
                          capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tokens"] == single["tokens"]
    assert len(out["tokens"]) == N_TOKENS
    assert [r["host"] for r in out["ranks"]] == NODES

    # each node's sshd let the generated client key in during the run
    key = subprocess.run(["ssh-keygen", "-lf", str(SSH_DIR / "id_ed25519.pub")], capture_output=True,
                         text=True, check=True).stdout.split()[1]
    for node, log in logs.items():
        with open(log) as f:
            f.seek(seen[node])
            new = f.read()
        assert re.search(rf"Accepted publickey for root from 198\.18\.0\.\d+ port \d+ ssh2: ED25519 "
                         rf"{re.escape(key)}", new), (node, new)

    # and the ranks descend from it: rank <- prted at --prefix <- ssh session <- the node's sshd
    proc = subprocess.run([*mpirun, sys.executable, "-c", ANCESTRY], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["host"] for r in ranks] == NODES
    for k, r in enumerate(ranks, start=1):
        chain = r["chain"]
        assert chain[0].startswith(f"{venv}/bin/prted "), chain  # launch/mpirun's --prefix, as typed
        session = next(i for i, c in enumerate(chain) if c.startswith("sshd: root@"))
        assert f"ListenAddress=198.18.0.{10 + k}" in chain[session + 1], chain
