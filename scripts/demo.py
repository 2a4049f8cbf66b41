"""Start a local 3-node mesh on the shipped SmolLM2 model; Ctrl-C stops it."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh_inference.cli.devmesh import LocalMesh  # noqa: E402


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--port", type=int, default=9337, help="API/console port of the first node")
    ap.add_argument("--state", type=Path, default=ROOT / ".demo")
    args = ap.parse_args()
    port = args.port if port_free(args.port) else 0
    # One machine plays three: one engine thread per node keeps them from fighting.
    mesh = LocalMesh(args.state, extra_args=["--threads", "1"])
    try:
        a = mesh.start_node("node-a", model=args.model, max_vram_gb=4, http_port=port)
        token = mesh.join_token(a)
        mesh.start_node("node-b", join=token, max_vram_gb=2)
        mesh.start_node("node-c", join=token, max_vram_gb=1)
        print("starting a 3-node mesh (logs in .demo/*/node.log) ...", flush=True)
        t0 = time.monotonic()
        st = mesh.wait_for(
            a,
            lambda s: s["ready"] and len(s["plan"]["order"]) == 3,
            timeout=300,
            what="engine ready on 3 nodes",
        )
        print(
            f"ready in {time.monotonic() - t0:.1f} s: model {st['model']['name']}, "
            f"split {st['plan']['tensor_split']} over {len(st['plan']['order'])} nodes"
        )
        print(f"\n  console  {a.console_url}\n  API      {a.url}/v1\n  token    {token}\n")
        print(
            f"  try: curl {a.url}/v1/chat/completions -H 'content-type: application/json' "
            '-d \'{"messages":[{"role":"user","content":"Hello!"}]}\'\n'
        )
        print("Ctrl-C stops all nodes.", flush=True)
        stop = False

        def on_signal(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            for node in mesh.nodes:
                if node.proc.poll() is not None:
                    print(f"node {node.name} exited:\n{node.log_tail()}", file=sys.stderr)
                    stop = True
            time.sleep(0.5)
    finally:
        print("stopping…", flush=True)
        mesh.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
