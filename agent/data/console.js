"use strict";
const STATUS_EVERY_MS = 3000, CHARTS_EVERY_MS = 15000;
const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let tz, skewMs = 0, chartsAt = 0, chartsMissing = true, hours = 24;

function h(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
function sv(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}
function badge(text, cls) { return h("span", {class: "badge " + cls, text: text}); }
function fmtNum(v) {
  if (v === null || v === undefined) return "\u2014";
  if (typeof v !== "number") return String(v);
  if (Math.abs(v) >= 1000) return String(Math.round(v));
  return String(Number(v.toPrecision(4)));
}
function fmtTime(iso, withDate) {
  if (!iso) return "\u2014";
  const d = new Date(iso);
  const o = {hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23"};
  if (withDate) Object.assign(o, {year: "numeric", month: "2-digit", day: "2-digit"});
  try { return new Intl.DateTimeFormat("sv-SE", Object.assign(o, {timeZone: tz})).format(d); }
  catch (e) { return d.toISOString(); }
}
function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "\u2014";
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400), hh = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  if (d) return d + " d " + hh + " h";
  if (hh) return hh + " h " + String(m).padStart(2, "0") + " min";
  if (m) return m + " min " + (s % 60) + " s";
  return s + " s";
}
function ago(iso) {
  if (!iso) return "\u2014";
  return fmtTime(iso) + " (" + fmtDuration((Date.now() - skewMs - Date.parse(iso)) / 1000) + " ago)";
}
function flagClass(f) { return f === "N" ? "ok" : (f === "B" || f === "D") ? "bad" : "warn"; }
const HEALTH = {ok: "ok", degraded: "warn", failing: "bad", stale: "bad", unknown: "muted"};
async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store", headers: {"Accept": "application/json"}});
  if (!r.ok) {
    let msg = "HTTP " + r.status;
    try { msg = (await r.json()).error || msg; } catch (e) { /* not JSON */ }
    throw new Error(url + ": " + msg);
  }
  return r.json();
}
function fact(dl, label, ...value) { dl.append(h("dt", {text: label}), h("dd", {}, ...value)); }

function renderStation(st) {
  const c = st.console, s = c.station;
  tz = s.timezone;
  skewMs = Date.now() - Date.parse(c.clock.utc);
  document.title = s.id + " \u2014 edge-agent console";
  $("st-id").textContent = s.id;
  $("st-name").textContent = [s.name, s.type].filter(Boolean).join(" \u00b7 ");
  const dl = h("dl", {id: "station-facts"});
  fact(dl, "Agent", "edge-agent " + c.agent.version + ", up " + fmtDuration(c.agent.uptime_s) +
       " (pid " + c.agent.pid + ")");
  fact(dl, "Gateway", c.system.uptime_s === null ? "\u2014" : "up " + fmtDuration(c.system.uptime_s));
  const clock = [fmtTime(c.clock.utc, true) + " " + s.timezone + " ",
                 badge(c.clock.state, c.clock.state === "synchronized" ? "ok" : "bad")];
  if (Math.abs(skewMs) > 10000) clock.push(" this computer's clock differs by " + fmtDuration(Math.abs(skewMs) / 1000));
  fact(dl, "Clock", ...clock);
  const b = st.broker || {};
  const broker = [badge(b.state || "unknown", b.state === "online" ? "ok" : "bad")];
  if (b.url) broker.push(" " + b.url);
  if (b.since) broker.push(" since " + fmtTime(b.since, true));
  if (b.error) broker.push(h("div", {class: "bad", text: b.error}));
  fact(dl, "Broker", ...broker);
  const dr = c.drain;
  let drain = dr.state;
  if (dr.state === "draining") drain += " at " + fmtNum(dr.out_per_s) + "/s, about " + fmtDuration(dr.eta_s) + " left";
  else if (dr.in_per_s !== null) drain += " (" + fmtNum(dr.in_per_s) + " new readings/s)";
  fact(dl, "Backlog", h("span", {id: "backlog", text: String(dr.backlog)}), " unsent readings \u00b7 " + drain);
  if (st.pending_gaps && st.pending_gaps.length) {
    fact(dl, "Gaps", h("span", {class: "bad", text: st.pending_gaps.map(
      (g) => g.first_seq + "\u2013" + g.last_seq + " (" + g.reason + ")").join(", ")}));
  }
  const bu = c.buffer;
  if (bu.used_bytes !== null && bu.used_bytes !== undefined) {
    fact(dl, "Buffer", h("meter", {min: "0", max: "100", low: "70", high: "90", optimum: "0",
                                   value: String(bu.percent)}),
         " " + (bu.used_bytes / 1048576).toFixed(1) + " MB of " + (bu.max_bytes / 1048576).toFixed(0) +
         " MB (" + bu.percent + " %)");
  } else {
    fact(dl, "Buffer", "no database yet");
  }
  fact(dl, "Last seq", String(st.last_seq));
  $("station-facts").replaceWith(dl);
  $("updated").textContent = "updated " + fmtTime(c.clock.utc);
}

