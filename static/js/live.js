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
    // No traffic: no error rate (a dash and a chart gap), not 0.00 %.
    return { rps: rps, p50_ms: weight ? p50w / weight : null, p99_ms: p99, error_rate: total ? eps / total : null };
  };

  // One time format everywhere on the charts: 24-hour HH:MM:SS, local time.
  function clock(tS) {
    var d = new Date(tS * 1000);
    return [d.getHours(), d.getMinutes(), d.getSeconds()].map(function (n) { return (n < 10 ? "0" : "") + n; }).join(":");
  }

  // A line of a chart: {key, label, unit, scale, factor}; a plain name is a line on "y".
  function lineSpec(spec) {
    return typeof spec === "string" ? { key: spec, label: spec, unit: "", scale: "y", factor: 1 }
      : { key: spec.key, label: spec.label || spec.key, unit: spec.unit || "", scale: spec.scale || "y", factor: spec.factor || 1 };
  }

  // A rolling chart of series {t: [...], key: [...]}; push(t, {key: value}). Each scale
  // (one quantity, one unit) gets its own axis: the first on the left, a second on the
  // right. A stretch without data longer than gapS is drawn as a gap, never as a line.
  function Chart(el, specs, seed, height, yRange, gapS) {
    var self = this;
    this.lines = specs.map(lineSpec);
    this.gapS = gapS || 20;
    this.data = [[]].concat(this.lines.map(function () { return []; }));
    var times = seed && seed.t ? seed.t : [];
    times.forEach(function (t, i) {
      var values = {};
      self.lines.forEach(function (line) { var col = seed[line.key]; values[line.key] = col ? col[i] : null; });
      self._append(t, values);
    });
    var palette = ["#2f6fde", "#0f7b3f", "#b42318", "#a15c07", "#6941c6", "#0e7490", "#be185d", "#4d7c0f"];
    var scales = [], units = {};
    this.lines.forEach(function (line) { if (scales.indexOf(line.scale) < 0) { scales.push(line.scale); units[line.scale] = line.unit; } });
    var scaleOpts = { x: { time: true } };
    scales.forEach(function (scale) { if (units[scale] === "%" || (yRange && scale === "y")) scaleOpts[scale] = { range: yRange || [0, 100] }; });
    var opts = {
      width: Math.max(el.clientWidth || 0, 280), height: height || 180,
      series: [{ value: function (u, t) { return t == null ? "–" : clock(t); } }].concat(this.lines.map(function (line, i) {
        return { label: line.label + (line.unit ? " (" + line.unit + ")" : ""), scale: line.scale, stroke: palette[i % palette.length], width: 1.5, spanGaps: false,
                 value: function (u, v) { return v == null ? "–" : Number(v).toFixed(line.unit === "req/s" ? 2 : 1) + (line.unit ? " " + line.unit : ""); } };
      })),
      axes: [{ values: function (u, splits) { return splits.map(clock); } }].concat(scales.map(function (scale, i) {
        return { scale: scale, side: i === 0 ? 3 : 1, size: 56, label: units[scale] || undefined, grid: { show: i === 0 } };
      })),
      legend: { show: true }, scales: scaleOpts
    };
    this.plot = window.uPlot ? new window.uPlot(opts, this.data, el) : null;
    el.swarmChart = this;  // for tests and the console: the points as drawn
  }
  Chart.prototype._append = function (t, values) {
    var data = this.data, lines = this.lines, last = data[0].length ? data[0][data[0].length - 1] : null;
    if (last != null && t - last > this.gapS) {  // no data for a while: break the line
      data[0].push((last + t) / 2);
      lines.forEach(function (line, i) { data[i + 1].push(null); });
    }
    data[0].push(t);
    lines.forEach(function (line, i) { var v = values[line.key]; data[i + 1].push(v == null ? null : v * line.factor); });
  };
  Chart.prototype.push = function (t, values) {
    var data = this.data, windowS = this.windowS || HISTORY_S;
    if (this.frozen) return;  // a longer range is shown: it is fetched again, not pushed to
    this._append(t, values);
    while (data[0].length && data[0][0] < t - windowS) data.forEach(function (col) { col.shift(); });
    if (this.plot) this.plot.setData(data);
  };
  // Show a fetched range instead: {t, key: [...]} over windowS seconds, gaps over gapS.
  Chart.prototype.reset = function (seed, windowS, gapS, frozen) {
    var self = this;
    this.windowS = windowS; this.gapS = gapS; this.frozen = frozen;
    this.data = [[]].concat(this.lines.map(function () { return []; }));
    (seed.t || []).forEach(function (t, i) {
      var values = {};
      self.lines.forEach(function (line) { var col = seed[line.key]; values[line.key] = col ? col[i] : null; });
      self._append(t, values);
    });
    if (this.plot) this.plot.setData(this.data);
  };

  // The 5 min / 1 h / 24 h buttons of a chart (templates/dashboards/_range_picker.html):
  // a choice fetches that range's history from the server (/charts/) and hands it to
  // onSeries(body, live); a longer range is fetched again every step, the 5 min one
  // follows the heartbeats live.
  function rangePicker(picker, query, onSeries) {
    if (!picker) return;
    var timer = null, buttons = picker.querySelectorAll("button[data-range]");
    function choose(range) {
      clearTimeout(timer);
      buttons.forEach(function (b) { b.setAttribute("aria-pressed", String(b.dataset.range === range)); });
      picker.dataset.state = "loading";
      fetch("/charts/?" + query + "&range=" + encodeURIComponent(range), { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
        .then(function (body) {
          picker.dataset.state = "shown";
          picker.dataset.range = body.range;
          onSeries(body, body.range === "5m");
          if (body.range !== "5m") timer = setTimeout(function () { choose(range); }, body.step_s * 1000);
        })
        .catch(function () { picker.dataset.state = "failed"; });
    }
    buttons.forEach(function (b) { b.addEventListener("click", function () { choose(b.dataset.range); }); });
  }

  function pct(value) { return value == null ? "–" : Math.round(value) + "%"; }
  function num(value, digits) { return value == null ? "–" : Number(value).toFixed(digits == null ? 1 : digits); }

  window.SwarmLive = { json: json, connect: connect, fromSample: fromSample, RateTracker: RateTracker, Chart: Chart, rangePicker: rangePicker, pct: pct, num: num, clock: clock };
})();
