// patchcore inspection page: plain JavaScript, no build step, no network access beyond this
// service. Uploads go to POST /v1/inspect?heatmap=url; the colour layer is fetched from the
// returned heatmap_url with alpha=1 and laid over the image, so the opacity slider is local.
"use strict";

const MAX_RECENT = 40;
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem("patchcore-token") || "",
  card: null,
  recent: [], // newest first: {id, name, result, error, status, imageUrl, heatUrl}
  current: null,
  queue: Promise.resolve(),
  pending: 0,
  nextId: 1,
};

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

function fmt(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  const a = Math.abs(x);
  return a >= 1000 || a < 0.01 ? x.toPrecision(4) : x.toFixed(a >= 100 ? 1 : a >= 10 ? 2 : 3);
}

async function detailOf(resp) {
  try {
    const body = await resp.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body);
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

// ------------------------------------------------------------------ model card

async function loadModel() {
  const el = $("model");
  let resp;
  try {
    resp = await fetch("/v1/model", { headers: authHeaders() });
  } catch {
    el.textContent = "service unreachable; retrying…";
    el.classList.add("bad");
    setTimeout(loadModel, 2000);
    return;
  }
  $("token").parentElement.classList.toggle("need", resp.status === 401);
  if (resp.status === 401) {
    el.textContent = "this service needs an API token: enter it on the right";
    el.classList.add("bad");
    return;
  }
  if (resp.status === 503) {
    el.textContent = "model loading…";
    setTimeout(loadModel, 1000);
    return;
  }
  if (!resp.ok) {
    el.textContent = `model card: ${await detailOf(resp)}`;
    el.classList.add("bad");
    return;
  }
  const card = await resp.json();
  state.card = card;
  el.classList.remove("bad");
  const px = Array.isArray(card.image_size) ? card.image_size.join("×") : card.image_size;
  const size = px ? `${px} px` : card.scale ? `scale ${card.scale}` : "own size";
  const cal = card.calibration || {};
  const method = !card.threshold_method
    ? ""
    : card.threshold_method === "conformal"
      ? ` (conformal: false alarms ≤ ${fmt(100 * cal.max_fpr)}% from ${cal.n} normal images)`
      : ` (${card.threshold_method})`;
  const bank = card.bank_size == null ? "" : ` · bank ${card.bank_size.toLocaleString()} rows`;
  el.textContent =
    `${card.backbone} · ${size}${bank} · ` +
    `threshold ${fmt(card.threshold)}${method} · ${card.backend} · v${card.patchcore_version}`;
  // one fixed colour range for every image (record.display_range); null: each map its own
  const range = card.display_range;
  $("legend-lo").textContent = range ? fmt(range[0]) : "map min";
  $("legend-hi").textContent = range ? fmt(range[1]) : "map max";
}

// ------------------------------------------------------------------ inspecting

function enqueue(files) {
  for (const file of files) {
    state.pending += 1;
    updateBusy();
    state.queue = state.queue.then(() => inspect(file)).finally(() => {
      state.pending -= 1;
      updateBusy();
    });
  }
}

function updateBusy() {
  const drop = $("drop");
  drop.classList.toggle("busy", state.pending > 0);
  drop.querySelector(".big").textContent =
    state.pending > 0 ? `Inspecting… (${state.pending} left)` : "Drop images here";
}

async function postImage(file) {
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  for (let attempt = 0; ; attempt++) {
    const resp = await fetch("/v1/inspect?heatmap=url", {
      method: "POST",
      headers: authHeaders(),
      body: form,
    });
    if (resp.status !== 503 || attempt >= 5) return resp;
    const wait = Number(resp.headers.get("Retry-After") || "1");
    await new Promise((r) => setTimeout(r, 1000 * Math.min(Math.max(wait, 1), 10)));
  }
}

async function fetchPng(url) {
  const resp = await fetch(url, { headers: authHeaders() });
  if (!resp.ok) throw new Error(await detailOf(resp));
  return URL.createObjectURL(await resp.blob());
}

async function inspect(file) {
  const entry = {
    id: state.nextId++,
    name: file.name || "pasted image",
    imageUrl: URL.createObjectURL(file),
    heatUrl: null,
    result: null,
    error: null,
    status: 0,
  };
  try {
    const resp = await postImage(file);
    entry.status = resp.status;
    if (!resp.ok) {
      entry.error = await detailOf(resp);
      if (resp.status === 401) {
        entry.error += " (enter the API token at the top right)";
        $("token").parentElement.classList.add("need");
      }
    } else {
      entry.result = await resp.json();
      if (entry.result.heatmap_url) {
        entry.heatUrl = await fetchPng(`${entry.result.heatmap_url}?alpha=1`);
        if (!(await decodable(entry.imageUrl))) {
          // e.g. TIFF, which browsers do not show: use the server's decoded copy
          URL.revokeObjectURL(entry.imageUrl);
          entry.imageUrl = await fetchPng(`${entry.result.heatmap_url}?alpha=0`);
        }
      }
    }
  } catch (err) {
    entry.error = `request failed: ${err.message || err}`;
  }
  addRecent(entry);
  show(entry);
}

function decodable(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(true);
    img.onerror = () => resolve(false);
    img.src = url;
  });
}

