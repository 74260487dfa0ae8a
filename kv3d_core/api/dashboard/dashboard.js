// kv3d's workload analytics page: reads /v1/kv3d/analytics every refresh_s seconds and draws it.
// Text from the server is only ever set with textContent (never parsed as HTML).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "kv3d.apiKey";
  const charts = {};
  const history = { t: [], hit: [], prefill: [] };
  let timer = null, refreshS = 3;
  window.kv3d = { charts, last: null };

  const pct = (v) => (v == null ? "–" : (100 * v).toFixed(1) + "%");
  const tick = (v) => (v == null ? "" : Math.round(100 * v) + "%");     // axis labels: whole percent
  const num = (v, d = 1) => (v == null ? "–" : Number(v).toLocaleString(undefined, { maximumFractionDigits: d }));
  const bytes = (v) => {
    if (v == null) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; let x = Math.abs(v);
    while (x >= 1024 && i < u.length - 1) { x /= 1024; i++; }
    return (v < 0 ? "-" : "") + x.toFixed(x < 10 && i ? 2 : 1) + " " + u[i];
  };
  const secs = (v) => (v == null ? "–" : v < 1 ? (1000 * v).toFixed(1) + " ms" : v.toFixed(2) + " s");
  const money = (v) => (v == null ? "–" : v.toFixed(v < 1 ? 4 : 2));

  function setText(id, text, value) {
    const el = $(id); el.textContent = text;
    if (value !== undefined) el.dataset.value = value == null ? "" : String(value);
  }
  function row(tbody, cells, attrs) {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) {
      const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td);
    }
    for (const k in attrs || {}) tr.dataset[k] = attrs[k];
    tbody.appendChild(tr);
  }
  function fill(dl, pairs) {
    dl.replaceChildren();
    for (const [k, v] of pairs) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
  }

  function showNoData(message) {
    $("data").hidden = true;
    for (const t of document.querySelectorAll("tbody")) t.replaceChildren();
    $("auth").textContent = message; $("auth").hidden = false;
    $("keyform").hidden = false;
    window.kv3d.last = null;
  }

  async function refresh() {
    const key = sessionStorage.getItem(KEY);
    const headers = key ? { Authorization: "Bearer " + key } : {};
    let res;
    try {
      res = await fetch("/v1/kv3d/analytics", { headers, cache: "no-store" });
    } catch (e) {
      $("status").textContent = "server unreachable"; $("status").className = "status bad"; return;
    }
    if (res.status === 401) {
      showNoData(key ? "That API key was refused." : "This server needs an API key: type it above.");
      $("status").textContent = "no key"; $("status").className = "status bad"; return;
    }
    if (!res.ok) { $("status").textContent = "error " + res.status; $("status").className = "status bad"; return; }
    const d = await res.json();
    window.kv3d.last = d;
    $("auth").hidden = true; $("keyform").hidden = !key; $("data").hidden = false;
    render(d);
    $("status").textContent = d.model + " · " + d.health.status + " · updated " + new Date().toLocaleTimeString();
    $("status").className = d.health.status === "ok" ? "status" : "status bad";
    if (d.refresh_s !== refreshS) { refreshS = d.refresh_s; schedule(); }
  }

  function render(d) {
    const h = d.hit_rate, m = d.memory, r = d.roi, l = d.latency;
    setText("hit-rate", pct(h.value), h.value);
    setText("hit-detail", num(h.hits, 0) + " of " + num(h.requests, 0) + " requests reused cached KV");
    setText("spg-now", num(m.sessions_per_gib), m.sessions_per_gib);
    setText("spg-without", "without sharing and compression: " + num(m.sessions_per_gib_without_reuse));
    setText("mem-saved", bytes(m.memory_saved_bytes), m.memory_saved_bytes);
    setText("mem-held", bytes(m.bytes_held) + " held for " + num(m.sessions_held, 0) + " sessions");
    setText("prefill-rate", num(l.prefill_tokens_avoided_per_s) + " tok/s", l.prefill_tokens_avoided_per_s);
    setText("prefill-total", num(r.prefill_tokens_saved, 0) + " prompt tokens not recomputed");
    setText("cost-with", money(r.cost_per_10k_requests), r.cost_per_10k_requests);
    setText("cost-without", "without reuse: " + money(r.cost_per_10k_requests_without_reuse) + " at " +
      r.price_per_device_hour + " per " + r.device.toUpperCase() + "-hour");
    renderFamilies(d.families);
    renderTiers(m);
    renderLatency(l);
    renderWhatIf(d.what_if);
    renderHistory(h.value, l.prefill_tokens_avoided_per_s);
    renderHealth(d.health);
    fill($("roi"), [
      ["prefill tokens saved", num(r.prefill_tokens_saved, 0)],
      [r.device.toUpperCase() + "-seconds saved (est.)", num(r.device_seconds_saved, 2)],
      [r.device.toUpperCase() + "-seconds busy", num(r.device_seconds_busy, 2)],
      ["cost / 10k requests with reuse", money(r.cost_per_10k_requests)],
      ["cost / 10k requests without reuse (est.)", money(r.cost_per_10k_requests_without_reuse)],
      ["how", r.method],
    ]);
  }

  function renderFamilies(f) {
    const tb = $("families").tBodies[0]; tb.replaceChildren();
    for (const x of f.top) {
      row(tb, [[x.id], [x.preview == null ? "(previews off)" : x.preview, "preview"], [num(x.tokens, 0), "num"],
        [num(x.requests, 0), "num"], [pct(x.hit_rate), "num"], [num(x.sessions, 0), "num"],
        [bytes(x.bytes_shared), "num"], [x.snapshot || "none"], [num(x.namespaces, 0), "num"]],
        { id: x.id, requests: x.requests, hits: x.hits });
    }
    setText("families-note", "top " + f.top.length + " of " + f.total +
      (f.other_tenants ? " · " + f.other_tenants + " more in other namespaces (not shown)" : ""));
  }

  function renderTiers(m) {
    const tb = $("tiers").tBodies[0]; tb.replaceChildren();
    for (const [name, t] of Object.entries(m.tiers)) {
      row(tb, [[name], [bytes(t.bytes), "num"], [bytes(t.capacity_bytes), "num"], [num(t.sessions, 0), "num"],
        [t.snapshots == null ? "–" : num(t.snapshots, 0), "num"]], { tier: name, bytes: t.bytes, sessions: t.sessions });
    }
    setText("compression", m.compression.map((c) => "codec " + c.codec + ": " +
      (c.ratio == null ? "nothing stored yet" : c.ratio.toFixed(2) + "× smaller than f16")).join(" · "));
  }

  function renderLatency(l) {
    const tb = $("latency").tBodies[0]; tb.replaceChildren();
    const line = (name, q) => row(tb, [[name], [secs(q.p50_s), "num"], [secs(q.p95_s), "num"], [num(q.count, 0), "num"]]);
    line("TTFT, cache hit", l.ttft.hit); line("TTFT, cache miss", l.ttft.miss);
    for (const [tier, q] of Object.entries(l.restore)) line("restore from " + tier, q);
    setText("latency-window", "(last " + num(l.window_s, 0) + " s)");
  }

  function chart(name, el, opts, data) {
    const width = Math.max(240, el.clientWidth || 300);
    if (!charts[name]) charts[name] = new uPlot(Object.assign({ width, height: 220 }, opts), data, el);
    else { charts[name].setData(data); if (Math.abs(charts[name].width - width) > 4) charts[name].setSize({ width, height: 220 }); }
  }

  function renderWhatIf(w) {
    const xs = w.curve.map((p) => p.bytes), ys = w.curve.map((p) => p.hit_ratio);
    chart("whatif", $("whatif-chart"), {
      scales: { x: { time: false, distr: 3 }, y: { range: [0, 1] } },
      axes: [{ values: (u, v) => v.map(bytes), size: 40 }, { values: (u, v) => v.map(tick), size: 60 }],
      series: [{ label: "cache size", value: (u, v) => bytes(v) },
        { label: "hit ratio (LRU)", stroke: "#2b6cb0", width: 2, value: (u, v) => pct(v) }],
    }, [xs, ys]);
    const tb = $("whatif").tBodies[0]; tb.replaceChildren();
    for (const t of w.tiers) {
      row(tb, [[t.tier + " (" + bytes(t.capacity_f16_bytes) + ")"], ...t.points.map((p) => [pct(p.hit_ratio), "num"])],
        { tier: t.tier });
    }
    setText("whatif-note", "Hit ratio of the requests' lookups (snapshots and conversations) if a tier had that size, " +
      "tiers above it unchanged; from " + num(w.sampled, 0) + " sampled of " + num(w.accesses, 0) +
      " accesses (sampling " + pct(w.sample_rate) + "). " + w.assumptions.join("; ") + ".");
  }

  function renderHistory(hit, prefill) {
    history.t.push(Date.now() / 1000); history.hit.push(hit); history.prefill.push(prefill);
    for (const k in history) if (history[k].length > 600) history[k].shift();
    chart("history", $("history-chart"), {
      scales: { x: { time: true }, y: { range: [0, 1] }, tok: {} },
      axes: [{}, { values: (u, v) => v.map(tick), size: 60 }, { scale: "tok", side: 1, grid: { show: false }, size: 60 }],
      series: [{}, { label: "hit rate", stroke: "#2b6cb0", width: 2, value: (u, v) => pct(v) },
        { label: "prefill avoided (tok/s)", stroke: "#38a169", scale: "tok", value: (u, v) => num(v) }],
    }, [history.t, history.hit, history.prefill]);
  }

  function renderHealth(h) {
    const kv = (o) => Object.entries(o).map(([k, v]) => k + ": " + num(v, 0)).join(", ") || "none";
    fill($("health"), [["status", h.status], ["safe mode", h.safe_mode ? "ON" : "off"],
      ["fallbacks", kv(h.fallbacks)], ["tier errors", kv(h.tier_errors)],
      ["queue", h.queue.waiting + " waiting, " + h.queue.running + " running"],
      ["503 answers", num(h.http_503, 0)], ["refused", kv(h.rejected)]]);
  }

  function schedule() {
    if (timer) clearInterval(timer);
    timer = setInterval(refresh, refreshS * 1000);
  }

  $("keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    refresh();
  });
  window.addEventListener("resize", () => { for (const c of Object.values(charts)) c.setSize({ width: Math.max(240, c.root.parentElement.clientWidth), height: 220 }); });
  refresh(); schedule();
})();
