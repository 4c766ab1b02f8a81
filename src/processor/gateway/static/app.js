// Live page: one WebSocket to the gateway, channels per selected event and stage.
// Plain DOM and SVG; every value from the server goes through textContent or attributes.
"use strict";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const SVG_NS = "http://www.w3.org/2000/svg";
const TRAIL_POINTS = 20;
const LABELLED_VEHICLES = 30;

const state = {
  ws: null,
  retryMs: 500,
  channels: new Map(), // channel -> {seq, onSnapshot, onUpdate}
  eventId: params.get("event"),
  stageId: params.get("stage"),
  catalog: [],
  vehicles: new Map(), // number -> {row, trail: [[lon, lat]]}
  course: null,
  projection: null,
  leaderboardRanks: new Map(),
};

const $ = (id) => document.getElementById(id);

// ---- connection -------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`);
  state.ws = ws;
  ws.onopen = () => {
    state.retryMs = 500;
    setStatus(true);
    for (const [channel, sub] of state.channels) {
      sub.seq = -1;
      sendSubscribe(channel);
    }
  };
  ws.onmessage = (event) => onMessage(JSON.parse(event.data));
  ws.onclose = () => {
    setStatus(false);
    setTimeout(connect, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 10000);
  };
}

function setStatus(online) {
  const el = $("status");
  el.textContent = online ? "live" : "reconnecting…";
  el.className = `status ${online ? "online" : "offline"}`;
}

function sendSubscribe(channel) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    const message = { type: "subscribe", channel };
    if (channel.endsWith(":alerts")) message.token = token;
    state.ws.send(JSON.stringify(message));
  }
}

function subscribe(channel, onSnapshot, onUpdate) {
  state.channels.set(channel, { seq: -1, onSnapshot, onUpdate });
  sendSubscribe(channel);
}

function unsubscribe(channel) {
  if (!state.channels.delete(channel)) return;
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ type: "unsubscribe", channel }));
  }
}

function onMessage(message) {
  const sub = state.channels.get(message.channel);
  if (message.type === "error") {
    if (message.channel && message.channel.endsWith(":alerts")) showAlertsError(message);
    return;
  }
  if (!sub) return;
  if (message.type === "snapshot") {
    sub.seq = message.seq;
    sub.onSnapshot(message.data);
  } else if (message.type === "update" && sub.seq >= 0 && message.seq > sub.seq) {
    sub.seq = message.seq;
    sub.onUpdate(message.data);
  }
}

// ---- selection --------------------------------------------------------------------------

function onCatalog(data) {
  state.catalog = (data && data.events) || [];
  if (state.catalog.length === 0) {
    discover();
    return;
  }
  renderSelectors();
}

async function discover() {
  try {
    const found = await (await fetch("/api/discover")).json();
    state.catalog = found.events.map((id) => ({
      id, name: `Event ${id}`, stages: found.stages.map((s) => ({ id: s, name: `Stage ${s}` })),
    }));
    if (state.catalog.length === 0 && found.stages.length) {
      state.catalog = [{ id: state.eventId || "", name: "—", stages: found.stages.map(
        (s) => ({ id: s, name: `Stage ${s}` })) }];
    }
  } catch (err) {
    state.catalog = [];
  }
  renderSelectors();
}

function renderSelectors() {
  const events = state.catalog;
  if (!state.eventId && events.length) state.eventId = String(events[0].id);
  fillSelect($("event-select"), events, state.eventId);
  const event = events.find((e) => String(e.id) === String(state.eventId));
  const stages = (event && event.stages) || [];
  if (!state.stageId && stages.length) state.stageId = String(stages[stages.length - 1].id);
  fillSelect($("stage-select"), stages, state.stageId);
  selectEvent(state.eventId);
  selectStage(state.stageId);
}

function fillSelect(select, items, selected) {
  select.replaceChildren();
  const known = items.map((item) => String(item.id));
  if (selected && !known.includes(String(selected))) {
    items = [{ id: selected, name: `#${selected}` }, ...items];
  }
  for (const item of items) {
    const option = document.createElement("option");
    option.value = String(item.id);
    option.textContent = item.name || `#${item.id}`;
    option.selected = String(item.id) === String(selected);
    select.append(option);
  }
}

