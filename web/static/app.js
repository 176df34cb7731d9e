// The technician page's script: no framework, no build. Every action calls the JSON API with the
// session cookie and the CSRF token (double submit); live views use EventSource.
"use strict";

function cookie(name) {
  const m = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
  return m ? decodeURIComponent(m[1]) : "";
}

function toast(text, bad) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.className = ""; }, 6000);
}

async function api(method, path, body, raw) {
  const headers = {"X-CSRF-Token": cookie("cw_csrf")};
  let data;
  if (raw !== undefined) { headers["Content-Type"] = "application/octet-stream"; data = raw; }
  else if (body !== undefined) { headers["Content-Type"] = "application/json"; data = JSON.stringify(body); }
  const r = await fetch(path, {method, headers, body: data, credentials: "same-origin"});
  let json = null;
  try { json = await r.json(); } catch (e) { json = null; }
  if (r.status === 401) { location.href = "/login?why=expired&next=" + encodeURIComponent(location.pathname); }
  if (!r.ok) { toast((json && json.message) || ("HTTP " + r.status), true); }
  return {ok: r.ok, status: r.status, json};
}

// --- live operations (bulk SSE) -------------------------------------------------------------

function follow(setupId, box) {
  box.hidden = false;
  const bar = box.querySelector(".op-progress"), pct = box.querySelector(".op-pct"), list = box.querySelector(".op-results");
  list.textContent = "";
  const rows = {};
  const row = (d) => {
    if (!rows[d.device_id]) { rows[d.device_id] = document.createElement("li"); list.appendChild(rows[d.device_id]); }
    return rows[d.device_id];
  };
  const es = new EventSource("/api/v1/devices/bulk-events/" + encodeURIComponent(setupId));
  es.addEventListener("progress", (e) => {
    const d = JSON.parse(e.data);
    bar.value = d.progress; pct.textContent = d.progress + "%";
    box.dataset.progress = d.progress;
  });
  for (const name of ["device-success", "device-failed", "device-timeout", "device-progress", "command-sent"]) {
    es.addEventListener(name, (e) => {
      const d = JSON.parse(e.data), li = row(d);
      li.className = "s-" + d.status;
      li.dataset.device = d.device_id;
      li.textContent = d.device_id + ": " + d.status + (d.error ? " (" + d.error + ")" : "") +
        (d.progress !== undefined && d.status === "PROGRESS" ? " " + d.progress + "%" : "") +
        (d.new_version ? " → " + d.new_version : "");
    });
  }
  es.addEventListener("complete", (e) => {
    const d = JSON.parse(e.data);
    box.dataset.complete = "1";
    toast(d.command + ": " + d.completed + "/" + d.total + " ✓, " + d.failed + " ✗, " + d.timeout + " timeout");
  });
  es.addEventListener("results", () => es.close());
}

function formConfigs(form) {
  const out = {};
  for (const el of form.querySelectorAll("[data-kind]")) {
    const path = el.name.split(".").slice(1);  // drop "configs"
    let node = out;
    for (const key of path.slice(0, -1)) { node = node[key] = node[key] || {}; }
    const k = path[path.length - 1];
    node[k] = el.dataset.kind === "boolean" ? el.checked : el.dataset.kind === "integer" ? Number(el.value) : el.value;
  }
  return out;
}

function showFieldError(form, message) {
  for (const el of form.querySelectorAll(".field-error")) { el.textContent = ""; }
  const m = (message || "").match(/(configs(?:\.[A-Za-z0-9_]+)+)/);
  const slot = m && form.querySelector('.field-error[data-for="' + m[1] + '"]');
  if (slot) { slot.textContent = message; slot.closest(".field").querySelector("input").focus(); }
}

async function applyConfig(form, deviceIds, box) {
  const r = await api("POST", "/api/v1/devices/apply-config", {device_ids: deviceIds, configs: formConfigs(form)});
  if (!r.ok) { showFieldError(form, r.json && r.json.message); return; }
  showFieldError(form, "");
  follow(r.json.data.setup_id, box);
}

// --- pages ------------------------------------------------------------------------------------

// --- Money charts (uPlot, vendored in /static/vendor) ---------------------------------------
// Series come from /api/v1/reports/money in the site's zone; axis values, dates and hover values
// are formatted here with Intl in the page's language and the site's zone (not the phone's).
// After each draw the figure records what it shows (data-points, data-sums, data-x-ticks,
// data-y-ticks, data-y-label): the canvas holds no text a test or a screen reader could read.

