// The plan page: as the depth or the data change, ask /api/estimate and show size, tokens, steps,
// memory and time without a reload. Uploads go straight to /api/datasets with a progress bar.
(function () {
  "use strict";
  const form = document.getElementById("plan-form");
  if (!form) return;
  const $ = (id) => document.getElementById(id);
  const { count, size, duration, decimal } = NCS;  // util.js: the server's formats
  const depth = $("depth");
  let timer = null, seq = 0, calibrationTimer = null;

  function source() { return (form.querySelector('input[name="source"]:checked') || {}).value || "demo"; }
  function showSourceDetails() {
    for (const el of form.querySelectorAll(".source-detail")) el.hidden = el.dataset.source !== source();
    // Chat-tuning is on by default for the demo (its conversations are about the demo's stories); for
    // other data it is the person's choice, kept once they have made it.
    if ($("chat") && !chatTouched) $("chat").checked = source() === "demo";
  }
  let chatTouched = !!($("chat") && $("chat").dataset.chosen);  // a form sent back with errors: as sent
  if ($("chat")) $("chat").addEventListener("change", () => { chatTouched = true; });
  if ($("chat-data")) $("chat-data").addEventListener("change", () => { chatTouched = true; $("chat").checked = true; });

  function params() {
    const p = new URLSearchParams();
    p.set("depth", depth.value);
    const s = source();
    if (s === "demo") p.set("dataset", "demo");
    if (s === "upload" && $("dataset-id").value) p.set("dataset", "ds:" + $("dataset-id").value);
    if (s === "url" && form.url.value) p.set("dataset", form.url.value);
    if (s === "s3" && form.s3.value) p.set("dataset", form.s3.value);
    if (s === "path" && form.path && form.path.value) p.set("dataset", form.path.value);
    for (const k of ["max_steps", "seq_len", "batch_size", "vocab_size"]) if (form[k].value) p.set(k, form[k].value);
    if ($("chat") && $("chat").checked) {  // the chat stage after pretraining (chatplan.py estimates it)
      const conv = $("chat-data").value;
      if (conv === "demo") p.set("chat", "1"); else p.set("chat_data", "ds:" + conv);
    }
    return p;
  }

  async function refresh() {
    const mine = ++seq;
    $("depth-out").textContent = depth.value;
    try {
      const r = await fetch(form.dataset.estimateUrl + "?" + params().toString(), { headers: { Accept: "application/json" } });
      const body = await r.json();
      if (mine !== seq) return;  // a newer request is on its way
      if (!r.ok) { showError((body.error && body.error.message) || r.statusText); return; }
      show(body);
    } catch (e) { if (mine === seq) showError("Could not reach the server for an estimate."); }
  }
  function showError(msg) { const el = $("e-error"); el.textContent = msg; el.hidden = false; }

  function show(e) {
    $("e-error").hidden = true;
    $("e-params").textContent = e.params_human;
    $("e-tokens").textContent = e.tokens_human;
    $("e-ratio").textContent = e.tokens_per_param;
    $("e-steps").textContent = e.steps.toLocaleString() + ` × ${e.batch_size}×${e.seq_len}`;
    showChat(e.chat, e.stages);
    const m = e.memory;
    const verdict = { fits: "fits", tight: "tight", wont_fit: "will not fit", unknown: "" }[m.verdict] || "";
    $("e-memory").textContent = size(m.needed_bytes) + (verdict ? " · " + verdict : "");
    $("e-memory").className = "verdict-" + m.verdict;
    const share = m.device_bytes ? Math.min(1, m.needed_bytes / m.device_bytes) : 0;
    $("e-meter").style.width = (100 * share).toFixed(1) + "%";
    $("e-meter").className = "meter-bar verdict-" + m.verdict;
    $("e-memory-note").textContent = m.device_bytes ? `of ${size(m.device_bytes)} on ${e.device.device_name || e.device.device}` : "";
    $("e-time").textContent = duration(e.time.seconds);
    const src = {
      calibrated: `measured here: ${count(e.time.tokens_per_sec)} tokens/s at this shape` +
        (e.time.dtype ? ` in ${e.time.dtype}` : ""),
      extrapolated: "scaled from a timing run at a nearby size; refining…",
      rough: "a rough guess until the timing run finishes…",
    }[e.time.source] || "";
    $("e-time-note").textContent = src;
    $("e-data-note").textContent = (e.data && e.data.note) || "";
    showCost(e.cost);
    const ul = $("e-warnings");
    ul.textContent = "";
    for (const w of e.warnings) { const li = document.createElement("li"); li.textContent = w; ul.appendChild(li); }
    // A calibration runs in the background; ask again until the time is measured.
    clearTimeout(calibrationTimer);
    // So does the data's preparation (its vocabulary and token counts): ask again until it is known.
    const estimating = e.data && e.data.status === "estimating";
    if ((e.time.source !== "calibrated" && e.calibrating) || estimating) calibrationTimer = setTimeout(refresh, 2000);
  }

  // The chat stage: its steps and time beside pretraining's, and what its length assumes.
  function showChat(chat, stages) {
    $("e-chat-row").hidden = $("e-chat-note").hidden = !chat;
    if (!chat) return;
    const pre = (stages || []).find((s) => s.stage === "pretrain");
    $("e-chat").textContent = `${chat.steps.toLocaleString()} steps · ${duration(chat.seconds)}`;
    $("e-chat-note").textContent = (pre ? `Pretraining ${pre.steps.toLocaleString()} steps, then chat-tuning ` +
      `${chat.steps.toLocaleString()}. ` : "") + `Chat length assumes ${chat.assumes}.`;
  }

  // Billing's quote (null when nothing is charged): the cost, what a start holds, what is available.
  function showCost(c) {
    $("e-cost-row").hidden = $("e-cost-note").hidden = !c;
    if (!c) return;
    if (c.credits === null) { $("e-cost").textContent = "–"; $("e-cost-note").textContent = c.error; return; }
    $("e-cost").textContent = `${decimal(c.credits, 2)} ${c.unit}` + (c.money ? ` (about ${c.money.display})` : "");
    $("e-cost-note").textContent = `Starting holds ${decimal(c.hold, 2)} ${c.unit}; you have ` +
      `${decimal(c.available, 2)} available` + (c.enough ? ". Unused credits return when the run ends." :
      ": not enough. Top up on your account page.");
  }

  function schedule() { clearTimeout(timer); timer = setTimeout(refresh, 150); }
  form.addEventListener("input", (ev) => { if (ev.target.id !== "upload-file") schedule(); });
  form.addEventListener("change", () => { showSourceDetails(); schedule(); });

  $("upload-file") && $("upload-file").addEventListener("change", () => {
    const file = $("upload-file").files[0];
    if (!file) return;
    const data = new FormData();
    data.append("file", file);
    const xhr = new XMLHttpRequest();
    const bar = $("upload-progress"), status = $("upload-status");
    bar.hidden = false; bar.value = 0; status.textContent = `Uploading ${file.name}…`;
    xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) bar.value = (100 * ev.loaded) / ev.total; };
    xhr.onload = () => {
      bar.hidden = true;
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { /* shown below */ }
      if (xhr.status >= 200 && xhr.status < 300) {
        const opt = document.createElement("option");
        opt.value = body.id; opt.textContent = `${body.name} (${size(body.size_bytes)})`;
        $("dataset-id").appendChild(opt);
        $("dataset-id").value = body.id;
        status.textContent = `Uploaded ${body.name}.`;
        refresh();
      } else {
        status.textContent = (body.error && body.error.message) || `Upload failed (${xhr.status}).`;
      }
    };
    xhr.onerror = () => { bar.hidden = true; status.textContent = "Upload failed: the connection broke."; };
    xhr.open("POST", form.dataset.uploadUrl);
    xhr.setRequestHeader("X-CSRFToken", NCS.csrfToken());  // an XHR (for its progress) is not fetch
    xhr.setRequestHeader("Accept", "application/json");
    xhr.send(data);
  });

  showSourceDetails();
  refresh();
})();
