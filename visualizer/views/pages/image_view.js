/* Image view: the image the model saw with one query's attention over its patches.
 * Hover a patch to make it the query, click to pin it, or pick the CLS query; choose the
 * layer, a head or their mean, or the attention rollout through the chosen layer. */
(function () {
  var el = VZ.el;

  VZ.views.image = function (root, data) {
    var maps = new VZ.Maps(data.maps);
    var roll = data.rollout ? new VZ.Maps(data.rollout) : null;
    var rows = data.grid[0], cols = data.grid[1], prefix = data.prefix, n = maps.n;
    var state = {layer: data.layers.length - 1, head: data.heads > 1 ? -1 : 0,
                 mode: "attention", query: prefix > 0 ? -1 : 0, pinned: false};

    var controls = el("div", "vz-controls");
    var layerSel = VZ.select("layer", VZ.layerOptions(data), state.layer, function (v) {
      state.layer = v; draw();
    });
    var headSel = VZ.select("head", VZ.headOptions(data.heads), state.head, function (v) {
      state.head = v; draw();
    });
    var modes = [[0, "attention"]];
    if (roll) { modes.push([1, "rollout through this layer"]); }
    var modeSel = VZ.select("show", modes, 0, function (v) {
      state.mode = v === 1 ? "rollout" : "attention";
      headSel.sel.disabled = state.mode === "rollout";
      draw();
    });
    controls.appendChild(layerSel.root);
    controls.appendChild(headSel.root);
    controls.appendChild(modeSel.root);
    if (prefix > 0) {
      var cls = el("button", "vz-button", "CLS query");
      cls.type = "button";
      cls.addEventListener("click", function () { state.query = -1; state.pinned = true; draw(); });
      controls.appendChild(cls);
    }
    var bar = VZ.colourbar("share of the query's attention over the patches (0 to the largest patch)");
    controls.appendChild(bar.root);
    root.appendChild(controls);

    var readout = el("div", "vz-readout", "");
    readout.setAttribute("data-view", "image");
    root.appendChild(readout);

    var ih = data.image_size[0], iw = data.image_size[1];
    var scale = Math.max(1, 448 / Math.max(ih, iw));
    var w = Math.round(iw * scale), hgt = Math.round(ih * scale), margin = 26;
    var pw = w / cols, ph = hgt / rows;
    var canvas = el("canvas", "vz-image-canvas");
    canvas.setAttribute("data-margin", String(margin));
    canvas.setAttribute("data-patch-width", String(pw));
    canvas.setAttribute("data-patch-height", String(ph));
    var wrap = el("div", "vz-canvas-wrap");
    wrap.appendChild(canvas);
    root.appendChild(wrap);
    var ctx = VZ.setupCanvas(canvas, w + margin, hgt + margin);
    var img = new Image();
    var loaded = false;
    img.onload = function () { loaded = true; draw(); };
    img.src = data.image;

    function row() {
      var token = state.query < 0 ? 0 : prefix + state.query;
      if (state.mode === "rollout") { return roll.flatRow(state.layer * n + token); }
      return maps.row(state.layer, state.head, token);
    }

    function draw() {
      ctx.clearRect(0, 0, w + margin, hgt + margin);
      ctx.save();
      ctx.translate(margin, margin);
      if (loaded) {
        ctx.imageSmoothingEnabled = false;
        ctx.drawImage(img, 0, 0, w, hgt);
      }
      var r = row(), patches = r.slice(prefix), total = 0, i;
      for (i = 0; i < patches.length; i++) { total += patches[i]; }
      var share = new Float32Array(patches.length), best = 0;
      for (i = 0; i < patches.length; i++) {
        share[i] = total > 0 ? patches[i] / total : 0;
        if (share[i] > share[best]) { best = i; }
      }
      var smax = share[best];
      for (i = 0; i < patches.length; i++) {
        var t = smax > 0 ? share[i] / smax : 0;
        ctx.fillStyle = VZ.rgba(t, 0.6);
        ctx.fillRect((i % cols) * pw, Math.floor(i / cols) * ph, pw, ph);
      }
      if (state.query >= 0) {
        ctx.strokeStyle = "#fff";
        ctx.lineWidth = 2.5;
        ctx.strokeRect((state.query % cols) * pw + 1, Math.floor(state.query / cols) * ph + 1,
                       pw - 2, ph - 2);
        ctx.strokeStyle = "#000";
        ctx.lineWidth = 1;
        ctx.strokeRect((state.query % cols) * pw, Math.floor(state.query / cols) * ph, pw, ph);
      }
      ctx.restore();
      // patch coordinates: column numbers on top, row numbers on the left
      ctx.fillStyle = "#333";
      ctx.font = "10px sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      var every = Math.max(1, Math.ceil(16 / Math.min(pw, ph)));
      for (var c = 0; c < cols; c += every) { ctx.fillText(String(c), margin + (c + 0.5) * pw, margin / 2); }
      for (var rr = 0; rr < rows; rr += every) { ctx.fillText(String(rr), margin / 2, margin + (rr + 0.5) * ph); }
      bar.set(smax);
      report(r, patches, share, best, total);
    }

    function name(q) {
      return q < 0 ? "CLS" : "patch (row " + Math.floor(q / cols) + ", col " + (q % cols) + ")";
    }

    function report(r, patches, share, best, total) {
      var what = state.mode === "rollout" ? "rollout through " + data.layers[state.layer]
        : data.layers[state.layer] + ", " + (state.head < 0 ? "mean of heads" : "head " + state.head);
      readout.textContent = "";
      readout.appendChild(el("b", null, "query " + name(state.query)));
      readout.appendChild(el("span", null, " (" + what + "): " + VZ.fmt(total) +
        " of its attention on the patches" + (prefix ? ", " + VZ.fmt(1 - total) + " on " +
        prefix + " prefix token" + (prefix > 1 ? "s" : "") : "") + "; most on " + name(best) +
        " (" + VZ.fmt(share[best]) + " of the patch share)"));
      readout.setAttribute("data-layer", String(state.layer));
      readout.setAttribute("data-head", String(state.head));
      readout.setAttribute("data-mode", state.mode);
      readout.setAttribute("data-query", String(state.query));
      readout.setAttribute("data-values", VZ.valuesText(patches));
      readout.setAttribute("data-prefix-values", VZ.valuesText(r.slice(0, prefix)));
    }

    function at(event) {
      var box = canvas.getBoundingClientRect();
      var x = event.clientX - box.left - margin, y = event.clientY - box.top - margin;
      if (x < 0 || y < 0 || x >= w || y >= hgt) { return null; }
      return Math.min(rows - 1, Math.floor(y / ph)) * cols + Math.min(cols - 1, Math.floor(x / pw));
    }
    canvas.addEventListener("mousemove", function (event) {
      if (state.pinned) { return; }
      var q = at(event);
      if (q === null || q === state.query) { return; }
      state.query = q; draw();
    });
    canvas.addEventListener("click", function (event) {
      var q = at(event);
      if (q === null) { return; }
      if (state.pinned && q === state.query) { state.pinned = false; }
      else { state.query = q; state.pinned = true; }
      draw();
    });
    draw();
  };
})();
