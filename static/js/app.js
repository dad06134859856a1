// Every page: send the CSRF token with same-origin fetch() writes, and confirm dangerous buttons.
// No dependencies; loaded with `defer` from base.html (the CSP forbids inline script).
(function () {
  "use strict";
  const meta = document.querySelector('meta[name="csrf-token"]');
  const token = meta ? meta.content : "";
  const SAFE = new Set(["GET", "HEAD", "OPTIONS", "TRACE"]);

  // Wrap fetch once: a write to this site carries X-CSRFToken (multipart uploads cannot be JSON).
  if (token && window.fetch && !window.fetch.ncsWrapped) {
    const original = window.fetch.bind(window);
    const wrapped = function (input, init) {
      init = init || {};
      const method = (init.method || (input instanceof Request ? input.method : "GET")).toUpperCase();
      const url = new URL(input instanceof Request ? input.url : String(input), window.location.href);
      if (!SAFE.has(method) && url.origin === window.location.origin) {
        const headers = new Headers(init.headers || (input instanceof Request ? input.headers : undefined));
        if (!headers.has("X-CSRFToken")) headers.set("X-CSRFToken", token);
        init = Object.assign({}, init, { headers: headers, credentials: init.credentials || "same-origin" });
      }
      return original(input, init);
    };
    wrapped.ncsWrapped = true;
    window.fetch = wrapped;
  }

  // <button data-confirm="Really delete?"> asks before its form is sent.
  document.addEventListener("click", function (event) {
    const el = event.target.closest("[data-confirm]");
    if (el && !window.confirm(el.getAttribute("data-confirm"))) {
      event.preventDefault();
    }
  });
})();
