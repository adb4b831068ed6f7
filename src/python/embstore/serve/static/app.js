// The live page of `embstore serve`: polls /api/stats, draws /api/projection with Chart.js and
// overlays a searched key's neighbours and trajectory. See embstore/serve/__init__.py for the API.
// Keys and epochs (uint64) come as decimal strings and stay strings here: shown, compared with
// ===, put in URLs, never made Numbers (a Number above 2**53 is rounded: another key or epoch).
"use strict";

const kPollMs = 1000;
// A growing epoch is redrawn at most this often (a new epoch at once): each redraw samples,
// fits and projects on the server, CPU that a writer on the same machine would miss.
const kRedrawMs = 5000;
const kPalette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"];

const state = {
  epochs: [],          // [{epoch, rows}], epoch a string
  epoch: null,         // the epoch shown (a string)
  drawn: null,         // {epoch, rows, generation} of the projection on screen
  drawnAt: 0,
  loading: false,
  draws: 0,
  key: null,           // the searched key (the digits typed)
  neighbours: null,
  history: null,
};

const $ = (id) => document.getElementById(id);

function colour(i) {
  return i < kPalette.length ? kPalette[i] : `hsl(${(i * 137.5) % 360}, 60%, 50%)`;
}

function formatBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return `${n.toFixed(u ? 1 : 0)} ${units[u]}`;
}

async function getJson(url) {
  const response = await fetch(url, {cache: "no-store"});
  let body;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`${url}: HTTP ${response.status}, not JSON`);
  }
  if (!response.ok) throw new Error(body.error || `${url}: HTTP ${response.status}`);
  return body;
}

function showError(element, message) {
  element.textContent = message || "";
  element.hidden = !message;
}

let chart = null;

function makeChart() {
  if (typeof Chart === "undefined") {
    showError($("error"), "Chart.js did not load (/static/chart.js): install the Debian " +
                          "package libjs-chart.js on the server.");
    return null;
  }
  return new Chart($("chart"), {
    type: "scatter",
    data: {datasets: []},
    options: {
      animation: false,
      maintainAspectRatio: false,
      parsing: false,
      normalized: true,
      plugins: {
        legend: {position: "bottom", labels: {boxWidth: 10}},
        tooltip: {
          callbacks: {
            label: (ctx) => {
              const p = ctx.raw;
              const extra = p.epoch !== undefined ? ` epoch ${p.epoch}` : "";
              return `key ${p.key}${p.label ? " (" + p.label + ")" : ""}${extra}`;
            },
          },
        },
      },
      scales: {x: {title: {display: true, text: "PC 1"}},
               y: {title: {display: true, text: "PC 2"}}},
    },
  });
}

function pointDatasets(projection) {
  const names = projection.label_names;
  const groups = new Map();
  for (let i = 0; i < projection.x.length; i++) {
    const code = projection.labels ? projection.labels[i] : -1;
    if (!groups.has(code)) groups.set(code, []);
    groups.get(code).push({x: projection.x[i], y: projection.y[i], key: projection.keys[i],
                           label: code >= 0 ? names[code] : null});
  }
  const codes = [...groups.keys()].sort((a, b) => a - b);
  return codes.map((code) => ({
    label: code >= 0 ? `label ${names[code]}` : (projection.labels ? "no label" : "rows"),
    data: groups.get(code),
    pointRadius: 2,
    pointHoverRadius: 4,
    backgroundColor: code >= 0 ? colour(code) : "#8899aa",
    borderWidth: 0,
  }));
}

function overlayDatasets() {
  const sets = [];
  const n = state.neighbours;
  if (n && n.epoch === state.drawn?.epoch) {
    sets.push({label: `${n.neighbours.length} nearest at epoch ${n.epoch}`,
               data: n.neighbours.map((p) => ({x: p.x, y: p.y, key: p.key, label: p.label})),
               pointRadius: 5, backgroundColor: "rgba(0,0,0,0)", borderColor: "#000",
               borderWidth: 1.5});
  }
  const h = state.history;
  if (h && h.trajectory.length) {
    sets.push({label: `trajectory of key ${h.key}`, type: "line", showLine: true,
               data: h.trajectory.map((p) => ({x: p.x, y: p.y, key: h.key, label: h.label,
                                               epoch: p.epoch})),
               borderColor: "#d00", backgroundColor: "#d00", borderWidth: 2,
               pointRadius: h.trajectory.map((p) => (p.epoch === state.drawn?.epoch ? 7 : 3)),
               pointStyle: "rectRot", tension: 0});
  }
  return sets;
}

