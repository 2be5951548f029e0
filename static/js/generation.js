// The Generation panel of a generative deployment (templates/dashboards/_generation.html):
// each replica's figures from its node's heartbeats, and the deployment's, summed as
// dashboards/generation.py does on the server (sequences and tokens/s add up, KV-cache use
// and p50s are means, p99s the worst replica's). deployment.js hands it the messages.
(function () {
  "use strict";
  var panel = document.getElementById("generation");
  if (!panel) return;
  var COUNTS = ["running_sequences", "waiting_sequences"];
  var NUMBERS = ["kv_cache_usage", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "queue_p50_ms"];
  var MEANS = ["kv_cache_usage", "ttft_p50_ms", "itl_p50_ms", "queue_p50_ms"];
  var WORST = ["ttft_p99_ms", "itl_p99_ms"];
  var known = window.SwarmLive.json("generation-seed") || {};  // replica id -> figures

  function isNumber(v) { return typeof v === "number" && isFinite(v) && v >= 0; }
  function figuresOf(status) {
    var f = {};
    COUNTS.forEach(function (name) { var v = status[name]; f[name] = isNumber(v) && Math.floor(v) === v ? v : null; });
    NUMBERS.forEach(function (name) { f[name] = isNumber(status[name]) ? status[name] : null; });
    if (f.kv_cache_usage != null) f.kv_cache_usage = Math.min(f.kv_cache_usage, 1);
    return f;
  }
  function text(name, v) {
    if (v == null) return "–";
    if (COUNTS.indexOf(name) >= 0) return String(v);
    if (name === "kv_cache_usage") return (100 * v).toFixed(0) + "%";
    return Number(v).toFixed(1);
  }
  function show(el, figures) {
    el.querySelectorAll("[data-field]").forEach(function (cell) { cell.textContent = text(cell.dataset.field, figures[cell.dataset.field]); });
  }
  function rows() { return panel.querySelectorAll("#generation-replicas tr[data-replica]"); }
  function combine() {
    var values = {}, total = {};
    COUNTS.concat(NUMBERS).forEach(function (name) { values[name] = []; });
    rows().forEach(function (row) {
      var f = known[row.dataset.replica];
      if (!f) return;
      Object.keys(values).forEach(function (name) { if (f[name] != null) values[name].push(f[name]); });
    });
    Object.keys(values).forEach(function (name) {
      var list = values[name];
      if (!list.length) { total[name] = null; return; }
      var sum = list.reduce(function (a, b) { return a + b; }, 0);
      total[name] = WORST.indexOf(name) >= 0 ? Math.max.apply(null, list) : MEANS.indexOf(name) >= 0 ? sum / list.length : sum;
    });
    return total;
  }
  function showTotal() { show(document.getElementById("generation-total"), combine()); }

  // A heartbeat (node.figures): the rows of this deployment's replicas it carries.
  function update(message) {
    var changed = false;
    message.replicas.forEach(function (status) {
      var row = panel.querySelector('#generation-replicas tr[data-replica="' + Number(status.replica_id) + '"]');
      if (!row) return;
      known[status.replica_id] = figuresOf(status);
      show(row, known[status.replica_id]);
      changed = true;
    });
    if (changed) showTotal();
  }

  function cell(row, fields) {
    var td = document.createElement("td");
    fields.forEach(function (name, i) {
      if (i) td.appendChild(document.createTextNode(" / "));
      var span = document.createElement("span");
      span.dataset.field = name;
      td.appendChild(span);
    });
    row.appendChild(td);
  }
  // The deployment's replicas changed (replicas.changed): one row per replica, figures kept.
  function replicasChanged(message) {
    var body = panel.querySelector("#generation-replicas tbody");
    body.innerHTML = "";
    message.replicas.forEach(function (r) {
      var row = document.createElement("tr");
      row.dataset.replica = r.id;
      [["#" + r.id], [r.node || "–"]].forEach(function (t) { var td = document.createElement("td"); td.textContent = t[0]; row.appendChild(td); });
      [["running_sequences"], ["waiting_sequences"], ["kv_cache_usage"], ["tokens_per_s"], ["ttft_p50_ms", "ttft_p99_ms"],
       ["itl_p50_ms", "itl_p99_ms"], ["queue_p50_ms"]].forEach(function (fields) { cell(row, fields); });
      show(row, known[r.id] || {});
      body.appendChild(row);
    });
    if (!message.replicas.length) body.innerHTML = '<tr class="empty"><td colspan="9" class="muted">No replicas.</td></tr>';
    showTotal();
  }

  window.SwarmGeneration = { update: update, replicasChanged: replicasChanged };
})();
