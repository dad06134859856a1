// Every page: the CSRF token on writes, the formats numbers and durations are written in, reading
// Server-Sent Events from a fetch() response, and confirm buttons. base.html loads it first, without
// defer, so the page scripts find window.NCS. The formats follow nanochat_studio/formats.py rule for
// rule (tests/test_formats.py runs both on the same values). No dependencies; the CSP forbids inline
// script.
(function () {
  "use strict";
  const MISSING = "–";
  const SAFE = new Set(["GET", "HEAD", "OPTIONS", "TRACE"]);

  // -- CSRF -------------------------------------------------------------------------------------------
  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // Wrap fetch once: a write to this site carries X-CSRFToken (multipart uploads cannot be JSON).
  // An XMLHttpRequest (the upload with a progress bar) sets the header itself from csrfToken().
  if (window.fetch && !window.fetch.ncsWrapped) {
    const original = window.fetch.bind(window);
    const wrapped = function (input, init) {
      init = init || {};
      const method = (init.method || (input instanceof Request ? input.method : "GET")).toUpperCase();
      const url = new URL(input instanceof Request ? input.url : String(input), window.location.href);
      const token = csrfToken();
      if (token && !SAFE.has(method) && url.origin === window.location.origin) {
        const headers = new Headers(init.headers || (input instanceof Request ? input.headers : undefined));
        if (!headers.has("X-CSRFToken")) headers.set("X-CSRFToken", token);
        init = Object.assign({}, init, { headers: headers, credentials: init.credentials || "same-origin" });
      }
      return original(input, init);
    };
    wrapped.ncsWrapped = true;
    window.fetch = wrapped;
  }

  // -- formats (the rules of nanochat_studio/formats.py) ---------------------------------------------
  // toFixed rounds the exact binary value, a tie away from zero; formats.py does the same.
  function number(x) {
    return typeof x === "number" && isFinite(x) ? x : null;
  }
  function decimal(x, digits) {
    x = number(x);
    return x === null ? MISSING : x.toFixed(digits || 0);
  }
  const COUNT_UNITS = [["T", 1e12], ["B", 1e9], ["M", 1e6], ["K", 1e3]];
  function count(n) {
    n = number(n);
    if (n === null) return MISSING;
    for (const [unit, div] of COUNT_UNITS) if (Math.abs(n) >= div) return (n / div).toFixed(1) + unit;
    return n.toFixed(0);
  }
  const SIZE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];
  function size(n) {
    n = number(n);
    if (n === null) return MISSING;
    let i = 0;
    while (Math.abs(n) >= 1024 && i < SIZE_UNITS.length - 1) { n /= 1024; i++; }
    return n.toFixed(i === 0 || Math.abs(n) >= 10 ? 0 : 1) + " " + SIZE_UNITS[i];
  }
  function duration(seconds) {
    let s = number(seconds);
    if (s === null) return MISSING;
    s = Math.max(0, Number(s.toFixed(0)));
    const days = Math.floor(s / 86400), hours = Math.floor((s % 86400) / 3600), minutes = Math.floor((s % 3600) / 60);
    if (days) return `${days}d ${hours}h`;
    if (hours) return `${hours}h ${minutes}m`;
    if (minutes) return `${minutes}m ${s % 60}s`;
    return `${s}s`;
  }

  // -- Server-Sent Events from a fetch() response (a POST cannot use EventSource) -------------------
  // Calls on(event, data) for each event (data parsed as JSON when it is JSON); resolves at the end.
  function readEvents(response, on) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buf = "";
    function dispatch(frame) {
      let event = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.indexOf("event:") === 0) event = line.slice(6).trim();
        else if (line.indexOf("data:") === 0) data.push(line.slice(line.charAt(5) === " " ? 6 : 5));
      }
      if (!data.length) return;  // comments (heartbeats) and retry lines
      let parsed;
      try { parsed = JSON.parse(data.join("\n")); } catch (e) { parsed = data.join("\n"); }
      on(event, parsed);
    }
    function pump() {
      return reader.read().then(function (r) {
        if (r.done) { if (buf.trim()) dispatch(buf); return; }
        buf += decoder.decode(r.value, { stream: true });  // keeps a split UTF-8 sequence for the next chunk
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          dispatch(buf.slice(0, cut));
          buf = buf.slice(cut + 2);
        }
        return pump();
      });
    }
    return pump();
  }

  // <button data-confirm="Really delete?"> asks before its form is sent.
  document.addEventListener("click", function (event) {
    const el = event.target.closest("[data-confirm]");
    if (el && !window.confirm(el.getAttribute("data-confirm"))) {
      event.preventDefault();
    }
  });

  window.NCS = { csrfToken: csrfToken, decimal: decimal, count: count, size: size, duration: duration,
                 readEvents: readEvents };
})();