function deviceIds(st) {
  const ids = Object.keys(st.console.devices);
  for (const d of Object.keys(st.devices)) if (!ids.includes(d)) ids.push(d);
  return ids;
}
function channelIds(st, d) {
  const ids = ((st.console.devices[d] || {}).channels || []).slice();
  for (const c of Object.keys((st.devices[d] || {}).channels || {})) if (!ids.includes(c)) ids.push(c);
  return ids;
}

function renderDevices(st) {
  const body = h("tbody");
  for (const d of deviceIds(st)) {
    const dev = st.devices[d] || {}, cfg = st.console.devices[d] || {}, polls = cfg.polls || {};
    const name = h("td", {}, h("b", {text: d}));
    if (cfg.in_config === false || !(d in st.console.devices)) {
      name.append(h("div", {class: "muted", text: "not in the config"}));
    }
    const health = dev.health || "unknown";
    const driver = cfg.driver ? cfg.driver + (cfg.bus ? " on " + cfg.bus : "") +
      (cfg.interval ? " \u00b7 every " + fmtNum(cfg.interval) + " s" : "") : "\u2014";
    const flags = h("td", {});
    for (const f of dev.flags || []) flags.append(badge(f, flagClass(f)));
    const cnt = (c) => c ? (c.failed + c.partial) + " of " + c.polls : "\u2014";
    const cls = (c) => "num" + (c && c.failed + c.partial ? " bad" : "");
    const last = h("td", {text: ago(dev.last_reading)});
    if (polls.last_failure) {
      last.append(h("div", {class: "muted", text: "last failure " + fmtTime(polls.last_failure, true)}));
    }
    body.append(h("tr", {"data-device": d}, name, h("td", {}, badge(health, HEALTH[health] || "muted")),
      h("td", {text: driver}), last, h("td", {text: ago(dev.last_valid)}), flags,
      h("td", {class: cls(polls.last_hour), text: cnt(polls.last_hour)}),
      h("td", {class: cls(polls.last_24h), text: cnt(polls.last_24h)})));
  }
  $("device-table").tBodies[0].replaceWith(body);
}

const cards = new Map();
function card(key) {
  let c = cards.get(key);
  if (c) return c;
  const svg = sv("svg", {class: "chart", viewBox: "0 0 320 100", role: "img", "data-points": "0"});
  svg.append(sv("text", {class: "axis", x: 160, y: 50, "text-anchor": "middle"}, "loading\u2026"));
  const el = h("div", {class: "ch", "data-channel": key},
    h("div", {class: "ch-head"}, h("span", {class: "ch-name", text: key}), h("span", {class: "flag"})),
    h("div", {class: "ch-value"}, h("span", {class: "value", text: "\u2014"}), h("span", {class: "unit"})),
    h("div", {class: "ch-time"}), svg);
  c = {el: el, svg: svg, interval: null};
  cards.set(key, c);
  return c;
}

