/* Head view: the tokens twice, queries on the left and keys on the right; hover a token
 * to see where it attends (left) or who attends to it (right).  Drawn on one canvas so
 * that thousands of tokens stay responsive; labels are drawn when rows are tall enough. */
(function () {
  var el = VZ.el;

  function rowHeight(n) {
    if (n <= 60) { return 20; }
    if (n <= 600) { return 12; }
    return Math.max(1, Math.floor(2400 / n));
  }

  /* The head panel inside `container`; returns {set(layer, head), draw()}. */
  VZ.headPanel = function (container, data, maps) {
    var labels = data.labels, n = maps.n;
    var state = {layer: 0, head: data.heads > 1 ? -1 : 0, side: null, index: -1, pinned: false};
    var controls = el("div", "vz-controls");
    var layerSel = VZ.select("layer", VZ.layerOptions(data), 0, function (v) {
      state.layer = v; draw();
    });
    var headSel = VZ.select("head", VZ.headOptions(data.heads), state.head, function (v) {
      state.head = v; draw();
    });
    controls.appendChild(layerSel.root);
    controls.appendChild(headSel.root);
    var bar = VZ.colourbar("attention weight: hover a token");
    controls.appendChild(bar.root);
    container.appendChild(controls);

    var readout = el("div", "vz-readout", n <= 64 ? "hover a token" :
                     "hover a token (lines are drawn for the hovered token only)");
    readout.setAttribute("data-view", "head");
    container.appendChild(readout);

    var h = rowHeight(n), fontPx = Math.min(13, h - 6), showText = h >= 10;
    var measure = document.createElement("canvas").getContext("2d");
    measure.font = fontPx + "px sans-serif";
    var textW = 40, seen = labels.map(VZ.visible);
    if (showText) {
      for (var i = 0; i < n; i++) {
        textW = Math.max(textW, Math.min(200, measure.measureText(VZ.short(seen[i], 200)).width + 12));
      }
    }
    var gap = 160, top = 6, width = 2 * textW + gap, height = top * 2 + n * h;
    var leftX = textW, rightX = textW + gap;
    var wrap = el("div", "vz-canvas-wrap");
    var canvas = el("canvas", "vz-head-canvas");
    canvas.setAttribute("data-row-height", String(h));
    canvas.setAttribute("data-top", String(top));
    canvas.setAttribute("data-left-x", String(leftX / 2));
    canvas.setAttribute("data-right-x", String(rightX + textW / 2));
    wrap.appendChild(canvas);
    container.appendChild(wrap);
    var ctx = VZ.setupCanvas(canvas, width, height);

    var shown = showText ? seen.map(function (text) { return VZ.clip(measure, text, textW - 12); })
      : null;

    function y(i) { return top + i * h + h / 2; }

    function drawLabels(weights, side) {
      ctx.font = fontPx + "px sans-serif";
      ctx.textBaseline = "middle";
      var wmax = weights ? VZ.maxOf(weights) : 0;
      for (var i = 0; i < n; i++) {
        // the shaded column is the other side of the hovered token
        if (weights && wmax > 0) {
          ctx.fillStyle = VZ.rgba(weights[i] / wmax, 0.25 + 0.6 * weights[i] / wmax);
          if (side === "query") { ctx.fillRect(rightX, top + i * h, textW, h - (h > 3 ? 1 : 0)); }
          else { ctx.fillRect(0, top + i * h, textW, h - (h > 3 ? 1 : 0)); }
        }
        if (state.index === i && state.side) {
          ctx.fillStyle = "rgba(255,170,0,0.55)";
          if (state.side === "query") { ctx.fillRect(0, top + i * h, textW, h); }
          else { ctx.fillRect(rightX, top + i * h, textW, h); }
        }
        if (showText) {
          ctx.fillStyle = "#222";
          ctx.textAlign = "right";
          ctx.fillText(shown[i], leftX - 6, y(i));
          ctx.textAlign = "left";
          ctx.fillText(shown[i], rightX + 6, y(i));
        } else {
          ctx.fillStyle = "rgba(0,0,0,0.12)";
          ctx.fillRect(leftX - 4, top + i * h, 3, Math.max(1, h - 1));
          ctx.fillRect(rightX + 1, top + i * h, 3, Math.max(1, h - 1));
        }
      }
    }

    function line(i, j, alpha, width) {
      ctx.strokeStyle = "rgba(31,119,180," + alpha + ")";
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.moveTo(leftX, y(i));
      ctx.lineTo(rightX, y(j));
      ctx.stroke();
    }

    function draw() {
      ctx.clearRect(0, 0, width, height);
      var weights = null;
      if (state.side === "query") {
        weights = maps.row(state.layer, state.head, state.index);
      } else if (state.side === "key") {
        weights = maps.column(state.layer, state.head, state.index);
      }
      if (weights) {
        var wmax = VZ.maxOf(weights);
        for (var j = 0; j < n; j++) {
          var t = wmax > 0 ? weights[j] / wmax : 0;
          if (t < 0.01) { continue; }
          if (state.side === "query") { line(state.index, j, 0.15 + 0.85 * t, 0.5 + 2.5 * t); }
          else { line(j, state.index, 0.15 + 0.85 * t, 0.5 + 2.5 * t); }
        }
        bar.set(wmax, state.side === "query" ?
          "weight query " + state.index + " gives each key (0 to the largest in its row)" :
          "weight each query gives key " + state.index + " (0 to the largest in its column)");
        report(weights);
      } else if (n <= 64) {
        // nothing hovered: every line, its opacity the weight itself
        for (var i = 0; i < n; i++) {
          var r = maps.row(state.layer, state.head, i);
          for (var k = 0; k < n; k++) {
            if (r[k] > 0.02) { line(i, k, Math.min(1, r[k]), 1); }
          }
        }
      }
      drawLabels(weights, state.side);
    }

    function report(weights) {
      var who = labels[state.index];
      var verb = state.side === "query" ? " attends to" : " is attended by";
      readout.textContent = "";
      readout.appendChild(el("b", null, (state.side === "query" ? "query " : "key ") + state.index + " "));
      readout.appendChild(VZ.token(who));
      readout.appendChild(el("span", null, verb + " (" + data.layers[state.layer] + ", " +
                             (state.head < 0 ? "mean of heads" : "head " + state.head) + "): "));
      var best = VZ.top(weights, 5);
      if (!best.length) { readout.appendChild(el("span", null, "nothing (every weight is 0)")); }
      best.forEach(function (j, k) {
        if (k) { readout.appendChild(el("span", null, ", ")); }
        readout.appendChild(VZ.token(labels[j], 60));
        readout.appendChild(el("span", null, " " + VZ.fmt(weights[j])));
      });
      readout.setAttribute("data-top", best.join(","));
      readout.setAttribute("data-layer", String(state.layer));
      readout.setAttribute("data-head", String(state.head));
      readout.setAttribute("data-side", state.side);
      readout.setAttribute("data-index", String(state.index));
      readout.setAttribute("data-token", who);
      readout.setAttribute("data-values", VZ.valuesText(weights));
    }

    function at(event) {
      var box = canvas.getBoundingClientRect();
      var x = event.clientX - box.left, yy = event.clientY - box.top;
      var i = Math.floor((yy - top) / h);
      if (i < 0 || i >= n) { return null; }
      if (x <= leftX) { return ["query", i]; }
      if (x >= rightX) { return ["key", i]; }
      return null;
    }
    canvas.addEventListener("mousemove", function (event) {
      if (state.pinned) { return; }
      var hit = at(event);
      if (!hit || (hit[0] === state.side && hit[1] === state.index)) { return; }
      state.side = hit[0]; state.index = hit[1];
      draw();
    });
    canvas.addEventListener("mouseleave", function () {
      if (state.pinned) { return; }
      state.side = null; state.index = -1; draw();
    });
    canvas.addEventListener("click", function (event) {
      var hit = at(event);
      state.pinned = !!hit && !state.pinned;
      if (hit) { state.side = hit[0]; state.index = hit[1]; }
      draw();
    });

    draw();
    return {
      set: function (layer, head) {
        state.layer = layer; state.head = head;
        layerSel.sel.value = String(layer); headSel.sel.value = String(head);
        draw();
      },
      draw: draw
    };
  };

  VZ.views.head = function (root, data) {
    VZ.headPanel(root, data, new VZ.Maps(data.maps));
  };
})();
