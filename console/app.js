import { renderMesh } from "./mesh.js";
import { initChat } from "./chat.js";
import { refreshModels, onDownload, onStatusForModels } from "./models.js";
import { copyText } from "./util.js";

const conn = document.getElementById("conn");
const connText = document.getElementById("conn-text");
let status = null;

function show(view) {
  for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("active", s.id === `view-${view}`);
  if (view === "models") refreshModels();
  history.replaceState(null, "", `#${view}`);
}

function renderJoin(st) {
  const token = st.join_token || "";
  document.getElementById("token").textContent = token;
  document.getElementById("join-cmd").textContent = `mesh-inference --join ${token}`;
  document.getElementById("client-cmd").textContent = `mesh-inference --client --join ${token}`;
}

function onStatus(st) {
  status = st;
  renderMesh(st);
  renderJoin(st);
  onStatusForModels(st);
  document.title = `mesh-inference · ${st.ready ? "ready" : (st.engine?.state || "starting")}`;
}

function connect() {
  // EventSource reconnects by itself; we only show its state.
  const es = new EventSource("/api/events");
  es.addEventListener("open", () => { conn.className = "conn live"; connText.textContent = "live"; });
  es.addEventListener("error", () => { conn.className = "conn down"; connText.textContent = "reconnecting…"; });
  es.addEventListener("status", (e) => onStatus(JSON.parse(e.data)));
  es.addEventListener("download", (e) => onDownload(JSON.parse(e.data)));
  es.addEventListener("model", () => refreshModels());
}

let started = false;
function start() {
  // Only after login: the event stream carries the join token for a logged-in console only.
  if (started) return;
  started = true;
  document.body.classList.remove("pending", "locked");
  for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => show(b.dataset.view));
  for (const b of document.querySelectorAll("[data-copy]")) {
    b.addEventListener("click", () => copyText(document.getElementById(b.dataset.copy).textContent));
  }
  initChat();
  connect();
  show(["mesh", "chat", "models", "join"].includes(location.hash.slice(1)) ? location.hash.slice(1) : "mesh");
}

async function loggedIn() {
  try {
    const resp = await fetch("/api/session", { cache: "no-store" });
    return resp.ok && (await resp.json()).authenticated === true;
  } catch { return false; }
}

function showLogin() {
  document.body.classList.replace("pending", "locked");
  const form = document.getElementById("login-form");
  const input = document.getElementById("login-token");
  const error = document.getElementById("login-error");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    error.textContent = "";
    // A pasted console URL works as well as the bare token.
    let token = input.value.trim();
    const m = token.match(/[?&]token=([A-Za-z0-9_-]+)/);
    if (m) token = m[1];
    try {
      const resp = await fetch("/api/login", {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ token }),
      });
      if (resp.ok) { input.value = ""; start(); return; }
      let msg = `HTTP ${resp.status}`;
      try { msg = (await resp.json()).error.message; } catch { /* keep the status */ }
      error.textContent = resp.status === 401 ? "That is not this node's console token." : msg;
    } catch (err) { error.textContent = `The node did not answer: ${err.message}`; }
  });
  input.focus();
}

window.meshStatus = () => status;
if (await loggedIn()) start(); else showLogin();
