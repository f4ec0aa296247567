// patchcore review page: plain JavaScript, no build step, no network beyond this server.
// The threshold view is computed here from the cached scores (metrics.js) on every move;
// the server is asked only for pictures, threshold methods and the actions.
"use strict";

const M = window.ReviewMetrics;
const P = window.ReviewPanels;
const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 24;
const BINS = 50;
const METRIC_COLUMNS = ["GlobalAccuracy", "MeanAccuracy", "Precision", "Recall", "Specificity",
  "F1Score", "FalsePositiveRate", "FalseNegativeRate"];
const GROUP_HELP = {
  tp: "anomalous images flagged as anomalous, highest score first",
  fp: "normal images flagged as anomalous, highest score first: tick the ones to add to the model",
  fn: "anomalous images the model missed, lowest score first",
  tn: "normal images judged normal, lowest score first",
  error: "images that could not be scored: left out of every metric",
  marked: "normal images marked as normal and added to the model: left out of the metrics",
};

const S = {
  state: null, items: null, prep: null, stops: [], order: [], t: 0, method: "",
  choice: { method: null, max_fpr: null, max_fnr: null },
  group: "fp", page: 0, marks: new Set(), groups: {}, tilesKey: "", hist: null, polling: false,
};

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  const a = Math.abs(x);
  return a >= 1000 || (a < 0.01 && a > 0) ? x.toPrecision(4) : x.toFixed(a >= 100 ? 1 : a >= 10 ? 2 : 3);
}
window.ReviewFormat = fmt;
const pct = (x) => `${(100 * x).toFixed(1)}%`;

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const resp = await fetch(path, init);
  let data = null;
  try { data = await resp.json(); } catch { data = null; }
  if (!resp.ok) throw new Error((data && data.detail) || `${resp.status} ${resp.statusText}`);
  return data;
}

function say(text, kind) {
  const el = $("message");
  el.textContent = text;
  el.className = `message ${kind || ""}`;
}

// ------------------------------------------------------------------ loading

async function load() {
  const st = await api("api/state");
  apply(st);
  if (st.job.running) poll();
}

function apply(st) {
  const first = S.state === null;
  S.state = st;
  S.items = st.items;
  S.prep = M.prepare(S.items);
  S.stops = M.stops(S.prep);
  const sc = S.items.score;
  S.order = S.prep.counted.slice().sort((a, b) => sc[b] - sc[a]);
  S.errors = [];
  S.marked = [];
  for (let i = 0; i < sc.length; i++) {
    if (sc[i] === null && !S.items.pending[i]) S.errors.push(i);
    else if (S.items.excluded[i]) S.marked.push(i);
  }
  S.hist = histogram();
  if (first || !Number.isFinite(S.t)) {
    const start = st.start_threshold;
    S.t = start ? start.value : S.stops[Math.floor(S.stops.length / 2)];
    S.method = start ? start.method : "manual";
    if (start && ["max_f1", "youden", "nearest_zero_one"].includes(start.method) && !st.model.threshold) {
      S.choice = { method: start.method, max_fpr: null, max_fnr: null };
    }
  }
  S.marks.clear();
  S.tilesKey = "";
  $("t-range").max = String(Math.max(0, S.stops.length - 1));
  renderHeader();
  P.renderUpdate(st);
  P.renderCompare(st);
  update();
}

function renderHeader() {
  const m = S.state.model;
  const size = m.image_size ? `${m.image_size} px` : m.scale ? `scale ${m.scale}` : "own size";
  const thr = m.threshold === null ? "no threshold saved" : `model threshold ${fmt(m.threshold)} (${m.threshold_method})`;
  $("model").textContent = `${m.path} · ${m.backbone} · ${size} · bank ${m.bank_size.toLocaleString()} patches · ${thr}` +
    (m.updates ? ` · ${m.updates} update(s)` : "") + ` · data ${S.state.data.path}`;
  const n = S.items.score.length;
  const parts = [`${n} images`, `${S.prep.counted.length} counted (${S.prep.normal.length} normal, ${S.prep.anomalous.length} anomalous)`];
  if (S.errors.length) parts.push(`${S.errors.length} error${S.errors.length === 1 ? "" : "s"} (not scored)`);
  if (S.marked.length) parts.push(`${S.marked.length} marked as normal and added to the model: left out of the metrics`);
  if (S.state.missing) parts.push(`${S.state.missing} still to score`);
  $("counts").textContent = parts.join(" · ");
}