function redraw(projection) {
  if (!chart) chart = makeChart();
  if (!chart) return;
  if (projection) chart.$points = pointDatasets(projection);
  chart.data.datasets = [...overlayDatasets(), ...(chart.$points || [])];
  chart.update("none");
}

async function loadProjection() {
  if (state.loading || state.epoch === null) return;
  state.loading = true;
  const epoch = state.epoch;
  try {
    const p = await getJson(`/api/projection?epoch=${epoch}`);
    state.drawn = {epoch: p.epoch, rows: p.epoch_rows, generation: JSON.stringify(p.generation)};
    state.drawnAt = Date.now();
    if (state.key !== null) await loadSearch(false);
    redraw(p);
    state.draws++;
    const status = $("projection-status");
    status.dataset.epoch = p.epoch;
    status.dataset.points = p.x.length;
    status.dataset.rows = p.epoch_rows;
    status.dataset.draws = state.draws;
    const ev = p.explained_variance.map((v) => (100 * v).toFixed(1) + "%").join(" + ");
    const left = (p.non_finite ? ` (${p.non_finite} more left out: NaN or Inf)` : "") +
        (p.corrupt ? ` (${p.corrupt} more left out: they fail their checksum, the store is ` +
                     "damaged; embstore verify lists the rows)" : "");
    status.textContent = `epoch ${p.epoch}: ${p.sampled} of ${p.epoch_rows} rows sampled${left}, ` +
                         `PCA explains ${ev} of their variance (${p.snapshot_rows} rows in the store)`;
    showError($("error"), "");
  } catch (e) {
    showError($("error"), `projection of epoch ${epoch}: ${e.message}`);
  } finally {
    state.loading = false;
  }
}

function renderEpochs() {
  const slider = $("epoch");
  slider.max = Math.max(0, state.epochs.length - 1);
  slider.disabled = state.epochs.length === 0;
  const index = state.epochs.findIndex((e) => e.epoch === state.epoch);
  if (index >= 0) slider.value = index;
  $("epoch-value").textContent = state.epoch === null ? "–" : state.epoch;
  const bars = $("epoch-bars");
  bars.replaceChildren(...state.epochs.slice(-200).map((e) => {
    const span = document.createElement("span");
    span.textContent = `${e.epoch}: ${e.rows.toLocaleString()}`;
    span.dataset.epoch = e.epoch;
    if (e.epoch === state.epoch) span.className = "current";
    span.addEventListener("click", () => selectEpoch(e.epoch, false));
    return span;
  }));
}

// The epoch on screen is no longer in the store (a truncate dropped it): its points go, and the
// page says so until the epoch has rows again or another is chosen.
async function showGone(epoch) {
  state.drawn = null;
  if (chart) chart.$points = [];
  if (state.key !== null) await loadSearch(false);
  redraw(null);
  const status = $("projection-status");
  status.dataset.epoch = "";
  status.dataset.points = 0;
  status.dataset.rows = 0;
  status.textContent = `epoch ${epoch} is no longer in the store (truncated): choose another ` +
                       "epoch, or wait for it to be written again";
}

function selectEpoch(epoch, follow) {
  $("follow").checked = follow;
  state.epoch = epoch;
  renderEpochs();
  loadProjection();
}

