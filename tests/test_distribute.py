"""Model files move once, verified: rank 0 sends a rank what it lacks, over a real mpirun.

Each rank gets its own --model path through mpirun's MPMD syntax (`-np 1 A : -np 1 B`), as on a
cluster where every machine has its own disk. The hub tests run a small fake Hugging Face hub
(HTTP, HF_ENDPOINT) serving a model made with make_model: the four endpoints hf_hub_download and
snapshot_download use, nothing more.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import MPIRUN, ROOT, mpi_env, reference_tokens

ARGS = ("--prompt", "The quick brown fox", "--no-chat", "--temp", "0", "--max-tokens", "12",
        "--ignore-eos", "--split", "3,4")
RANK1_SHARDS = ["model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(model_dir):
    """Rank 0's model: 7 layers in 4 shards; with --split 3,4 rank 1 needs shards 3 and 4 only."""
    return model_dir("tiny-llama", shards=4)


@pytest.fixture
def env(tmp_path):
    e = mpi_env()
    e["PIPELINE_CACHE"] = str(tmp_path / "cache")
    return e


def mpmd(env, models, *args, prefix=((), ()), timeout=120) -> subprocess.CompletedProcess:
    """One rank per entry of `models`, each with its own --model (and command prefix)."""
    cmd = [MPIRUN, "--oversubscribe", "--bind-to", "none"]
    for i, model in enumerate(models):
        cmd += [":"] * (i > 0) + ["-np", "1", *prefix[i], sys.executable, "-m", "pipeline",
                                  "--model", str(model), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def tokens_of(proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_empty_rank_receives_its_files_once(source, env, tmp_path):
    target = tmp_path / "rank1-model"
    target.mkdir()  # empty: nothing to load from
    proc = mpmd(env, [source, target], *ARGS, "--json")
    out = tokens_of(proc)
    assert out["tokens"] == reference_tokens(source, out["prompt_ids"], 12)
    assert "sending 6 model files" in proc.stderr and "to rank 1" in proc.stderr
    assert "pipeline: sent 6 files" in proc.stderr and "MB/s" in proc.stderr
    # only what rank 1's layers need, byte for byte rank 0's, no temporary files left
    got = sorted(p.name for p in target.iterdir())
    assert got == sorted(["config.json", "model.safetensors.index.json", "tokenizer.json",
                          "tokenizer_config.json", *RANK1_SHARDS])
    for name in got:
        assert sha(target / name) == sha(source / name), name

    # second run: everything is there and verified, nothing moves (hashes come from the cache)
    mtimes = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    again = mpmd(env, [source, target], *ARGS, "--json")
    assert tokens_of(again)["tokens"] == out["tokens"]
    assert "sending" not in again.stderr and "sent" not in again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == mtimes
    assert list((tmp_path / "cache" / "sha256").glob("rank1-model-*.json"))


def test_missing_folder_is_created(source, env, tmp_path):
    target = tmp_path / "not" / "there"
    out = tokens_of(mpmd(env, [source, target], *ARGS, "--json"))
    assert out["tokens"] == reference_tokens(source, out["prompt_ids"], 12)
    assert (target / RANK1_SHARDS[0]).is_file()


@pytest.fixture
def rank1_copy(source, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    return target


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100:-96] = b"\xde\xad\xbe\xef"  # tensor bytes: the header stays readable
    path.write_bytes(bytes(data))


def test_corrupted_file_is_replaced(source, rank1_copy, env):
    shard = rank1_copy / RANK1_SHARDS[1]
    corrupt(shard)
    proc = mpmd(env, [source, rank1_copy], *ARGS, "--json")
    out = tokens_of(proc)
    assert "rank 1 (" in proc.stderr and f"{RANK1_SHARDS[1]} under {rank1_copy}: sha256 " \
        "differs from rank 0's; replacing it" in proc.stderr
    assert "sending 1 model file" in proc.stderr
    assert sha(shard) == sha(source / RANK1_SHARDS[1])
    assert out["tokens"] == reference_tokens(source, out["prompt_ids"], 12)


def test_corrupted_file_is_refused_without_distribution(source, rank1_copy, env):
    shard = rank1_copy / RANK1_SHARDS[0]
    corrupt(shard)
    before = shard.read_bytes()
    proc = mpmd(env, [source, rank1_copy], *ARGS, "--no-distribute", timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pipeline: error:")]
    assert len(lines) == 1, proc.stderr
    assert "rank 1 (" in lines[0] and "differ from rank 0's" in lines[0]
    assert RANK1_SHARDS[0] in lines[0] and str(rank1_copy) in lines[0]
    assert "drop --no-distribute" in lines[0]
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr
    assert shard.read_bytes() == before  # refused, not touched


def test_missing_files_without_distribution_is_a_clear_error(source, env, tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    proc = mpmd(env, [source, target], *ARGS, "--no-distribute", timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = next(l for l in proc.stderr.splitlines() if l.startswith("pipeline: error:"))
    assert line.startswith("pipeline: error: rank 1 (") and "lacks model files (" in line
    assert f"under {target}; copy them there or drop --no-distribute" in line
    assert "Traceback" not in proc.stderr
    assert list(target.iterdir()) == []


def test_unwritable_folder_falls_back_to_the_cache(monkeypatch, tmp_path, source):
    from pipeline.files import distribute

    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(distribute, "_writable", lambda folder: False)
    manifest = [distribute.Entry(n, (source / n).stat().st_size, sha(source / n))
                for n in ["config.json", RANK1_SHARDS[0]]]
    folder, problems = distribute.choose_folder(tmp_path / "ro" / "model", manifest)
    assert folder == tmp_path / "cache" / "models" / "model"
    assert problems == [("config.json", "missing"), (RANK1_SHARDS[0], "missing")]
    # a complete read-only copy is used where it is
    folder, problems = distribute.choose_folder(source, manifest)
    assert (folder, problems) == (source, [])


def test_wanted_files_follow_the_split(source):
    from pipeline.files.distribute import wanted_files

    meta = ["config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"]
    wanted = wanted_files(source, [3, 4])
    assert wanted[0] == meta + ["model-00001-of-00004.safetensors",
                                "model-00002-of-00004.safetensors",
                                "model-00004-of-00004.safetensors"]  # the final norm lives there
    assert wanted[1] == meta + RANK1_SHARDS


# ---------------------------------------------------------------- a fake Hugging Face hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-llama"


class FakeHub:
    """The endpoints huggingface_hub needs for one repo at one commit; counts file GETs."""

    def __init__(self, folder: Path):
        self.files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.gets: dict[str, int] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, doc):
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, head: bool):
                prefix = f"/{REPO}/resolve/"
                rest = self.path.split("?")[0][len(prefix):] if self.path.startswith(prefix) else ""
                name = rest.split("/", 1)[1] if "/" in rest else ""
                if name not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[name]
                start = 0
                if (rng := self.headers.get("Range", "")).startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not head:
                    hub.gets[name] = hub.gets.get(name, 0) + 1
                    self.wfile.write(data[start:])

            def do_HEAD(self):
                self._file(head=True)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path.startswith(f"/api/models/{REPO}/revision/"):
                    return self._json({"id": REPO, "sha": COMMIT, "siblings": [
                        {"rfilename": n} for n in sorted(hub.files)]})
                if path.startswith(f"/api/models/{REPO}/tree/"):
                    return self._json([{"type": "file", "path": n, "size": len(d),
                                        "oid": hashlib.sha1(d).hexdigest()}
                                       for n, d in sorted(hub.files.items())])
                self._file(head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(source):
    h = FakeHub(source)
    yield h
    h.close()


def hub_env(env, hub, home: Path) -> dict:
    return dict(env, HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
                NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")


def cached_files(home: Path) -> set[str]:
    snap = home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    return {p.name for p in snap.iterdir()} if snap.is_dir() else set()


def test_hub_each_rank_downloads_only_its_files(source, hub, env, tmp_path):
    e = hub_env(env, hub, tmp_path / "hf0")
    own = ("env", f"HF_HOME={tmp_path / 'hf1'}")  # rank 1: its own disk (cache)
    proc = mpmd(e, [REPO, REPO], *ARGS, "--json", prefix=((), own))
    out = tokens_of(proc)
    assert out["tokens"] == reference_tokens(source, out["prompt_ids"], 12)
    shards = {f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)}
    assert cached_files(tmp_path / "hf0") & shards == shards - {RANK1_SHARDS[0]}
    assert cached_files(tmp_path / "hf1") & shards == set(RANK1_SHARDS)
    assert f"pipeline: downloaded {REPO}: rank 0 " in proc.stderr and ", rank 1 " in proc.stderr


def test_hub_shared_cache_downloads_each_file_once(source, hub, env, tmp_path):
    e = hub_env(env, hub, tmp_path / "shared")
    out = tokens_of(mpmd(e, [REPO, REPO], *ARGS, "--json"))
    assert out["tokens"] == reference_tokens(source, out["prompt_ids"], 12)
    # both ranks need config, index, tokenizer and shard 4: the per-blob lock lets one fetch it
    assert hub.gets and all(n == 1 for n in hub.gets.values()), hub.gets
    assert hub.gets[RANK1_SHARDS[1]] == 1


@pytest.mark.parametrize("how", ["rank 1 offline", "--distribute"])
def test_hub_rank_without_hub_gets_files_from_rank_0(source, hub, env, tmp_path, how):
    e = hub_env(env, hub, tmp_path / "hf0")
    rank1 = ("env", f"HF_HOME={tmp_path / 'hf1'}", *["HF_HUB_OFFLINE=1"] * (how != "--distribute"))
    flags = ["--distribute"] * (how == "--distribute")
    proc = mpmd(e, [REPO, REPO], *ARGS, *flags, "--json", prefix=((), rank1))
    out = tokens_of(proc)
    assert out["tokens"] == reference_tokens(source, out["prompt_ids"], 12)
    received = tmp_path / "cache" / "models" / REPO.replace("/", "--")
    assert set(RANK1_SHARDS) <= {p.name for p in received.iterdir()}
    assert "to rank 1" in proc.stderr
    assert cached_files(tmp_path / "hf1") & set(RANK1_SHARDS) == set()  # none from the hub
    # rank 0 fetched rank 1's shards for it, then sent them
    assert set(RANK1_SHARDS) <= cached_files(tmp_path / "hf0")
