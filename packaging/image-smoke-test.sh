#!/bin/sh
# Runs INSIDE the built image (scripts/package chroots into it as uid 10001, with a
# read-only root and tmpfs state): a two-node mesh on loopback — a host with the
# shipped model and a worker that joins through mesh-inference-launch and a token
# file — then one chat completion through the worker's API, proxied to the host.
# Used where `podman run` is not allowed; ports come from the caller.
set -eu
HTTP_A=${HTTP_A:?}; QUIC_A=${QUIC_A:?}; HTTP_B=${HTTP_B:?}; QUIC_B=${QUIC_B:?}
STATE=/var/lib/mesh-inference
common="--no-mdns --http-host 127.0.0.1 --quic-host 127.0.0.1 --advertise 127.0.0.1 --ctx-size 512"

# shellcheck disable=SC2086
mesh-inference-launch --state-dir "$STATE/a" --http-port "$HTTP_A" --quic-port "$QUIC_A" \
  --max-vram 2 --model smollm2-135m $common > "$STATE/a.log" 2>&1 &
a=$!
# shellcheck disable=SC2086
MESH_INFERENCE_JOIN_TOKEN_FILE=$STATE/a/join-token MESH_INFERENCE_TOKEN_WAIT=60 \
  mesh-inference-launch --state-dir "$STATE/b" --http-port "$HTTP_B" --quic-port "$QUIC_B" \
  --max-vram 1 $common > "$STATE/b.log" 2>&1 &
b=$!

status=0
python3 - "$HTTP_B" <<'EOF' || status=$?
import json, sys, time, urllib.error, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"


def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.loads(r.read())


# Ready on both nodes: the mesh re-plans (and restarts the engine) when the
# worker joins, so a single-node "ready" does not count.
deadline = time.monotonic() + 240
members = 0
while time.monotonic() < deadline:
    try:
        st = get("/api/status")
        members = len(st.get("plan", {}).get("order", []))
        if st.get("ready") and members >= 2 and get("/health").get("ready"):
            break
    except OSError:
        pass
    time.sleep(2)
else:
    sys.exit(f"the worker never saw a ready 2-node mesh (last plan: {members} node(s))")
print(f"mesh ready: {members} nodes in the plan")
body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}],
                   "max_tokens": 8}).encode()
for attempt in range(5):
    req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        break
    except urllib.error.HTTPError as exc:
        if exc.code not in (502, 503) or attempt == 4:
            raise
        time.sleep(3)
text = answer["choices"][0]["message"]["content"]
print(f"chat answer through the worker: {text!r}")
EOF

kill "$a" "$b" 2>/dev/null || true
wait "$a" "$b" 2>/dev/null || true
if [ "$status" != 0 ]; then
  echo "--- host log"; tail -20 "$STATE/a.log"
  echo "--- worker log"; tail -20 "$STATE/b.log"
fi
exit "$status"
