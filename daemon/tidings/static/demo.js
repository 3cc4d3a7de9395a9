// The demo page's script: one TidingsClient per page, messages listed as they arrive.
import { TidingsClient } from "/tidings.js";

const $ = (id) => document.getElementById(id);
const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
const wsPath = meta("tidings-ws-path");
const insecure = meta("tidings-auth") === "insecure";
const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${wsPath}`;
$("token-row").hidden = insecure;

function show(cls, text, seq) {
  const li = document.createElement("li");
  li.className = cls;
  li.textContent = text;
  if (seq !== undefined) li.dataset.seq = String(seq);
  $("messages").append(li);
}

function setStatus(status, detail) {
  const el = $("status");
  el.dataset.status = status;
  el.textContent = status === "reconnecting" ? `reconnecting in ${detail.delay} ms` : status;
  document.body.dataset.reconnects = String(client ? client.reconnects : 0);
}

let client = null;

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (client) client.close();
  const user = $("user").value.trim();
  client = new TidingsClient({
    url: wsUrl,
    user: insecure ? user : undefined,
    token: insecure ? undefined : $("token").value.trim(),
    onStatus: setStatus,
    onMessage: (m) => {
      const text = m.body && typeof m.body === "object" && "text" in m.body ? m.body.text : JSON.stringify(m.body);
      show("msg in", `${m.from}: ${text}`, m.seq);
      const li = $("messages").lastElementChild;
      li.dataset.text = String(text);
      li.dataset.from = m.from;
    },
    onError: (e) => { $("send-error").textContent = `${e.code}: ${e.message}`; },
  });
  window.tidings = client;
  client.connect();
});

$("compose").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!client) { $("send-error").textContent = "connect first"; return; }
  const to = $("to").value.trim();
  const text = $("body").value;
  $("body").value = "";
  try {
    const ack = await client.send(to, { text });
    show("msg out", `me → ${to}: ${text} ✓`);
    $("messages").lastElementChild.dataset.text = text;
    $("send-error").textContent = "";
    return ack;
  } catch (err) {
    $("send-error").textContent = `not sent (${err.code}): ${text}`;
  }
});
