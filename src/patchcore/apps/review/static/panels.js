// patchcore review: the tables shared by the threshold view, the "Mark as normal" panel and
// the comparison (confusion matrix, recall per defect type), and those two panels.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const fmt = (x) => window.ReviewFormat(x);

  function confusionHtml(cm) {
    const [[tn, fp], [fn, tp]] = cm;
    return `<thead><tr><th></th><th>judged normal</th><th>judged anomalous</th></tr></thead>` +
      `<tbody><tr><th class="row">normal</th><td class="ok">${tn}</td><td class="bad">${fp}</td></tr>` +
      `<tr><th class="row">anomalous</th><td class="bad">${fn}</td><td class="ok">${tp}</td></tr></tbody>`;
  }

  function perTypeHtml(per) {
    const rows = Object.entries(per).map(([name, v]) => {
      const what = name === "good" ? "good (judged normal)" : name;
      const low = v.recall < 0.5 ? " low" : "";
      return `<tr><td>${escapeHtml(what)}</td><td>${v.correct} / ${v.n}</td><td>${v.recall.toFixed(3)}</td>` +
        `<td><div class="bar"><span class="${low}" style="width:${(100 * v.recall).toFixed(1)}%"></span></div></td></tr>`;
    });
    return `<thead><tr><th>type</th><th>right</th><th>recall</th><th></th></tr></thead><tbody>${rows.join("")}</tbody>`;
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  // ------------------------------------------------------------------ update and compare panels

  function nameList(entries, empty) {
    if (!entries.length) return `<p class="muted">${empty}</p>`;
    return `<ul>${entries.map((e) => `<li><button class="linklike" data-open="${e.index}">${escapeHtml(e.name)}</button> ` +
      `${fmt(e.before)} → ${fmt(e.after)}</li>`).join("")}</ul>`;
  }

  function renderUpdate(state) {
    const u = state.last_update;
    $("update-panel").hidden = !u;
    if (!u) return;
    $("update").innerHTML =
      `<p>${u.marked.length} image(s) added to the memory bank: ${u.marked.map(escapeHtml).join(", ")}. ` +
      `They are left out of the metrics from now on. Compared at threshold ${fmt(u.threshold)} on ${u.counted} images:</p>` +
      `<div class="side"><div><h3>Before</h3><table class="confusion">${confusionHtml(u.before)}</table></div>` +
      `<div><h3>After</h3><table class="confusion">${confusionHtml(u.after)}</table></div></div>` +
      `<div class="update-lists"><div><h3>False positives that went away (${u.fp_gone.length})</h3>${nameList(u.fp_gone, "none")}</div>` +
      `<div><h3>True positives lost (${u.tp_lost.length})</h3>${nameList(u.tp_lost, "none: every defect flagged before is still flagged")}</div>` +
      `<div><h3>New false positives (${u.fp_new.length})</h3>${nameList(u.fp_new, "none")}</div>` +
      `<div><h3>Defects newly flagged (${u.tp_gained.length})</h3>${nameList(u.tp_gained, "none")}</div></div>`;
    wireOpeners($("update"));
  }

  function renderCompare(state) {
    const c = state.compare;
    const out = $("compare-out");
    if (!c) { out.replaceChildren(); return; }
    const col = (side, label) => {
      const m = side.metrics;
      return `<div><h3>${label}: ${escapeHtml(side.path)}</h3>` +
        `<p>image AUROC <b>${side.auroc === null ? "—" : side.auroc.toFixed(4)}</b> · threshold ${fmt(side.threshold)}` +
        `${side.threshold_method ? ` (${escapeHtml(side.threshold_method)})` : " (the page's)"}</p>` +
        `<table class="confusion">${confusionHtml(side.confusion)}</table>` +
        `<p class="muted">F1 ${m.F1Score.toFixed(3)} · precision ${m.Precision.toFixed(3)} · recall ${m.Recall.toFixed(3)} · FPR ${m.FalsePositiveRate.toFixed(3)}</p>` +
        `<table class="per-type">${perTypeHtml(Object.fromEntries(Object.entries(side.recall_by_type).map(
          ([k, r]) => [k, { recall: r, n: side.counts_by_type[k], correct: Math.round(r * side.counts_by_type[k]) }])))}</table></div>`;
    };
    const dis = c.disagree.map((d) => `<li><button class="linklike" data-open="${d.index}">${escapeHtml(d.name)}</button> ` +
      `(${escapeHtml(d.type)}): A ${d.a} ${fmt(d.score_a)}, B ${d.b} ${fmt(d.score_b)}</li>`).join("");
    out.innerHTML = `<div class="side">${col(c.a, "A")}${col(c.b, "B")}</div>` +
      (c.note ? `<p class="muted">${escapeHtml(c.note)}</p>` : "") +
      `<div class="disagree"><h3>The models disagree on ${c.disagree.length} of ${c.counted} images</h3>` +
      (dis ? `<ul>${dis}</ul>` : `<p class="muted">none</p>`) + `</div>`;
    wireOpeners(out);
  }

  function wireOpeners(root) {
    const buttons = Array.from(root.querySelectorAll("[data-open]"));
    const list = buttons.map((b) => Number(b.dataset.open));
    buttons.forEach((b, k) => b.addEventListener("click", () => window.ReviewViewer.open(list, k)));
  }

  window.ReviewPanels = { confusionHtml, perTypeHtml, escapeHtml, renderUpdate, renderCompare };
})();
