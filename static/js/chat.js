/* The chat page and the compare page. No framework; model output is inserted with textContent only
   (it is untrusted text), never as HTML. Streams come from POST /api/chat as Server-Sent Events read
   with fetch + ReadableStream, so Stop is an AbortController and the server cancels generation. */
(function () {
  "use strict";

  function $(sel, root) { return (root || document).querySelector(sel); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  /* POST body to the chat API and call on(event, data) for each SSE event; resolves at stream end.
     (util.js's fetch adds the CSRF header and NCS.readEvents reads the stream.) */
  function streamChat(url, body, signal, on) {
    return fetch(url, {
      method: "POST", signal: signal, credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify(body)
    }).then(function (resp) {
      var type = resp.headers.get("Content-Type") || "";
      if (!resp.ok || type.indexOf("text/event-stream") !== 0) {
        return resp.json().catch(function () { return {}; }).then(function (j) {
          var msg = (j && j.error && j.error.message) || ("HTTP " + resp.status);
          on("error", { message: msg, status: resp.status });
          on("done", { finish_reason: "error" });
        });
      }
      return NCS.readEvents(resp, on);
    });
  }

  function statsText(s, clientTtft, clientTps) {
    if (!s) return "";
    var parts = [];
    var ttft = clientTtft != null ? clientTtft : s.ttft_ms;
    if (ttft != null) parts.push("first token " + NCS.decimal(ttft, 0) + " ms");
    var tps = s.tokens_per_sec != null ? s.tokens_per_sec : clientTps;
    if (tps != null) parts.push(NCS.decimal(tps, 1) + " tokens/s");
    if (s.completion_tokens != null) parts.push(s.completion_tokens + " tokens");
    if (s.finish_reason) parts.push(s.finish_reason === "length" ? "hit max tokens" : s.finish_reason);
    return parts.join(" · ");
  }

  function copyText(text, button) {
    function done() { var old = button.textContent; button.textContent = "Copied"; setTimeout(function () { button.textContent = old; }, 1200); }
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(done, function () { legacyCopy(text); done(); });
    } else { legacyCopy(text); done(); }
  }
  function legacyCopy(text) {
    var t = el("textarea");
    t.value = text;
    document.body.appendChild(t);
    t.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more to try */ }
    t.remove();
  }

  /* ------------------------------------------------------------------------------------ chat page */
  function chatPage(root) {
    var boot = JSON.parse(root.getAttribute("data-boot"));
    var api = root.getAttribute("data-api");
    var state = {
      mode: boot.mode, sessionId: boot.session ? boot.session.id : null,
      messages: boot.session ? boot.session.messages.map(function (m) { return { role: m.role, content: m.content, stats: m.stats }; }) : [],
      controller: null
    };
    var list = $("#messages"), prompt = $("#prompt"), sendBtn = $("#send"), stopBtn = $("#stop");
    var regenBtn = $("#regenerate"), contBtn = $("#continue"), status = $("#status"), banner = $("#mode-banner");

    // settings panel
    var fields = ["temperature", "top_k", "top_p", "max_tokens", "seed"];
    var saved = (boot.session && boot.session.settings) || {};
    fields.forEach(function (f) {
      var input = $("#" + f), v = saved[f] != null ? saved[f] : boot.defaults[f];
      if (f === "top_p" && v == null) v = 1;
      input.value = v == null ? "" : v;
      var out = $("#" + f + "-out");
      function show() { if (out) out.textContent = input.value; }
      input.addEventListener("input", show);
      show();
    });
    function sampling() {
      var s = {};
      fields.forEach(function (f) {
        var raw = $("#" + f).value.trim();
        if (raw === "") return;
        s[f] = (f === "temperature" || f === "top_p") ? parseFloat(raw) : parseInt(raw, 10);
      });
      return s;
    }

    function setMode(mode, fresh) {
      state.mode = mode;
      document.querySelectorAll('input[name="mode"]').forEach(function (r) { r.checked = r.value === mode; });
      banner.textContent = mode === "chat"
        ? "Chat mode: the model answers your messages" + (boot.chat_tuned ? "." : " (it was not chat-tuned, so expect rough answers).")
        : "Complete-text mode: the model continues the text you write.";
      banner.setAttribute("data-mode", mode);
      prompt.placeholder = mode === "chat" ? "Write a message…" : "Write the beginning of a text for the model to continue…";
      if (fresh) newChat();
    }
    document.querySelectorAll('input[name="mode"]').forEach(function (r) {
      r.addEventListener("change", function () { if (r.checked) setMode(r.value, true); });
    });

    function render() {
      list.textContent = "";
      state.messages.forEach(function (m, i) { list.appendChild(messageNode(m, i)); });
      var last = state.messages[state.messages.length - 1];
      regenBtn.disabled = !!state.controller || !last || last.role !== "assistant";
      contBtn.hidden = state.mode !== "complete" || !last || last.role !== "assistant";
      contBtn.disabled = !!state.controller;
      list.scrollTop = list.scrollHeight;
    }

    function messageNode(m, i) {
      var node = el("div", "msg msg-" + m.role);
      node.setAttribute("data-index", i);
      var label = m.role === "user" ? (state.mode === "complete" ? "Prompt" : "You")
        : m.role === "assistant" ? (state.mode === "complete" ? "Continuation" : "Model") : "System";
      node.appendChild(el("div", "msg-role", label));
      var body = el("div", "msg-body", m.content);
      node.appendChild(body);
      if (m.error) node.appendChild(el("div", "msg-error", m.error));
      var stats = el("div", "msg-stats small muted", statsText(m.stats, m.clientTtft, m.clientTps));
      node.appendChild(stats);
      var actions = el("div", "msg-actions");
      var copy = el("button", "link-btn", "Copy");
      copy.type = "button";
      copy.addEventListener("click", function () { copyText(state.messages[i].content, copy); });
      actions.appendChild(copy);
      if (m.role === "user") {
        var edit = el("button", "link-btn", "Edit");
        edit.type = "button";
        edit.addEventListener("click", function () { startEdit(node, i); });
        actions.appendChild(edit);
      }
      node.appendChild(actions);
      m.node = node; m.body = body; m.statsNode = stats;
      return node;
    }

    function startEdit(node, i) {
      if (state.controller) return;
      var body = node.querySelector(".msg-body");
      var area = el("textarea", "edit-area");
      area.value = state.messages[i].content;
      area.rows = Math.min(12, Math.max(2, area.value.split("\n").length));
      body.replaceWith(area);
      var bar = el("div", "actions");
      var save = el("button", "btn small primary", "Save and continue");
      var cancel = el("button", "btn small", "Cancel");
      save.type = cancel.type = "button";
      bar.appendChild(save); bar.appendChild(cancel);
      area.after(bar);
      area.focus();
      cancel.addEventListener("click", render);
      save.addEventListener("click", function () {
        state.messages = state.messages.slice(0, i + 1);
        state.messages[i] = { role: "user", content: area.value };
        render();
        generate();
      });
    }

    function newChat() {
      if (state.controller) state.controller.abort();
      state.sessionId = null;
      state.messages = [];
      history.replaceState(null, "", boot.page_url);
      document.querySelectorAll("#session-list li").forEach(function (li) { li.removeAttribute("aria-current"); });
      render();
      prompt.focus();
    }

    function addSessionToList(id, title) {
      var ul = $("#session-list");
      if (ul.querySelector('li[data-session-id="' + id + '"]')) return;
      var li = el("li");
      li.setAttribute("data-session-id", id);
      li.setAttribute("aria-current", "true");
      var a = el("a", null, title);
      a.href = boot.page_url + "?session=" + id;
      li.appendChild(a);
      li.appendChild(deleteButton(title));
      ul.prepend(li);
    }
    function deleteButton(title) {
      var b = el("button", "link-btn delete-session", "×");
      b.type = "button";
      b.title = "Delete this conversation";
      b.setAttribute("aria-label", "Delete " + title);
      return b;
    }
    $("#session-list").addEventListener("click", function (e) {
      var btn = e.target.closest(".delete-session");
      if (!btn) return;
      var li = btn.closest("li"), id = li.getAttribute("data-session-id");
      if (!confirm("Delete this conversation?")) return;
      fetch(root.getAttribute("data-sessions-api") + "/" + id, {
        method: "DELETE", credentials: "same-origin"
      }).then(function (r) {
        if (r.ok || r.status === 404) { li.remove(); if (String(state.sessionId) === id) newChat(); }
      });
    });
    $("#new-chat").addEventListener("click", newChat);

    function busy(on) {
      sendBtn.disabled = on;
      stopBtn.disabled = !on;
      status.textContent = on ? "generating…" : "";
    }

    function generate() {
      var history_ = state.messages.map(function (m) { return { role: m.role, content: m.content }; });
      var body = Object.assign({ model_id: boot.model_id, mode: state.mode, session_id: state.sessionId }, sampling());
      if (state.mode === "chat") body.messages = history_;
      else body.prompt = history_[0].content;
      var answer = { role: "assistant", content: "", stats: null };
      state.messages.push(answer);
      state.controller = new AbortController();
      busy(true);
      render();
      var text = document.createTextNode("");
      answer.body.appendChild(text);
      answer.node.classList.add("streaming");
      var t0 = performance.now(), tFirst = null, tLast = null, n = 0;
      var title = history_[0] ? history_[0].content.replace(/\s+/g, " ").slice(0, 80) : "New chat";
      return streamChat(root.getAttribute("data-api"), body, state.controller.signal, function (event, data) {
        if (event === "session") {
          state.sessionId = data.session_id;
          history.replaceState(null, "", boot.page_url + "?session=" + data.session_id);
          addSessionToList(data.session_id, title);
        } else if (event === "delta") {
          if (tFirst === null) tFirst = performance.now();
          tLast = performance.now();
          n += 1;
          text.appendData(data.text);  // text, never HTML
          answer.content += data.text;
          list.scrollTop = list.scrollHeight;
        } else if (event === "error") {
          answer.error = data.message;
          answer.node.appendChild(el("div", "msg-error", data.message));
        } else if (event === "done") {
          answer.stats = data;
          answer.clientTtft = tFirst === null ? null : tFirst - t0;
          answer.clientTps = n > 1 && tLast > tFirst ? (n - 1) / ((tLast - tFirst) / 1000) : null;
        }
      }).catch(function (err) {
        if (err && err.name === "AbortError") {
          answer.stats = { finish_reason: "stopped", completion_tokens: n };
          answer.clientTtft = tFirst === null ? null : tFirst - t0;
        } else {
          answer.error = "The connection failed: " + (err && err.message ? err.message : err);
        }
      }).then(function () {
        state.controller = null;
        if (!answer.content && answer.error) {
          // nothing was said: keep the error visible on its own
        }
        busy(false);
        render();
      });
    }

    $("#composer").addEventListener("submit", function (e) {
      e.preventDefault();
      if (state.controller) return;
      var text = prompt.value;
      if (!text.trim() && state.mode === "chat") return;
      if (state.mode === "complete") state.messages = [{ role: "user", content: text }];
      else state.messages.push({ role: "user", content: text });
      prompt.value = "";
      render();
      generate();
    });
    prompt.addEventListener("keydown", function (e) {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("#composer").requestSubmit(); }
    });
    stopBtn.addEventListener("click", function () { if (state.controller) state.controller.abort(); });
    regenBtn.addEventListener("click", function () {
      if (state.controller) return;
      var last = state.messages[state.messages.length - 1];
      if (last && last.role === "assistant") state.messages.pop();
      if (!state.messages.length) return;
      render();
      generate();
    });
    contBtn.addEventListener("click", function () {
      if (state.controller || state.messages.length < 2) return;
      state.messages = [{ role: "user", content: state.messages[0].content + state.messages[1].content }];
      render();
      generate();
    });

    setMode(state.mode, false);
    render();
  }

  /* --------------------------------------------------------------------------------- compare page */
  function comparePage(root) {
    var boot = JSON.parse(root.getAttribute("data-boot"));
    var api = root.getAttribute("data-api");
    var controllers = [];
    var stopBtn = $("#compare-stop");
    $("#compare-form").addEventListener("submit", function (e) {
      e.preventDefault();
      if (!boot.a || !boot.b || controllers.length) return;
      var text = $("#compare-prompt").value;
      var mode = document.querySelector('#compare-form input[name="mode"]:checked').value;
      var sampling = {
        temperature: parseFloat($("#compare-temperature").value || "0.8"),
        max_tokens: parseInt($("#compare-max").value || "128", 10)
      };
      var seed = $("#compare-seed").value.trim();
      if (seed !== "") sampling.seed = parseInt(seed, 10);
      stopBtn.disabled = false;
      var runs = [["a", boot.a], ["b", boot.b]].map(function (pair) {
        var side = pair[0], out = $("#out-" + side), stats = $("#stats-" + side);
        out.textContent = "";
        stats.textContent = "";
        var node = document.createTextNode("");
        out.appendChild(node);
        var c = new AbortController();
        controllers.push(c);
        var body = Object.assign({ model_id: pair[1], mode: mode, save: false }, sampling);
        if (mode === "chat") body.messages = [{ role: "user", content: text }];
        else body.prompt = text;
        var t0 = performance.now(), tFirst = null, tLast = null, n = 0;
        return streamChat(api, body, c.signal, function (event, data) {
          if (event === "delta") {
            if (tFirst === null) tFirst = performance.now();
            tLast = performance.now(); n += 1;
            node.appendData(data.text);
          } else if (event === "error") {
            out.appendChild(el("div", "msg-error", data.message));
          } else if (event === "done") {
            stats.textContent = statsText(data, tFirst === null ? null : tFirst - t0,
              n > 1 && tLast > tFirst ? (n - 1) / ((tLast - tFirst) / 1000) : null);
          }
        }).catch(function () { stats.textContent = "stopped"; });
      });
      Promise.all(runs).then(function () { controllers = []; stopBtn.disabled = true; });
    });
    stopBtn.addEventListener("click", function () { controllers.forEach(function (c) { c.abort(); }); });
  }

  var chatRoot = document.getElementById("chat-app");
  if (chatRoot) chatPage(chatRoot);
  var compareRoot = document.getElementById("compare-app");
  if (compareRoot) comparePage(compareRoot);
})();
