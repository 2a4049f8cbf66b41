import { el, fmtBytes, requiredBytes, toast } from "./util.js";

let lastStatus = null;
const downloads = {};

function meshMemory(st) {
  if (!st) return 0;
  const mine = st.node.role === "client" ? 0 : st.node.memory_bytes || 0;
  return mine + (st.peers || []).filter((p) => p.status === "alive" || p.status === "suspect")
    .filter((p) => p.role !== "client").reduce((a, p) => a + (p.memory_bytes || 0), 0);
}

async function post(url, ref) {
  const resp = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ ref }) });
  if (!resp.ok) {
    let msg = `HTTP ${resp.status}`;
    try { msg = (await resp.json()).error.message; } catch { /* keep the status */ }
    throw new Error(msg);
  }
}

export async function refreshModels() {
  let data;
  try {
    const resp = await fetch("/api/models");
    if (!resp.ok) {
      toast(resp.status === 401 ? "Log in again: open the console URL printed by mesh-inference" : `HTTP ${resp.status}`);
      return;
    }
    data = await resp.json();
  } catch { return; }
  const mem = meshMemory(lastStatus);
  document.getElementById("models-note").textContent =
    `This mesh offers ${fmtBytes(mem)}. A model needs about its size × 1.15 + 256 MB.`;
  const rows = data.catalog.map((m) => {
    const fits = requiredBytes(m.size_bytes) <= mem;
    const dl = downloads[m.name];
    let action;
    if (m.name === data.current) action = el("span", { class: "current" }, "serving");
    else if (dl && !dl.done) action = el("progress", { max: dl.total_bytes || 1, value: dl.downloaded_bytes || 0 });
    else if (m.local) action = el("button", { class: "primary", onclick: () => switchTo(m.name) }, "Use this model");
    else action = el("button", { onclick: () => startDownload(m.name) }, "Download");
    return el("tr", { "data-model": m.name },
      el("td", {}, el("b", {}, m.display_name), el("div", { class: "muted" }, m.description)),
      el("td", { class: "num" }, `${m.size_approx ? "≈" : ""}${fmtBytes(m.size_bytes)}`),
      el("td", {}, m.quant),
      el("td", { class: fits ? "fit-yes" : "fit-no" }, fits ? "fits" : "too big"),
      el("td", {}, dl?.error ? el("span", { class: "fit-no", title: dl.error }, "failed") : null, action));
  });
  document.getElementById("catalog").replaceChildren(
    el("thead", {}, el("tr", {}, ...["model", "size", "quant", "this mesh", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
  const local = data.local.length ? data.local.map((m) => el("tr", {},
    el("td", {}, m.name), el("td", { class: "num" }, fmtBytes(m.size_bytes)),
    el("td", {}, m.name === data.current ? el("span", { class: "current" }, "serving")
      : el("button", { onclick: () => switchTo(m.name) }, "Use this model"))))
    : [el("tr", {}, el("td", { class: "muted" }, "No models in the local models folder yet."))];
  document.getElementById("local").replaceChildren(el("tbody", {}, local));
}

async function startDownload(name) {
  try { await post("/api/models/download", name); toast(`Downloading ${name}`); } catch (e) { toast(e.message); }
}

async function switchTo(name) {
  if (!confirm(`Switch the whole mesh to ${name}? The host restarts its engine.`)) return;
  try { await post("/api/models/switch", name); toast(`Switching to ${name}`); } catch (e) { toast(e.message); }
}

export function onDownload(ev) {
  downloads[ev.ref] = ev;
  if (ev.done) refreshModels();
  else {
    const row = document.querySelector(`tr[data-model="${CSS.escape(ev.ref)}"] progress`);
    if (row) { row.max = ev.total_bytes || 1; row.value = ev.downloaded_bytes; }
    else if (!("from" in ev)) refreshModels(); // a copy from a peer shows on the mesh card
  }
}

export function onStatusForModels(st) { lastStatus = st; }
