// Live updates for the dashboards: one WebSocket per page, rates from heartbeat counters,
// and small rolling uPlot charts. No framework; every page script builds on SwarmLive.
(function () {
  "use strict";
  var HISTORY_S = 360;

  function json(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  function setBadge(state, text) {
    var badge = document.getElementById("live-badge");
    if (!badge) return;
    badge.dataset.state = state;
    badge.textContent = text;
  }

  // Connect to /ws/<page>/ and hand every message to onMessage; reconnect with backoff.
  function connect(path, onMessage) {
    var delayMs = 500;
    function open() {
      var scheme = location.protocol === "https:" ? "wss://" : "ws://";
      var socket = new WebSocket(scheme + location.host + path);
      socket.onopen = function () { delayMs = 500; setBadge("live", "● live"); };
      socket.onmessage = function (event) { onMessage(JSON.parse(event.data)); };
      socket.onclose = function () {
        setBadge("closed", "reconnecting…");
        setTimeout(open, delayMs);
        delayMs = Math.min(delayMs * 2, 10000);
      };
    }
    open();
  }

  // A compact history sample [at_s, devices, replicas] as a node.figures message.
  function fromSample(nodeId, sample) {
    return {
      node_id: nodeId, at_s: sample[0],
      devices: sample[1].map(function (d) {
        return { index: d[0], utilization_pct: d[1], memory_used_bytes: d[2], temperature_c: d[3], power_w: d[4] };
      }),
      replicas: sample[2].map(function (r) {
        return { replica_id: r[0], completed: r[1], failed: r[2], in_flight: r[3], latency_p50_ms: r[4], latency_p99_ms: r[5] };
      })
    };
  }

  // Counters since replica start -> rates between two heartbeats of the same replica.
  function RateTracker() { this.last = {}; this.rates = {}; }
  RateTracker.prototype.update = function (message) {
    var self = this;
    message.replicas.forEach(function (r) {
      var old = self.last[r.replica_id];
      self.last[r.replica_id] = { at_s: message.at_s, completed: r.completed || 0, failed: r.failed || 0 };
      if (!old) return;
      var dt = message.at_s - old.at_s;
      if (dt <= 0 || r.completed < old.completed || r.failed < old.failed) return;
      self.rates[r.replica_id] = {
        rps: (r.completed - old.completed) / dt, eps: (r.failed - old.failed) / dt,
        p50: r.latency_p50_ms, p99: r.latency_p99_ms, at_s: message.at_s
      };
    });
  };
  // Sum the rates of some replicas: requests/s, request-weighted p50, worst p99, error rate.
  RateTracker.prototype.combine = function (replicaIds) {
    var rps = 0, eps = 0, p50w = 0, weight = 0, p99 = null, self = this;
    replicaIds.forEach(function (id) {
      var r = self.rates[id];
      if (!r) return;
      rps += r.rps; eps += r.eps;
      if (r.p50 != null) { p50w += r.p50 * Math.max(r.rps, 1e-9); weight += Math.max(r.rps, 1e-9); }
      if (r.p99 != null) p99 = p99 == null ? r.p99 : Math.max(p99, r.p99);
    });
    var total = rps + eps;
    return { rps: rps, p50_ms: weight ? p50w / weight : null, p99_ms: p99, error_rate: total ? eps / total : 0 };
  };

  // A rolling chart: series {t: [...], name: [...]}; push(t, {name: value}).
  function Chart(el, names, seed, height, yRange) {
    this.names = names;
    this.data = [seed && seed.t ? seed.t.slice() : []];
    var self = this;
    names.forEach(function (name) { self.data.push(seed && seed[name] ? seed[name].slice() : []); });
    var palette = ["#2f6fde", "#0f7b3f", "#b42318", "#a15c07", "#6941c6", "#0e7490", "#be185d", "#4d7c0f"];
    var opts = {
      width: Math.max(el.clientWidth || 0, 280), height: height || 180,
      series: [{}].concat(names.map(function (name, i) { return { label: name, stroke: palette[i % palette.length], width: 1.5, spanGaps: true }; })),
      axes: [{}, { size: 50 }], legend: { show: true },
      scales: yRange ? { y: { range: yRange } } : {}
    };
    this.plot = window.uPlot ? new window.uPlot(opts, this.data, el) : null;
  }
  Chart.prototype.push = function (t, values) {
    var data = this.data;
    data[0].push(t);
    this.names.forEach(function (name, i) { data[i + 1].push(values[name] == null ? null : values[name]); });
    while (data[0].length && data[0][0] < t - HISTORY_S) data.forEach(function (col) { col.shift(); });
    if (this.plot) this.plot.setData(data);
  };

  function pct(value) { return value == null ? "–" : Math.round(value) + "%"; }
  function num(value, digits) { return value == null ? "–" : Number(value).toFixed(digits == null ? 1 : digits); }

  window.SwarmLive = { json: json, connect: connect, fromSample: fromSample, RateTracker: RateTracker, Chart: Chart, pct: pct, num: num };
})();
