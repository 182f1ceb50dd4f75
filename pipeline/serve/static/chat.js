// The chat page of `python -m pipeline serve`: streams /v1/chat/completions, shows /stats.
// With serve --api-key every request but the page's own files needs the key: the first 401
// (from /stats, fetched at load) shows a field for it, kept in this tab's sessionStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "pipeline-api-key";  // sessionStorage item: gone when the tab closes
let history = [];  // the conversation sent with each request: {role, content}
let controller = null;  // aborts the answer being streamed (the server then drops it)

function askForKey(message) {
  $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("api-key").focus();
}

// fetch() with the key as a Bearer token when one was given; a 401 asks for the key (again).
async function apiFetch(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = "Bearer " + key;
  const r = await fetch(path, { ...options, headers });
  if (r.status === 401) {
    sessionStorage.removeItem(KEY);
    askForKey(key ? "The API key was refused; enter it again." :
      "This server needs an API key (serve --api-key).");
  }
  return r;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

const mib = (bytes) => (bytes / 2 ** 20).toFixed(1) + " MiB";

async function refreshStats() {
  let s;
  try {
    const r = await apiFetch("/stats");
    if (r.status === 401) $("cluster").textContent = "waiting for the API key";
    if (!r.ok) return;
    s = await r.json();
  } catch (e) {
    $("cluster").textContent = "server unreachable";
    return;
  }
  $("model").textContent = s.model;
  document.title = s.model + " · pipeline";
  const hosts = new Set(s.ranks.map((r) => r.host));
  const layers = s.ranks.map((r) => r.layer_range[1] - r.layer_range[0]).join(" + ");
  $("cluster").textContent = `${s.ranks.length} rank${s.ranks.length > 1 ? "s" : ""} on ` +
    `${hosts.size} host${hosts.size > 1 ? "s" : ""} · layers per rank ${layers} · ` +
    `context ${s.context} tokens · ${s.requests.active} request(s) in progress`;
  const body = $("ranks").querySelector("tbody");
  body.replaceChildren(...s.ranks.map((r) => {
    const tr = document.createElement("tr");
    const cells = [r.rank, r.host, `${r.layer_range[0]}–${r.layer_range[1] - 1}`,
      mib(r.weight_bytes), mib(r.peak_rss_bytes), r.compute_s.toFixed(2) + " s"];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.appendChild(td);
    }
    return tr;
  }));
}

// Server-sent events of a fetch response: yields each `data:` payload.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  div.dataset.chunks = "0";
  setBusy(true);
  controller = new AbortController();
  let answer = "", thought = "", first = null, usage = null;
  const shown = document.createElement("span");  // the answer; its reasoning goes above it
  shown.className = "text";
  div.appendChild(shown);
  let reasoning = null;  // <details> with the reasoning, made when the first of it arrives
  try {
    const r = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: controller.signal,
      body: JSON.stringify({
        messages: history, stream: true, stream_options: { include_usage: true },
        max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
      }),
    });
    if (r.status === 401) throw Object.assign(new Error("API key needed"), { keyNeeded: true });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `${r.status} ${r.statusText}`);
    }
    for await (const data of sseData(r)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.usage) usage = event.usage;
      const delta = (event.choices && event.choices[0] && event.choices[0].delta) || {};
      const piece = delta.content, thinking = delta.reasoning_content;
      if (piece || thinking) {
        if (first === null) first = performance.now();
        div.dataset.chunks = String(Number(div.dataset.chunks) + 1);
      }
      if (thinking) {  // a thinking model's reasoning: shown folded, never sent back
        if (reasoning === null) {
          reasoning = document.createElement("details");
          reasoning.className = "reasoning";
          reasoning.innerHTML = "<summary>Reasoning</summary><div class='thought'></div>";
          reasoning.open = true;  // open while the model thinks, folded once it answers
          div.insertBefore(reasoning, shown);
        }
        thought += thinking;
        reasoning.querySelector(".thought").textContent = thought;
      }
      if (piece) {
        if (reasoning !== null && answer === "") reasoning.open = false;
        answer += piece;
        shown.textContent = answer;
      }
      if (piece || thinking) div.scrollIntoView({ block: "end" });
    }
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    if (usage && usage.completion_tokens > 1 && seconds > 0) {
      $("speed").textContent = `${((usage.completion_tokens - 1) / seconds).toFixed(1)} tok/s ` +
        `(${usage.completion_tokens} tokens)`;
    } else if (usage) {
      $("speed").textContent = `${usage.completion_tokens} token(s)`;
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: answer });
      div.dataset.stopped = "1";
    } else if (e.keyNeeded) {  // the key field is up: the message goes back, to resend
      history.pop();
      asked.remove();
      div.remove();
      if (!$("prompt").value) $("prompt").value = text;
    } else {
      history.pop();
      addMessage("error", e.message);
    }
  } finally {
    div.classList.remove("streaming");
    div.dataset.done = "1";
    controller = null;
    setBusy(false);
    refreshStats();
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  refreshStats();  // tries the key at once: a wrong one brings the field back
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
});

refreshStats();