function renderChannels(st, active) {
  const grid = $("channel-grid"), seen = new Set();
  for (const d of deviceIds(st)) {
    const cfg = st.console.devices[d] || {};
    for (const ch of channelIds(st, d)) {
      const key = d + "." + ch, r = ((st.devices[d] || {}).channels || {})[ch] || {};
      const c = card(key);
      seen.add(key);
      c.interval = cfg.interval || null;
      c.el.querySelector(".value").textContent = fmtNum(r.value);
      c.el.querySelector(".value").className = "value" + (r.value === null && r.flag ? " bad" : "");
      c.el.querySelector(".unit").textContent = r.unit || (cfg.units || {})[ch] || "";
      const flag = c.el.querySelector(".flag");
      flag.replaceChildren();
      if (r.flag) flag.append(badge(r.flag, flagClass(r.flag)));
      c.el.querySelector(".ch-time").textContent = r.ts ? ago(r.ts) : "no reading yet";
      c.el.classList.toggle("alarm", active.has(key));
      grid.append(c.el);
    }
  }
  for (const [key, c] of cards) if (!seen.has(key)) { c.el.remove(); cards.delete(key); }
}

function renderAlarms(al) {
  const body = h("tbody");
  for (const a of al.active) {
    body.append(h("tr", {"data-alarm": a.id}, h("td", {}, badge("active", "bad"), h("b", {text: a.id})),
      h("td", {text: fmtTime(a.since, true)}), h("td", {class: "num", text: fmtNum(a.value)}),
      h("td", {class: "num", text: fmtNum(a.threshold)})));
  }
  if (!al.active.length) body.append(h("tr", {}, h("td", {colspan: "4", class: "empty", text: "no active alarm"})));
  $("active-alarms").tBodies[0].replaceWith(body);
  const recent = h("tbody");
  for (const e of al.recent) {
    recent.append(h("tr", {"data-event": String(e.seq)}, h("td", {text: fmtTime(e.ts, true)}),
      h("td", {text: e.id}), h("td", {}, badge(e.state, e.state === "raised" ? "bad" : "ok")),
      h("td", {class: "num", text: fmtNum(e.value)}), h("td", {class: "num", text: fmtNum(e.threshold)})));
  }
  if (!al.recent.length) recent.append(h("tr", {}, h("td", {colspan: "5", class: "empty", text: "no alarm events"})));
  $("recent-alarms").tBodies[0].replaceWith(recent);
  return new Set(al.active.map((a) => a.channel));
}