// ------------------------------------------------------------------ the live update

function setThreshold(t, method, choice) {
  if (!Number.isFinite(t)) return;
  S.t = t;
  S.method = method;
  S.choice = choice || { method: null, max_fpr: null, max_fnr: null };
  update();
}

function update() {
  const ev = M.evaluateAt(S.prep, S.t);
  S.ev = ev;
  $("t-range").value = String(M.stopIndex(S.prep, S.t));
  if (document.activeElement !== $("t-value")) $("t-value").value = String(S.t);
  $("t-method").textContent = S.method ? `(${S.method})` : "";
  renderMetrics(ev);
  renderConfusion(ev);
  renderPerType(ev);
  drawHistogram();
  drawRoc(ev);
  renderGalleries();
}

function renderMetrics(ev) {
  const head = `<tr>${METRIC_COLUMNS.map((k) => `<th>${k}</th>`).join("")}</tr>`;
  const row = `<tr>${METRIC_COLUMNS.map((k) => `<td>${ev[k].toFixed(4)}</td>`).join("")}</tr>`;
  $("metrics").innerHTML = `<thead>${head}</thead><tbody>${row}</tbody>`;
  const auc = S.prep.roc.auroc;
  $("auroc").textContent = auc === null ? "" : `· image AUROC ${auc.toFixed(4)} · threshold ${fmt(S.t)} · ${ev.NumSamples} images`;
}

function renderConfusion(ev) {
  $("confusion").innerHTML = P.confusionHtml(ev.ConfusionMatrix);
}

function renderPerType(ev) {
  $("per-type").innerHTML = P.perTypeHtml(ev.DefectTypeRecall);
}

// ------------------------------------------------------------------ histogram and ROC

function histogram() {
  const all = S.prep.normal.concat(S.prep.anomalous);
  if (!all.length) return null;
  let lo = Math.min(...all);
  let hi = Math.max(...all);
  if (hi <= lo) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.04;
  lo -= pad;
  hi += pad;
  const count = (list) => {
    const bins = new Array(BINS).fill(0);
    for (const s of list) bins[Math.min(BINS - 1, Math.floor(((s - lo) / (hi - lo)) * BINS))]++;
    return bins;
  };
  const normal = count(S.prep.normal);
  const anomalous = count(S.prep.anomalous);
  return { lo, hi, normal, anomalous, top: Math.max(1, ...normal, ...anomalous) };
}

