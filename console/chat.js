import { el, copyText } from "./util.js";
import { renderMarkdown } from "./markdown.js";

const KEY = "mesh-inference.chats.v1";
// The API key (when the node has --api-key): this tab only, sent as a Bearer token on /v1.
// The console's own /api routes use the login cookie instead.
const API_KEY = "mesh-inference.api-key";
const SYSTEM = { role: "system", content: "You are a helpful assistant." };
let chats = load();
let current = chats[0]?.id ?? null;
let controller = null;

function load() {
  try {
    const data = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(data) ? data : [];
  } catch { return []; }
}
function save() { localStorage.setItem(KEY, JSON.stringify(chats.slice(0, 50))); }
function chat() { return chats.find((c) => c.id === current); }

function newChat() {
  const c = { id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()), title: "New chat", messages: [] };
  chats.unshift(c);
  current = c.id;
  save();
  render();
}

function renderList() {
  const list = document.getElementById("chat-list");
  list.replaceChildren(...chats.map((c) => el("li", { class: c.id === current ? "active" : "", onclick: () => { current = c.id; render(); } },
    el("span", {}, c.title),
    el("button", { title: "Delete", "aria-label": "Delete chat", onclick: (e) => {
      e.stopPropagation();
      chats = chats.filter((x) => x.id !== c.id);
      if (current === c.id) current = chats[0]?.id ?? null;
      save(); render();
    } }, "×"))));
}

function messageNode(m) {
  const body = el("div", { class: `body ${m.error ? "error" : ""}` });
  if (m.role === "assistant" && !m.error) body.innerHTML = renderMarkdown(m.content || "");
  else body.textContent = m.content;
  if (m.streaming) body.classList.add("cursor");
  const stats = m.stats ? el("div", { class: "stats" }, m.stats) : null;
  return el("div", { class: `msg ${m.role}` }, el("div", { class: "who" }, m.role === "user" ? "you" : "mesh"), body, stats);
}

function renderMessages() {
  const box = document.getElementById("messages");
  const c = chat();
  if (!c || c.messages.length === 0) {
    box.replaceChildren(el("div", { class: "empty" }, el("h2", {}, "Chat with the mesh"),
      el("p", {}, "Answers stream from the model whose layers are spread over every node.")));
    return;
  }
  box.replaceChildren(...c.messages.map(messageNode));
  box.scrollTop = box.scrollHeight;
}

function render() { renderList(); renderMessages(); }

function setBusy(busy) {
  document.getElementById("send").disabled = busy;
  document.getElementById("regen").disabled = busy;
  document.getElementById("stop").hidden = !busy;
}

async function errorOf(resp) {
  try {
    const data = await resp.json();
    return { message: data?.error?.message || `HTTP ${resp.status}`, code: data?.error?.code };
  } catch { return { message: `HTTP ${resp.status}`, code: null }; }
}

let memoryKey = "";  // when sessionStorage is unavailable
function apiKey() {
  try { return sessionStorage.getItem(API_KEY) || memoryKey; } catch { return memoryKey; }
}

function askForKey(message) {
  document.getElementById("api-key-form").hidden = false;
  document.getElementById("api-key-error").textContent = message;
  document.getElementById("api-key").focus();
}

function apiHeaders() {
  const headers = { "content-type": "application/json" };
  const key = apiKey();
  if (key) headers.authorization = `Bearer ${key}`;
  return headers;
}

async function complete() {
  const c = chat();
  const history = c.messages.filter((m) => !m.error).map(({ role, content }) => ({ role, content }));
  const answer = { role: "assistant", content: "", streaming: true };
  c.messages.push(answer);
  renderMessages();
  setBusy(true);
  controller = new AbortController();
  const t0 = performance.now();
  let first = null;
  let tokens = 0;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(), signal: controller.signal,
      body: JSON.stringify({ messages: [SYSTEM, ...history], stream: true, temperature: 0.7, max_tokens: 512 }),
    });
    if (!resp.ok) {
      const { message: msg, code } = await errorOf(resp);
      if (resp.status === 401 && code === "invalid_api_key") {
        const had = apiKey();
        memoryKey = "";
        try { sessionStorage.removeItem(API_KEY); } catch { /* nothing stored */ }
        answer.needsKey = true;
        askForKey(had ? "The node refused that API key." : "");
        throw new Error("This node's API needs its API key: enter it above.");
      }
      throw new Error(resp.status === 503 ? `The mesh cannot answer yet: ${msg}` : msg);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buf += decoder.decode(value, { stream: true });
      let idx;
      while ((idx = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, idx);
        buf = buf.slice(idx + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message || "the stream broke");
          const delta = obj.choices?.[0]?.delta?.content;
          if (delta) {
            if (first === null) first = performance.now();
            tokens += 1;
            answer.content += delta;
            renderMessages();
          }
        }
      }
    }
    if (!done) throw new Error("the stream ended before the answer was complete");
  } catch (err) {
    if (err.name === "AbortError") answer.stats = "stopped";
    else { answer.error = true; answer.content = (answer.content ? answer.content + "\n\n" : "") + `⚠ ${err.message}`; }
  } finally {
    answer.streaming = false;
    const end = performance.now();
    if (!answer.error && first !== null) {
      const rate = tokens > 1 ? (tokens - 1) / ((end - first) / 1000) : 0;
      answer.stats = `${answer.stats ? answer.stats + " · " : ""}${rate.toFixed(1)} tok/s · first token ${((first - t0) / 1000).toFixed(2)} s`;
    }
    controller = null;
    setBusy(false);
    save();
    renderMessages();
  }
}

async function send(text) {
  if (!chat()) newChat();
  const c = chat();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.slice(0, 40);
  save();
  render();
  await complete();
}

export function initChat() {
  const prompt = document.getElementById("prompt");
  document.getElementById("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    prompt.value = "";
    send(text);
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("composer").requestSubmit(); }
  });
  document.getElementById("stop").addEventListener("click", () => controller?.abort());
  document.getElementById("new-chat").addEventListener("click", newChat);
  document.getElementById("regen").addEventListener("click", () => {
    const c = chat();
    if (!c || controller) return;
    while (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
    if (c.messages.length) complete();
  });
  document.getElementById("api-key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = document.getElementById("api-key");
    const key = input.value.trim();
    if (!key) return;
    memoryKey = key;
    try { sessionStorage.setItem(API_KEY, key); } catch { /* kept in memory only */ }
    input.value = "";
    document.getElementById("api-key-form").hidden = true;
    // The answer that failed for want of a key is asked again, now with it.
    const c = chat();
    const last = c?.messages[c.messages.length - 1];
    if (last?.needsKey && !controller) { c.messages.pop(); complete(); }
  });
  fetch("/api/session", { cache: "no-store" }).then((r) => r.json()).then((s) => {
    if (s.api_key_required && !apiKey()) askForKey("");
  }).catch(() => { /* the first chat's 401 asks instead */ });
  document.getElementById("messages").addEventListener("click", (e) => {
    if (e.target.classList.contains("copy-code")) copyText(e.target.nextElementSibling.textContent);
  });
  render();
}