function drawChart(c, hist) {
  const W = 320, H = 100, L = 36, R = 6, T = 6, B = 14, svg = c.svg;
  svg.replaceChildren();
  const pts = hist.points.filter((p) => p.avg !== null);
  svg.setAttribute("data-points", String(pts.length));
  svg.append(sv("rect", {class: "frame", x: L, y: T, width: W - L - R, height: H - T - B}));
  const t0 = Date.parse(hist.from), t1 = Date.parse(hist.to);
  svg.append(sv("text", {class: "axis", x: L, y: H - 2}, "\u2212" + fmtNum(hist.hours) + " h"));
  svg.append(sv("text", {class: "axis", x: W - R, y: H - 2, "text-anchor": "end"}, "now"));
  if (!pts.length) {
    svg.append(sv("text", {class: "axis", x: (L + W) / 2, y: H / 2, "text-anchor": "middle"},
                  hist.ready ? "no readings yet" : "loading history\u2026"));
    return;
  }
  let lo = Math.min(...pts.map((p) => p.min)), hi = Math.max(...pts.map((p) => p.max));
  for (const l of hist.limits) { lo = Math.min(lo, l.value); hi = Math.max(hi, l.value); }
  if (hi - lo < 1e-9) { const pad = Math.abs(hi) * 0.05 || 1; lo -= pad; hi += pad; }
  const margin = (hi - lo) * 0.06;
  lo -= margin;
  hi += margin;
  const x = (t) => (L + (W - L - R) * (t - t0) / (t1 - t0)).toFixed(1);
  const y = (v) => (T + (H - T - B) * (hi - v) / (hi - lo)).toFixed(1);
  svg.append(sv("text", {class: "axis", x: L - 3, y: T + 8, "text-anchor": "end"}, fmtNum(hi)));
  svg.append(sv("text", {class: "axis", x: L - 3, y: H - B, "text-anchor": "end"}, fmtNum(lo)));
  for (const l of hist.limits) {
    const line = sv("line", {class: "limit", x1: L, x2: W - R, y1: y(l.value), y2: y(l.value)});
    line.append(sv("title", {}, l.rule + " " + fmtNum(l.value)));
    svg.append(line);
  }
  const gap = Math.max(180, 2.5 * (c.interval || 0)) * 1000, segs = [];
  let cur = [];
  for (const p of pts) {
    const t = Date.parse(p.t) + hist.bucket_s * 500;
    if (cur.length && t - cur[cur.length - 1].tt > gap) { segs.push(cur); cur = []; }
    cur.push(Object.assign({tt: t}, p));
  }
  if (cur.length) segs.push(cur);
  for (const seg of segs) {
    const band = seg.map((p) => x(p.tt) + "," + y(p.max))
      .concat(seg.slice().reverse().map((p) => x(p.tt) + "," + y(p.min)));
    svg.append(sv("polygon", {class: "band", points: band.join(" ")}));
    svg.append(sv("polyline", {class: "line", points: seg.map((p) => x(p.tt) + "," + y(p.avg)).join(" ")}));
  }
  const all = pts.length <= 120, lastT = pts[pts.length - 1].t;
  for (const seg of segs) {
    for (const p of seg) {
      if (!all && p.t !== lastT) continue;
      if (p.max > p.min) {
        svg.append(sv("line", {class: "whisker", x1: x(p.tt), x2: x(p.tt), y1: y(p.max), y2: y(p.min)}));
      }
      const dot = sv("circle", {class: "pt", cx: x(p.tt), cy: y(p.avg), r: 2});
      dot.append(sv("title", {}, fmtTime(p.t) + "  avg " + fmtNum(p.avg) + "  min " + fmtNum(p.min) + "  max " +
        fmtNum(p.max) + "  (" + p.n + " readings" + (p.bad ? ", " + p.bad + " failed" : "") + ")"));
      svg.append(dot);
    }
  }
}

async function refreshCharts() {
  let missing = false;
  await Promise.all([...cards.entries()].map(async ([key, c]) => {
    const hist = await getJSON("/api/history?channel=" + encodeURIComponent(key) + "&hours=" + hours);
    drawChart(c, hist);
    if (!hist.points.some((p) => p.avg !== null)) missing = true;
  }));
  chartsMissing = missing;
}

function setConn(ok, err) {
  const el = $("conn");
  el.classList.toggle("show", !ok);
  el.textContent = ok ? "" : "Cannot reach the agent (" + (err && err.message || err) + "); retrying\u2026";
}

async function refresh() {
  try {
    const [st, al] = await Promise.all([getJSON("/api/status"), getJSON("/api/alarms?limit=20")]);
    renderStation(st);
    const active = renderAlarms(al);
    renderDevices(st);
    renderChannels(st, active);
    if (chartsMissing || Date.now() - chartsAt > CHARTS_EVERY_MS) {
      chartsAt = Date.now();
      await refreshCharts();
    }
    setConn(true);
  } catch (err) {
    setConn(false, err);
  } finally {
    setTimeout(refresh, STATUS_EVERY_MS);
  }
}
$("hours").addEventListener("change", (ev) => {
  hours = Number(ev.target.value);
  chartsAt = 0;
  refreshCharts().catch((err) => setConn(false, err));
});
refresh();
