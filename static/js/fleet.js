// Fleet page: per-GPU figures and a utilisation chart per node, live from heartbeats.
(function () {
  "use strict";
  var L = window.SwarmLive;
  var series = L.json("series") || {};
  var charts = {};
  var refreshTimer = null;

  function gib(bytes) { return bytes == null ? "–" : (bytes / Math.pow(1024, 3)).toFixed(1); }

  function mountCharts() {
    charts = {};
    document.querySelectorAll("[data-chart]").forEach(function (el) {
      var nodeId = el.dataset.chart.replace("node-", "");
      var seed = series[nodeId] || { t: [] };
      var names = Object.keys(seed).filter(function (k) { return k !== "t"; });
      if (!names.length) {
        names = Array.prototype.map.call(document.querySelectorAll("#node-" + nodeId + " tr[data-gpu]"), function (row) { return (row.dataset.kind || "gpu") + row.dataset.gpu; });
      }
      el.innerHTML = "";
      var specs = names.map(function (key) { return { key: key, label: key.slice(0, 3).toUpperCase() + " " + key.slice(3), unit: "%", scale: "%" }; });
      charts[nodeId] = new L.Chart(el, specs, seed, 160, [0, 100]);
    });
  }

  // Nodes joined, left or changed their replicas: fetch the server-rendered list again.
  function refreshNodes() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(function () {
      fetch(location.pathname + "?partial=nodes", { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          var holder = document.createElement("div");
          holder.innerHTML = html;
          document.getElementById("fleet-nodes").replaceWith(holder.firstElementChild);
          mountCharts();
          if (shown) showRange(shown, false);
        });
    }, 150);
  }

  function showFigures(message) {
    var card = document.getElementById("node-" + message.node_id);
    if (!card) { refreshNodes(); return; }
    var values = {};
    message.devices.forEach(function (d) {
      values[(d.kind || "gpu") + d.index] = d.utilization_pct;
      var row = card.querySelector('tr[data-gpu="' + d.index + '"]');
      if (!row) return;
      row.querySelector(".util").textContent = L.pct(d.utilization_pct);
      row.querySelector(".memory").textContent = gib(d.memory_used_bytes) + " / " + gib(Number(row.dataset.memoryTotal)) + " GiB";
      row.querySelector(".temperature").textContent = d.temperature_c == null ? "–" : d.temperature_c + " °C";
      row.querySelector(".power").textContent = d.power_w == null ? "–" : d.power_w + " W";
    });
    var chart = charts[message.node_id];
    if (chart) chart.push(message.at_s, values);
  }

  function onMessage(message) {
    if (message.type === "node.figures") showFigures(message);
    else if (message.type === "node.status" || message.type === "replicas.changed") refreshNodes();
  }

  // A longer range: every node's chart shows it, fetched again each step (and after a
  // refresh of the node list, which mounts the charts anew).
  var shown = null;
  function showRange(body, live) {
    shown = live ? null : body;
    Object.keys(charts).forEach(function (nodeId) {
      charts[nodeId].reset(body.series[nodeId] || { t: [] }, body.window_s, 4 * body.step_s, !live);
    });
  }
  L.rangePicker(document.getElementById("fleet-range"), "chart=nodes", showRange);

  mountCharts();
  L.connect("/ws/fleet/", onMessage);
})();
