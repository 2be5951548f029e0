// Playground: POST the request to /v2/models/NAME/infer with the session; show reply and time.
// (A generative deployment gets the chat of playground_chat.js instead of this form.)
(function () {
  "use strict";
  var form = document.getElementById("playground-form");
  if (!form) return;
  var examples = JSON.parse(document.getElementById("examples").textContent);
  var select = document.getElementById("pg-deployment");
  var body = document.getElementById("pg-body");
  var csrf = form.querySelector("input[name=csrfmiddlewaretoken]").value;

  function fillExample() { body.value = examples[select.value] || "{}"; }
  select.addEventListener("change", fillExample);
  fillExample();

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    if (document.getElementById("pg-tensor").hidden) return;  // a chat model: playground_chat.js
    var started = performance.now();
    var status = document.getElementById("pg-status");
    // A file chosen for a BYTES input (playground_image.js) makes a binary-extension body.
    var image = window.SwarmPlaygroundImage;
    var prepared = (image && image.request(body.value)) || Promise.resolve(
      { body: body.value, headers: { "Content-Type": "application/json" } });
    prepared.then(function (request) {
      // The session authenticates; the CSRF token goes along for any check on that path.
      request.headers["X-CSRFToken"] = csrf;
      return fetch("/v2/models/" + encodeURIComponent(select.value) + "/infer", {
        method: "POST", credentials: "same-origin", body: request.body,
        headers: request.headers
      });
    }).then(function (response) {
      return response.text().then(function (text) {
        var ms = performance.now() - started;
        status.textContent = response.status + " " + (response.ok ? "OK" : response.statusText);
        status.className = response.ok ? "" : "error";
        document.getElementById("pg-latency").textContent = ms.toFixed(1);
        try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* not JSON */ }
        document.getElementById("pg-response").textContent = text;
        document.getElementById("pg-result").hidden = false;
      });
    }).catch(function (error) {
      status.textContent = "request failed: " + error;
      status.className = "error";
      document.getElementById("pg-result").hidden = false;
    });
  });
})();
