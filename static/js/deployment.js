// One deployment: replicas and their states, live rates, latency and errors, scaling events.
(function () {
  "use strict";
  var L = window.SwarmLive;
  var root = document.getElementById("deployment");
  var deploymentId = Number(root.dataset.deployment);
  var rates = new L.RateTracker();
  var seed = L.json("series") || { t: [] };
  // During a canary (replicas of several versions), one requests line per version too.
  function versionsShown() {
    var found = {};
    Object.keys(seed).forEach(function (key) { var m = /^rps_v(\d+)$/.exec(key); if (m) found[m[1]] = true; });
    document.querySelectorAll("#replicas tr[data-version]").forEach(function (row) { found[row.dataset.version] = true; });
    var list = Object.keys(found).sort(function (a, b) { return a - b; });
    return list.length > 1 ? list : [];
  }
  var versions = versionsShown();
  var rpsChart = new L.Chart(document.getElementById("chart-rps"), [{ key: "rps", label: "all", unit: "req/s", scale: "rps" }].concat(
    versions.map(function (v) { return { key: "rps_v" + v, label: "v" + v, unit: "req/s", scale: "rps" }; })), seed);
  var latencyChart = new L.Chart(document.getElementById("chart-latency"), [
    { key: "p50_ms", label: "p50", unit: "ms", scale: "ms" }, { key: "p99_ms", label: "p99", unit: "ms", scale: "ms" },
    { key: "error_rate", label: "errors", unit: "%", scale: "%", factor: 100 }], seed);
  var lastPointS = 0;
  L.rangePicker(document.getElementById("deployment-range"), "chart=deployment&deployment=" + encodeURIComponent(root.dataset.name || ""), function (body, live) {
    rpsChart.reset(body.series, body.window_s, 4 * body.step_s, !live);
    latencyChart.reset(body.series, body.window_s, 4 * body.step_s, !live);
  });

  function latest(name) { var col = seed[name]; return col && col.length ? col[col.length - 1] : null; }
  function showFigures(f) {
    document.getElementById("tile-rps").textContent = L.num(f.rps);
    document.getElementById("tile-latency").textContent = L.num(f.p50_ms) + " / " + L.num(f.p99_ms) + " ms";
    document.getElementById("tile-errors").textContent = f.error_rate == null ? "–" : L.num(100 * f.error_rate, 2) + "%";
  }
  if (seed.t.length) showFigures({ rps: latest("rps"), p50_ms: latest("p50_ms"), p99_ms: latest("p99_ms"), error_rate: latest("error_rate") });

  function replicaIds(version) {
    var rows = document.querySelectorAll("#replicas tr[data-replica]" + (version ? '[data-version="' + version + '"]' : ""));
    return Array.prototype.map.call(rows, function (row) { return Number(row.dataset.replica); });
  }

  function cell(row, text, className) {
    var td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
  }

  function showReplicas(message) {
    document.getElementById("desired").textContent = message.desired_replicas;
    document.getElementById("desired-noun").textContent = message.desired_replicas === 1 ? "replica" : "replicas";
    var body = document.querySelector("#replicas tbody");
    body.innerHTML = "";
    message.replicas.forEach(function (r) {
      var row = document.createElement("tr");
      row.dataset.replica = r.id;
      row.dataset.version = r.version;
      cell(row, "#" + r.id);
      cell(row, "v" + r.version);
      cell(row, r.node || "–");
      cell(row, r.gpu_index == null ? "cpu" : "cuda:" + r.gpu_index);
      cell(row, r.state, "state " + r.state);
      var why = r.error && (r.state === "pending" || r.state === "failed");
      cell(row, (r.desired ? "" : "retiring ") + (r.error || ""), why ? "why" : "muted");
      row.lastChild.dataset.field = "why";
      body.appendChild(row);
    });
    if (!message.replicas.length) body.innerHTML = '<tr class="empty"><td colspan="6" class="muted">No replicas.</td></tr>';
  }

  function addScalingEvent(message) {
    var body = document.querySelector("#scaling-events tbody");
    var empty = body.querySelector(".empty");
    if (empty) empty.remove();
    var row = document.createElement("tr");
    cell(row, message.at.replace("T", " ").slice(0, 19));
    cell(row, String(message.from_replicas));
    cell(row, String(message.to_replicas));
    cell(row, message.reason);
    body.insertBefore(row, body.firstChild);
  }

  // Canary weights: show the split they give as they are typed, or what is wrong.
  var trafficInput = document.getElementById("traffic-input");
  function previewSplit() {
    var preview = document.getElementById("split-preview"), known = trafficInput.dataset.versions.split(",");
    var parts = trafficInput.value.split(/[,;]/).map(function (p) { return p.trim(); }).filter(Boolean);
    var weights = {}, total = 0, problem = null;
    parts.forEach(function (part) {
      var match = /^(\d+)\s*=\s*(\d+(\.\d+)?)$/.exec(part);
      if (!match) { problem = problem || "“" + part + "” is not version=weight (for example 1=90, 2=10)"; return; }
      if (known.indexOf(match[1]) < 0) { problem = problem || "there is no version " + match[1]; return; }
      weights[match[1]] = Number(match[2]); total += Number(match[2]);
    });
    if (!problem && parts.length && total <= 0) problem = "at least one version needs a positive weight";
    trafficInput.setCustomValidity(problem || "");
    preview.className = problem ? "helptext error" : "helptext";
    preview.textContent = problem ? problem : parts.length ? "Gives: " + Object.keys(weights).filter(function (v) { return weights[v] > 0; })
      .map(function (v) { return "v" + v + " " + Number((100 * weights[v] / total).toPrecision(3)) + "%"; }).join(" · ") : "";
  }
  if (trafficInput) { trafficInput.addEventListener("input", previewSplit); previewSplit(); }

  L.connect("/ws/deployments/", function (message) {
    var generation = window.SwarmGeneration;  // only on a generative deployment's page
    if (message.type === "node.figures") {
      if (generation) generation.update(message);
      rates.update(message);
      var f = rates.combine(replicaIds());
      showFigures(f);
      if (message.at_s - lastPointS >= 1) {
        lastPointS = message.at_s;
        var point = { rps: f.rps };
        versions.forEach(function (v) { point["rps_v" + v] = rates.combine(replicaIds(v)).rps; });
        rpsChart.push(message.at_s, point);
        latencyChart.push(message.at_s, f);
      }
    } else if (message.type === "replicas.changed" && message.deployment_id === deploymentId) {
      showReplicas(message);
      if (generation) generation.replicasChanged(message);
    } else if (message.type === "scaling.event" && message.deployment_id === deploymentId) {
      addScalingEvent(message);
    }
  });
})();
