// The job page: live charts, stats, samples, state history and log tail from the job's event stream.
// Server-Sent Events carry ids, so a browser that reconnects (lid closed, network blip) resumes from
// Last-Event-ID and loses no points. Every piece of text from the trainer or the model is inserted with
// textContent, never as HTML.
(function () {
  "use strict";
  const root = document.getElementById("job");
  if (!root) return;
  const jobId = root.dataset.jobId;
  const eventsUrl = root.dataset.eventsUrl;
  const logUrl = root.dataset.logUrl;
  const FINAL = new Set(root.dataset.finalStates.split(" "));  // jobs.FINAL, from the server
  const $ = (sel) => root.querySelector(sel);
  const { count, decimal, duration } = NCS;  // util.js: the server's formats
  function setText(sel, text) {
    const el = $(sel);
    if (el) el.textContent = text;
  }

  // -- charts ---------------------------------------------------------------------------------------
  // chatStep/chatVal: the chat stage's validation loss (held-out conversations), its own curve;
  // boundary: the last pretraining step of a run that chat-tunes after it (0: a chat-tune of a model).
  const loss = { step: [], train: [], valStep: [], val: [], bpb: [], chatStep: [], chatVal: [], boundary: null };
  let lossChart = null, bpbChart = null, dirty = false;

  function chartWidth(el) { return Math.max(280, el.clientWidth - 8); }
  function makeCharts() {
    if (typeof uPlot === "undefined") return;
    const le = $("#loss-chart"), be = $("#bpb-chart");
    const axes = [{ label: "step", stroke: "currentColor", grid: { stroke: "rgba(128,128,128,.15)" } },
                  { stroke: "currentColor", grid: { stroke: "rgba(128,128,128,.15)" } }];
    lossChart = new uPlot({
      width: chartWidth(le), height: 260, axes: axes,
      scales: { x: { time: false } },
      series: [{ label: "step" },
               { label: "train loss", stroke: "#3b82f6", width: 1.5, spanGaps: true },
               { label: "val loss", stroke: "#f59e0b", width: 2, spanGaps: true, points: { show: true } },
               { label: "chat val loss", stroke: "#a855f7", width: 2, spanGaps: true, points: { show: true } }],
      hooks: { draw: [drawBoundary] },
    }, [[], [], [], []], le);
    bpbChart = new uPlot({
      width: chartWidth(be), height: 200, axes: axes,
      scales: { x: { time: false } },
      series: [{ label: "step" },
               { label: "val bits/byte", stroke: "#10b981", width: 2, points: { show: true } }],
    }, [[], []], be);
    window.addEventListener("resize", () => {
      lossChart.setSize({ width: chartWidth(le), height: 260 });
      bpbChart.setSize({ width: chartWidth(be), height: 200 });
    });
  }
  // Where pretraining ends and chat-tuning begins: a dashed line across the loss chart.
  function drawBoundary(u) {
    if (loss.boundary === null || !u.data[0].length) return;
    const x = u.valToPos(loss.boundary, "x", true);
    const ctx = u.ctx;
    ctx.save();
    ctx.strokeStyle = "#a855f7"; ctx.fillStyle = "#a855f7"; ctx.lineWidth = 1.5;
    ctx.setLineDash([5, 4]);
    ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
    ctx.font = `${12 * devicePixelRatio}px sans-serif`;
    ctx.fillText("chat-tuning →", x + 4 * devicePixelRatio, u.bbox.top + 14 * devicePixelRatio);
    ctx.restore();
  }
  // Train loss is logged every step and the val losses now and then: merge them on one x axis.
  function lossData() {
    const xs = Array.from(new Set(loss.step.concat(loss.valStep, loss.chatStep))).sort((a, b) => a - b);
    const at = (steps, values) => { const m = new Map(steps.map((s, i) => [s, values[i]])); return xs.map((s) => (m.has(s) ? m.get(s) : null)); };
    return [xs, at(loss.step, loss.train), at(loss.valStep, loss.val), at(loss.chatStep, loss.chatVal)];
  }
  function markStage(boundary) {
    if (boundary === null || boundary === undefined || loss.boundary === boundary) return;
    loss.boundary = boundary;
    const note = $("#stage-note");
    if (note) {
      note.textContent = boundary ? `Pretraining ran to step ${boundary}; chat-tuning from step ${boundary + 1} on.`
                                  : "Chat-tuning only: this run starts from a trained model.";
      note.hidden = false;
    }
    dirty = true;
  }
  function redraw() {
    if (!dirty) return;
    dirty = false;
    if (lossChart) lossChart.setData(lossData());
    if (bpbChart) bpbChart.setData([loss.valStep.slice(), loss.bpb.slice()]);
  }
  setInterval(redraw, 250);

  // -- state ----------------------------------------------------------------------------------------
  function showJob(job) {
    if (!job) return;
    showRunTime(job);
    const badge = $("#status");
    badge.textContent = job.status;
    badge.className = "badge status-" + job.status;
    setText("#status-reason", job.status_reason || "");
    setText("#why-waiting", job.why_waiting || "");
    $("#waiting").hidden = !job.why_waiting;
    setText("#attempt", job.attempt ? `attempt ${job.attempt} of ${job.max_attempts}` : "");
    const active = !FINAL.has(job.status);
    $("#cancel").hidden = !active || job.cancel_requested;
    $("#cancelling").hidden = !(active && job.cancel_requested);
    const dl = $("#download");
    if (job.urls && job.urls.download) { dl.href = job.urls.download; dl.hidden = false; } else { dl.hidden = true; }
    const chat = $("#chat");
    if (job.urls && job.urls.chat) { chat.href = job.urls.chat; chat.hidden = false; } else { chat.hidden = true; }
    const midRun = active && job.progress && job.progress.checkpoint_step;
    $("#snapshot").hidden = !midRun;
    $("#snapshot-download").hidden = !midRun;
    if (job.progress) showProgress(job.progress);
    if (!active) { stopLog(); setText("#eta", "–"); }
  }
  function showProgress(p) {
    if (p.step !== undefined && p.total_steps) {
      setText("#step", `${p.step} / ${p.total_steps}`);
      $("#bar").style.width = Math.min(100, (100 * p.step) / p.total_steps).toFixed(1) + "%";
    }
    if (p.loss !== undefined) setText("#loss", decimal(p.loss, 3));
    if (p.val_bpb !== undefined && p.val_bpb !== null) setText("#bpb", decimal(p.val_bpb, 3));
    if (p.stage) { setText("#stage", p.stage === "chat" ? "chat-tuning" : "pretraining"); $("#stage-stat").hidden = false; }
    if (p.chat_val_loss !== undefined && p.chat_val_loss !== null) { setText("#chat-val", decimal(p.chat_val_loss, 3)); $("#chat-val-stat").hidden = false; }
    if (p.tokens_per_sec !== undefined) setText("#tps", count(p.tokens_per_sec));
    if (p.mfu !== undefined) setText("#mfu", p.mfu === null ? "–" : decimal(100 * p.mfu, 1) + "%");
    if (p.elapsed_s !== undefined) setText("#elapsed", duration(p.elapsed_s));
    if (p.eta_s !== undefined) setText("#eta", duration(p.eta_s));
  }
  function addHistory(text, when) {
    const li = document.createElement("li");
    const t = document.createElement("time");
    t.textContent = when ? new Date(when * 1000).toLocaleTimeString() : "";
    li.append(t, document.createTextNode(" " + text));
    $("#history").appendChild(li);
  }
  function addSamples(d) {
    const box = $("#samples");
    const block = document.createElement("div");
    block.className = "sample-block";
    const h = document.createElement("h4");
    h.textContent = `step ${d.step}`;
    block.appendChild(h);
    for (const s of d.samples || []) {
      const p = document.createElement("p");
      const b = document.createElement("b");
      b.textContent = s.prompt;
      p.append(b, document.createTextNode(s.text));
      block.appendChild(p);
    }
    box.prepend(block);
    $("#no-samples").hidden = true;
  }

  // -- plan and run: the estimate the job was submitted with beside what the trainer decided ------------
  const ACTUAL = { vocab_size: "vocab_size", params: "params", train_tokens: "n_train_tokens",
                   steps: "total_steps", tokens: "total_tokens", budget: "budget" };
  function showActual(key, value) {
    const row = root.querySelector(`#plan-vs-run tr[data-key="${key}"]`);
    if (!row || value === undefined || value === null) return;
    const est = row.querySelector(".est").dataset.value;
    const cell = row.querySelector(".act");
    // exact figures in full (the point is that they match); the time as the server writes durations
    cell.textContent = key === "seconds" ? duration(value)
      : typeof value === "number" ? value.toLocaleString("en-US") : String(value);
    const same = key === "seconds" ? null : String(est) === String(value);
    row.classList.toggle("differs", same === false);
    row.classList.toggle("matches", same === true);
  }
  function showPlanFromStart(d) {
    for (const [key, field] of Object.entries(ACTUAL)) showActual(key, d[field]);
  }
  function showRunTime(job) {
    if (job.status !== "completed" || !job.started_at || !job.finished_at) return;
    showActual("seconds", (Date.parse(job.finished_at) - Date.parse(job.started_at)) / 1000);
  }

  const handlers = {
    state(d) {
      addHistory(`${d.from || "–"} → ${d.to}${d.reason ? ": " + d.reason : ""}`, d.time);
      showJob(d.job);
    },
    start(d) {
      if (d.params) setText("#params", count(d.params));
      if (d.dtype) setText("#dtype", d.dtype);  // what the trainer's products run in (--dtype)
      const stages = d.stages || [];  // a chat stage's start: where its boundary will be
      if (stages.some((s) => s.stage === "chat")) markStage(stages.filter((s) => s.stage === "pretrain").reduce((n, s) => n + s.steps, 0));
      showPlanFromStart(d);
      addHistory(d.resumed_from_step ? `trainer resumed from step ${d.resumed_from_step}` :
                 `trainer started on ${d.device}`, d.time);
    },
    step(d) {
      loss.step.push(d.step); loss.train.push(d.loss); dirty = true;
      showProgress(d);
    },
    eval(d) {
      if (d.stage === "chat") {  // held-out conversations: the chat stage's own validation curve
        loss.chatStep.push(d.step); loss.chatVal.push(d.val_loss); dirty = true;
        setText("#chat-val", decimal(d.val_loss, 3)); $("#chat-val-stat").hidden = false;
        return;
      }
      loss.valStep.push(d.step); loss.val.push(d.val_loss); loss.bpb.push(d.val_bpb); dirty = true;
      if (d.val_bpb !== null) setText("#bpb", decimal(d.val_bpb, 3));
    },
    stage(d) {
      markStage(d.step);
      showProgress({ stage: d.stage });
      addHistory(`chat-tuning began after step ${d.step}: ${d.steps} steps on ${count(d.n_conversations || 0)} conversations` +
                 (d.n_val_conversations ? ` (${count(d.n_val_conversations)} held out)` : ""), d.time);
    },
    sample: addSamples,
    checkpoint(d) {
      addHistory(`checkpoint at step ${d.step}`, d.time);
      $("#snapshot").hidden = $("#snapshot-download").hidden = FINAL.has($("#status").textContent);
    },
    done(d) { addHistory(`finished at step ${d.step}, loss ${decimal(d.final_loss, 3)}`, d.time); },
    error(d) { addHistory(`${d.kind} error: ${d.message}`, d.time); },
    job(d) { showJob(d); },
  };

  // -- the stream ------------------------------------------------------------------------------------
  let source = null;
  let ended = false;
  function connect() {
    // A reconnect made here (not by EventSource itself) resumes after the last event seen.
    const last = root.dataset.lastEventId;
    source = new EventSource(last ? `${eventsUrl}${eventsUrl.includes("?") ? "&" : "?"}since=${encodeURIComponent(last)}` : eventsUrl);
    for (const name of Object.keys(handlers)) {
      source.addEventListener(name, (e) => {
        let d;
        try { d = JSON.parse(e.data); } catch (err) { return; }
        handlers[name](d);
        root.dataset.lastEventId = e.lastEventId || root.dataset.lastEventId || "";
      });
    }
    source.addEventListener("end", () => { ended = true; source.close(); setText("#live", "finished"); redraw(); });
    source.onopen = () => setText("#live", "live");
    source.onerror = () => {
      // EventSource reconnects by itself and sends Last-Event-ID; just say so.
      if (source.readyState !== EventSource.CLOSED) { setText("#live", "reconnecting…"); return; }
      // Refused (429: too many streams open): EventSource gives up, so try again in a while.
      if (!ended) { setText("#live", "waiting for a free stream…"); setTimeout(connect, 5000 + Math.random() * 5000); }
    };
  }

  // -- the log tail (polled; plain text) ------------------------------------------------------------
  let logTimer = null;
  async function pollLog() {
    try {
      const r = await fetch(logUrl, { headers: { Accept: "application/json" } });
      if (r.ok) {
        const body = await r.json();
        const pre = $("#log");
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.textContent = body.text || "";
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      }
    } catch (err) { /* next poll */ }
  }
  function stopLog() { if (logTimer) { clearInterval(logTimer); logTimer = null; pollLog(); } }

  async function post(url) {
    const r = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },  // util.js adds the CSRF token
      body: "{}",
    });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
    return body;
  }

  $("#cancel").addEventListener("click", async () => {
    if (!confirm("Stop this run? It saves a checkpoint first, and the partial model stays usable.")) return;
    try { showJob(await post(root.dataset.cancelUrl)); } catch (e) { alert(e.message); }
  });
  $("#snapshot").addEventListener("click", async () => {
    try {
      const m = await post(root.dataset.snapshotUrl);
      window.location = m.chat_url;
    } catch (e) { alert(e.message); }
  });

  // A checkpoint taken mid-run becomes a read-only model of its own, which downloads like any other.
  $("#snapshot-download").addEventListener("click", async () => {
    try {
      const m = await post(root.dataset.snapshotUrl);
      window.location = root.dataset.downloadBase.replace("0", String(m.model_id));
    } catch (e) { alert(e.message); }
  });

  makeCharts();
  connect();
  pollLog();
  logTimer = setInterval(pollLog, 3000);
  window.__jobPage = { loss: loss, jobId: jobId, lossChart: () => lossChart };  // read by the browser tests
})();
