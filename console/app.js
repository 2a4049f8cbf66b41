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

for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => show(b.dataset.view));
for (const b of document.querySelectorAll("[data-copy]")) {
  b.addEventListener("click", () => copyText(document.getElementById(b.dataset.copy).textContent));
}
initChat();
connect();
show(["mesh", "chat", "models", "join"].includes(location.hash.slice(1)) ? location.hash.slice(1) : "mesh");
window.meshStatus = () => status;
