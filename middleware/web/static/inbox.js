// The agent inbox: live updates over server-sent events, forms sent without leaving the page.
// Every form also works without this script (the server answers with a redirect).
// HTML put into the page comes from the inbox's own partials, rendered (and escaped) by the server.
"use strict";

(() => {
  const root = document.getElementById("inbox");
  if (!root) return;
  const key = root.dataset.key || "";
  const live = document.getElementById("live-state");
  const flash = document.getElementById("flash");
  let source = null;
  const pending = { sidebar: null, conversation: null };
  let deliveryChecks = 0; // replies still going out: look again until they are sent (bounded)

  function keyPath(k) {
    return k.split("/").map(encodeURIComponent).join("%2F").replace(/%3A/g, ":").replace(/%40/g, "@");
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  }

  function tick() {
    const now = Date.now() / 1000;
    for (const node of document.querySelectorAll("[data-since]")) {
      const since = parseFloat(node.dataset.since);
      if (since > 0) node.textContent = duration(now - since);
    }
  }

  function localTimes(scope) {
    for (const node of scope.querySelectorAll("time[data-ts]")) {
      const ts = parseFloat(node.dataset.ts);
      if (ts > 0) {
        const when = new Date(ts * 1000);
        node.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
        node.title = when.toLocaleString();
      }
    }
  }

  function say(text, isError) {
    if (!flash) return;
    flash.textContent = text;
    flash.classList.toggle("is-error", !!isError);
    flash.hidden = !text;
    clearTimeout(say.timer);
    if (text) say.timer = setTimeout(() => { flash.hidden = true; }, isError ? 8000 : 3000);
  }

  function signedOut() {
    window.location.assign("/inbox/login?next=" + encodeURIComponent(window.location.pathname));
  }

  async function load(url) {
    const response = await fetch(url, { headers: { "X-Requested-With": "fetch" }, cache: "no-store" });
    if (response.status === 401) {
      signedOut();
      return null;
    }
    return response.ok ? response.text() : null;
  }

  async function refreshSidebar() {
    const html = await load("/inbox/partials/sidebar" + (key ? "?current=" + encodeURIComponent(key) : ""));
    const sidebar = document.getElementById("sidebar");
    if (html !== null && sidebar) {
      sidebar.innerHTML = html;
      tick();
    }
  }

  async function refreshConversation() {
    if (!key) return;
    const box = document.getElementById("conversation");
    if (!box) return;
    const html = await load("/inbox/partials/conversation/" + keyPath(key));
    if (html === null) return;
    const old = box.querySelector(".transcript");
    const atBottom = !old || old.scrollHeight - old.scrollTop - old.clientHeight < 60;
    box.innerHTML = html;
    afterConversation(atBottom);
  }

  function afterConversation(scroll) {
    const box = document.getElementById("conversation");
    if (!box) return;
    localTimes(box);
    tick();
    bindForms(box);
    const conv = box.querySelector(".conv");
    const reply = document.getElementById("reply-button");
    if (conv && reply) reply.disabled = conv.dataset.canAct !== "true";
    const transcript = box.querySelector(".transcript");
    if (transcript && scroll) transcript.scrollTop = transcript.scrollHeight;
    if (box.querySelector(".status-sending, .status-retrying") && deliveryChecks < 30) {
      deliveryChecks += 1;
      later("conversation", refreshConversation, 1000);
    }
  }

  function later(what, fn, delay) {
    clearTimeout(pending[what]);
    pending[what] = setTimeout(fn, delay || 150);
  }

  async function submit(form, submitter) {
    if (submitter && submitter.disabled) return;
    const ask = form.dataset.confirm;
    if (ask && !window.confirm(ask)) return;
    const data = new FormData(form, submitter);
    const buttons = form.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    let response;
    try {
      // not form.action: a control named "action" shadows it
      response = await fetch(form.getAttribute("action"), {
        method: "POST",
        headers: { "X-Requested-With": "fetch" },
        body: new URLSearchParams(data),
      });
    } catch (err) {
      say("The server did not answer: " + err, true);
      buttons.forEach((b) => { b.disabled = false; });
      return;
    }
    buttons.forEach((b) => { b.disabled = false; });
    if (response.status === 401) return signedOut();
    let answer = {};
    try { answer = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      say(answer.error || "That did not work (" + response.status + ").", true);
    } else {
      say(answer.notice || "Done.");
      const text = form.querySelector("textarea");
      if (text) text.value = "";
    }
    refreshConversation();
    refreshSidebar();
  }

  function bindForms(scope) {
    for (const form of scope.querySelectorAll("form[data-fetch]")) {
      if (form.dataset.bound) continue;
      form.dataset.bound = "1";
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        submit(form, event.submitter);
      });
    }
  }

  function connect() {
    const url = "/inbox/events" + (key ? "?conversation=" + encodeURIComponent(key) : "");
    source = new EventSource(url);
    source.addEventListener("ready", () => {
      live.dataset.state = "live";
      live.textContent = "live";
      later("sidebar", refreshSidebar); // whatever happened while (re)connecting
      later("conversation", refreshConversation);
    });
    source.addEventListener("turn", (event) => {
      const data = JSON.parse(event.data);
      later("sidebar", refreshSidebar);
      if (data.conversation === key) {
        deliveryChecks = 0;
        later("conversation", refreshConversation);
      }
    });
    source.addEventListener("resync", () => {
      later("sidebar", refreshSidebar);
      later("conversation", refreshConversation);
    });
    source.addEventListener("signed-out", signedOut);
    source.onerror = () => {
      live.dataset.state = "connecting";
      live.textContent = "reconnecting…";
    };
  }

  const text = document.getElementById("composer-text");
  if (text) {
    text.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        const reply = document.getElementById("reply-button");
        if (reply && !reply.disabled && text.value.trim()) text.form.requestSubmit(reply);
      }
    });
  }

  bindForms(document);
  localTimes(document);
  afterConversation(true);
  tick();
  setInterval(tick, 1000);
  connect();
  window.addEventListener("beforeunload", () => { if (source) source.close(); });
})();
