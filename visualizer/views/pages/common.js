/* visualizer pages: shared helpers.  Plain JavaScript, no framework, no network.
 * Text from the data (tokens, titles, layer names) reaches the page only through
 * textContent and canvas fillText, never as HTML. */
"use strict";
var VZ = (function () {
  var VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
                 [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];

  function colour(t) {
    if (!(t > 0)) { t = 0; }
    if (t > 1) { t = 1; }
    var x = t * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - i;
    var a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return [Math.round(a[0] + (b[0] - a[0]) * f), Math.round(a[1] + (b[1] - a[1]) * f),
            Math.round(a[2] + (b[2] - a[2]) * f)];
  }

  function rgba(t, alpha) {
    var c = colour(t);
    return "rgba(" + c[0] + "," + c[1] + "," + c[2] + "," + alpha + ")";
  }

  /* Shade a token's span by t in [0, 1] (null: no shade), dark text on light colours. */
  function shade(span, t) {
    span.style.backgroundColor = t === null ? "" : rgba(t, 0.15 + 0.75 * t);
    span.style.color = t !== null && t > 0.6 ? "#000" : "";
  }

  function bytes(text) {
    var s = atob(text), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) { out[i] = s.charCodeAt(i); }
    return out;
  }

  /* Maps of shape (..., n, n): float32 exact, or 8-bit codes with one scale per row. */
  function Maps(enc) {
    this.shape = enc.shape;
    this.n = enc.shape[enc.shape.length - 1];
    this.dtype = enc.dtype;
    var raw = bytes(enc.data);
    if (enc.dtype === "f4") {
      this.f = new Float32Array(raw.buffer, 0, raw.length / 4);
    } else {
      this.u = raw;
      var s = bytes(enc.scales);
      this.s = new Float32Array(s.buffer, 0, s.length / 4);
    }
  }
  /* Row number r of the flattened (rows, n) maps, as a new Float32Array. */
  Maps.prototype.flatRow = function (r) {
    var n = this.n, out = new Float32Array(n), off = r * n, i;
    if (this.f) {
      for (i = 0; i < n; i++) { out[i] = this.f[off + i]; }
    } else {
      var scale = this.s[r] / 255;
      for (i = 0; i < n; i++) { out[i] = this.u[off + i] * scale; }
    }
    return out;
  };
  /* Row i of layer l, head h (h < 0: the mean of the heads) of (layers, heads, n, n) maps. */
  Maps.prototype.row = function (l, h, i) {
    var heads = this.shape[1], n = this.n;
    if (h >= 0) { return this.flatRow((l * heads + h) * n + i); }
    var out = new Float32Array(n);
    for (var k = 0; k < heads; k++) {
      var r = this.flatRow((l * heads + k) * n + i);
      for (var j = 0; j < n; j++) { out[j] += r[j]; }
    }
    for (var m = 0; m < n; m++) { out[m] /= heads; }
    return out;
  };
  /* Column j of layer l, head h: how much each query gives key j. */
  Maps.prototype.column = function (l, h, j) {
    var n = this.n, out = new Float32Array(n);
    for (var i = 0; i < n; i++) { out[i] = this.row(l, h, i)[j]; }
    return out;
  };

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }

  /* A token as a <bdi> (its direction its own: right-to-left neighbours keep their order),
   * shown visibly, cut to `count` characters when given (the whole token in a readout). */
  function token(text, count, cls) {
    var shown = visible(text);
    return el("bdi", cls || "vz-token", count ? short(shown, count) : shown);
  }

  /* A labelled <select>; options are [value, text] pairs. */
  function select(label, options, value, onchange) {
    var wrap = el("label", "vz-control");
    wrap.appendChild(el("span", "vz-control-label", label));
    var sel = el("select");
    options.forEach(function (o) {
      var opt = el("option", null, o[1]);
      opt.value = String(o[0]);
      sel.appendChild(opt);
    });
    sel.value = String(value);
    sel.addEventListener("change", function () { onchange(parseInt(sel.value, 10)); });
    wrap.appendChild(sel);
    return {root: wrap, sel: sel};
  }

  function layerOptions(data) {
    return data.layers.map(function (name, i) { return [i, name]; });
  }

  function headOptions(heads) {
    var out = [[-1, "mean of " + heads + " heads"]];
    for (var h = 0; h < heads; h++) { out.push([h, "head " + h]); }
    return out;
  }

  /* Characters that draw nothing or move text (controls, zero-width spaces, bidi controls,
   * line and paragraph separators) are shown as their code point, so a token never hides,
   * splits a line or reorders its neighbours.  U+200C/U+200D (joiners) are left alone:
   * emoji sequences and Persian or Indic words need them. */
  var INVISIBLE = new RegExp("[\\u0000-\\u001f\\u007f-\\u009f\\u00ad\\u061c\\u180e" +
    "\\u200b\\u200e\\u200f\\u2028-\\u202e\\u2060-\\u2064\\u2066-\\u206f\\ufeff" +
    "\\ufff9-\\ufffb]", "g");
  var ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "\u2423"};
  var LONGEST = 400;  // characters kept before measuring: no label is drawn wider

  function codePoint(c) {
    return ESCAPES[c] || "\u27e8U+" + ("000" + c.charCodeAt(0).toString(16).toUpperCase()).slice(-4) +
      "\u27e9";
  }

  /* A token as it is shown: invisible characters made visible, an empty token as a
   * placeholder, a token of spaces alone as open boxes. */
  function visible(token) {
    token = String(token);
    if (token === "") { return "\u27e8empty\u27e9"; }
    if (!/\S/.test(token)) { return token.replace(/[\s\S]/g, codePoint); }
    return token.replace(INVISIBLE, codePoint);
  }

  /* The first `count` characters of `text` and an ellipsis; a surrogate pair is never cut
   * in two. */
  function cutAt(text, count) {
    var code = text.charCodeAt(count - 1);
    if (count > 0 && code >= 0xd800 && code <= 0xdbff) { count -= 1; }
    return text.slice(0, count) + "\u2026";
  }

  /* `text`, or its first `count` characters and an ellipsis if it is longer. */
  function short(text, count) {
    return text.length <= count ? text : cutAt(text, count);
  }

  /* `text` cut to fit `width` pixels in the context's font, with an ellipsis: a binary
   * search over a bounded prefix, so a token of any length costs a dozen measurements
   * (cutting one character at a time was quadratic in the token's length). */
  function clip(ctx, text, width) {
    if (text.length <= LONGEST && ctx.measureText(text).width <= width) { return text; }
    text = text.slice(0, LONGEST);
    var lo = 0, hi = text.length;
    while (lo < hi) {
      var mid = (lo + hi + 1) >> 1;
      if (ctx.measureText(text.slice(0, mid) + "\u2026").width <= width) { lo = mid; } else { hi = mid - 1; }
    }
    return cutAt(text, lo);
  }

  function fmt(v) { return v === 0 ? "0" : Number(v).toPrecision(3); }

  function maxOf(a) {
    var m = 0;
    for (var i = 0; i < a.length; i++) { if (a[i] > m) { m = a[i]; } }
    return m;
  }

  /* Indices of the k largest values of a, largest first.  Weights of exactly 0 are left
   * out: under a causal or padding mask they are keys the query could not see. */
  function top(a, k) {
    var idx = [];
    for (var i = 0; i < a.length; i++) { if (a[i] !== 0) { idx.push(i); } }
    idx.sort(function (x, y) { return a[y] - a[x]; });
    return idx.slice(0, k);
  }

  /* The values a page shows, exactly, for tests and for copying. */
  function valuesText(a) {
    var parts = [];
    for (var i = 0; i < a.length; i++) { parts.push(String(a[i])); }
    return parts.join(",");
  }

  function setupCanvas(canvas, width, height) {
    var ratio = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(width * ratio));
    canvas.height = Math.max(1, Math.round(height * ratio));
    canvas.style.width = width + "px";
    canvas.style.height = height + "px";
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return ctx;
  }

  /* A horizontal colour bar from 0 to max with its label. */
  function colourbar(label) {
    var wrap = el("div", "vz-colourbar");
    var canvas = el("canvas");
    var lo = el("span", "vz-cb-lo", "0"), hi = el("span", "vz-cb-hi", "");
    var name = el("span", "vz-cb-label", label);
    wrap.appendChild(lo); wrap.appendChild(canvas); wrap.appendChild(hi); wrap.appendChild(name);
    var ctx = setupCanvas(canvas, 160, 10);
    for (var x = 0; x < 160; x++) { ctx.fillStyle = rgba(x / 159, 1); ctx.fillRect(x, 0, 1, 10); }
    return {root: wrap, set: function (max, text) {
      hi.textContent = fmt(max);
      if (text) { name.textContent = text; }
    }};
  }

  function header(root, data) {
    var head = el("div", "vz-header");
    head.appendChild(el("h1", "vz-title", data.title));
    if (data.note) { head.appendChild(el("p", "vz-note", data.note)); }
    root.appendChild(head);
  }

  var views = {};

  function start(uid) {
    var root = document.getElementById("vz-" + uid);
    var data = JSON.parse(document.getElementById("vz-data-" + uid).textContent);
    header(root, data);
    views[data.view](root, data);
    root.setAttribute("data-ready", "1");
    if (window.performance && performance.mark) { performance.mark("vz-ready"); }
  }

  return {colour: colour, rgba: rgba, shade: shade, bytes: bytes, Maps: Maps, el: el,
          select: select, layerOptions: layerOptions, headOptions: headOptions, fmt: fmt, maxOf: maxOf,
          visible: visible, short: short, clip: clip, token: token,
          top: top, valuesText: valuesText, setupCanvas: setupCanvas, colourbar: colourbar,
          views: views, start: start};
})();
