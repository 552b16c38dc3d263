/* Model view: a grid of layers x heads thumbnails; click one to open it in the head view
 * below.  Thumbnails are block averages computed in Python, each scaled to its own maximum. */
(function () {
  var el = VZ.el;

  VZ.views.model = function (root, data) {
    var maps = new VZ.Maps(data.maps);
    var t = data.thumbs.size, codes = VZ.bytes(data.thumbs.data);
    var layers = data.layers.length, heads = data.heads;
    root.appendChild(el("p", "vz-caption",
      "rows: layers, columns: heads; each thumbnail is a map (queries down, keys across) scaled " +
      "to its own maximum. Click one to open it below."));
    var grid = el("div", "vz-grid");
    grid.style.gridTemplateColumns = "auto repeat(" + heads + ", 60px)";
    grid.appendChild(el("span"));
    for (var h = 0; h < heads; h++) { grid.appendChild(el("span", "vz-grid-head", "head " + h)); }
    var thumbs = [];
    var panel;
    for (var l = 0; l < layers; l++) {
      var name = el("span", "vz-grid-layer", data.layers[l]);
      name.title = data.layers[l];  // the whole name when CSS cuts a long one
      grid.appendChild(name);
      for (h = 0; h < heads; h++) {
        var c = el("canvas", "vz-thumb");
        c.width = t; c.height = t;
        c.setAttribute("data-layer", String(l));
        c.setAttribute("data-head", String(h));
        c.title = data.layers[l] + ", head " + h;
        var ctx = c.getContext("2d"), img = ctx.createImageData(t, t);
        var off = (l * heads + h) * t * t;
        for (var p = 0; p < t * t; p++) {
          var rgb = VZ.colour(codes[off + p] / 255);
          img.data[4 * p] = rgb[0]; img.data[4 * p + 1] = rgb[1];
          img.data[4 * p + 2] = rgb[2]; img.data[4 * p + 3] = 255;
        }
        ctx.putImageData(img, 0, 0);
        c.addEventListener("click", (function (layer, head, canvas) {
          return function () {
            thumbs.forEach(function (x) { x.classList.remove("vz-selected"); });
            canvas.classList.add("vz-selected");
            panel.set(layer, head);
            detail.setAttribute("data-layer", String(layer));
            detail.setAttribute("data-head", String(head));
            detail.scrollIntoView({block: "nearest"});
          };
        })(l, h, c));
        thumbs.push(c);
        grid.appendChild(c);
      }
    }
    root.appendChild(grid);
    var detail = el("div", "vz-detail");
    root.appendChild(detail);
    panel = VZ.headPanel(detail, data, maps);
  };
})();