async function poll() {
  try {
    const s = await getJson("/api/stats");
    $("live").textContent = `live · ${new Date().toLocaleTimeString()}`;
    $("live").className = "live ok";
    $("store").textContent = s.store;
    $("rows").textContent = s.rows.toLocaleString();
    $("rate").textContent = Math.round(s.rows_per_second).toLocaleString();
    $("epoch-count").textContent = s.epoch_count;
    $("bytes").textContent = formatBytes(s.bytes_on_disk);
    $("last-commit").textContent = s.last_commit_unix
        ? new Date(s.last_commit_unix * 1000).toLocaleString() : "unknown";
    $("shape").textContent = `${s.dtype} × ${s.dim}`;
    showError($("error"), "");
    state.epochs = s.epochs;
    if (state.epochs.length) {
      const newest = state.epochs[state.epochs.length - 1].epoch;
      if ($("follow").checked || state.epoch === null) state.epoch = newest;
    }
    renderEpochs();
    const current = state.epochs.find((e) => e.epoch === state.epoch);
    // A truncate (the generation changed) replaced the rows drawn, even when the epoch has as
    // many rows as before (a resume from a checkpoint): redrawn at once, as a new epoch is.
    const replaced = state.drawn !== null &&
                     state.drawn.generation !== JSON.stringify(s.generation);
    const stale = current && (!state.drawn || state.drawn.epoch !== current.epoch ||
                              state.drawn.rows !== current.rows || replaced);
    if (stale && (state.drawn?.epoch !== current.epoch || replaced ||
                  Date.now() - state.drawnAt > kRedrawMs)) {
      await loadProjection();
    } else if (!current && state.drawn !== null) {
      await showGone(state.drawn.epoch);
    }
  } catch (e) {
    $("live").textContent = "no answer";
    $("live").className = "live bad";
    showError($("error"), `server: ${e.message}`);
  } finally {
    setTimeout(poll, kPollMs);
  }
}

async function loadSearch(draw) {
  const key = state.key;
  const k = $("k").value || "10";
  const epoch = state.epoch;
  // Settled apart: the key's history stands without its neighbours at the epoch shown (a new
  // epoch that has not reached the key yet, an epoch truncated away, a row holding NaN).
  const [n, h] = await Promise.allSettled([
    getJson(`/api/neighbours?key=${encodeURIComponent(key)}&epoch=${epoch}&k=${encodeURIComponent(k)}`),
    getJson(`/api/history?key=${encodeURIComponent(key)}`),
  ]);
  if (h.status === "fulfilled") {
    state.neighbours = n.status === "fulfilled" ? n.value : null;
    state.history = h.value;
    showError($("search-error"), "");
    renderSearch(epoch, n.status === "fulfilled" ? "" : n.reason.message);
  } else {
    state.neighbours = null;
    state.history = null;
    $("search-result").hidden = true;
    showError($("search-error"), h.reason.message);
  }
  if (draw) redraw(null);
}

// `missing`: why there are no neighbours at `epoch` (state.neighbours is null), or "".
function renderSearch(epoch, missing) {
  const n = state.neighbours, h = state.history;
  $("search-result").hidden = false;
  $("result-key").textContent = h.key;
  $("result-label").textContent = h.label === null ? "" : `label ${h.label}`;
  showError($("neighbours-missing"), n ? "" : `not available at epoch ${epoch}: ${missing}`);
  $("neighbours").hidden = !n;
  $("result-epoch").textContent = !n ? `${epoch}`
      : `${n.epoch}${n.exact ? "" : ` (${n.scanned} of ${n.epoch_rows} rows sampled)`}`;
  $("neighbours").tBodies[0].replaceChildren(...(n ? n.neighbours : []).map((p) => {
    const tr = document.createElement("tr");
    for (const text of [p.key, p.label ?? "", p.distance.toPrecision(4)]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
  $("trajectory").replaceChildren(...h.trajectory.map((p) => {
    const li = document.createElement("li");
    li.dataset.epoch = p.epoch;
    li.textContent = `epoch ${p.epoch}: (${p.x.toFixed(3)}, ${p.y.toFixed(3)}) row ${p.row}`;
    return li;
  }));
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!/^[0-9]+$/.test(key)) {
    showError($("search-error"), `a sample id is a non-negative integer; got "${key}"`);
    return;
  }
  state.key = key;
  loadSearch(true);
});

$("epoch").addEventListener("input", () => {
  const e = state.epochs[Number($("epoch").value)];
  if (e) selectEpoch(e.epoch, Number($("epoch").value) === state.epochs.length - 1 && $("follow").checked);
});

$("follow").addEventListener("change", () => {
  if ($("follow").checked && state.epochs.length) {
    selectEpoch(state.epochs[state.epochs.length - 1].epoch, true);
  }
});

window.embstorePage = state;
window.embstoreChart = () => chart;
poll();
