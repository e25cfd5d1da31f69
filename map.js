// retrieve.py --map's page (pages.map_page inlines this file, __ID__ its block's id): the
// collection on a canvas, pan and zoom, a filter box, a painting's neighbours on click.
(function () {
  "use strict";
  var root = document.getElementById("__ID__");
  var D = JSON.parse(root.querySelector("script.data").textContent);
  var n = D.n, xy = D.xy, sp = D.sp, tw = D.tw;
  var cv = root.querySelector("canvas"), ctx = cv.getContext("2d");
  var tip = root.querySelector(".tip"), side = root.querySelector(".side");
  var box = root.querySelector("input"), pick = root.querySelector("select");
  var count = root.querySelector(".count");
  var match = new Uint8Array(n).fill(1), sel = -1, queued = false, drag = null;
  var view = {s: 1, x: 0, y: 0}, W = 0, H = 0, dpr = window.devicePixelRatio || 1;
  var low = D.rows.map(function (r) { return r.map(function (v) { return v.toLowerCase(); }); });
  var any = low.map(function (r) { return r.join("\n"); });
  var frame = D.cat ? D.cat.map(function (c) { return D.legend[c][1]; }) : null;
  // Each sheet is copied once onto a canvas: drawing from an <img> let the browser drop and
  // re-decode the 4096 px JPEGs over and over (0.5-1.7 s frames at 5,000-20,000 paintings).
  // Small thumbnails come from a half-resolution copy: fewer source pixels per draw call
  // (worst zoom frame at 20,000 paintings, software canvas: 190 -> 100 ms).
  var halves = [];
  var sheets = D.sheets.map(function (src, s) {
    var im = new Image();
    im.onload = function () {
      var c = el("canvas"), h = el("canvas");
      c.width = im.width; c.height = im.height; c.getContext("2d").drawImage(im, 0, 0);
      h.width = Math.ceil(im.width / 2); h.height = Math.ceil(im.height / 2);
      h.getContext("2d").drawImage(im, 0, 0, h.width, h.height);
      sheets[s] = c; halves[s] = h; redraw();
    };
    im.src = src;
    return null;
  });

  function el(tag, cls, txt) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (txt !== undefined) e.textContent = txt;
    return e;
  }
  function fit() {  // canvas pixels follow its CSS size and the screen's pixel density
    W = cv.clientWidth; H = cv.clientHeight;
    cv.width = Math.round(W * dpr); cv.height = Math.round(H * dpr);
  }
  function reset() {  // the whole collection, as large as the canvas allows
    fit();
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (var i = 0; i < n; i++) {
      x0 = Math.min(x0, xy[2 * i]); x1 = Math.max(x1, xy[2 * i]);
      y0 = Math.min(y0, xy[2 * i + 1]); y1 = Math.max(y1, xy[2 * i + 1]);
    }
    var s = Math.min((W - 20) / (x1 - x0 + tw), (H - 20) / (y1 - y0 + tw));
    view = {s: s, x: W / 2 - s * (x0 + x1) / 2, y: H / 2 - s * (y0 + y1) / 2};
    redraw();
  }
  function redraw() { if (!queued) { queued = true; requestAnimationFrame(draw); } }
  function rect(i, px) {  // screen box of painting i when its longer side is px
    var k = 5 * i, w = sp[k + 3], h = sp[k + 4], f = px / Math.max(w, h, 1);
    return [xy[2 * i] * view.s + view.x - w * f / 2, xy[2 * i + 1] * view.s + view.y - h * f / 2,
            w * f, h * f];
  }
  function layer(on, px) {  // greyed-out paintings first, the matching ones over them
    ctx.globalAlpha = on ? 1 : 0.12;
    for (var i = 0; i < n; i++) {
      if (match[i] !== on) continue;
      var b = rect(i, px);
      if (b[0] > W || b[1] > H || b[0] + b[2] < 0 || b[1] + b[3] < 0) continue;
      var k = 5 * i, im = sheets[sp[k]];
      if (px < 10 || !im) {  // far out (or loading): a square of its class or mean colour
        ctx.fillStyle = frame ? frame[i] : D.colour[i]; ctx.fillRect(b[0], b[1], b[2], b[3]);
        continue;
      } else if (px < D.cell / 2) {
        ctx.drawImage(halves[sp[k]], sp[k + 1] / 2, sp[k + 2] / 2, sp[k + 3] / 2, sp[k + 4] / 2,
                      b[0], b[1], b[2], b[3]);
      } else {
        ctx.drawImage(im, sp[k + 1], sp[k + 2], sp[k + 3], sp[k + 4], b[0], b[1], b[2], b[3]);
      }
      if (frame) {  // --color-by: the thumbnail framed in its class's colour
        ctx.strokeStyle = frame[i]; ctx.lineWidth = Math.max(1.5, px / 16);
        ctx.strokeRect(b[0], b[1], b[2], b[3]);
      }
    }
    ctx.globalAlpha = 1;
  }
  function mark(i, colour, width) {
    var b = rect(i, Math.max(tw * view.s, 8));
    ctx.strokeStyle = colour; ctx.lineWidth = width;
    ctx.strokeRect(b[0] - 2, b[1] - 2, b[2] + 4, b[3] + 4);
  }
  function draw() {
    queued = false;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#f2f2f2"; ctx.fillRect(0, 0, W, H);
    var px = tw * view.s;
    layer(0, px); layer(1, px);
    if (sel >= 0) {
      D.nn[sel].forEach(function (j) { mark(j, "#1e5ac8", 2); });
      mark(sel, "#e60", 3);
    }
  }
  function hit(mx, my) {  // the painting under the pointer, a matching one when several
    var px = Math.max(tw * view.s, 6), best = -1, bd = Infinity;
    for (var i = 0; i < n; i++) {
      var b = rect(i, px);
      if (mx < b[0] || my < b[1] || mx > b[0] + b[2] || my > b[1] + b[3]) continue;
      var dx = mx - b[0] - b[2] / 2, dy = my - b[1] - b[3] / 2;
      var d = dx * dx + dy * dy + (match[i] ? 0 : 1e12);
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  }
  function thumb(i, max) {
    var k = 5 * i, w = sp[k + 3], h = sp[k + 4], f = max / Math.max(w, h, 1);
    var c = el("canvas"), g = c.getContext("2d"), im = sheets[sp[k]];
    c.width = Math.max(1, Math.round(w * f)); c.height = Math.max(1, Math.round(h * f));
    if (im) g.drawImage(im, sp[k + 1], sp[k + 2], w, h, 0, 0, c.width, c.height);
    else { g.fillStyle = D.colour[i]; g.fillRect(0, 0, c.width, c.height); }
    return c;
  }
  function field(table, name, v) {
    var tr = el("tr"), td = el("td");
    if (/^https?:\/\//.test(v)) {
      var a = el("a", null, name === "nga.gov" ? "nga.gov page" : "link");
      a.href = v; a.target = "_blank"; a.rel = "noopener"; td.appendChild(a);
    } else { td.textContent = v; }
    tr.appendChild(el("td", "k", name)); tr.appendChild(td); table.appendChild(tr);
  }
  function select(i, centre) {
    sel = i; side.textContent = "";
    if (i < 0) {
      side.appendChild(el("p", "k", "Click a painting to see it here with its " +
                          (D.nn.length ? D.nn[0].length : 0) + " nearest neighbours."));
      redraw(); return;
    }
    side.appendChild(thumb(i, 200));
    side.appendChild(el("div", "title", D.names[i]));
    var t = el("table");
    D.cols.forEach(function (c, j) { if (D.rows[i][j]) field(t, c, D.rows[i][j]); });
    if (D.links && D.links[i]) field(t, "nga.gov", D.links[i]);
    side.appendChild(t);
    side.appendChild(el("h3", null, "nearest neighbours"));
    D.nn[i].forEach(function (j, r) {
      var row = el("div", "nb");
      row.appendChild(thumb(j, 56));
      row.appendChild(el("span", null, (r + 1) + ". " + D.ns[i][r].toFixed(3) + "  " +
                         D.names[j]));
      row.onclick = function () { select(j, true); };
      side.appendChild(row);
    });
    if (centre) { view.x = W / 2 - xy[2 * i] * view.s; view.y = H / 2 - xy[2 * i + 1] * view.s; }
    redraw();
  }
  function filter() {
    var q = box.value.trim().toLowerCase(), c = +pick.value, hits = 0;
    for (var i = 0; i < n; i++) {
      var ok = !q || (c < 0 ? any[i] : low[i][c]).indexOf(q) >= 0;
      match[i] = ok ? 1 : 0; hits += ok ? 1 : 0;
    }
    count.textContent = q ? hits + " of " + n + " match" : n + " paintings";
    redraw();
  }
  function zoom(f, mx, my) {
    var s = Math.max(0.02, Math.min(view.s * f, 400));
    f = s / view.s; view.s = s;
    view.x = mx - (mx - view.x) * f; view.y = my - (my - view.y) * f;
    redraw();
  }
  function at(e) {
    var r = cv.getBoundingClientRect();
    return [e.clientX - r.left, e.clientY - r.top];
  }
  cv.addEventListener("pointerdown", function (e) {
    drag = {x: e.clientX, y: e.clientY, vx: view.x, vy: view.y, moved: false};
    cv.setPointerCapture(e.pointerId);
  });
  cv.addEventListener("pointermove", function (e) {
    var p = at(e);
    if (drag) {
      var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      if (drag.moved) {
        view.x = drag.vx + dx; view.y = drag.vy + dy; tip.style.display = "none"; redraw();
        return;
      }
    }
    var i = hit(p[0], p[1]);
    cv.style.cursor = i < 0 ? "grab" : "pointer";
    if (i < 0) { tip.style.display = "none"; return; }
    var by = D.by >= 0 ? D.rows[i][D.by] : "";
    tip.textContent = D.names[i] + (by ? " \u2014 " + by : "");
    tip.style.left = Math.min(p[0] + 14, W - 200) + "px"; tip.style.top = (p[1] + 14) + "px";
    tip.style.display = "block";
  });
  cv.addEventListener("pointerup", function (e) {
    if (drag && !drag.moved) { var p = at(e); select(hit(p[0], p[1]), false); }
    drag = null;
  });
  cv.addEventListener("pointerleave", function () { tip.style.display = "none"; });
  cv.addEventListener("wheel", function (e) {
    e.preventDefault();
    var p = at(e), dy = e.deltaY * (e.deltaMode === 1 ? 40 : 1);
    zoom(Math.exp(-dy * 0.0015), p[0], p[1]);
  }, {passive: false});
  root.querySelector(".zin").onclick = function () { zoom(1.5, W / 2, H / 2); };
  root.querySelector(".zout").onclick = function () { zoom(1 / 1.5, W / 2, H / 2); };
  root.querySelector(".reset").onclick = reset;
  root.querySelectorAll(".legend .item").forEach(function (it) {  // a class: only it
    it.onclick = function () {
      var v = it.getAttribute("data-v"), on = box.value !== v;
      pick.value = on ? D.colour_col : -1; box.value = on ? v : ""; filter();
    };
  });
  box.addEventListener("input", filter);
  pick.addEventListener("change", filter);
  window.addEventListener("resize", function () { fit(); redraw(); });
  reset(); filter(); select(-1, false);
})();