// ------------------------------------------------------------------ presenting

// The record's verdict words: "anomalous" | "normal" | "error" (no verdict).
function verdictOf(entry) {
  if (entry.error) return "error";
  return entry.result.verdict || "error";
}

function show(entry) {
  state.current = entry;
  const card = $("result");
  const v = verdictOf(entry);
  card.className = `result ${v}`;
  $("verdict").textContent = v === "error" ? `ERROR ${entry.status || ""}`.trim() : v.toUpperCase();
  $("name").textContent = entry.name;
  const r = entry.result;
  $("error").hidden = !entry.error;
  $("error").textContent = entry.error || "";
  $("ood").hidden = !(r && r.ood);
  $("ood").textContent = r && r.ood ? `Out of distribution: ${r.ood_reason}` : "";
  $("gauge").hidden = !r;
  $("panels").hidden = !r;
  $("legend").hidden = !r || !state.card;
  $("timing").textContent = r
    ? `${r.width}×${r.height} px · ${fmt(r.timing.total_ms)} ms on the server`
    : "";
  if (r) {
    $("score").textContent = fmt(r.score);
    $("threshold").textContent = fmt(r.threshold);
    $("normalized").textContent = r.normalized_score == null ? "—" : r.normalized_score.toFixed(3);
    const rel = ((r.score - r.threshold) / Math.abs(r.threshold || 1)) * 100;
    $("margin").textContent =
      rel >= 0 ? `(${rel.toFixed(1)}% above: defect suspected)` : `(${(-rel).toFixed(1)}% below: normal)`;
    const [dlo, dhi] = (state.card && state.card.display_range) || [0, 2 * r.threshold];
    const lo = Math.min(dlo, r.score);
    const hi = Math.max(dhi, r.score);
    const pos = (x) => `${(100 * (x - lo)) / (hi - lo || 1)}%`;
    $("fill").style.width = pos(r.score);
    $("tick").style.left = pos(r.threshold);
    $("image").src = entry.imageUrl;
    $("overlay-base").src = entry.imageUrl;
    $("overlay").src = entry.heatUrl || "";
    $("overlay").hidden = !entry.heatUrl;
    const m = $("marker");
    m.style.left = `${(100 * (r.map_max_x + 0.5)) / r.width}%`;
    m.style.top = `${(100 * (r.map_max_y + 0.5)) / r.height}%`;
    m.style.display = "block";
    m.title = `map maximum ${fmt(r.map_max)} at (${r.map_max_x}, ${r.map_max_y})`;
  }
  drawRegions(r);
  for (const li of $("recent").children) {
    li.classList.toggle("current", Number(li.dataset.id) === entry.id);
  }
}

// Defect regions: one absolutely positioned box per region over the overlay, placed in
// percent of the image so it follows the frame's size; the list under the panels names them.
function drawRegions(r) {
  const layer = $("regions");
  const list = $("region-list");
  layer.replaceChildren();
  list.replaceChildren();
  const regions = (r && r.regions) || [];
  $("region-info").hidden = !r;
  if (!r) return;
  $("region-count").textContent =
    `${regions.length} defect region${regions.length === 1 ? "" : "s"}` +
    ` (map ≥ ${fmt(r.region_threshold)})`;
  regions.forEach((g, k) => {
    const title = `region ${k + 1}: ${g.area} px, peak ${fmt(g.peak)}, mean ${fmt(g.mean)}`;
    const box = regionBox(g, r, title);
    box.dataset.index = String(k + 1);
    layer.appendChild(box);
    const li = document.createElement("li");
    li.textContent =
      `(${g.x0}, ${g.y0})–(${g.x1}, ${g.y1}), ${g.area} px, ` +
      `peak ${fmt(g.peak)}, mean ${fmt(g.mean)}`;
    list.appendChild(li);
  });
}

