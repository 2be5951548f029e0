// Deployments list: replicas per version and state, and live rates per deployment.
(function () {
  "use strict";
  var L = window.SwarmLive;
  var rates = new L.RateTracker();
  var deploymentOf = L.json("replica-map") || {};
  var errorRateBad = Number(document.getElementById("deployments").dataset.errorRateBad || 0.05);

  function row(deploymentId) { return document.querySelector('#deployments tr[data-deployment="' + deploymentId + '"]'); }

  function showReplicas(message) {
    var tr = row(message.deployment_id);
    if (!tr) { location.reload(); return; }
    tr.querySelector('[data-field="desired"]').textContent = message.desired_replicas;
    var byVersion = {};
    Object.keys(deploymentOf).forEach(function (id) { if (deploymentOf[id] === message.deployment_id) delete deploymentOf[id]; });
    message.replicas.forEach(function (r) {
      deploymentOf[r.id] = message.deployment_id;
      byVersion[r.version] = byVersion[r.version] || {};
      byVersion[r.version][r.state] = (byVersion[r.version][r.state] || 0) + 1;
    });
    var parts = Object.keys(byVersion).map(function (v) {
      return "v" + v + ": " + Object.keys(byVersion[v]).map(function (s) { return byVersion[v][s] + " " + s; }).join(", ");
    });
    tr.querySelector('[data-field="states"]').textContent = parts.length ? parts.join("  ") : "none";
    var failed = message.replicas.filter(function (r) { return r.state === "failed"; }).length;
    if (failed) markUnhealthy(tr, failed + " failed");
  }

  // Live evidence only makes a row worse; the next page load judges it afresh.
  function markUnhealthy(tr, why) {
    tr.className = "health-bad";
    tr.dataset.health = "bad";
    var cell = tr.querySelector('[data-field="health"]');
    cell.innerHTML = '<span class="health bad">unhealthy</span> ';
    cell.appendChild(document.createTextNode(why));
  }

  function showFigures() {
    var ids = {};
    Object.keys(deploymentOf).forEach(function (replicaId) { (ids[deploymentOf[replicaId]] = ids[deploymentOf[replicaId]] || []).push(Number(replicaId)); });
    Object.keys(ids).forEach(function (deploymentId) {
      var tr = row(deploymentId);
      if (!tr) return;
      var f = rates.combine(ids[deploymentId]);
      tr.querySelector('[data-field="rps"]').textContent = L.num(f.rps);
      tr.querySelector('[data-field="latency"]').textContent = L.num(f.p50_ms) + " / " + L.num(f.p99_ms);
      var served = f.error_rate != null;
      tr.querySelector('[data-field="errors"]').textContent = served ? L.num(100 * f.error_rate, 2) + "%" : "–";
      if (served && f.error_rate > errorRateBad) markUnhealthy(tr, "errors " + L.num(100 * f.error_rate, 1) + "%");
    });
  }

  L.connect("/ws/deployments/", function (message) {
    if (message.type === "node.figures") { rates.update(message); showFigures(); }
    else if (message.type === "replicas.changed") showReplicas(message);
  });
})();
