/* Generation view: step through the generated tokens.  At step s the token at position
 * p + s (p = prompt length) was produced by the query at position p + s - 1; that query's
 * attention over the earlier tokens shades them. */
(function () {
  var el = VZ.el;

  VZ.views.generation = function (root, data) {
    var maps = new VZ.Maps(data.maps), labels = data.labels, n = maps.n;
    var p = Math.max(1, data.prompt_length), steps = n - p;
    var state = {layer: data.layers.length - 1, head: data.heads > 1 ? -1 : 0, step: 0};
    var controls = el("div", "vz-controls");
    controls.appendChild(VZ.select("layer", VZ.layerOptions(data), state.layer, function (v) {
      state.layer = v; draw();
    }).root);
    controls.appendChild(VZ.select("head", VZ.headOptions(data.heads), state.head, function (v) {
      state.head = v; draw();
    }).root);
    var prev = el("button", "vz-button", "\u25c0 previous"), next = el("button", "vz-button", "next \u25b6");
    prev.type = next.type = "button";
    var slider = el("input", "vz-slider");
    slider.type = "range"; slider.min = "0"; slider.max = String(Math.max(0, steps - 1)); slider.value = "0";
    var stepText = el("span", "vz-step");
    prev.addEventListener("click", function () { go(state.step - 1); });
    next.addEventListener("click", function () { go(state.step + 1); });
    slider.addEventListener("input", function () { go(parseInt(slider.value, 10)); });
    controls.appendChild(prev); controls.appendChild(slider); controls.appendChild(next);
    controls.appendChild(stepText);
    var bar = VZ.colourbar("weight the query gives each earlier token (0 to the largest " +
                           "of this step)");
    controls.appendChild(bar.root);
    root.appendChild(controls);
    var readout = el("div", "vz-readout");
    readout.setAttribute("data-view", "generation");
    root.appendChild(readout);
    var text = el("div", "vz-text");
    var spans = labels.map(function (label, i) {
      var s = VZ.token(label, 60, "vz-tok" + (i < p ? " vz-prompt" : ""));
      s.setAttribute("data-token", label);
      s.setAttribute("data-index", String(i));
      text.appendChild(s);
      return s;
    });
    root.appendChild(text);

    function go(step) {
      if (step < 0 || step >= steps) { return; }
      state.step = step; slider.value = String(step); draw();
    }
    function draw() {
      var t = p + state.step, q = t - 1;
      var w = maps.row(state.layer, state.head, q), wmax = VZ.maxOf(w.slice(0, t));
      spans.forEach(function (s, i) {
        s.classList.toggle("vz-current", i === t);
        s.classList.toggle("vz-future", i > t);
        VZ.shade(s, i < t && wmax > 0 ? w[i] / wmax : null);
        s.title = i < t ? "weight " + VZ.fmt(w[i]) : "";
      });
      stepText.textContent = "step " + (state.step + 1) + " of " + steps;
      bar.set(wmax);
      readout.textContent = "";
      readout.appendChild(el("span", null, "generating "));
      readout.appendChild(VZ.token(labels[t]));
      readout.appendChild(el("span", null, " (position " + t + ") from the query at position " + q +
        "; most attention on: "));
      VZ.top(w.slice(0, t), 3).forEach(function (j, k) {
        if (k) { readout.appendChild(el("span", null, ", ")); }
        readout.appendChild(VZ.token(labels[j], 60));
        readout.appendChild(el("span", null, " " + VZ.fmt(w[j])));
      });
      readout.setAttribute("data-layer", String(state.layer));
      readout.setAttribute("data-head", String(state.head));
      readout.setAttribute("data-step", String(state.step));
      readout.setAttribute("data-query", String(q));
      readout.setAttribute("data-values", VZ.valuesText(w));
    }
    if (steps > 0) { draw(); } else { readout.textContent = "no generated tokens"; }
  };
})();
