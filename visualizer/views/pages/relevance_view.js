/* Relevance view: which tokens (or image patches) an output rests on, one explained output at a
 * time and one method at a time (relevance, rollout, raw attention, ...).  With an image the
 * patches are shaded over it; otherwise the tokens are, and for a generated token the tokens
 * after it are greyed. */
(function () {
  var el = VZ.el;

  function rows(enc, k, n) {
    var raw = VZ.bytes(enc), all = new Float32Array(raw.buffer, 0, raw.length / 4), out = [];
    for (var r = 0; r < k; r++) { out.push(all.subarray(r * n, (r + 1) * n)); }
    return out;
  }

  VZ.views.relevance = function (root, data) {
    var k = data.k, n = data.n, prefix = data.prefix || 0;
    var values = data.values.map(function (enc) { return rows(enc, k, n); });
    var state = {target: 0, method: 0};

    var controls = el("div", "vz-controls");
    if (k > 1) {
      controls.appendChild(VZ.select("explaining", data.targets.map(function (t, i) {
        return [i, t];
      }), 0, function (v) { state.target = v; draw(); }).root);
    }
    if (data.methods.length > 1) {
      controls.appendChild(VZ.select("method", data.methods.map(function (m, i) {
        return [i, m];
      }), 0, function (v) { state.method = v; draw(); }).root);
    }
    var bar = VZ.colourbar(data.image ? "share over the patches" : "relevance");
    controls.appendChild(bar.root);
    root.appendChild(controls);
    var readout = el("div", "vz-readout");
    readout.setAttribute("data-view", "relevance");
    root.appendChild(readout);

    var paint = data.image ? imagePainter(root, data, prefix) : textPainter(root, data);

    function draw() {
      var v = values[state.method][state.target];
      var limit = data.positions ? data.positions[state.target] : n;  // tokens it may rest on
      var shown = paint(v, limit, state.target);
      bar.set(shown.max);
      readout.textContent = "";
      readout.appendChild(el("b", null, data.methods[state.method]));
      readout.appendChild(el("span", null, " for " + data.targets[state.target] + "; most on: "));
      VZ.top(shown.values, 3).forEach(function (j, i) {
        if (i) { readout.appendChild(el("span", null, ", ")); }
        readout.appendChild(el("span", "vz-token", shown.names(j)));
        readout.appendChild(el("span", null, " " + VZ.fmt(shown.values[j])));
      });
      readout.setAttribute("data-target", String(state.target));
      readout.setAttribute("data-method", data.methods[state.method]);
      readout.setAttribute("data-values", VZ.valuesText(v));
    }
    draw();
  };

  function textPainter(root, data) {
    var text = el("div", "vz-text"), p = data.positions;
    var spans = data.tokens.map(function (label, i) {
      var s = el("span", "vz-tok", label);
      s.setAttribute("data-index", String(i));
      text.appendChild(s);
      return s;
    });
    root.appendChild(text);
    return function (v, limit, target) {
      var before = v.slice(0, limit), max = VZ.maxOf(before);
      spans.forEach(function (s, i) {
        s.classList.toggle("vz-current", p ? i === p[target] : false);
        s.classList.toggle("vz-future", i >= limit && !(p && i === p[target]));
        VZ.shade(s, i < limit && max > 0 && v[i] > 0 ? v[i] / max : null);
        s.title = i < limit ? "relevance " + VZ.fmt(v[i]) : "";
      });
      return {max: max, values: before, names: function (j) { return data.tokens[j]; }};
    };
  }

  function imagePainter(root, data, prefix) {
    var rows = data.grid[0], cols = data.grid[1];
    var ih = data.image_size[0], iw = data.image_size[1];
    var scale = Math.max(1, 448 / Math.max(ih, iw));
    var w = Math.round(iw * scale), h = Math.round(ih * scale), pw = w / cols, ph = h / rows;
    var canvas = el("canvas", "vz-image-canvas");
    var wrap = el("div", "vz-canvas-wrap");
    wrap.appendChild(canvas);
    root.appendChild(wrap);
    var ctx = VZ.setupCanvas(canvas, w, h);
    var img = new Image(), loaded = false, last = null;
    img.onload = function () { loaded = true; if (last) { paint(last[0], last[1]); } };
    img.src = data.image;
    function paint(v) {
      last = [v];
      var patches = v.slice(prefix), total = 0, i;
      for (i = 0; i < patches.length; i++) { if (patches[i] > 0) { total += patches[i]; } }
      var share = new Float32Array(patches.length);
      for (i = 0; i < patches.length; i++) { share[i] = total > 0 && patches[i] > 0 ? patches[i] / total : 0; }
      var max = VZ.maxOf(share);
      ctx.clearRect(0, 0, w, h);
      if (loaded) { ctx.imageSmoothingEnabled = false; ctx.drawImage(img, 0, 0, w, h); }
      for (i = 0; i < patches.length; i++) {
        ctx.fillStyle = VZ.rgba(max > 0 ? share[i] / max : 0, 0.6);
        ctx.fillRect((i % cols) * pw, Math.floor(i / cols) * ph, pw, ph);
      }
      return {max: max, values: share, names: function (j) {
        return "patch (row " + Math.floor(j / cols) + ", col " + (j % cols) + ")";
      }};
    }
    return paint;
  }
})();
