// One defect region's box over an image, shared by the inspection page (app.js) and the review
// page (viewer.js): absolutely positioned in percent of the record's width and height, so it
// follows the frame's size. `g` is one of the record's regions, `r` the record.
"use strict";

function regionBox(g, r, title) {
  const box = document.createElement("div");
  box.className = "region";
  box.style.left = `${(100 * g.x0) / r.width}%`;
  box.style.top = `${(100 * g.y0) / r.height}%`;
  box.style.width = `${(100 * (g.x1 - g.x0)) / r.width}%`;
  box.style.height = `${(100 * (g.y1 - g.y0)) / r.height}%`;
  box.title = title;
  return box;
}
