// The playground: a chat with one flow through the `playground` platform, with each turn's trace.
// Everything shown is built with DOM nodes and textContent: no text from a flow or a user is ever HTML.
"use strict";

(() => {
  const root = document.getElementById("playground");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const chat = $("chat");
  const traces = $("traces");
  const input = $("message");
  const send = $("send");
  const typing = $("typing");
  const live = $("live-state");
  const ownerBadge = $("owner-badge");
  const currentState = $("current-state");
  const graph = $("graph");

  let conversation = null;
  let source = null;
  let typingTimer = null;
  let turn = 0;
  const seen = new Set();
  const sentBubbles = new Map();
  const agentMessages = new Map(); // id of an agent.message event -> the agent's name (from its trace)

  const OWNER_LABEL = { bot: "bot", queued: "waiting for a person", agent: "with an agent", resolved: "resolved" };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function safeHref(url) {
    try {
      const parsed = new URL(String(url), window.location.href);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (_) {
      return null;
    }
  }

  function newId() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
    return Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  function setLive(state, text) {
    live.dataset.state = state;
    live.textContent = text;
  }

  function enable(on) {
    input.disabled = !on;
    send.disabled = !on;
    if (on) input.focus();
  }

  function scrollDown(list) {
    list.scrollTop = list.scrollHeight;
  }

  function addLine(from, text, by) {
    const item = el("li", "from-" + from);
    if (by) item.appendChild(el("span", "byline", by));
    item.appendChild(el("div", "msg", text));
    chat.appendChild(item);
    scrollDown(chat);
    return item;
  }

  function sender() {
    const name = ($("user-name").value || "Ana").trim().slice(0, 64) || "Ana";
    let attributes = {};
    const raw = $("user-attributes").value.trim();
    if (raw) {
      try {
        const parsed = JSON.parse(raw);
        if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) attributes = parsed;
      } catch (_) {
        addLine("system", "The attributes are not a JSON object; sending none.");
      }
    }
    return { id: "user:" + name.toLowerCase(), name, attributes };
  }

  async function post(type, text, payload) {
    if (!conversation) return;
    const messageId = "pg-" + newId();
    const bubble = addLine("user", text);
    const receipt = el("span", "receipt", "sending…");
    bubble.appendChild(receipt);
    sentBubbles.set(messageId, receipt);
    const body = {
      message_id: messageId,
      conversation_id: conversation.conversation_id,
      sender: sender(),
      type,
      text,
      payload: payload || {},
      timestamp: new Date().toISOString(),
    };
    try {
      const response = await fetch(conversation.webhook, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      if (response.ok) {
        receipt.textContent = "sent";
      } else {
        let why = response.status + " " + response.statusText;
        try {
          why = (await response.json()).error || why;
        } catch (_) { /* not JSON */ }
        receipt.textContent = "not accepted: " + why;
        receipt.classList.add("failed");
      }
    } catch (err) {
      receipt.textContent = "not sent: " + err;
      receipt.classList.add("failed");
    }
  }

  function buttonRow(buttons) {
    const row = el("div", "chips");
    for (const b of buttons) {
      const chip = el("button", "chip", b.title);
      chip.type = "button";
      chip.addEventListener("click", () => post("postback", b.title, { payload: b.payload }));
      row.appendChild(chip);
    }
    return row;
  }

  function showReply(data) {
    if (seen.has(data.id)) return; // a redelivery after a retry carries the same key
    seen.add(data.id);
    showTyping(false);
    const agent = agentMessages.get(data.reply_to);
    const from = agent !== undefined ? "agent" : "bot";
    const item = el("li", "from-" + from);
    item.appendChild(el("span", "byline", from === "agent" ? "agent " + agent : "bot"));
    if (data.text) item.appendChild(el("div", "msg", data.text));
    for (const card of data.cards || []) {
      const box = el("div", "card-reply");
      box.appendChild(el("strong", null, card.title));
      if (card.text) box.appendChild(el("div", null, card.text));
      const img = card.image_url && safeHref(card.image_url);
      if (img) {
        const link = el("a", null, "image");
        link.href = img;
        link.target = "_blank";
        link.rel = "noopener noreferrer";
        box.appendChild(link);
      }
      if (card.buttons && card.buttons.length) box.appendChild(buttonRow(card.buttons));
      item.appendChild(box);
    }
    for (const a of data.attachments || []) {
      const href = safeHref(a.url);
      const link = el(href ? "a" : "span", "msg", (a.name || a.type || "file") + (href ? "" : " (" + a.url + ")"));
      if (href) {
        link.href = href;
        link.target = "_blank";
        link.rel = "noopener noreferrer";
      }
      item.appendChild(link);
    }
    const buttons = (data.buttons || []).concat(data.quick_replies || []);
    if (buttons.length) item.appendChild(buttonRow(buttons));
    if (!item.querySelector(".msg, .card-reply, .chips")) item.appendChild(el("div", "msg", data.plain || ""));
    chat.appendChild(item);
    scrollDown(chat);
  }

  function showTyping(on, ttl) {
    clearTimeout(typingTimer);
    typing.hidden = !on;
    if (on) typingTimer = setTimeout(() => { typing.hidden = true; }, (ttl || 30) * 1000);
  }

  function markRead(messageId) {
    const receipt = sentBubbles.get(messageId);
    if (receipt && !receipt.classList.contains("failed")) receipt.textContent = "seen";
  }

  function highlight(nodeId) {
    for (const node of graph.querySelectorAll("g.node")) {
      const title = node.querySelector("title");
      node.classList.toggle("current", !!title && title.textContent === nodeId);
    }
  }

  function setOwner(owner) {
    ownerBadge.className = "badge owner-" + owner;
    ownerBadge.textContent = OWNER_LABEL[owner] || owner;
  }

  function showTrace(data) {
    const placeholder = traces.querySelector(".empty-trace");
    if (placeholder) placeholder.remove();
    turn += 1;
    const card = el("li", "trace owner-" + data.owner);
    const head = el("div", "trace-head");
    const m = data.message || {};
    if (m.event === "agent.message") agentMessages.set(m.id, m.by || "");
    let said;
    if (m.type === "event") said = (m.event || "event") + (m.by ? " by " + m.by : "");
    else said = (m.by ? m.by + ": " : "") + (m.type === "text" ? "\u201c" + m.text + "\u201d" : m.type + " " + (m.text || ""));
    head.appendChild(el("span", "muted", "#" + turn));
    head.appendChild(el("span", "said", said));
    head.appendChild(el("span", "ms", data.ms + " ms"));
    card.appendChild(head);
    const lines = el("ul");
    for (const line of data.lines || []) lines.appendChild(el("li", null, line));
    for (const action of data.actions || []) lines.appendChild(el("li", null, "action: " + action));
    if (lines.children.length) card.appendChild(lines);
    const where = el("div", "where");
    where.textContent = "now in " + data.flow + "/" + data.state + " \u00b7 owner " + data.owner +
      (data.queue ? " (" + data.queue + ")" : "") + " \u00b7 " + data.replies + " repl" + (data.replies === 1 ? "y" : "ies");
    card.appendChild(where);
    const vars = data.vars || {};
    if (Object.keys(vars).length) {
      const details = el("details");
      details.appendChild(el("summary", null, "variables (" + Object.keys(vars).length + ")"));
      details.appendChild(el("pre", null, JSON.stringify(vars, null, 2)));
      card.appendChild(details);
    }
    traces.insertBefore(card, traces.firstChild);
    setOwner(data.owner);
    if (data.state) currentState.textContent = data.state;
    if (data.node) highlight(data.node);
  }

  async function refreshGraph(flow) {
    try {
      const response = await fetch("/playground/graph/" + encodeURIComponent(flow));
      if (response.ok) {
        graph.innerHTML = await response.text(); // our own server's template: escaped text, sanitized SVG
        highlight("n_" + (graph.dataset.start || "").replace(/[^A-Za-z0-9_]/g, "_"));
      }
    } catch (_) { /* keep the old drawing */ }
  }

  function closeStream() {
    if (source) source.close();
    source = null;
  }

  async function start() {
    closeStream();
    enable(false);
    chat.replaceChildren();
    traces.replaceChildren(el("li", "empty-trace muted", "Each turn shows here: the route that matched, the actions, the variables, the owner and how long it took."));
    turn = 0;
    seen.clear();
    sentBubbles.clear();
    agentMessages.clear();
    setOwner("bot");
    setLive("connecting", "connecting…");
    const flow = root.dataset.flow;
    let response;
    try {
      response = await fetch("/playground/conversations", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ flow, platform: root.dataset.platform }),
      });
    } catch (err) {
      setLive("offline", "offline");
      addLine("system", "The server did not answer: " + err);
      return;
    }
    if (!response.ok) {
      setLive("offline", "error");
      addLine("system", "Could not start a conversation: " + ((await response.json()).error || response.status));
      return;
    }
    conversation = await response.json();
    root.dataset.conversation = conversation.conversation_id;
    $("conversation-id").textContent = conversation.conversation;
    currentState.textContent = graph.dataset.start || "";
    refreshGraph(flow);
    addLine("system", "New conversation with flow " + flow + ". Say something.");
    source = new EventSource(conversation.events);
    source.addEventListener("ready", () => { setLive("live", "live"); enable(true); });
    source.addEventListener("reply", (e) => showReply(JSON.parse(e.data)));
    source.addEventListener("typing", (e) => { const d = JSON.parse(e.data); showTyping(d.on, d.ttl); });
    source.addEventListener("read", (e) => markRead(JSON.parse(e.data).message_id));
    source.addEventListener("trace", (e) => showTrace(JSON.parse(e.data)));
    source.addEventListener("resync", () => addLine("system", "Some live events were missed while reconnecting."));
    source.onerror = () => setLive("connecting", "reconnecting…");
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || input.disabled) return;
    input.value = "";
    post("text", text);
  });
  $("new-conversation").addEventListener("click", start);
  $("flow-select").addEventListener("change", (event) => {
    const url = new URL(window.location.href);
    url.searchParams.set("flow", event.target.value);
    window.location.assign(url.toString());
  });
  window.addEventListener("beforeunload", closeStream);
  start();
})();
