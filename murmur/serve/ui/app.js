"use strict";
// The chat page: conversations live in localStorage; replies stream from /v1/chat/completions.
// Stop aborts the fetch; the server sees the connection close and cancels the request in the engine.

const STORE = "murmur.chats.v1";
const SETTINGS = "murmur.settings.v1";
const $ = (id) => document.getElementById(id);

const state = {
  chats: load(STORE, []),
  settings: Object.assign({ system: "", temperature: 0.8, maxTokens: "", apiKey: "" }, load(SETTINGS, {})),
  current: null,
  controller: null,
  model: null,
};

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}
function save() {
  localStorage.setItem(STORE, JSON.stringify(state.chats));
  localStorage.setItem(SETTINGS, JSON.stringify(state.settings));
}
function currentChat() { return state.chats.find((c) => c.id === state.current); }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.settings.apiKey) h.Authorization = `Bearer ${state.settings.apiKey}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// ---- rendering -------------------------------------------------------------------------------

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const chat of [...state.chats].reverse()) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = chat.title || "New chat";
    button.className = chat.id === state.current ? "active" : "";
    button.addEventListener("click", () => { state.current = chat.id; renderAll(); });
    item.append(button);
    list.append(item);
  }
}

function messageNode(message) {
  const node = document.createElement("div");
  node.className = `msg ${message.role}`;
  fillMessage(node, message);
  return node;
}

function fillMessage(node, message) {
  if (message.role === "assistant") {
    node.innerHTML = Markdown.render(message.content || "");  // escaped by the renderer
    if (message.citations && message.citations.length) node.append(citationList(message.citations));
    if (message.note) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = message.note;
      node.append(note);
    }
  } else {
    node.textContent = message.content;
  }
}

// The posts a reply cites (its url_citation annotations), as links under it: built as DOM nodes, never as HTML,
// and only http(s) links (a javascript: url from a misconfigured template would not run).
function safeUrl(url) {
  try {
    const parsed = new URL(url, location.href);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch { return null; }
}

function citationsOf(annotations) {
  const seen = new Set();
  const list = [];
  for (const a of annotations || []) {
    const c = a && a.type === "url_citation" && a.url_citation;
    const url = c && typeof c.url === "string" && safeUrl(c.url);
    if (!url || seen.has(url)) continue;
    seen.add(url);
    list.push({ url, title: typeof c.title === "string" && c.title ? c.title : url });
  }
  return list;
}

function citationList(citations) {
  const list = document.createElement("ol");
  list.className = "citations";
  for (const c of citations) {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = c.url;
    link.textContent = c.title;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    item.append(link);
    list.append(item);
  }
  return list;
}

function renderMessages() {
  const chat = currentChat();
  const box = $("messages");
  box.replaceChildren(...(chat ? chat.messages.map(messageNode) : []));
  box.scrollTop = box.scrollHeight;
  const last = chat && chat.messages[chat.messages.length - 1];
  $("regenerate").hidden = !(last && last.role === "assistant") || !!state.controller;
}

function renderAll() { renderHistory(); renderMessages(); }

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = false;
  renderMessages();
}

// ---- talking to the server -------------------------------------------------------------------

async function fetchModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    state.model = body.data[0].id;
    $("model-name").textContent = state.model;
  } catch (err) {
    $("model-name").textContent = "model unavailable";
    showError(`Could not reach the model: ${err.message}`);
  }
  fetch("/report", { method: "HEAD" }).then((r) => { $("report-link").hidden = !r.ok; }).catch(() => {});
}

function requestMessages(chat) {
  const messages = [];
  if (state.settings.system.trim()) messages.push({ role: "system", content: state.settings.system });
  for (const m of chat.messages) messages.push({ role: m.role, content: m.content });
  return messages;
}

async function streamReply(chat) {
  const reply = { role: "assistant", content: "" };
  const body = {
    model: state.model || undefined, messages: requestMessages(chat), stream: true,
    temperature: Number(state.settings.temperature), max_tokens: Number(state.settings.maxTokens) || undefined,
  };
  chat.messages.push(reply);
  state.controller = new AbortController();
  setBusy(true);
  showError("");
  const node = $("messages").lastElementChild;
  let pending = false;
  const paint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => { pending = false; fillMessage(node, reply); $("messages").scrollTop = $("messages").scrollHeight; });
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices && chunk.choices[0];
          if (choice && choice.delta && choice.delta.content) { reply.content += choice.delta.content; paint(); }
          if (choice && choice.delta && choice.delta.annotations) {
            reply.citations = citationsOf(choice.delta.annotations); paint();
          }
          if (choice && choice.finish_reason === "length") reply.note = "(cut at the token limit)";
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") reply.note = "(stopped)";
    else { reply.note = "(failed)"; showError(err.message); }
  } finally {
    state.controller = null;
    if (!chat.title) chat.title = (chat.messages[0]?.content || "New chat").slice(0, 40);
    save();
    setBusy(false);
    renderHistory();
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  const chat = { id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`, title: "", messages: [] };
  state.chats.push(chat);
  state.current = chat.id;
  save();
  renderAll();
  $("input").focus();
  return chat;
}

function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  const chat = currentChat() || newChat();
  chat.messages.push({ role: "user", content: text });
  if (!chat.title) chat.title = text.slice(0, 40);
  $("input").value = "";
  save();
  renderAll();
  streamReply(chat);
}

function regenerate() {
  const chat = currentChat();
  if (!chat || state.controller) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  renderMessages();
  if (chat.messages.length) streamReply(chat);
}

// ---- wiring ----------------------------------------------------------------------------------

function bindSettings() {
  const fields = [["set-system", "system"], ["set-temperature", "temperature"], ["set-max-tokens", "maxTokens"],
                  ["set-api-key", "apiKey"]];
  for (const [id, key] of fields) {
    $(id).value = state.settings[key];
    $(id).addEventListener("input", () => {
      state.settings[key] = $(id).value;
      save();
      if (key === "apiKey") fetchModel();
    });
  }
  $("toggle-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
}

document.addEventListener("DOMContentLoaded", () => {
  bindSettings();
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("regenerate").addEventListener("click", regenerate);
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));
  state.current = state.chats.length ? state.chats[state.chats.length - 1].id : null;
  renderAll();
  fetchModel();
});
