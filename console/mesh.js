import { el, fmtBytes } from "./util.js";

const roleOrder = { host: 0, worker: 1, standby: 2, client: 3 };

// This node copying the model file from a peer (status "model_fetch", models/transfer.py).
function fetchLine(f, names) {
  if (!f) return null;
  const from = names[f.from] || (f.from || "a peer").slice(0, 8);
  let text;
  if (f.state === "fetching") text = el("progress", { max: f.total || 1, value: f.bytes || 0, title: `from ${from}` });
  else if (f.state === "retrying") text = `retrying (from ${from})`;
  else if (f.state === "done") text = `copied from ${from}`;
  else text = "not copied";
  return [el("dt", {}, "model file"), el("dd", { title: f.error || null }, text)];
}

// The host leaves a peer that keeps failing out of its plan for a while (core/quarantine.py).
function quarantineLine(q) {
  if (!q) return null;
  const until = new Date(q.until * 1000).toLocaleTimeString();
  return [el("dt", {}, "quarantine"), el("dd", { class: "quarantine", title: q.reason }, `until ${until}: ${q.reason}`)];
}

function card(node, you, engineState, fetch) {
  const dead = node.status === "dead" || node.status === "left";
  const share = node.share;
  return el("article", { class: `card ${node.role === "host" ? "host" : ""} ${dead ? "dead" : ""}`, "data-node": node.id },
    el("h3", {}, el("span", { class: "name" }, node.name || node.id.slice(0, 8)),
      el("span", { class: `badge ${node.role}` }, node.role === "host" ? "★ host" : node.role),
      you ? el("span", { class: "badge you" }, "this node") : null,
      node.quarantine ? el("span", { class: "badge quarantined", title: node.quarantine.reason }, "quarantined") : null),
    el("div", { class: "id" }, node.id),
    el("dl", { class: "kv" },
      el("dt", {}, "memory"), el("dd", {}, fmtBytes(node.memory_bytes)),
      el("dt", {}, "layers"), el("dd", {}, share === null || share === undefined ? "–" : `${Math.round(share * 100)}%`),
      el("dt", {}, "link RTT"), el("dd", {}, you ? "–" : node.rtt_ms === null || node.rtt_ms === undefined ? "–" : `${node.rtt_ms.toFixed(1)} ms`),
      el("dt", {}, "status"), el("dd", {}, you ? "alive" : node.status || "–"),
      node.role === "host" ? [el("dt", {}, "engine"), el("dd", {}, engineState)] : null,
      quarantineLine(node.quarantine),
      fetch),
    el("div", { class: "share", title: "share of the model's layers" },
      el("div", { style: `width:${Math.round((share || 0) * 100)}%` })));
}

export function renderMesh(st) {
  const summary = document.getElementById("summary");
  const plan = st.plan || {};
  const engine = st.engine || {};
  let planText;
  if (plan.state === "planned") planText = `split over ${plan.order.length} node${plan.order.length > 1 ? "s" : ""}`;
  else if (plan.state === "waiting") planText = `waiting for capacity: ${plan.reason}`;
  else planText = plan.reason || "no plan yet";
  summary.replaceChildren(
    el("span", { class: `pill ${st.ready ? "ok" : "warn"}`, id: "ready-pill" }, st.ready ? "● ready" : `● ${engine.state || "not ready"}`),
    el("span", { class: "pill" }, "model ", el("b", {}, (st.model && st.model.name) || "–")),
    el("span", { class: `pill ${plan.state === "waiting" ? "warn" : ""}` }, planText),
    el("span", { class: "pill" }, "engine ", el("b", {}, engine.backend || "–")),
  );
  const me = { ...st.node, status: "alive" };
  const nodes = [me, ...(st.peers || []).filter((p) => p.status !== "dead" && p.status !== "left")];
  nodes.sort((a, b) => (roleOrder[a.role] ?? 9) - (roleOrder[b.role] ?? 9) || (b.memory_bytes - a.memory_bytes));
  const names = Object.fromEntries(nodes.map((n) => [n.id, n.name || n.id.slice(0, 8)]));
  const fetch = fetchLine(st.model_fetch, names);
  document.getElementById("cards").replaceChildren(
    ...nodes.map((n) => card(n, n.id === st.node.id, engine.state, n.id === st.node.id ? fetch : null)));
}