// A canvas drawn at the screen's resolution: its size in CSS pixels, the context scaled.
function sharp(c) {
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth || c.width;
  const h = c.clientHeight || c.height;
  if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  const ctx = c.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function histGeometry(w, h) {
  return { left: 40, right: w - 10, top: 10, bottom: h - 28 };
}

function drawHistogram() {
  const c = $("hist");
  c.setAttribute("aria-valuetext", `threshold ${fmt(S.t)}`);
  const { ctx, w: cw, h: ch } = sharp(c);
  const h = S.hist;
  if (!h) return;
  const g = histGeometry(cw, ch);
  const xOf = (s) => g.left + ((s - h.lo) / (h.hi - h.lo)) * (g.right - g.left);
  const tx = Math.max(g.left, Math.min(g.right, xOf(S.t)));
  ctx.fillStyle = "#c6282812";
  ctx.fillRect(tx, g.top, g.right - tx, g.bottom - g.top);
  const bw = (g.right - g.left) / BINS;
  for (const [bins, colour] of [[h.normal, "#2b7bbaaa"], [h.anomalous, "#d7301faa"]]) {
    ctx.fillStyle = colour;
    bins.forEach((n, k) => {
      if (!n) return;
      const y = g.bottom - (n / h.top) * (g.bottom - g.top);
      ctx.fillRect(g.left + k * bw + 0.5, y, bw - 1, g.bottom - y);
    });
  }
  ctx.strokeStyle = "#667085";
  ctx.beginPath();
  ctx.moveTo(g.left, g.bottom + 0.5);
  ctx.lineTo(g.right, g.bottom + 0.5);
  ctx.stroke();
  ctx.fillStyle = "#667085";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "center";
  for (let k = 0; k <= 4; k++) {
    const s = h.lo + (k / 4) * (h.hi - h.lo);
    ctx.textAlign = k === 0 ? "left" : k === 4 ? "right" : "center";
    ctx.fillText(fmt(s), xOf(s), g.bottom + 14);
  }
  ctx.textAlign = "right";
  ctx.fillText(String(h.top), g.left - 4, g.top + 10);
  ctx.fillText("0", g.left - 4, g.bottom);
  ctx.fillStyle = "#1d2330";
  ctx.fillRect(tx - 1.5, g.top - 4, 3, g.bottom - g.top + 4);
  ctx.textAlign = tx > g.right - 80 ? "right" : "left";
  ctx.fillText(`threshold ${fmt(S.t)}`, tx + (ctx.textAlign === "left" ? 5 : -5), g.top + 8);
  ctx.textAlign = "center";
  ctx.fillStyle = "#667085";
  ctx.fillText("image score (higher = more anomalous)", (g.left + g.right) / 2, ch - 2);
}

function drawRoc(ev) {
  const c = $("roc");
  const { ctx, h: ch } = sharp(c);
  const roc = S.prep.roc;
  const p = 34;
  const w = ch - p - 10;
  const X = (f) => p + f * w;
  const Y = (r) => 10 + (1 - r) * w;
  ctx.strokeStyle = "#d9dee7";
  ctx.strokeRect(X(0), Y(1), w, w);
  ctx.setLineDash([4, 4]);
  ctx.beginPath(); ctx.moveTo(X(0), Y(0)); ctx.lineTo(X(1), Y(1)); ctx.stroke();
  ctx.setLineDash([]);
  ctx.fillStyle = "#667085";
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.fillText("false positive rate", X(0.5), ch - 2);
  ctx.save(); ctx.translate(10, Y(0.5)); ctx.rotate(-Math.PI / 2); ctx.fillText("recall (true positive rate)", 0, 0); ctx.restore();
  if (!roc.fpr.length) {
    $("roc-text").textContent = "needs normal and anomalous images";
    return;
  }
  ctx.strokeStyle = "#24527a";
  ctx.lineWidth = 2;
  ctx.beginPath();
  roc.fpr.forEach((f, k) => (k ? ctx.lineTo(X(f), Y(roc.tpr[k])) : ctx.moveTo(X(f), Y(roc.tpr[k]))));
  ctx.stroke();
  ctx.lineWidth = 1;
  const fx = ev.FalsePositiveRate;
  const ty = ev.Recall;
  ctx.fillStyle = "#c62828";
  ctx.beginPath(); ctx.arc(X(fx), Y(ty), 6, 0, 2 * Math.PI); ctx.fill();
  ctx.strokeStyle = "#fff"; ctx.stroke();
  $("roc-text").textContent = `AUROC ${roc.auroc.toFixed(4)} · operating point: FPR ${pct(fx)}, recall ${pct(ty)}`;
}

// ------------------------------------------------------------------ galleries

function groupsAt(t) {
  const sc = S.items.score;
  const lab = S.items.label;
  const g = { tp: [], fp: [], fn: [], tn: [] };
  for (const i of S.order) {
    const flag = M.judge(sc[i], t) === M.ANOMALOUS;
    if (lab[i]) (flag ? g.tp : g.fn).push(i);
    else (flag ? g.fp : g.tn).push(i);
  }
  g.fn.reverse();
  g.tn.reverse();
  g.error = S.errors;
  g.marked = S.marked;
  return g;
}

function renderGalleries() {
  S.groups = groupsAt(S.t);
  for (const b of $("tabs").children) {
    const key = b.dataset.group;
    b.querySelector("b").textContent = String(S.groups[key].length);
    b.setAttribute("aria-selected", String(key === S.group));
    b.tabIndex = key === S.group ? 0 : -1;
  }
  const list = S.groups[S.group];
  const pages = Math.max(1, Math.ceil(list.length / PAGE_SIZE));
  S.page = Math.min(S.page, pages - 1);
  const slice = list.slice(S.page * PAGE_SIZE, (S.page + 1) * PAGE_SIZE);
  $("page").textContent = `page ${S.page + 1} of ${pages} · ${list.length} image${list.length === 1 ? "" : "s"}`;
  $("prev").disabled = S.page === 0;
  $("next").disabled = S.page >= pages - 1;
  $("group-help").textContent = GROUP_HELP[S.group];
  $("mark-bar").hidden = S.group !== "fp";
  for (const i of Array.from(S.marks)) if (!S.groups.fp.includes(i)) S.marks.delete(i);
  $("mark").disabled = S.marks.size === 0 || S.state.job.running;
  $("mark").textContent = `Mark as normal${S.marks.size ? ` (${S.marks.size})` : ""}`;
  const key = `${S.group}|${slice.join(",")}`;
  if (key === S.tilesKey) return;
  S.tilesKey = key;
  const tiles = $("tiles");
  tiles.replaceChildren(...slice.map((i) => tile(i, list)));
  if (!slice.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "No images in this group at this threshold.";
    tiles.append(p);
  }
}

function tile(i, list) {
  const sc = S.items.score[i];
  const verdict = M.judge(sc, S.t);
  const el = document.createElement("div");
  el.className = `tile ${verdict}`;
  el.tabIndex = 0;
  el.setAttribute("role", "button");
  el.dataset.index = String(i);
  const name = S.items.name[i];
  el.setAttribute("aria-label", `${name}, ${verdict}${sc === null ? "" : `, score ${fmt(sc)}`}; Enter opens it`);
  let pic;
  if (sc === null) {
    pic = document.createElement("div");
    pic.className = "noimg";
    pic.textContent = "✕";
  } else {
    pic = document.createElement("img");
    pic.loading = "lazy";
    pic.decoding = "async";
    pic.alt = "";
    pic.src = `api/thumb/${i}?m=${S.state.model.digest.slice(0, 12)}`;
  }
  const cap = document.createElement("div");
  cap.className = "cap";
  const a = document.createElement("div");
  a.textContent = name.split("/").pop();
  a.title = name;
  const b = document.createElement("div");
  b.className = "sub";
  b.textContent = sc === null ? (S.items.error[i] || "error") : `score ${fmt(sc)} · ${S.items.type[i]}`;
  cap.append(a, b);
  el.append(pic, cap);
  if (S.group === "fp") {
    const lab = document.createElement("label");
    lab.className = "tick";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = S.marks.has(i);
    box.setAttribute("aria-label", `mark ${name} as normal`);
    box.addEventListener("click", (ev) => ev.stopPropagation());
    box.addEventListener("keydown", (ev) => ev.stopPropagation());
    box.addEventListener("change", () => {
      if (box.checked) S.marks.add(i); else S.marks.delete(i);
      $("mark").disabled = S.marks.size === 0;
      $("mark").textContent = `Mark as normal${S.marks.size ? ` (${S.marks.size})` : ""}`;
    });
    lab.append(box, " mark");
    lab.addEventListener("click", (ev) => ev.stopPropagation());
    el.append(lab);
  }
  const open = () => window.ReviewViewer.open(list, list.indexOf(i));
  el.addEventListener("click", open);
  el.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); open(); }
  });
  return el;
}

