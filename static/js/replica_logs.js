// A replica's recent output on the deployment page: the last lines, then new ones every
// second (GET /api/replicas/<id>/logs/?after=<next>). The text is a model's output:
// untrusted, so it only ever goes in as a text node, never as HTML.
(function () {
  "use strict";
  var root = document.getElementById("replica-logs");
  if (!root) return;
  var select = document.getElementById("replica-logs-replica");
  var follow = document.getElementById("replica-logs-follow");
  var status = document.getElementById("replica-logs-status");
  var text = document.getElementById("replica-logs-text");
  var POLL_MS = 1000, TAIL_LINES = 200, PAGE_LINES = 1000, KEEP_LINES = 1000;
  var replica = null, cursor = null, lines = [], timer = null, busy = false;

  function url() {
    var query = cursor === null ? "limit=" + TAIL_LINES : "after=" + cursor + "&limit=" + PAGE_LINES;
    return root.dataset.url + encodeURIComponent(replica) + "/logs/?" + query;
  }

  function show(newLines) {
    if (!newLines.length) return;
    var atBottom = text.scrollTop + text.clientHeight >= text.scrollHeight - 4;
    newLines.forEach(function (line) { lines.push(line.text); });
    if (lines.length > KEEP_LINES) lines = lines.slice(lines.length - KEEP_LINES);
    text.textContent = lines.join("\n");
    if (atBottom) text.scrollTop = text.scrollHeight;
  }

  function poll() {
    timer = null;
    if (!replica || busy) return schedule();
    var asked = replica;
    busy = true;
    fetch(url(), { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (response) {
        return response.json().then(function (body) { return { ok: response.ok, body: body }; });
      })
      .then(function (answer) {
        if (asked !== replica) return;  // switched meanwhile: this answer is for another one
        if (!answer.ok) { status.textContent = answer.body.error || "not available"; return; }
        status.textContent = "";
        show(answer.body.lines);
        cursor = answer.body.next;
      })
      .catch(function () { status.textContent = "the portal did not answer; retrying"; })
      .then(function () { busy = false; schedule(); });
  }

  function schedule() {
    if (timer === null && follow.checked && !document.hidden) timer = setTimeout(poll, POLL_MS);
  }

  function choose() {
    replica = select.value || null;
    cursor = null;
    lines = [];
    text.textContent = "";
    status.textContent = replica ? "" : "no replica";
    if (timer !== null) { clearTimeout(timer); timer = null; }
    if (replica && !busy) poll();
  }

  // The replica table is redrawn live (deployment.js): offer the replicas it shows now.
  function syncOptions() {
    var rows = document.querySelectorAll("#replicas tr[data-replica]");
    var ids = Array.prototype.map.call(rows, function (row) { return row.dataset.replica; });
    var known = Array.prototype.map.call(select.options, function (option) { return option.value; });
    if (ids.join() === known.join()) return;
    var current = select.value;
    select.textContent = "";
    Array.prototype.forEach.call(rows, function (row) {
      var option = document.createElement("option");
      option.value = row.dataset.replica;
      option.textContent = Array.prototype.map.call(row.cells, function (td) { return td.textContent; }).slice(0, 5).join(" · ");
      select.appendChild(option);
    });
    if (ids.indexOf(current) >= 0) select.value = current; else choose();
  }

  var table = document.querySelector("#replicas tbody");
  if (table && window.MutationObserver) new MutationObserver(syncOptions).observe(table, { childList: true });
  select.addEventListener("change", choose);
  follow.addEventListener("change", function () { if (follow.checked) poll(); });
  document.addEventListener("visibilitychange", schedule);
  choose();
})();