let currentEvent = null;
let currentStage = null;

function selectEvent(eventId) {
  if (!eventId || eventId === currentEvent) return;
  if (currentEvent) {
    for (const kind of ["positions", "standings", "course", "alerts"]) {
      unsubscribe(`event:${currentEvent}:${kind}`);
    }
  }
  currentEvent = eventId;
  state.eventId = eventId;
  state.vehicles.clear();
  state.course = null;
  subscribe(`event:${eventId}:course`, onCourse, onCourse);
  subscribe(`event:${eventId}:positions`, onPositionsSnapshot, onPositionsUpdate);
  subscribe(`event:${eventId}:standings`, renderStandings, renderStandings);
  if (token) {
    $("alerts-panel").hidden = false;
    subscribe(`event:${eventId}:alerts`, onAlertsSnapshot, onAlert);
  }
  updateUrl();
}

function selectStage(stageId) {
  if (!stageId || stageId === currentStage) return;
  if (currentStage) unsubscribe(`stage:${currentStage}:leaderboard`);
  currentStage = stageId;
  state.stageId = stageId;
  state.leaderboardRanks.clear();
  const option = [...$("stage-select").options].find((o) => o.value === stageId);
  $("stage-title").textContent = option ? option.textContent : `#${stageId}`;
  subscribe(`stage:${stageId}:leaderboard`, renderLeaderboard, renderLeaderboard);
  updateUrl();
}

function updateUrl() {
  const next = new URLSearchParams(location.search);
  if (state.eventId) next.set("event", state.eventId);
  if (state.stageId) next.set("stage", state.stageId);
  history.replaceState(null, "", `?${next}`);
}

// ---- formatting -------------------------------------------------------------------------

function fmtDuration(ms) {
  if (ms === null || ms === undefined) return "";
  const negative = ms < 0;
  let rest = Math.abs(Math.round(ms / 100));
  const tenths = rest % 10; rest = Math.floor(rest / 10);
  const s = rest % 60; rest = Math.floor(rest / 60);
  const m = rest % 60; const h = Math.floor(rest / 60);
  const mm = h ? String(m).padStart(2, "0") : String(m);
  const body = `${h ? `${h}:` : ""}${mm}:${String(s).padStart(2, "0")}.${tenths}`;
  return negative ? `-${body}` : body;
}

function fmtGap(ms) {
  if (ms === null || ms === undefined) return "";
  return ms === 0 ? "—" : `+${fmtDuration(ms)}`;
}

function fmtClock(ts) {
  if (!ts) return "";
  const d = typeof ts === "number" ? new Date(ts) : new Date(String(ts));
  return Number.isNaN(d.getTime()) ? String(ts) : d.toISOString().slice(11, 19);
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  return td;
}

// ---- leaderboard and standings ----------------------------------------------------------

function renderLeaderboard(data) {
  const rows = (data && data.rows) || [];
  const body = $("leaderboard").querySelector("tbody");
  const previous = state.leaderboardRanks;
  const next = new Map();
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    const running = !row.finish_ts && row.status !== "finished";
    tr.className = running ? "running" : (row.status === "dnf" || row.status === "dsq" ? "dnf" : "");
    tr.dataset.number = String(row.number);
    const key = `${row.rank}|${row.total_ms}|${(row.splits || []).length}`;
    next.set(String(row.number), key);
    if (previous.size && previous.get(String(row.number)) !== key) tr.classList.add("changed");
    tr.append(
      cell(running ? "" : row.rank, "num"),
      cell(row.number, "num number"),
      cell(row.name),
      cell(row.class),
      splitsCell(row, running),
      cell(fmtDuration(row.elapsed_ms), "num"),
      cell(row.penalty_ms ? `+${fmtDuration(row.penalty_ms)}` : "", "num"),
      cell(running ? "" : fmtDuration(row.total_ms), "num"),
      cell(running ? "" : fmtGap(row.gap_ms), "num"),
    );
    return tr;
  }));
  state.leaderboardRanks = next;
  $("leaderboard-empty").hidden = rows.length > 0;
}