function addRecent(entry) {
  state.recent.unshift(entry);
  while (state.recent.length > MAX_RECENT) {
    const old = state.recent.pop();
    URL.revokeObjectURL(old.imageUrl);
    if (old.heatUrl) URL.revokeObjectURL(old.heatUrl);
  }
  renderRecent();
}

function renderRecent() {
  const list = $("recent");
  list.replaceChildren();
  let normal = 0;
  let anomalous = 0;
  let errors = 0;
  for (const e of state.recent) {
    const v = verdictOf(e);
    if (v === "normal") normal++;
    else if (v === "anomalous") anomalous++;
    else errors++;
    const li = document.createElement("li");
    li.className = v;
    li.dataset.id = e.id;
    li.title = e.error || `score ${fmt(e.result.score)} / threshold ${fmt(e.result.threshold)}`;
    const thumb = document.createElement(e.error ? "div" : "img");
    thumb.className = e.error ? "noimg" : "";
    if (e.error) {
      thumb.textContent = "✕";
    } else {
      thumb.src = e.imageUrl;
      thumb.alt = "";
    }
    const what = document.createElement("div");
    what.className = "what";
    const n = document.createElement("div");
    n.textContent = e.name;
    const sub = document.createElement("div");
    sub.className = "sub";
    sub.textContent = e.error ? e.error : `score ${fmt(e.result.score)}`;
    what.append(n, sub);
    const chip = document.createElement("span");
    chip.className = `chip ${v}`;
    chip.textContent = v === "error" ? "ERR" : v === "anomalous" ? "ANOM" : "OK";
    chip.title = v;
    li.append(thumb, what, chip);
    li.addEventListener("click", () => show(e));
    list.append(li);
  }
  $("recent-empty").hidden = state.recent.length > 0;
  $("counts").textContent = state.recent.length
    ? `${normal} normal · ${anomalous} anomalous${errors ? ` · ${errors} error` : ""}`
    : "";
  if (state.current) {
    for (const li of list.children) {
      li.classList.toggle("current", Number(li.dataset.id) === state.current.id);
    }
  }
}

// ------------------------------------------------------------------ wiring

function imageFiles(list) {
  return Array.from(list || []).filter(
    (f) => f.type.startsWith("image/") || /\.(tiff?|bmp|png|jpe?g|webp|gif)$/i.test(f.name),
  );
}

function setup() {
  const drop = $("drop");
  const picker = $("file");
  drop.addEventListener("click", () => picker.click());
  drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      picker.click();
    }
  });
  picker.addEventListener("change", () => {
    enqueue(imageFiles(picker.files));
    picker.value = "";
  });
  // The whole page accepts drops, so a near miss does not navigate away from it.
  window.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  });
  window.addEventListener("dragleave", (ev) => {
    if (ev.relatedTarget === null) drop.classList.remove("over");
  });
  window.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    enqueue(imageFiles(ev.dataTransfer && ev.dataTransfer.files));
  });
  window.addEventListener("paste", (ev) => {
    const items = Array.from((ev.clipboardData && ev.clipboardData.items) || []);
    const files = items
      .filter((it) => it.kind === "file" && it.type.startsWith("image/"))
      .map((it) => it.getAsFile())
      .filter(Boolean);
    if (files.length) {
      ev.preventDefault();
      enqueue(files);
    }
  });

  const slider = $("opacity");
  const saved = localStorage.getItem("patchcore-opacity");
  if (saved !== null) slider.value = saved;
  const applyOpacity = () => {
    $("overlay").style.opacity = String(slider.value / 100);
    $("opacity-value").textContent = `${slider.value}%`;
    localStorage.setItem("patchcore-opacity", slider.value);
  };
  slider.addEventListener("input", applyOpacity);
  applyOpacity();

  const token = $("token");
  token.value = state.token;
  token.addEventListener("change", () => {
    state.token = token.value.trim();
    sessionStorage.setItem("patchcore-token", state.token);
    loadModel();
  });

  loadModel();
}

setup();