// ------------------------------------------------------------------ jobs and actions

async function poll() {
  if (S.polling) return;
  S.polling = true;
  let ticks = 0;
  try {
    for (;;) {
      const st = await api("api/status");
      const j = st.job;
      $("job").hidden = !j.running;
      $("job-text").textContent = `${j.what}: ${j.done} of ${j.total}`;
      $("job-fill").style.width = `${j.total ? (100 * j.done) / j.total : 0}%`;
      if (!j.running) {
        if (j.error) say(j.error, "bad");
        break;
      }
      await new Promise((r) => setTimeout(r, 500));
      if (j.what === "scoring" && ++ticks % 10 === 0) apply(await api("api/state"));
    }
  } finally {
    S.polling = false;
  }
  await load();
}

async function choose(button) {
  const body = { method: button.dataset.method };
  const bound = button.dataset.bound;
  if (bound) body[bound] = Number($(bound === "max_fpr" ? "max-fpr" : "max-fnr").value);
  try {
    const r = await api("api/threshold/choose", body);
    const label = bound ? `${body.method}, ${bound.replace("max_", "max ").toUpperCase()} ≤ ${body[bound]}` : body.method;
    setThreshold(r.value, label, { method: body.method, max_fpr: r.max_fpr, max_fnr: r.max_fnr });
    say(`${label}: threshold ${fmt(r.value)} on ${r.n} images`, "good");
  } catch (err) {
    say(`cannot set the threshold: ${err.message}`, "bad");
  }
}

