"""The report's interactive point-cloud view and page style, inlined into the HTML (no network, no library).

The view draws on a 2D canvas with its own projection and depth buffer rather than WebGL: a headless browser
without a GPU may have no WebGL at all, and ~20 k points redraw in a few milliseconds this way. Dragging rotates
the cloud, the wheel zooms. ``window.mmiadViewerReady`` becomes true after the first frame, for tests.
"""

from __future__ import annotations

BACKGROUND = (17, 17, 17)

_VIEWER_TEMPLATE = r"""
(function () {
  "use strict";
  var BG = __BACKGROUND__;
  var data = JSON.parse(document.getElementById("mmiad-clouds").textContent);
  var canvas = document.getElementById("mmiad-viewer");
  var select = document.getElementById("mmiad-cloud-select");
  var info = document.getElementById("mmiad-viewer-info");
  if (!canvas || !data.clouds.length) { window.mmiadViewerReady = true; return; }
  var ctx = canvas.getContext("2d");
  var view = { yaw: 0.35, pitch: -0.35, zoom: 1.0, points: null, colors: null, count: 0 };

  function bytes(b64) {
    var text = atob(b64), out = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) { out[i] = text.charCodeAt(i); }
    return out;
  }

  function load(index) {
    var cloud = data.clouds[index];
    var raw = bytes(cloud.positions), q = new Uint16Array(raw.buffer, 0, cloud.count * 3);
    var span = [0, 1, 2].map(function (a) { return cloud.high[a] - cloud.low[a]; });
    var extent = Math.max(span[0], span[1], span[2]) || 1;
    var points = new Float32Array(cloud.count * 3);
    for (var i = 0; i < cloud.count * 3; i++) {
      var a = i % 3;
      // Centre the box and scale its longest side to 2, keeping the true aspect ratio of the part.
      points[i] = ((q[i] / 65535 - 0.5) * span[a]) / extent * 2;
    }
    view.points = points;
    view.colors = bytes(cloud.colors);
    view.count = cloud.count;
    info.textContent = cloud.title + " — " + cloud.count + " points (drag to rotate, wheel to zoom)";
    render();
  }

  function render() {
    var w = canvas.width, h = canvas.height;
    var image = ctx.createImageData(w, h), px = image.data;
    for (var i = 0; i < w * h; i++) {
      px[4 * i] = BG[0]; px[4 * i + 1] = BG[1]; px[4 * i + 2] = BG[2]; px[4 * i + 3] = 255;
    }
    var depth = new Float32Array(w * h).fill(Infinity);
    var cy = Math.cos(view.yaw), sy = Math.sin(view.yaw), cp = Math.cos(view.pitch), sp = Math.sin(view.pitch);
    var scale = 0.45 * Math.min(w, h) * view.zoom, p = view.points, drawn = 0;
    // Sparse clouds get bigger dots so the surface still reads as one.
    var dot = Math.max(2, Math.min(6, Math.round(Math.sqrt((0.05 * w * h * view.zoom) / Math.max(view.count, 1)))));
    for (var n = 0; n < view.count; n++) {
      // Camera frame of the organised cloud: x right, y down, z away from the camera.
      var x = p[3 * n], y = p[3 * n + 1], z = p[3 * n + 2];
      var x1 = cy * x + sy * z, z1 = -sy * x + cy * z;
      var y2 = cp * y - sp * z1, z2 = sp * y + cp * z1;
      var u = Math.round(w / 2 + x1 * scale), v = Math.round(h / 2 + y2 * scale);
      if (u < 0 || v < 0 || u > w - dot || v > h - dot) { continue; }
      var rgb = data.ramp[view.colors[n]];
      for (var dv = 0; dv < dot; dv++) {
        for (var du = 0; du < dot; du++) {
          var k = (v + dv) * w + u + du;
          if (z2 < depth[k]) {
            depth[k] = z2; px[4 * k] = rgb[0]; px[4 * k + 1] = rgb[1]; px[4 * k + 2] = rgb[2];
          }
        }
      }
      drawn++;
    }
    ctx.putImageData(image, 0, 0);
    window.mmiadViewerDrawn = drawn;
    window.mmiadViewerReady = true;
  }

  var drag = null;
  canvas.addEventListener("pointerdown", function (e) {
    drag = [e.clientX, e.clientY];
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointerup", function () { drag = null; });
  canvas.addEventListener("pointermove", function (e) {
    if (!drag) { return; }
    view.yaw += (e.clientX - drag[0]) * 0.01;
    view.pitch = Math.max(-1.55, Math.min(1.55, view.pitch - (e.clientY - drag[1]) * 0.01));
    drag = [e.clientX, e.clientY];
    render();
  });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    view.zoom = Math.max(0.2, Math.min(8, view.zoom * (e.deltaY < 0 ? 1.1 : 1 / 1.1)));
    render();
  }, { passive: false });
  select.addEventListener("change", function () { load(Number(select.value)); });
  document.querySelectorAll("button[data-cloud]").forEach(function (button) {
    button.addEventListener("click", function () {
      select.value = button.getAttribute("data-cloud");
      load(Number(select.value));
      canvas.scrollIntoView({ behavior: "smooth", block: "center" });
    });
  });
  window.mmiadViewer = { load: load, view: view };
  load(0);
})();
"""
VIEWER_JS = _VIEWER_TEMPLATE.replace("__BACKGROUND__", str(list(BACKGROUND)))

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table.metrics { border-collapse: collapse; margin: 1em 0; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics tr.mean td { font-weight: bold; background: #eee; }
.meta { color: #555; font-size: 0.9em; }
.plots { display: flex; gap: 1em; flex-wrap: wrap; }
svg.plot { background: #fff; border: 1px solid #ddd; font-size: 10px; }
svg.plot .frame { fill: none; stroke: #888; } svg.plot .grid { stroke: #eee; }
svg.plot .curve, svg.plot .roc, svg.plot .pro { fill: none; stroke: #c0392b; stroke-width: 1.6; }
svg.plot .chance { fill: none; stroke: #aaa; stroke-dasharray: 4 3; }
svg.plot .title { font-size: 12px; font-weight: bold; } svg.plot .empty { fill: #999; font-size: 14px; }
.gallery { display: flex; flex-direction: column; gap: 0.8em; }
.card { background: #fff; border: 1px solid #ddd; padding: 0.5em; }
.card.FP, .card.FN { border-left: 5px solid #c0392b; } .card.TP, .card.TN { border-left: 5px solid #27ae60; }
.card .head { font-size: 0.9em; margin-bottom: 0.3em; }
.card .pictures { display: flex; gap: 0.4em; flex-wrap: wrap; }
figure { margin: 0; text-align: center; font-size: 0.75em; color: #555; }
figure img { width: 128px; height: 128px; image-rendering: pixelated; display: block; border: 1px solid #ddd; }
#mmiad-viewer { background: rgb(17, 17, 17); cursor: grab; touch-action: none; max-width: 100%; }
.badge { font-weight: bold; padding: 0 0.4em; border-radius: 3px; background: #eee; }
"""