const PALETTE = ["#2e7d32", "#1565c0", "#6a1b9a", "#ef6c00", "#00838f", "#ad1457", "#558b2f", "#4e342e"];

function thin(xs, most) {
  const step = Math.max(1, Math.ceil(xs.length / most));
  return xs.filter((_, i) => i % step === 0);
}

function moneyCharts() {
  const box = document.getElementById("charts");
  if (!box || typeof uPlot === "undefined") return;
  const texts = JSON.parse(document.getElementById("chart-texts").textContent);
  const tz = box.dataset.timezone;
  const locale = document.body.dataset.lang === "th" ? "th-TH" : "en-GB";
  const num = new Intl.NumberFormat(locale, {maximumFractionDigits: 2});
  const fmt = (opts) => new Intl.DateTimeFormat(locale, Object.assign({timeZone: tz}, opts));
  const dayFmt = fmt({day: "numeric", month: "short"}), hourFmt = fmt({hour: "2-digit", minute: "2-digit", hourCycle: "h23"});
  const fullDay = fmt({weekday: "short", day: "numeric", month: "short", year: "numeric"});
  const fullHour = fmt({day: "numeric", month: "short", hour: "2-digit", minute: "2-digit", hourCycle: "h23"});
  const plots = [];

  function draw(fig, data, series, unit, bars) {
    const area = fig.querySelector(".plot-area");
    area.textContent = "";
    const hourly = data.bucket === "hour", half = (hourly ? 3600 : 86400) / 2;
    const xf = hourly ? hourFmt : dayFmt, full = hourly ? fullHour : fullDay;
    const ticks = {x: [], y: []};
    const opts = {
      width: Math.max(280, area.clientWidth || fig.clientWidth), height: 240,
      scales: {x: {time: true, range: () => [data.x[0] - half, data.x[data.x.length - 1] + half]},
               y: {range: (u, lo, hi) => [0, hi > 0 ? hi * 1.15 : 1]}},
      axes: [
        {splits: () => thin(data.x, hourly ? 8 : 10),
         values: (u, splits) => (ticks.x = splits.map((v) => xf.format(new Date(v * 1000))))},
        {label: unit, size: 64, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 1e5, 2e5, 5e5, 1e6],
         values: (u, splits) => (ticks.y = splits.map((v) => num.format(v)))},
      ],
      series: [{label: texts.date, value: (u, v) => (v == null ? "–" : full.format(new Date(v * 1000)))}]
        .concat(series.map((s, i) => {
          const colour = PALETTE[i % PALETTE.length];
          // Money as bars side by side per bucket (cash left, QR right); counts as lines with points.
          const shape = bars ? {fill: colour, paths: uPlot.paths.bars({size: [0.4, 48], align: i ? 1 : -1}), points: {show: false}}
            : {points: {show: true, size: 7, fill: colour}};
          return Object.assign({label: s.label, stroke: colour, width: 2,
                                value: (u, v) => (v == null ? "–" : num.format(v) + " " + unit)}, shape);
        })),
      hooks: {draw: [() => {
        fig.dataset.range = data.range;
        fig.dataset.points = String(series.reduce((n, s) => n + s.values.filter((v) => v != null).length, 0));
        fig.dataset.sums = JSON.stringify(Object.fromEntries(series.map((s) => [s.key, s.values.reduce((a, b) => a + b, 0)])));
        fig.dataset.xTicks = JSON.stringify(ticks.x);
        fig.dataset.yTicks = JSON.stringify(ticks.y);
        fig.dataset.yLabel = unit;
      }]},
    };
    plots.push(new uPlot(opts, [data.x].concat(series.map((s) => s.values)), area));
  }

  let asked = 0;
  async function load(range) {
    const mine = ++asked;  // a slow answer for an earlier pick must not overwrite a later one
    const r = await api("GET", "/api/v1/reports/money?range=" + encodeURIComponent(range));
    if (!r.ok || mine !== asked) return;
    const d = r.json.data;
    while (plots.length) plots.pop().destroy();
    draw(document.getElementById("chart-revenue"), d, [
      {key: "cash", label: texts.cash, values: d.revenue.cash},
      {key: "qr", label: texts.qr, values: d.revenue.qr}], texts.baht, true);
    draw(document.getElementById("chart-sessions"), d,
      Object.keys(d.sessions).map((b) => ({key: b, label: d.bays[b] || b, values: d.sessions[b]})), texts.sessions);
    const codes = Object.keys(d.errors);
    const all = d.x.map((_, i) => codes.reduce((n, c) => n + d.errors[c][i], 0));
    draw(document.getElementById("chart-errors"), d, [{key: "all", label: texts.all_errors, values: all}]
      .concat(codes.map((c) => ({key: c, label: c, values: d.errors[c]}))), texts.sessions);
  }

  for (const b of box.querySelectorAll(".range-picker button")) {
    b.addEventListener("click", () => {
      for (const o of box.querySelectorAll(".range-picker button")) o.setAttribute("aria-pressed", String(o === b));
      load(b.dataset.range);
    });
  }
  let resized;
  window.addEventListener("resize", () => {
    clearTimeout(resized);
    resized = setTimeout(() => { for (const u of plots) u.setSize({width: Math.max(280, u.root.parentElement.clientWidth), height: 240}); }, 150);
  });
  load(box.querySelector('.range-picker [aria-pressed="true"]').dataset.range);
}

