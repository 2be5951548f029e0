// Overview page: fleet totals from heartbeats, a fleet chart, and the recent events feed.
(function () {
  "use strict";
  var L = window.SwarmLive;
  var rates = new L.RateTracker();
  var utilByNode = {};
  var seed = L.json("seed") || {};
  Object.keys(seed).forEach(function (nodeId) { rates.update(L.fromSample(Number(nodeId), seed[nodeId])); });
  var utilLabel = document.getElementById("tile-util") && document.getElementById("tile-util").dataset.kind === "cpu" ? "CPU load" : "GPU utilisation";
  var chart = new L.Chart(document.getElementById("fleet-chart"), [
    { key: "util_pct", label: utilLabel, unit: "%", scale: "%" }, { key: "rps", label: "requests", unit: "req/s", scale: "rps" }], L.json("series"), 200);
  var lastPointS = 0, refreshTimer = null;
  L.rangePicker(document.getElementById("fleet-range"), "chart=fleet", function (body, live) {
    chart.reset(body.series, body.window_s, 4 * body.step_s, !live);
  });
  var kinds = L.json("device-kinds") || {};

  // The utilisation tile shows GPUs, or the CPU load when the pool has no GPU: never a
  // CPU's load under a GPU label.
  function tileKind() { var tile = document.getElementById("tile-util"); return tile ? tile.dataset.kind : "gpu"; }
  function kindOf(nodeId, device) { return device.kind || (kinds[nodeId] || {})[device.index] || "gpu"; }

  function totals() {
    var utils = [];
    Object.keys(utilByNode).forEach(function (id) { utils = utils.concat(utilByNode[id]); });
    var util = utils.length ? utils.reduce(function (a, b) { return a + b; }, 0) / utils.length : null;
    return { util_pct: util, rps: rates.combine(Object.keys(rates.rates)).rps };
  }

  function showFigures(message) {
    rates.update(message);
    utilByNode[message.node_id] = message.devices.filter(function (d) { return kindOf(message.node_id, d) === tileKind(); })
      .map(function (d) { return d.utilization_pct; }).filter(function (v) { return v != null; });
    var t = totals();
    document.getElementById("tile-util").textContent = L.pct(t.util_pct);
    document.getElementById("tile-rps").textContent = L.num(t.rps);
    if (message.at_s - lastPointS >= 1) { lastPointS = message.at_s; chart.push(message.at_s, t); }
  }

  function addEvent(kind, text) {
    var list = document.getElementById("events");
    var empty = list.querySelector(".empty");
    if (empty) empty.remove();
    var item = document.createElement("li");
    item.className = "event " + kind;
    var time = document.createElement("time");
    time.textContent = new Date().toTimeString().slice(0, 8);
    item.appendChild(time);
    item.appendChild(document.createTextNode(" " + text));
    list.insertBefore(item, list.firstChild);
    while (list.children.length > 50) list.removeChild(list.lastChild);
  }

  // Active servers and cost change with nodes and replicas: re-read the server's totals.
  function refreshSummary() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(function () {
      fetch(location.pathname + "?partial=summary", { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var holder = document.createElement("div");
          holder.innerHTML = html;
          var fresh = holder.firstElementChild, before = tileKind();
          document.getElementById("summary").replaceWith(fresh);
          if (tileKind() !== before) utilByNode = {};  // a GPU joined (or left): other devices count now
          var t = totals();
          if (Object.keys(utilByNode).length) document.getElementById("tile-util").textContent = L.pct(t.util_pct);
        });
    }, 150);
  }

  L.connect("/ws/overview/", function (message) {
    if (message.type === "node.figures") { showFigures(message); return; }
    if (message.type === "scaling.event") addEvent("scaling", message.deployment_name + ": " + message.from_replicas + " → " + message.to_replicas + " replicas (" + message.reason + ")");
    else if (message.type === "node.status") addEvent("node", "node " + message.name + " is " + message.status);
    else if (message.type === "replicas.changed") {
      var states = {}, reasons = [];
      message.replicas.forEach(function (r) {
        states[r.state] = (states[r.state] || 0) + 1;
        if ((r.state === "pending" || r.state === "failed") && r.error && reasons.indexOf(r.error) < 0) reasons.push(r.error);
      });
      addEvent("replica", message.deployment_name + ": " + Object.keys(states).map(function (s) { return states[s] + " " + s; }).join(", ") + " (" + message.desired_replicas + " desired)" + (reasons.length ? ": " + reasons.join("; ") : ""));
    }
    refreshSummary();
  });
})();