function splitsCell(row, running) {
  const td = document.createElement("td");
  const box = document.createElement("div");
  box.className = "splits";
  const splits = row.splits || [];
  splits.forEach((split, i) => {
    const span = document.createElement("span");
    const last = running && i === splits.length - 1;
    span.className = last ? "split last" : "split";
    span.textContent = `${split.name} ${fmtDuration(split.elapsed_ms)}`;
    span.title = fmtClock(split.ts);
    box.append(span);
  });
  if (running && splits.length === 0 && row.last_split) {
    const span = document.createElement("span");
    span.className = "split last";
    span.textContent = String(row.last_split);
    box.append(span);
  }
  td.append(box);
  return td;
}

function renderStandings(data) {
  const rows = (data && data.rows) || [];
  const body = $("standings").querySelector("tbody");
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    const ranked = row.rank !== null && row.rank !== undefined;
    tr.className = ranked ? "" : "running";
    tr.append(
      cell(row.rank, "num"), cell(row.number, "num number"), cell(row.name), cell(row.class),
      cell(row.stages_finished, "num"), cell(ranked ? fmtDuration(row.total_ms) : "", "num"),
      cell(ranked ? fmtGap(row.gap_ms) : "", "num"),
    );
    return tr;
  }));
  $("standings-empty").hidden = rows.length > 0;
}

// ---- alerts ---------------------------------------------------------------------------

function onAlertsSnapshot(data) {
  $("alerts").replaceChildren();
  $("alerts-error").hidden = true;
  for (const alert of (data && data.alerts) || []) onAlert(alert);
}

function onAlert(alert) {
  const li = document.createElement("li");
  li.className = String(alert.severity || "warning");
  const when = document.createElement("span");
  when.className = "when";
  when.textContent = fmtClock(alert.started_at);
  const what = document.createElement("span");
  const number = alert.number ?? alert.entry_number ?? "";
  what.textContent = `${alert.severity || ""} · ${alert.kind || "alert"} · #${number}` +
    (alert.ended_at ? ` (ended ${fmtClock(alert.ended_at)})` : "");
  li.append(when, what);
  $("alerts").prepend(li);
}

function showAlertsError(message) {
  const el = $("alerts-error");
  el.hidden = false;
  el.textContent = `Alerts unavailable: ${message.message}`;
}

// ---- map --------------------------------------------------------------------------------

function onCourse(data) {
  state.course = (data && data.course) || null;
  state.projection = null;
  drawCourse();
  drawVehicles();
}

function onPositionsSnapshot(data) {
  state.vehicles.clear();
  for (const row of (data && data.entries) || []) {
    const trail = (row.trail || []).slice(-TRAIL_POINTS);
    if (trail.length === 0) trail.push([row.lon, row.lat]);
    state.vehicles.set(String(row.number), { row, trail });
  }
  drawVehicles();
}

function onPositionsUpdate(data) {
  for (const row of (data && data.entries) || []) {
    const key = String(row.number);
    const vehicle = state.vehicles.get(key) || { row, trail: [] };
    vehicle.row = row;
    vehicle.trail.push([row.lon, row.lat]);
    if (vehicle.trail.length > TRAIL_POINTS) vehicle.trail.shift();
    state.vehicles.set(key, vehicle);
  }
  drawVehicles();
}

function coursePoints() {
  const points = [];
  const walk = (coords) => {
    if (typeof coords[0] === "number") points.push(coords);
    else for (const c of coords) walk(c);
  };
  for (const feature of (state.course && state.course.features) || []) {
    if (feature.geometry) walk(feature.geometry.coordinates);
  }
  return points;
}