const pages = {
  money() { moneyCharts(); },
  overview() {
    const es = new EventSource("/api/wash/events");
    es.addEventListener("wash:status", (e) => {
      const s = JSON.parse(e.data);
      const tile = document.querySelector('.tile[data-bay="' + s.bayId + '"]');
      if (!tile) return;
      tile.className = "tile state-" + s.state;
      tile.querySelector(".bay-state").textContent = s.state;
      tile.querySelector(".bay-progress").value = s.progress;
      tile.querySelector(".bay-course").textContent = s.course || "—";
      tile.querySelector(".bay-error").textContent = s.errorCode || "—";
      tile.querySelector(".bay-reset").hidden = s.state !== "ERROR";
    });
    for (const tile of document.querySelectorAll(".tile")) {
      const bayId = tile.dataset.bay;
      tile.querySelector(".bay-start").addEventListener("click", async (ev) => {
        if (!confirm(ev.target.dataset.confirm)) return;
        const course = tile.querySelector(".bay-course-select").value;
        const r = await api("POST", "/api/wash/start", {bayId, course});
        if (r.ok) toast(bayId + ": START");
      });
      tile.querySelector(".bay-stop").addEventListener("click", async (ev) => {
        if (!confirm(ev.target.dataset.confirm)) return;
        const r = await api("POST", "/api/wash/stop", {bayId});
        if (r.ok) toast(bayId + ": STOP");
      });
      tile.querySelector(".bay-reset").addEventListener("click", async (ev) => {
        if (!confirm(ev.target.dataset.confirm)) return;
        const r = await api("POST", "/api/wash/reset", {bayId});
        if (r.ok) toast(bayId + ": RESET");
      });
    }
  },
  devices() {
    document.getElementById("pairing-open").addEventListener("click", async () => {
      if ((await api("POST", "/api/v1/pairing/open")).ok) location.reload();
    });
    document.getElementById("pairing-close").addEventListener("click", async () => {
      if ((await api("POST", "/api/v1/pairing/close")).ok) location.reload();
    });
    for (const tr of document.querySelectorAll("tr[data-device]")) {
      const id = tr.dataset.device;
      tr.querySelector(".claim").addEventListener("click", async () => {
        const body = {name: tr.querySelector(".claim-name").value};
        const pin = tr.querySelector(".claim-pin").value;
        if (pin) body.pin = pin;
        if ((await api("POST", "/api/v1/devices/" + encodeURIComponent(id) + "/claim", body)).ok) location.reload();
      });
      tr.querySelector(".reject").addEventListener("click", async () => {
        if ((await api("POST", "/api/v1/devices/" + encodeURIComponent(id) + "/reject")).ok) location.reload();
      });
    }
  },
  device() {
    const form = document.getElementById("config-form");
    if (form) {
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        applyConfig(form, JSON.parse(form.dataset.devices), form.parentElement.querySelector(".op"));
      });
    }
    const restart = document.querySelector(".device-restart");
    restart.addEventListener("click", async () => {
      const r = await api("POST", "/api/v1/devices/" + encodeURIComponent(restart.dataset.device) + "/restart");
      if (r.ok) toast("RESTART " + r.json.data.command_id);
    });
  },
  bulk() {
    const picks = () => [...document.querySelectorAll(".pick:checked")].map((el) => el.value);
    const box = document.getElementById("bulk-op");
    const count = () => { document.getElementById("picked-count").textContent = picks().length; };
    document.addEventListener("change", count);
    document.getElementById("type-filter").addEventListener("change", (ev) => {
      for (const tr of document.querySelectorAll("tr[data-type]")) {
        const show = !ev.target.value || tr.dataset.type === ev.target.value;
        tr.hidden = !show;
        if (!show) tr.querySelector(".pick").checked = false;
      }
      count();
    });
    document.getElementById("select-all").addEventListener("change", (ev) => {
      for (const tr of document.querySelectorAll("tr[data-type]")) {
        if (!tr.hidden) tr.querySelector(".pick").checked = ev.target.checked;
      }
      count();
    });
    const run = async (path, body) => {
      if (!picks().length) { toast("0", true); return; }
      const r = await api("POST", path, {device_ids: picks(), ...body});
      if (r.ok) follow(r.json.data.setup_id, box);
    };
    document.getElementById("bulk-restart").addEventListener("click", () => run("/api/v1/devices/bulk-restart", {}));
    document.getElementById("bulk-reset").addEventListener("click",
      () => run("/api/v1/devices/bulk-commands", {command: "RESET_CONFIG", payload: {}}));
    document.getElementById("bulk-firmware").addEventListener("click", () => run("/api/v1/devices/bulk-commands",
      {command: "UPDATE_FIRMWARE", payload: {firmware_id: Number(document.getElementById("firmware-pick").value)}}));
    for (const form of document.querySelectorAll(".bulk-config")) {
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        if (!picks().length) { toast("0", true); return; }
        applyConfig(form, picks(), box);
      });
    }
  },
  cloud() {
    const picked = () => [...document.querySelectorAll(".dead-pick:checked")].map((el) => Number(el.value));
    const act = async (what) => {
      if (picked().length && (await api("POST", "/api/v1/outbox/" + what, {seq: picked()})).ok) location.reload();
    };
    const rq = document.getElementById("dead-requeue"), dc = document.getElementById("dead-discard");
    if (rq) rq.addEventListener("click", () => act("requeue"));
    if (dc) dc.addEventListener("click", () => { if (confirm(dc.dataset.confirm)) act("discard"); });
  },
  diagnostics() {
    const form = document.getElementById("scan-form");
    if (!form) return;
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const out = document.getElementById("scan-results");
      out.textContent = "…";
      const r = await api("POST", "/api/v1/buses/scan", {bus: document.getElementById("scan-bus").value,
        first: Number(document.getElementById("scan-first").value), last: Number(document.getElementById("scan-last").value)});
      out.textContent = "";
      if (!r.ok) return;
      for (const u of r.json.data.units) {
        const tr = document.createElement("tr");
        const d = u.decoded;
        for (const text of ["unit " + u.unit, u.registers ? u.registers.join(" ") : u.error,
                            d ? d.state + " " + d.progress + "% " + (d.course || "") + " " + (d.error || "") : (u.decode_error || "")]) {
          const td = document.createElement("td"); td.textContent = text; tr.appendChild(td);
        }
        tr.className = u.registers ? "s-SUCCESS" : "s-FAILED";
        out.appendChild(tr);
      }
    });
  },
  firmware() {
    document.getElementById("firmware-upload").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const file = document.getElementById("fw-file").files[0];
      const q = new URLSearchParams({version: document.getElementById("fw-version").value});
      const type = document.getElementById("fw-type").value;
      if (type) q.set("device_type", type);
      if ((await api("POST", "/api/v1/firmware?" + q, undefined, await file.arrayBuffer())).ok) location.reload();
    });
    for (const b of document.querySelectorAll(".fw-delete")) {
      b.addEventListener("click", async () => {
        if ((await api("DELETE", "/api/v1/firmware/" + b.dataset.id)).ok) location.reload();
      });
    }
  },
  accounts() {
    document.getElementById("mqtt-account-add").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = {username: document.getElementById("acct-name").value,
                    password: document.getElementById("acct-pw").value,
                    role: document.getElementById("acct-role").value};
      if ((await api("POST", "/api/v1/mqtt-accounts", body)).ok) location.reload();
    });
    for (const b of document.querySelectorAll(".acct-passwd")) {
      b.addEventListener("click", async () => {
        const pw = b.parentElement.querySelector(".acct-password").value;
        if ((await api("POST", "/api/v1/mqtt-accounts/" + encodeURIComponent(b.dataset.name), {password: pw})).ok) location.reload();
      });
    }
    for (const b of document.querySelectorAll(".acct-remove")) {
      b.addEventListener("click", async () => {
        if ((await api("DELETE", "/api/v1/mqtt-accounts/" + encodeURIComponent(b.dataset.name))).ok) location.reload();
      });
    }
  },
};

document.addEventListener("DOMContentLoaded", () => {
  for (const el of document.querySelectorAll(".csrf-field")) { if (!el.value) el.value = cookie("cw_csrf"); }
  const fn = pages[document.body.dataset.page];
  if (fn) fn();
});