async function save() {
  const c = S.choice;
  const body = c.method ? { value: S.t, method: c.method, max_fpr: c.max_fpr, max_fnr: c.max_fnr }
    : { value: S.t, method: "manual (review)" };
  try {
    const r = await api("api/threshold/save", body);
    const e = r.saved;
    say(`Saved threshold ${fmt(e.value)} (${e.method}) to ${r.model.path}; it replaced ` +
      `${e.replaced.value === null ? "no threshold" : `${fmt(e.replaced.value)} (${e.replaced.method})`}.`, "good");
    const t = S.t;
    const method = S.method;
    const choice = S.choice;
    await load();
    setThreshold(t, method, choice);
  } catch (err) {
    say(`not saved: ${err.message}`, "bad");
  }
}

async function startJob(path, body, what) {
  try {
    await api(path, body);
    say(`${what} started…`);
    poll();
  } catch (err) {
    say(`${what}: ${err.message}`, "bad");
  }
}

async function exportReport() {
  say("writing the report…");
  try {
    const r = await api("api/export", { threshold: S.t, method: S.method || "manual (review)" });
    const a = $("report-link");
    a.href = r.url;
    a.hidden = false;
    say(`Report written: ${r.path}`, "good");
  } catch (err) {
    say(`export failed: ${err.message}`, "bad");
  }
}

// ------------------------------------------------------------------ wiring

function moveStop(delta) {
  const k = Math.max(0, Math.min(S.stops.length - 1, M.stopIndex(S.prep, S.t) + delta));
  setThreshold(S.stops[k], "manual");
}

function wireHistogram() {
  const c = $("hist");
  const toT = (ev) => {
    const r = c.getBoundingClientRect();
    const g = histGeometry(r.width, r.height);
    const x = ev.clientX - r.left;
    const f = Math.max(0, Math.min(1, (x - g.left) / (g.right - g.left)));
    return S.hist.lo + f * (S.hist.hi - S.hist.lo);
  };
  let dragging = false;
  c.addEventListener("pointerdown", (ev) => {
    if (!S.hist) return;
    dragging = true;
    try { c.setPointerCapture(ev.pointerId); } catch { /* a synthetic pointer */ }
    setThreshold(toT(ev), "manual");
  });
  c.addEventListener("pointermove", (ev) => { if (dragging) setThreshold(toT(ev), "manual"); });
  c.addEventListener("pointerup", () => { dragging = false; });
  c.addEventListener("keydown", (ev) => {
    const step = ev.shiftKey ? 10 : 1;
    if (ev.key === "ArrowRight" || ev.key === "ArrowUp") { ev.preventDefault(); moveStop(step); }
    if (ev.key === "ArrowLeft" || ev.key === "ArrowDown") { ev.preventDefault(); moveStop(-step); }
  });
}

function setup() {
  const range = $("t-range");
  range.addEventListener("input", () => setThreshold(S.stops[Number(range.value)], "manual"));
  range.addEventListener("keydown", (ev) => {
    if (!ev.shiftKey) return;
    if (ev.key === "ArrowRight" || ev.key === "ArrowUp") { ev.preventDefault(); moveStop(10); }
    if (ev.key === "ArrowLeft" || ev.key === "ArrowDown") { ev.preventDefault(); moveStop(-10); }
  });
  $("t-value").addEventListener("change", () => setThreshold(Number($("t-value").value), "manual"));
  wireHistogram();
  for (const b of document.querySelectorAll(".methods button[data-method]")) {
    b.addEventListener("click", () => choose(b));
  }
  $("save").addEventListener("click", save);
  const tabs = Array.from($("tabs").children);
  tabs.forEach((b, k) => {
    b.addEventListener("click", () => { S.group = b.dataset.group; S.page = 0; S.tilesKey = ""; renderGalleries(); });
    b.addEventListener("keydown", (ev) => {
      const d = ev.key === "ArrowRight" ? 1 : ev.key === "ArrowLeft" ? -1 : 0;
      if (!d) return;
      ev.preventDefault();
      const next = tabs[(k + d + tabs.length) % tabs.length];
      next.click();
      next.focus();
    });
  });
  $("prev").addEventListener("click", () => { S.page--; renderGalleries(); });
  $("next").addEventListener("click", () => { S.page++; renderGalleries(); });
  $("mark").addEventListener("click", () => {
    startJob("api/mark-normal", { ids: Array.from(S.marks), threshold: S.t }, "Mark as normal");
  });
  $("compare").addEventListener("click", () => {
    startJob("api/compare", { model: $("other").value.trim(), threshold: S.t }, "Compare");
  });
  $("export").addEventListener("click", exportReport);
  load().catch((err) => say(`cannot load the review: ${err.message}`, "bad"));
}

window.Review = { S, setThreshold, update, load, moveStop };
setup();