function projection() {
  if (state.projection) return state.projection;
  let points = coursePoints();
  const fromCourse = points.length > 0;
  if (!fromCourse) {
    for (const v of state.vehicles.values()) points.push(...v.trail);
  }
  if (points.length === 0) return null;
  const lons = points.map((p) => p[0]);
  const lats = points.map((p) => p[1]);
  let [minLon, maxLon, minLat, maxLat] = [
    Math.min(...lons), Math.max(...lons), Math.min(...lats), Math.max(...lats)];
  const padLon = Math.max((maxLon - minLon) * 0.1, 0.002);
  const padLat = Math.max((maxLat - minLat) * 0.06, 0.002);
  minLon -= padLon; maxLon += padLon; minLat -= padLat; maxLat += padLat;
  const k = Math.cos(((minLat + maxLat) / 2) * Math.PI / 180);
  const width = 600;
  const height = 420;
  const scale = Math.min(width / ((maxLon - minLon) * k), height / (maxLat - minLat));
  const offX = (width - (maxLon - minLon) * k * scale) / 2;
  const offY = (height - (maxLat - minLat) * scale) / 2;
  const project = ([lon, lat]) => [
    offX + (lon - minLon) * k * scale, offY + (maxLat - lat) * scale];
  // Without a course the frame follows the vehicles, so it is recomputed each time.
  if (fromCourse) state.projection = project;
  return project;
}

function svg(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  return el;
}

function pathOf(coords, project, close) {
  const d = coords.map((c, i) => {
    const [x, y] = project(c);
    return `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
  }).join("");
  return close ? `${d}Z` : d;
}

function drawCourse() {
  const layer = $("map-course");
  layer.replaceChildren();
  const project = projection();
  if (!project || !state.course) return;
  for (const feature of state.course.features || []) {
    const geometry = feature.geometry || {};
    const props = feature.properties || {};
    const lines = geometry.type === "LineString" ? [geometry.coordinates]
      : geometry.type === "MultiLineString" ? geometry.coordinates : [];
    for (const line of lines) layer.append(svg("path", { class: "route", d: pathOf(line, project) }));
    const polygons = geometry.type === "Polygon" ? [geometry.coordinates]
      : geometry.type === "MultiPolygon" ? geometry.coordinates : [];
    for (const polygon of polygons) {
      layer.append(svg("path", { class: "zone", d: polygon.map((r) => pathOf(r, project, true)).join("") }));
    }
    if (geometry.type === "Point") {
      const [x, y] = project(geometry.coordinates);
      layer.append(svg("circle", { class: "poi", cx: x, cy: y, r: 4.5 }));
      const label = svg("text", { class: "poi-label", x: x + 7, y: y + 14 });
      label.textContent = String(props.name || props.kind || "");
      layer.append(label);
    }
  }
}

function drawVehicles() {
  const project = projection();
  const trails = $("map-trails");
  const dots = $("map-vehicles");
  $("vehicle-count").textContent = state.vehicles.size ? `${state.vehicles.size} vehicles` : "";
  if (!project) {
    trails.replaceChildren();
    dots.replaceChildren();
    return;
  }
  if (!state.course) drawCourse();
  const trailEls = [];
  const dotEls = [];
  for (const [number, vehicle] of state.vehicles) {
    if (vehicle.trail.length > 1) {
      trailEls.push(svg("path", { class: "trail", d: pathOf(vehicle.trail, project) }));
    }
    const [x, y] = project([vehicle.row.lon, vehicle.row.lat]);
    const group = svg("g", { class: "vehicle", "data-number": number, transform: `translate(${x.toFixed(1)},${y.toFixed(1)})` });
    const title = svg("title", {});
    title.textContent = `#${number} · ${vehicle.row.speed ?? "?"} km/h · ${fmtClock(vehicle.row.ts)}`;
    group.append(svg("circle", { r: 6 }), title);
    if (state.vehicles.size <= LABELLED_VEHICLES) {  // beyond, numbers overlap: hover shows them
      const label = svg("text", { x: 8, y: -7 });
      label.textContent = number;
      group.append(label);
    }
    dotEls.push(group);
  }
  trails.replaceChildren(...trailEls);
  dots.replaceChildren(...dotEls);
}

// ---- start ------------------------------------------------------------------------------

$("event-select").addEventListener("change", (e) => {
  state.stageId = null;
  currentStage && unsubscribe(`stage:${currentStage}:leaderboard`);
  currentStage = null;
  state.eventId = e.target.value;
  renderSelectors();
});
$("stage-select").addEventListener("change", (e) => selectStage(e.target.value));

subscribe("events", onCatalog, onCatalog);
if (state.eventId || state.stageId) renderSelectors();
connect();
