// patchcore review: the image viewer (a modal dialog). The image, its heatmap on the model's
// display range with a colour bar, the defect regions at the page's threshold, the
// ground-truth outline, the record's fields, and the worst patch beside the nearest normal
// training patch. ← → step through the list it was opened from; Esc closes it.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const V = { list: [], pos: 0, token: 0 };
  const FIELDS = ["image", "verdict", "score", "threshold", "normalized_score", "width", "height",
    "map_max", "map_max_x", "map_max_y", "region_threshold", "error"];

  function fmt(x) {
    if (x === null || x === undefined) return "—";
    if (typeof x !== "number") return String(x);
    const a = Math.abs(x);
    return Number.isInteger(x) ? String(x) : a >= 1000 || (a < 0.01 && a > 0) ? x.toPrecision(4) : x.toFixed(4);
  }

  function drawRegions(r) {
    const layer = $("v-regions");
    layer.replaceChildren();
    for (const [k, g] of (r.regions || []).entries()) {
      layer.append(regionBox(g, r, `region ${k + 1}: ${g.area} px, peak ${fmt(g.peak)}`));
    }
  }

  function fields(r) {
    const rows = FIELDS.filter((k) => r[k] !== undefined).map((k) => `<tr><th>${k}</th><td>${fmt(r[k])}</td></tr>`);
    const truth = r.label ? `anomalous (${r.defect_type})` : "normal (good)";
    rows.splice(1, 0, `<tr><th>truth</th><td>${truth}</td></tr>`);
    const nreg = r.regions ? `${r.regions.length} (${r.regions_from === "record" ? "as scored" : "cut from the cached map at this threshold"})` : "—";
    rows.push(`<tr><th>regions</th><td>${nreg}</td></tr>`);
    if (r.excluded) rows.push(`<tr><th>note</th><td>marked as normal: left out of the metrics</td></tr>`);
    $("v-fields").innerHTML = rows.join("");
  }

  async function explain(i, token) {
    const img = $("v-explain");
    const text = $("v-explain-text");
    img.hidden = true;
    text.textContent = "finding the nearest normal training patch…";
    try {
      const resp = await fetch(`api/explain/${i}`, { cache: "no-store" });
      const e = await resp.json();
      if (token !== V.token) return;
      if (!resp.ok) { text.textContent = e.detail || "no explanation"; return; }
      text.textContent = `${e.caption}; worst patch rows ${e.box[0]}-${e.box[2]}, cols ${e.box[1]}-${e.box[3]}`;
      if (e.picture) {
        img.src = `api/explain/${i}/picture?m=${window.Review.S.state.model.digest.slice(0, 12)}`;
        img.hidden = false;
      }
    } catch (err) {
      text.textContent = `no explanation: ${err.message}`;
    }
  }

  async function show() {
    const i = V.list[V.pos];
    const token = ++V.token;
    const R = window.Review.S;
    const t = R.t;
    $("v-pos").textContent = `${V.pos + 1} of ${V.list.length}`;
    $("v-name").textContent = R.items.name[i];
    const resp = await fetch(`api/item/${i}?threshold=${encodeURIComponent(t)}`, { cache: "no-store" });
    const r = await resp.json();
    if (token !== V.token) return;
    const verdict = r.verdict || "error";
    const chip = $("v-verdict");
    chip.className = `chip ${verdict}`;
    chip.textContent = verdict;
    fields(r);
    const scored = r.score !== null && r.score !== undefined;
    $("v-image").src = `api/image/${i}`;
    $("v-base").src = `api/image/${i}`;
    $("v-heat").hidden = !scored;
    if (scored) $("v-heat").src = `api/heat/${i}?m=${R.state.model.digest.slice(0, 12)}`;
    for (const id of ["v-mask1", "v-mask2"]) {
      $(id).hidden = !r.has_mask || !$("v-showmask").checked;
      if (r.has_mask) $(id).src = `api/mask/${i}`;
    }
    const range = R.state.model.display_range;
    $("v-lo").textContent = range ? fmt(range[0]) : "each map's own min";
    $("v-hi").textContent = range ? fmt(range[1]) : "max";
    drawRegions(scored ? r : { regions: [] });
    if (scored) explain(i, token);
    else {
      $("v-explain").hidden = true;
      $("v-explain-text").textContent = r.error || "";
    }
  }

  function open(list, pos) {
    V.list = list;
    V.pos = Math.max(0, pos);
    const d = $("viewer");
    if (!d.open) d.showModal();
    show();
  }

  function setup() {
    const d = $("viewer");
    $("v-close").addEventListener("click", () => d.close());
    d.addEventListener("keydown", (ev) => {
      if (ev.target.tagName === "INPUT" && ev.target.type === "range") return;
      if (ev.key === "ArrowRight" && V.pos < V.list.length - 1) { V.pos++; show(); ev.preventDefault(); }
      if (ev.key === "ArrowLeft" && V.pos > 0) { V.pos--; show(); ev.preventDefault(); }
    });
    const op = $("v-opacity");
    op.addEventListener("input", () => { $("v-heat").style.opacity = String(op.value / 100); });
    $("v-showmask").addEventListener("change", () => {
      const has = $("v-mask1").getAttribute("src");
      for (const id of ["v-mask1", "v-mask2"]) $(id).hidden = !has || !$("v-showmask").checked;
    });
  }

  window.ReviewViewer = { open, V };
  setup();
})();
