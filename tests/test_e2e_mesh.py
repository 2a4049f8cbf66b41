"""End to end: 3 real nodes + a --client node on loopback.

Real QUIC, real llama.cpp, the real SmolLM2 model.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh_inference.cli.devmesh import LocalMesh, NodeProcess

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _engine_available() -> str | None:
    from mesh_inference.engine.backends import EngineUnavailable, find_backend

    try:
        find_backend("bin")
    except EngineUnavailable as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    reason = _engine_available()
    if reason:
        pytest.skip(f"llama.cpp binaries not installed: {reason}")
    root: Path = tmp_path_factory.mktemp("mesh")
    lm = LocalMesh(root, extra_args=["--threads", "1"])
    try:
        a = lm.start_node("a", model="smollm2-135m", max_vram_gb=4)
        token = lm.join_token(a)
        b = lm.start_node("b", join=token, max_vram_gb=2)
        c = lm.start_node("c", join=token, max_vram_gb=1)
        client = lm.start_node("laptop", join=token, client=True)
        st = lm.wait_for(
            a,
            lambda s: s["ready"] and len(s["plan"]["order"]) == 3,
            timeout=300,
            what="engine ready on 3 nodes",
        )
        yield {"lm": lm, "a": a, "b": b, "c": c, "client": client, "status": st}
    finally:
        lm.stop()


def _ask(node: NodeProcess, stream: bool, model: str = "smollm2-135m") -> str:
    cli = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", timeout=120, max_retries=0)
    if stream:
        parts = []
        chunks = 0
        for chunk in cli.chat.completions.create(
            model=model, messages=QUESTION, temperature=0, max_tokens=24, stream=True
        ):
            chunks += 1
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        assert chunks > 2, "a streamed answer arrives in several chunks"
        return "".join(parts)
    out = cli.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24
    )
    return out.choices[0].message.content or ""


def test_roles_and_split(mesh: dict[str, Any]) -> None:
    st = mesh["status"]
    a_id = st["node"]["id"]
    assert st["node"]["role"] == "host" and st["host_id"] == a_id
    b_id, c_id = mesh["b"].status()["node"]["id"], mesh["c"].status()["node"]["id"]
    # workers first (most memory first), host last
    assert st["plan"]["order"] == [b_id, c_id, a_id]
    split = st["plan"]["tensor_split"]
    assert split == pytest.approx([2 / 7, 1 / 7, 4 / 7], abs=0.002)
    roles = {p["id"]: p["role"] for p in st["peers"]}
    assert roles[b_id] == "worker" and roles[c_id] == "worker"
    assert "client" in roles.values()
    # every node agrees on the host
    for name in ("b", "c", "client"):
        assert mesh[name].status()["host_id"] == a_id
    assert mesh["client"].status()["node"]["role"] == "client"


def test_status_command(mesh: dict[str, Any]) -> None:
    import json
    import subprocess
    import sys

    a = mesh["a"]
    base = [sys.executable, "-m", "mesh_inference", "status", "--state-dir", str(a.state_dir)]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["node"]["role"] == "host"
    table = subprocess.run(base, capture_output=True, text=True, timeout=30,
                           env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"})
    assert table.returncode == 0, table.stderr
    assert "host" in table.stdout and "worker" in table.stdout and "smollm2-135m" in table.stdout


@pytest.mark.parametrize("where", ["a", "client"])
@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_gets_paris(mesh: dict[str, Any], where: str, stream: bool) -> None:
    assert "Paris" in _ask(mesh[where], stream)


def test_worker_gateway_proxies_to_host(mesh: dict[str, Any]) -> None:
    assert "Paris" in _ask(mesh["b"], stream=False)


def test_bad_request_is_400(mesh: dict[str, Any]) -> None:
    import json
    import urllib.error
    import urllib.request

    for node in (mesh["a"], mesh["client"]):
        req = urllib.request.Request(
            f"{node.url}/v1/chat/completions",
            data=b"{not json",
            headers={"content-type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 400
        assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"


def test_killing_a_worker_replans_to_two(mesh: dict[str, Any]) -> None:
    lm: LocalMesh = mesh["lm"]
    a, c = mesh["a"], mesh["c"]
    c_id = c.status()["node"]["id"]
    c.kill(signal.SIGKILL)
    st = lm.wait_for(
        a,
        lambda s: s["ready"] and len(s["plan"]["order"]) == 2 and c_id not in s["plan"]["order"],
        timeout=120,
        what="re-plan to two nodes",
    )
    assert st["plan"]["tensor_split"] == pytest.approx([1 / 3, 2 / 3], abs=0.002)
    dead = [p for p in st["peers"] if p["id"] == c_id]
    assert not dead or dead[0]["status"] in ("dead", "left")
    assert "Paris" in _ask(a, stream=False)
    assert "Paris" in _ask(mesh["client"], stream=True)


def test_killing_the_host_moves_the_engine(mesh: dict[str, Any]) -> None:
    """After the worker above, the host dies too: b holds the catalog model and takes over."""
    lm: LocalMesh = mesh["lm"]
    a, b = mesh["a"], mesh["b"]
    a_id, b_id = a.status()["node"]["id"], b.status()["node"]["id"]
    a.kill(signal.SIGKILL)
    st = lm.wait_for(b, lambda s: s["ready"] and s["host_id"] == b_id, timeout=120,
                     what="b hosting alone")
    assert st["plan"]["order"] == [b_id] and a_id not in st["plan"]["order"]
    lm.wait_for(mesh["client"], lambda s: s["host_id"] == b_id and s["ready"], timeout=60,
                what="the client following the new host")
    assert "Paris" in _ask(mesh["client"], stream=False)


def test_embedded_engine_serves_a_two_node_mesh(tmp_path: Path) -> None:
    """The llama-cpp-python backend behind the same mesh: host + one tunnelled worker."""
    from mesh_inference.engine.backends import EngineUnavailable, find_backend

    try:
        find_backend("embedded")
    except EngineUnavailable as exc:
        pytest.skip(f"llama-cpp-python with GGML_RPC not installed: {exc}")
    lm = LocalMesh(tmp_path, extra_args=["--threads", "1", "--engine", "embedded"])
    try:
        a = lm.start_node("a", model="smollm2-135m", max_vram_gb=2)
        b = lm.start_node("b", join=lm.join_token(a), max_vram_gb=2)
        st = lm.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 2,
                         timeout=300, what="embedded engine ready on 2 nodes")
        assert st["engine"]["backend"] == "embedded"
        assert st["plan"]["tensor_split"] == [0.5, 0.5]
        assert "Paris" in _ask(a, stream=False)
        assert "Paris" in _ask(a, stream=True)
        # equal memory: the smaller node id hosts (b also has the catalog model)
        host = a if st["host_id"] == st["node"]["id"] else b
        assert host.status()["node"]["role"] == "host"
        assert st["host_id"] == min(st["plan"]["order"])
        tunnels = host.status()["tunnels"]
        [tunnel] = tunnels.values()
        # The worker's layers crossed as weight references (it holds the same GGUF): the
        # tunnel carried the load's commands and the activations, not its ~49 MB of weights.
        assert 0 < tunnel["bytes_up"] < 5_000_000 and tunnel["bytes_down"] > 0
    finally:
        lm.stop()


def test_weights_cross_as_references_only_to_workers_that_hold_the_file(
    tmp_path: Path, smollm2_path: Path
) -> None:
    """b holds the GGUF (references), c runs with --no-model-copy (weight bytes), d copies
    the file from a peer and then gets references too; the answer is the same."""
    import hashlib
    import shutil
    import time

    reason = _engine_available()
    if reason:
        pytest.skip(f"llama.cpp binaries not installed: {reason}")
    shared, c_dir, d_dir = tmp_path / "shared-models", tmp_path / "c-models", tmp_path / "d-models"
    shared.mkdir()
    c_dir.mkdir()
    shutil.copy(smollm2_path, shared / "smol.gguf")
    sha = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    lm = LocalMesh(tmp_path / "m", extra_args=["--threads", "1"])
    try:
        # "smol" is a name in a models dir: c's and d's own dirs lack it.
        a = lm.start_node("a", model="smol", max_vram_gb=4, args=["--models-dir", str(shared)])
        token = lm.join_token(a)
        b = lm.start_node("b", join=token, max_vram_gb=2, args=["--models-dir", str(shared)])
        c = lm.start_node("c", join=token, max_vram_gb=1,
                          args=["--models-dir", str(c_dir), "--no-model-copy"])  # fmt: skip
        st = lm.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 3,
                         timeout=300, what="engine ready on 3 nodes")  # fmt: skip
        b_id, c_id = b.status()["node"]["id"], c.status()["node"]["id"]
        assert st["plan"]["order"] == [b_id, c_id, st["node"]["id"]]
        tunnels = st["tunnels"]
        # b's ~28 MB share went as references; c's ~14 MB share went as bytes.
        assert tunnels[b_id]["bytes_up"] < 2_000_000, tunnels
        assert tunnels[c_id]["bytes_up"] > 10_000_000, tunnels
        assert "Paris" in _ask(a, stream=False, model="smol")
        assert c.status()["model_fetch"] is None and not list(c_dir.iterdir())

        # d has no copy and no --no-model-copy: it copies the file from a peer (verified),
        # announces the same sha256, and from the next load on it gets references.
        d = lm.start_node("d", join=token, max_vram_gb=1, args=["--models-dir", str(d_dir)])
        d_st = lm.wait_for(
            d, lambda s: (s["model_fetch"] or {}).get("state") == "done"
            and s["model"]["sha256"] == sha, timeout=300, what="d copied the model file",
        )  # fmt: skip
        d_id = d_st["node"]["id"]
        assert d_st["model_fetch"]["from"] in (st["node"]["id"], b_id)
        assert (d_dir / "smol.gguf").stat().st_size == smollm2_path.stat().st_size
        lm.wait_for(a, lambda s: any(p["id"] == d_id and p["model_sha256"] == sha
                                     for p in s["peers"]), what="a sees d's copy")  # fmt: skip
        time.sleep(1.0)  # the relaunch that follows has begun
        st = lm.wait_for(a, lambda s: s["ready"] and len(s["plan"]["order"]) == 4,
                         timeout=300, what="engine ready on 4 nodes")  # fmt: skip
        before = st["tunnels"][d_id]["bytes_up"]
        c.kill(signal.SIGTERM)  # one more relaunch: c leaves
        st = lm.wait_for(
            a, lambda s: s["ready"] and s["plan"]["order"] == [b_id, d_id, s["node"]["id"]],
            timeout=300, what="engine ready on a, b, d",
        )  # fmt: skip
        # d's ~25 MB share crossed as references this time.
        assert st["tunnels"][d_id]["bytes_up"] - before < 2_000_000, st["tunnels"]
        assert "Paris" in _ask(a, stream=False, model="smol")
    finally:
        lm.stop()


def test_a_worker_whose_file_differs_in_one_tensor_gets_that_tensors_bytes(
    tmp_path: Path, smollm2_path: Path
) -> None:
    """b's copy has one tensor of its share zeroed: the host sends references for every
    other tensor (b's manifest lists them) and the real bytes of that one, so b computes
    with the host's weights and the answer is the intact mesh's."""
    import shutil

    from mesh_inference.models.ggufheader import read_header

    reason = _engine_available()
    if reason:
        pytest.skip(f"llama.cpp binaries not installed: {reason}")
    shared, b_dir = tmp_path / "shared-models", tmp_path / "b-models"
    shared.mkdir()
    b_dir.mkdir()
    shutil.copy(smollm2_path, shared / "smol.gguf")
    shutil.copy(smollm2_path, b_dir / "smol.gguf")
    # b is first in the split, so it holds the first layers: damage one of them.
    _, offset, size = next(t for t in read_header(smollm2_path).tensors
                              if t[0] == "blk.1.attn_norm.weight")  # fmt: skip
    with open(b_dir / "smol.gguf", "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes(size))
    lm = LocalMesh(tmp_path / "m", extra_args=["--threads", "1"])
    try:
        a = lm.start_node("a", model="smol", max_vram_gb=4, args=["--models-dir", str(shared)])
        token = lm.join_token(a)
        b = lm.start_node("b", join=token, max_vram_gb=2,
                          args=["--models-dir", str(b_dir), "--no-model-copy"])  # fmt: skip
        b_id = b.status()["node"]["id"]
        st = lm.wait_for(a, lambda s: s["ready"] and s["plan"]["order"][:1] == [b_id],
                         timeout=300, what="engine ready on a and b")  # fmt: skip
        peer = next(p for p in st["peers"] if p["id"] == b_id)
        assert peer["model_sha256"] and peer["model_sha256"] != st["model"]["sha256"]
        sent = st["tunnels"][b_id]["bytes_up"]
        # One 2,304-byte tensor as bytes, the rest of b's ~30 MB share as references.
        assert size <= sent < 2_000_000, st["tunnels"]
        answer = _ask(a, stream=False, model="smol")
        assert "Paris" in answer
    finally:
        lm.stop()
    # The same question to a mesh whose worker holds the intact file: the same answer.
    lm = LocalMesh(tmp_path / "m2", extra_args=["--threads", "1"])
    try:
        a = lm.start_node("a", model="smol", max_vram_gb=4, args=["--models-dir", str(shared)])
        b = lm.start_node("b", join=lm.join_token(a), max_vram_gb=2,
                          args=["--models-dir", str(shared)])  # fmt: skip
        b_id = b.status()["node"]["id"]
        lm.wait_for(a, lambda s: s["ready"] and s["plan"]["order"][:1] == [b_id], timeout=300,
                    what="engine ready on a and b")  # fmt: skip
        assert _ask(a, stream=False, model="smol") == answer
    finally:
        lm.stop()
