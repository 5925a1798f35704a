/* convscope atlas pages: model -> layer -> unit -> activation atlas, the layer view of an image, search.
 *
 * One script for both ways of opening an atlas:
 *   server mode (convscope serve --atlas ATLAS): data as JSON from api/..., pictures from api/files/...,
 *     both with the page's ?token=...;
 *   static mode (convscope atlas export ATLAS --static OUT, opened from file://): data files are scripts
 *     (data/KIND/....js, each sets window.__atlas_data[KEY]) inserted on demand, pictures from files/....
 * <body data-mode="server|static"> picks the mode; everything else is the same. Every view has a hash URL:
 *   #/                          the model: its layers as a stack, the images with a layer view
 *   #/layer/L?sort=max&order=desc   a layer's units (sort: unit, mean, max, sparsity, iou, dead)
 *   #/layer/L/unit/U            a unit: visualisations, dataset examples, statistics, concept, filter
 *   #/layer/L/atlas?z=&x=&y=&cell=gx,gy   the layer's activation atlas (pan, zoom, the chosen cell)
 *   #/flow/I?open=L             the layer view of image I (open=: the layers shown as grids of maps)
 *   #/search/TEXT               units whose concept or top class contains TEXT
 * Pages only read the store's answers; nothing is recomputed here. No inline styles or scripts (the
 * server's Content-Security-Policy forbids them): styles are set through element.style.
 */
"use strict";

(() => {
  const MODE = document.body.dataset.mode === "static" ? "static" : "server";
  const TOKEN = new URLSearchParams(location.search).get("token") || "";
  const DATA = (window.__atlas_data = window.__atlas_data || {});
  const SEARCH_LIMIT = 50;

  // ------------------------------------------------------------------ small helpers
  const $ = (sel, root = document) => root.querySelector(sel);
  const enc = encodeURIComponent;
  const has = (obj, key) => obj !== null && typeof obj === "object" && Object.prototype.hasOwnProperty.call(obj, key);

  function dec(text) {
    try { return decodeURIComponent(text); } catch (e) { return text; }
  }

  /** An element: h("a", {href, class, style: {...}, onclick}, ...children). */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "style") {
        for (const [prop, v] of Object.entries(value)) {
          if (prop.startsWith("--")) el.style.setProperty(prop, v);
          else el.style[prop] = v;
        }
      } else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "boolean") return value ? "yes" : "no";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en");
    if (Math.abs(value) >= 100) return value.toFixed(1);
    return String(parseFloat(value.toPrecision(3)));
  }

  function shapeText(shape) {
    return (shape || []).filter((d) => d !== null && d !== undefined).join("×") || "?";
  }

  function baseName(path) {
    return String(path || "").split(/[\\/]/).pop();
  }

  /** A CSS class for a layer kind (colours per kind). */
  function kindClass(kind) {
    const k = String(kind || "").toLowerCase();
    if (k.includes("conv")) return "kind-conv";
    if (k.includes("pool")) return "kind-pool";
    if (k.includes("norm")) return "kind-norm";
    if (k.includes("relu") || k.includes("gelu") || k.includes("silu") || k.includes("act") || k.includes("sigmoid")) return "kind-act";
    if (k.includes("linear") || k.includes("fc")) return "kind-linear";
    return "kind-other";
  }

  /** A class of a cell's top classes as text: "label", [label, score] or {label|class|name, score|share|count}. */
  function classText(c) {
    if (c === null || c === undefined) return "";
    if (typeof c !== "object") return String(c);
    const [label, score] = Array.isArray(c) ? c : [c.label ?? c.class ?? c.name ?? c.index, c.score ?? c.share ?? c.fraction ?? c.count];
    return score === undefined || score === null ? String(label) : `${label} (${fmt(score)})`;
  }

  // ------------------------------------------------------------------ data access (the only mode-dependent part)
  const cache = new Map();

  function filePath(rel) {
    return String(rel).split("/").map(enc).join("/");
  }

  /** The URL of a picture the store names by its path relative to the atlas folder ("files/..."). */
  function fileUrl(rel) {
    if (!rel) return null;
    if (MODE === "static") return filePath(rel);
    return `api/${filePath(rel)}${TOKEN ? `?token=${enc(TOKEN)}` : ""}`;
  }

  async function fetchJson(path) {
    const response = await fetch(`api/${path}`, { headers: TOKEN ? { "X-Convscope-Token": TOKEN } : {} });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status} for api/${path}`);
    return body;
  }

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.onload = () => { script.remove(); resolve(); };
      script.onerror = () => { script.remove(); reject(new Error(`missing data file ${src}`)); };
      document.head.append(script);
    });
  }

  async function staticData(key, file, missing) {
    if (!has(DATA, key)) {
      try { await loadScript(file); } catch (e) { throw new Error(missing || e.message); }
      if (!has(DATA, key)) throw new Error(missing || `${file} does not hold ${key}`);
    }
    return DATA[key];
  }

  async function slugOf(layer) {
    await staticData("model", "data/model.js");
    const slugs = DATA.slugs || {};
    if (!has(slugs, layer)) {
      throw new Error(`no layer ${JSON.stringify(layer)} in this atlas (layers: ${Object.keys(slugs).join(", ")})`);
    }
    return slugs[layer];
  }

  /** One answer per key, kept for the page's life (a failed one is forgotten, so a retry asks again). */
  function cached(key, server, local) {
    if (!cache.has(key)) {
      const promise = MODE === "static" ? local() : server();
      cache.set(key, promise);
      promise.catch(() => cache.delete(key));
    }
    return cache.get(key);
  }

  const api = {
    model: () => cached("model", () => fetchJson("model"), () => staticData("model", "data/model.js")),
    images: () => cached("images", () => fetchJson("images"), () => staticData("images", "data/images.js")),
    layer: (name) => cached(`layer/${name}`, () => fetchJson(`layer/${enc(name)}`),
      async () => staticData(`layer/${name}`, `data/layer/${filePath(await slugOf(name))}.js`)),
    unit: (name, unit) => cached(`unit/${name}/${unit}`, () => fetchJson(`unit/${enc(name)}/${enc(unit)}`),
      async () => staticData(`unit/${name}/${unit}`, `data/unit/${filePath(await slugOf(name))}/${enc(unit)}.js`,
        `no unit ${unit} in layer ${JSON.stringify(name)}`)),
    atlas: (name) => cached(`atlas/${name}`, () => fetchJson(`atlas/${enc(name)}`),
      async () => staticData(`atlas/${name}`, `data/atlas/${filePath(await slugOf(name))}.js`,
        `no activation atlas for layer ${JSON.stringify(name)}`)),
    flow: (image) => cached(`flow/${image}`, () => fetchJson(`flow/${enc(image)}`),
      () => staticData(`flow/${image}`, `data/flow/${enc(image)}.js`, `no layer view stored for image ${image}`)),
    search: (text) => cached(`search/${text}`,
      async () => (await fetchJson(`search?q=${enc(text)}&limit=${SEARCH_LIMIT}`)).results,
      async () => searchIndex(await staticData("search", "data/search.js"), text)),
  };

  /** The static export's search: what AtlasStore.search answers (substring of concept or top class, best IoU first). */
  function searchIndex(index, text) {
    const q = text.trim().toLowerCase();
    if (!q) return [];
    const rows = index.rows.map((row) => Object.fromEntries(index.fields.map((f, i) => [f, row[i]])));
    const hit = (v) => typeof v === "string" && v.toLowerCase().includes(q);
    const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
    return rows.filter((r) => hit(r.concept) || hit(r.top_class)).sort((a, b) =>
      (a.iou === null) - (b.iou === null) || (b.iou ?? 0) - (a.iou ?? 0) || cmp(a.layer, b.layer) || a.unit - b.unit,
    ).slice(0, SEARCH_LIMIT);
  }

  // ------------------------------------------------------------------ URLs of views
  const href = {
    model: () => "#/",
    layer: (layer, query) => `#/layer/${enc(layer)}${query ? `?${query}` : ""}`,
    unit: (layer, unit) => `#/layer/${enc(layer)}/unit/${unit}`,
    atlas: (layer, query) => `#/layer/${enc(layer)}/atlas${query ? `?${query}` : ""}`,
    flow: (image, query) => `#/flow/${image}${query ? `?${query}` : ""}`,
    search: (text) => `#/search/${enc(text)}`,
  };

  function parseRoute() {
    let hash = location.hash.replace(/^#\/?/, "");
    const q = hash.indexOf("?");
    const query = new URLSearchParams(q >= 0 ? hash.slice(q + 1) : "");
    hash = q >= 0 ? hash.slice(0, q) : hash;
    const raw = hash.split("/").filter((p) => p !== "");
    const parts = raw.map(dec);
    if (parts.length === 0) return { view: "model", query };
    if (parts[0] === "layer" && parts.length === 2) return { view: "layer", layer: parts[1], query };
    if (parts[0] === "layer" && parts.length === 4 && parts[2] === "unit" && /^\d+$/.test(parts[3])) {
      return { view: "unit", layer: parts[1], unit: Number(parts[3]), query };
    }
    if (parts[0] === "layer" && parts.length === 3 && parts[2] === "atlas") return { view: "atlas", layer: parts[1], query };
    if (parts[0] === "flow" && parts.length === 2 && /^\d+$/.test(parts[1])) return { view: "flow", image: Number(parts[1]), query };
    if (parts[0] === "search") return { view: "search", text: dec(raw.slice(1).join("/")), query };
    return { view: "missing", query };
  }

  /** Change the current URL without a new history entry or a re-render (pan, zoom, opened layers). */
  function replaceQuery(base, params) {
    const query = new URLSearchParams();
    for (const [key, value] of params) if (value !== null && value !== undefined && value !== "") query.append(key, value);
    const text = query.toString();
    const url = `${base}${text ? `?${text}` : ""}`;
    if (url !== location.hash) {
      history.replaceState(history.state, "", url);
      currentHash = location.hash;
    }
  }

  // ------------------------------------------------------------------ shared pieces
  function pic(rel, alt, cls = "") {
    if (!rel) return h("span", { class: `pic missing ${cls}`, title: "not in this atlas" }, "–");
    return h("img", { src: fileUrl(rel), alt, class: `pic ${cls}`, loading: "lazy", decoding: "async" });
  }

  function crumbs(items) {
    const nav = $("#crumbs");
    const all = [["model", href.model()], ...items];
    nav.replaceChildren(...all.flatMap(([label, link], i) => [
      i ? h("span", { class: "sep", "aria-hidden": "true" }, "›") : null,
      link && i < all.length - 1 ? h("a", { href: link }, label) : h("span", { class: "here" }, label),
    ]).filter(Boolean));
  }

  const tooltip = () => $("#tooltip");

  function showTip(event, lines) {
    const tip = tooltip();
    tip.replaceChildren(...lines.map((line, i) => h(i ? "div" : "strong", {}, line)));
    tip.hidden = false;
    const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    const y = Math.min(event.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
    tip.style.left = `${Math.max(4, x)}px`;
    tip.style.top = `${Math.max(4, y)}px`;
  }

  function hideTip() {
    tooltip().hidden = true;
  }

  function figure(rel, caption, cls) {
    return h("figure", { class: cls }, pic(rel, caption), h("figcaption", {}, caption));
  }

  function section(title, ...content) {
    return h("section", { class: "block" }, h("h2", {}, title), ...content);
  }

  function pager(prev, up, next) {
    return h("nav", { class: "pager" },
      prev ? h("a", { href: prev[1], rel: "prev", class: "prev" }, `← ${prev[0]}`) : h("span", { class: "prev" }),
      up ? h("a", { href: up[1], class: "up" }, up[0]) : null,
      next ? h("a", { href: next[1], rel: "next", class: "next" }, `${next[0]} →`) : h("span", { class: "next" }));
  }

  function layerShape(model, name) {
    return (model.layers.find((l) => l.name === name) || {}).shape;
  }

  // ------------------------------------------------------------------ the model: layers as a stack
  async function modelView() {
    const model = await api.model();
    crumbs([]);
    const images = model.flows.length ? await api.images() : [];
    const thumbs = new Map(images.map((img) => [img.id, img]));
    const maxChannels = Math.max(1, ...model.layers.map((l) => l.channels || 1));
    const maxSide = Math.max(1, ...model.layers.map((l) => (l.shape && l.shape[1]) || 1));
    const stack = h("ol", { class: "stack" }, model.layers.map((layer) => {
      const [c, hh, w] = layer.shape;
      const slab = h("span", {
        class: `slab ${kindClass(layer.kind)}`, "aria-hidden": "true",
        style: {
          width: `${Math.round(40 + 200 * Math.log2(1 + (c || 1)) / Math.log2(1 + maxChannels))}px`,
          height: `${Math.round(10 + 46 * ((hh || 1) / maxSide))}px`,
        },
      });
      const rf = layer.receptive_field || {};
      return h("li", { class: `layer-row ${layer.built ? "" : "unbuilt"}`, dataset: { layer: layer.name } },
        h("a", { href: href.layer(layer.name), class: "layer-link" }, slab, h("span", { class: "layer-name" }, layer.name)),
        h("span", { class: "kind" }, layer.kind || ""),
        h("span", { class: "shape", title: "channels × height × width" }, shapeText([c, hh, w])),
        h("span", { class: "rf" }, rf.size ? `receptive field ${rf.size} px, stride ${rf.stride}` : ""),
        layer.built ? null : h("span", { class: "badge" }, "not built yet"));
    }));
    const provenance = model.provenance && typeof model.provenance === "object" ? Object.entries(model.provenance) : [];
    return h("div", { class: "model-page" },
      h("h1", {}, model.model || "model"),
      h("p", { class: "facts" }, `${model.layers.length} layers · ${fmt(model.images)} dataset images`,
        model.labels ? ` · ${fmt(model.labels)} classes` : ""),
      provenance.length ? h("dl", { class: "provenance" }, provenance.flatMap(([k, v]) =>
        [h("dt", {}, k), h("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v))])) : null,
      section("Layers", h("p", { class: "hint" }, "From input (top) to output; a slab's width grows with the channels, its height with the map size."), stack),
      model.flows.length ? section("Layer view of an image",
        h("p", { class: "hint" }, "The image flowing through the layers: every feature map, each a link to its unit."),
        h("ul", { class: "flow-list" }, model.flows.map((id) => {
          const img = thumbs.get(id) || {};
          return h("li", {}, h("a", { href: href.flow(id), title: img.source || "" },
            img.thumb ? pic(img.thumb, `image ${id}`, "thumb") : null, h("span", {}, `image ${id}`)));
        }))) : null);
  }

  // ------------------------------------------------------------------ a layer: the grid of its units
  const SORTS = {
    unit: { label: "unit number", value: (u) => u.unit, order: "asc" },
    mean: { label: "mean activation", short: "mean", value: (u) => u.mean, order: "desc" },
    max: { label: "max activation", short: "max", value: (u) => u.max, order: "desc" },
    sparsity: { label: "sparsity", short: "sparsity", value: (u) => u.sparsity, order: "desc" },
    iou: { label: "concept (IoU)", short: "IoU", value: (u) => u.iou, order: "desc" },
    dead: { label: "dead first", value: (u) => (u.dead === null ? null : u.dead ? 1 : 0), order: "desc" },
  };

  function sortUnits(units, key, order) {
    const spec = SORTS[key];
    const sign = order === "asc" ? 1 : -1;
    return [...units].sort((a, b) => {
      const va = spec.value(a);
      const vb = spec.value(b);
      const na = va === null || va === undefined;
      const nb = vb === null || vb === undefined;
      if (na || nb) return na - nb || a.unit - b.unit; // missing values last
      return sign * (va - vb) || a.unit - b.unit;
    });
  }

  async function layerView(route) {
    const [model, layer] = await Promise.all([api.model(), api.layer(route.layer)]);
    const key = has(SORTS, route.query.get("sort")) ? route.query.get("sort") : "unit";
    const order = ["asc", "desc"].includes(route.query.get("order")) ? route.query.get("order") : SORTS[key].order;
    crumbs([[layer.name, href.layer(layer.name)]]);
    const index = model.layers.findIndex((l) => l.name === layer.name);
    const prev = model.layers[index - 1];
    const next = model.layers[index + 1];
    const go = (k, o) => { location.hash = href.layer(layer.name, `sort=${k}${o !== SORTS[k].order ? `&order=${o}` : ""}`); };
    const select = h("select", { id: "sort", onchange: (e) => go(e.target.value, SORTS[e.target.value].order) },
      Object.entries(SORTS).map(([k, spec]) => h("option", { value: k, selected: k === key }, spec.label)));
    const flip = h("button", { type: "button", id: "order", title: "reverse the order", onclick: () => go(key, order === "asc" ? "desc" : "asc") },
      order === "asc" ? "↑ ascending" : "↓ descending");
    const units = sortUnits(layer.units, key, order);
    const dead = layer.units.filter((u) => u.dead).length;
    const concepts = layer.units.filter((u) => u.concept).length;
    const grid = h("ol", { class: "unit-grid" }, units.map((u) => {
      const stat = key === "unit" ? null : SORTS[key].value(u);
      return h("li", {}, h("a", {
        href: href.unit(layer.name, u.unit), class: `unit-card ${u.dead ? "dead" : ""}`, dataset: { unit: u.unit },
        title: `unit ${u.unit}${u.concept ? ` · ${u.concept}` : ""}${u.top_class ? ` · top class ${u.top_class}` : ""}`,
      },
      pic(u.vis, `unit ${u.unit} visualisation`),
      h("span", { class: "num" }, `#${u.unit}`),
      u.dead ? h("span", { class: "badge dead" }, "dead") : null,
      h("span", { class: "concept" }, u.concept ? `${u.concept}${u.iou !== null ? ` ${fmt(u.iou)}` : ""}` : (u.top_class || "")),
      key !== "unit" && key !== "dead" ? h("span", { class: "stat" }, `${SORTS[key].short} ${fmt(stat)}`) : null));
    }));
    const rf = layer.receptive_field || {};
    return h("div", { class: "layer-page" },
      h("h1", {}, layer.name),
      h("p", { class: "facts" }, `${layer.kind || ""} · ${shapeText(layer.shape)} · ${layer.units.length} units`,
        dead ? ` · ${dead} dead` : "", concepts ? ` · ${concepts} with a concept` : "",
        rf.size ? ` · receptive field ${rf.size} px, stride ${rf.stride}` : "", layer.built ? "" : " · not built yet"),
      h("nav", { class: "actions" },
        layer.atlas ? h("a", { href: href.atlas(layer.name), id: "atlas-link", class: "button" }, "Activation atlas") : null,
        model.flows.length ? h("a", { href: href.flow(model.flows[0]), class: "button" }, "Layer view of an image") : null),
      pager(prev && [prev.name, href.layer(prev.name)], ["all layers", href.model()], next && [next.name, href.layer(next.name)]),
      h("div", { class: "controls" }, h("label", { for: "sort" }, "Sort by "), select, flip),
      layer.units.length ? grid : h("p", { class: "hint" }, "No units stored for this layer yet."));
  }

  // ------------------------------------------------------------------ a unit
  /** A neighbouring unit: U, [U, score] (the build's [unit, correlation]) or {unit, layer?, similarity|score}. */
  function neighbourLink(layer, n) {
    const item = Array.isArray(n) ? { unit: n[0], score: n[1] } : typeof n === "object" && n !== null ? n : { unit: n };
    const target = item.layer || layer;
    const score = item.similarity ?? item.score ?? item.distance;
    return h("li", {}, h("a", { href: href.unit(target, item.unit), class: "neighbour" },
      target === layer ? `unit ${item.unit}` : `${target} · unit ${item.unit}`), score !== undefined ? ` (${fmt(score)})` : "");
  }

  async function unitView(route) {
    const [model, unit] = await Promise.all([api.model(), api.unit(route.layer, route.unit)]);
    const layer = unit.layer;
    crumbs([[layer, href.layer(layer)], [`unit ${unit.unit}`, href.unit(layer, unit.unit)]]);
    const flows = new Set(model.flows);
    const n = unit.channels || 0;
    const prev = unit.unit > 0 ? [`unit ${unit.unit - 1}`, href.unit(layer, unit.unit - 1)] : null;
    const next = unit.unit + 1 < n ? [`unit ${unit.unit + 1}`, href.unit(layer, unit.unit + 1)] : null;
    const stats = [["mean", unit.mean], ["std", unit.std], ["max", unit.max], ["sparsity", unit.sparsity],
      ["fires", unit.fires], ["dead", unit.dead], ["top class", unit.top_class]];
    const diversity = Array.isArray(unit.diversity) ? unit.diversity : [];
    const hits = (unit.hits || []).slice(0, 9);
    return h("div", { class: "unit-page", dataset: { layer, unit: unit.unit } },
      h("h1", {}, `${layer} · unit ${unit.unit}`, unit.dead ? h("span", { class: "badge dead" }, "dead") : null),
      h("p", { class: "facts" },
        unit.concept ? h("span", { class: "concept-line" }, `concept: ${unit.concept}`,
          unit.concept_category ? ` (${unit.concept_category})` : "", unit.iou !== null ? `, IoU ${fmt(unit.iou)}` : "") : "no concept",
        unit.top_class ? ` · top class: ${unit.top_class}` : ""),
      pager(prev, [`all ${n} units of ${layer}`, href.layer(layer)], next),
      section("Feature visualisation",
        h("div", { class: "vis-row" },
          figure(unit.vis, "positive", "vis-positive"),
          figure(unit.negative, "negative", "vis-negative"),
          diversity.map((rel, i) => figure(rel, `diversity ${i + 1}`, "vis-diversity")))),
      section(`Top ${hits.length} dataset examples`,
        h("p", { class: "hint" }, "Each: the patch around the strongest position, and its projection back to the input."),
        hits.length ? h("ol", { class: "hits" }, hits.map((hit, i) => h("li", { class: "hit" },
          h("div", { class: "hit-pics" }, pic(hit.patch, `patch of image ${hit.image}`), pic(hit.projection, `projection of image ${hit.image}`)),
          h("div", { class: "hit-caption" }, `#${i + 1} · ${fmt(hit.value)}`, h("br"),
            flows.has(hit.image) ? h("a", { href: href.flow(hit.image) }, `image ${hit.image}`) : `image ${hit.image}`,
            hit.source ? h("span", { class: "source", title: hit.source }, ` ${baseName(hit.source)}`) : null,
            hit.y !== null && hit.x !== null ? h("span", { class: "pos" }, ` at (${hit.y}, ${hit.x})`) : null)))) :
          h("p", { class: "hint" }, "No dataset examples stored.")),
      h("div", { class: "two" },
        section("Statistics", h("table", { class: "stats" }, h("tbody", {}, stats.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, fmt(v))))))),
        section("Concept", h("table", { class: "stats" }, h("tbody", {},
          h("tr", {}, h("th", {}, "concept"), h("td", {}, fmt(unit.concept))),
          h("tr", {}, h("th", {}, "category"), h("td", {}, fmt(unit.concept_category))),
          h("tr", {}, h("th", {}, "IoU"), h("td", {}, fmt(unit.iou)))))),
        section("Filter", h("div", { class: "filter" }, pic(unit.filter, "filter weights", "filter-pic"),
          h("div", {}, `norm ${fmt(unit.filter_norm)}`, h("br"), `health: ${fmt(unit.filter_health)}`)))),
      section("Neighbouring units", Array.isArray(unit.neighbours) && unit.neighbours.length ?
        h("ul", { class: "neighbours" }, unit.neighbours.map((nb) => neighbourLink(layer, nb))) :
        h("p", { class: "hint" }, "None stored.")));
  }

  // ------------------------------------------------------------------ a layer's activation atlas
  const PLANE = 600;

  async function atlasView(route) {
    const [layer, atlas] = await Promise.all([api.layer(route.layer), api.atlas(route.layer)]);
    crumbs([[layer.name, href.layer(layer.name)], ["atlas", href.atlas(layer.name)]]);
    const base = href.atlas(layer.name);
    const head = [h("h1", {}, `${layer.name} · activation atlas`),
      h("p", { class: "facts" }, `${atlas.cells.length} cells on a ${atlas.grid || "?"}×${atlas.grid || "?"} grid`,
        atlas.samples ? ` · ${fmt(atlas.samples)} activations` : "", atlas.method ? ` · layout: ${atlas.method}` : "")];
    if (!atlas.cells.length) return h("div", { class: "atlas-page" }, ...head, h("p", { class: "hint" }, "No atlas stored for this layer."));
    const grid = atlas.grid || 1 + Math.max(...atlas.cells.map((c) => Math.max(c.gx, c.gy)));
    const size = PLANE / grid;
    const maxCount = Math.max(2, ...atlas.cells.map((c) => c.count));
    const units = new Map(layer.units.map((u) => [u.unit, u]));
    const byKey = new Map(atlas.cells.map((c) => [`${c.gx},${c.gy}`, c]));
    const plane = h("div", { class: "atlas-plane", style: { width: `${PLANE}px`, height: `${PLANE}px` } },
      atlas.cells.map((c) => {
        const scale = 0.45 + 0.55 * Math.log(1 + c.count) / Math.log(1 + maxCount);
        const side = size * scale;
        return h("div", {
          class: "cell", dataset: { gx: c.gx, gy: c.gy }, role: "button", tabindex: "0",
          "aria-label": `cell ${c.gx}, ${c.gy}: ${c.count} activations`,
          style: { left: `${c.gx * size + (size - side) / 2}px`, top: `${c.gy * size + (size - side) / 2}px`, width: `${side}px`, height: `${side}px`,
            "--heat": String(Math.log(1 + c.count) / Math.log(1 + maxCount)) },
        }, c.icon ? h("img", { src: fileUrl(c.icon), alt: "", draggable: "false", loading: "lazy" }) : null);
      }));
    const viewport = h("div", { class: "atlas-viewport", tabindex: "0", "aria-label": "activation atlas: drag to pan, wheel to zoom" }, plane);
    const panel = h("aside", { id: "cell-panel", class: "cell-panel" }, h("p", { class: "hint" }, "Hover a cell for its count and top classes; click it for its nearest units."));
    const num = (k) => (route.query.has(k) && Number.isFinite(Number(route.query.get(k))) ? Number(route.query.get(k)) : null);
    const state = { z: num("z") ?? 1, x: num("x"), y: num("y"), cell: route.query.get("cell") };
    let selected = null;

    const apply = () => { plane.style.transform = `translate(${state.x}px, ${state.y}px) scale(${state.z})`; };
    let saveTimer = 0;
    const save = (later = false) => { // the view in the URL (wheel zooms: once the wheel rests)
      clearTimeout(saveTimer);
      const write = () => {
        if (viewport.isConnected) replaceQuery(base, [["z", state.z.toFixed(3)], ["x", Math.round(state.x)], ["y", Math.round(state.y)], ["cell", state.cell]]);
      };
      if (later) saveTimer = setTimeout(write, 150); else write();
    };
    const zoomAt = (factor, mx, my, later = false) => {
      const z = Math.min(20, Math.max(0.25, state.z * factor));
      state.x = mx - (mx - state.x) * (z / state.z);
      state.y = my - (my - state.y) * (z / state.z);
      state.z = z;
      apply();
      save(later);
    };
    const fit = () => {
      const w = viewport.clientWidth || PLANE;
      const hgt = viewport.clientHeight || PLANE;
      state.z = Math.min(w, hgt) / PLANE * 0.95;
      state.x = (w - PLANE * state.z) / 2;
      state.y = (hgt - PLANE * state.z) / 2;
      apply();
    };
    const choose = (cell, remember = true) => {
      if (selected) selected.classList.remove("selected");
      selected = plane.querySelector(`.cell[data-gx="${cell.gx}"][data-gy="${cell.gy}"]`);
      if (selected) selected.classList.add("selected");
      state.cell = `${cell.gx},${cell.gy}`;
      const near = (cell.units || []).map((n) => (Array.isArray(n) ? n[0] : typeof n === "object" && n !== null ? n.unit : n));
      panel.replaceChildren(
        h("h2", {}, `Cell (${cell.gx}, ${cell.gy})`),
        h("p", {}, `${fmt(cell.count)} activations`),
        cell.icon ? pic(cell.icon, "the cell's icon", "cell-icon") : null,
        (cell.classes || []).length ? h("div", {}, h("h3", {}, "Top classes"), h("ol", {}, cell.classes.map((c) => h("li", {}, classText(c))))) : null,
        h("h3", {}, "Nearest units"),
        near.length ? h("ol", { class: "near-units" }, near.map((u) => h("li", {}, h("a", { href: href.unit(layer.name, u), class: "near-unit" },
          units.has(u) ? pic(units.get(u).vis, `unit ${u}`, "thumb") : null, `unit ${u}`,
          units.has(u) && units.get(u).concept ? ` · ${units.get(u).concept}` : "")))) : h("p", { class: "hint" }, "None stored."));
      if (remember) save();
    };

    let drag = null;
    viewport.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = viewport.getBoundingClientRect();
      zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top, true);
    }, { passive: false });
    viewport.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      drag = { x: e.clientX, y: e.clientY, sx: state.x, sy: state.y, moved: false };
    });
    viewport.addEventListener("pointermove", (e) => {
      if (drag && (drag.moved || Math.hypot(e.clientX - drag.x, e.clientY - drag.y) > 4)) {
        if (!drag.moved) viewport.setPointerCapture(e.pointerId);
        drag.moved = true;
        state.x = drag.sx + e.clientX - drag.x;
        state.y = drag.sy + e.clientY - drag.y;
        apply();
        hideTip();
        return;
      }
      const target = e.target.closest && e.target.closest(".cell");
      if (!target) { hideTip(); return; }
      const cell = byKey.get(`${target.dataset.gx},${target.dataset.gy}`);
      showTip(e, [`cell (${cell.gx}, ${cell.gy}) · ${fmt(cell.count)} activations`,
        ...(cell.classes || []).slice(0, 3).map((c) => classText(c))]);
    });
    viewport.addEventListener("pointerleave", hideTip);
    viewport.addEventListener("pointerup", (e) => {
      const moved = drag && drag.moved;
      drag = null;
      if (moved) { save(); return; }
      const target = e.target.closest && e.target.closest(".cell");
      if (target) choose(byKey.get(`${target.dataset.gx},${target.dataset.gy}`));
    });
    viewport.addEventListener("keydown", (e) => {
      const target = e.target.closest && e.target.closest(".cell");
      if (target && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); choose(byKey.get(`${target.dataset.gx},${target.dataset.gy}`)); }
      const step = { ArrowLeft: [40, 0], ArrowRight: [-40, 0], ArrowUp: [0, 40], ArrowDown: [0, -40] }[e.key];
      if (step && !target) { e.preventDefault(); state.x += step[0]; state.y += step[1]; apply(); save(); }
    });
    const centre = () => [viewport.clientWidth / 2, viewport.clientHeight / 2];
    const tools = h("div", { class: "atlas-tools" },
      h("button", { type: "button", id: "zoom-in", onclick: () => zoomAt(1.5, ...centre()) }, "+"),
      h("button", { type: "button", id: "zoom-out", onclick: () => zoomAt(1 / 1.5, ...centre()) }, "−"),
      h("button", { type: "button", id: "zoom-fit", onclick: () => { fit(); save(); } }, "fit"));
    requestAnimationFrame(() => {
      if (state.x === null || state.y === null) fit(); else apply();
      const chosen = state.cell && byKey.get(state.cell);
      if (chosen) choose(chosen, false);
    });
    return h("div", { class: "atlas-page" }, ...head,
      h("p", { class: "hint" }, "Each cell: the mean activation of the samples the layout put there, drawn as an icon (bigger: more samples). Drag to pan, wheel or +/− to zoom."),
      h("div", { class: "atlas-wrap" }, h("div", { class: "atlas-stage" }, tools, viewport), panel));
  }

  // ------------------------------------------------------------------ the layer view of one image (TensorSpace-like)
  const MEAN_MAPS = 64;
  const CLOSED_SIDE = 96;

  function tileSide(tile) {
    return tile < 32 ? tile * Math.ceil(32 / tile) : Math.min(tile, 64);
  }

  /** The closed view of a layer: the mean of (up to MEAN_MAPS evenly spaced) maps, drawn by alpha stacking. */
  function meanCanvas(entry, shape) {
    const canvas = h("canvas", { width: CLOSED_SIDE, height: CLOSED_SIDE, class: "flow-mean-map" });
    const picture = new Image();
    const n = entry.units;
    const k = Math.min(n, MEAN_MAPS);
    picture.onload = () => {
      const ctx = canvas.getContext("2d");
      ctx.imageSmoothingEnabled = entry.tile >= CLOSED_SIDE;
      for (let j = 0; j < k; j += 1) {
        const i = Math.floor((j * n) / k);
        ctx.globalAlpha = 1 / (j + 1); // the running mean: the j-th map over the mean of the first j
        ctx.drawImage(picture, (i % entry.columns) * entry.tile, Math.floor(i / entry.columns) * entry.tile,
          entry.tile, entry.tile, 0, 0, CLOSED_SIDE, CLOSED_SIDE);
      }
      canvas.dataset.drawn = String(k);
    };
    picture.src = fileUrl(entry.sprite);
    canvas.setAttribute("aria-label", `mean of ${k === n ? `all ${n}` : `${k} of ${n}`} feature maps, ${shapeText(shape)}`);
    return canvas;
  }

  function mapGrid(entry, layerName, shape) {
    const side = tileSide(entry.tile);
    const rows = Math.ceil(entry.units / entry.columns);
    const [, hh, ww] = shape || [];
    const size = hh ? `${hh}×${ww}` : `${entry.tile}×${entry.tile} px`;
    const grid = h("div", { class: "flow-grid", style: { width: `${entry.columns * side}px`, height: `${rows * side}px` } },
      h("img", { src: fileUrl(entry.sprite), alt: `${entry.units} feature maps of ${layerName}`, class: "sprite", draggable: "false",
        style: { width: `${entry.columns * side}px`, height: `${rows * side}px` } }));
    for (let i = 0; i < entry.units; i += 1) {
      grid.append(h("a", {
        href: href.unit(layerName, i), class: "tile", dataset: { unit: i }, "aria-label": `unit ${i}, ${size}`,
        style: { left: `${(i % entry.columns) * side}px`, top: `${Math.floor(i / entry.columns) * side}px`, width: `${side}px`, height: `${side}px` },
      }));
    }
    grid.addEventListener("pointermove", (e) => {
      const tile = e.target.closest && e.target.closest(".tile");
      if (tile) showTip(e, [`unit ${tile.dataset.unit}`, `map ${size} · ${layerName} ${shapeText(shape)}`]); else hideTip();
    });
    grid.addEventListener("pointerleave", hideTip);
    return grid;
  }

  async function flowView(route) {
    const [model, flow] = await Promise.all([api.model(), api.flow(route.image)]);
    crumbs([[`image ${flow.image}`, href.flow(flow.image)]]);
    const open = new Set(route.query.getAll("open"));
    const base = href.flow(flow.image);
    const order = model.flows;
    const at = order.indexOf(flow.image);
    const save = () => replaceQuery(base, [...open].map((name) => ["open", name]));
    const sections = flow.layers.map((entry) => {
      const shape = layerShape(model, entry.layer);
      const meta = model.layers.find((l) => l.name === entry.layer) || {};
      const body = h("div", { class: "flow-body" });
      const toggle = h("button", { type: "button", class: "flow-toggle", "aria-expanded": "false" });
      const box = h("section", { class: `flow-layer ${kindClass(meta.kind)}`, dataset: { layer: entry.layer } },
        h("header", {}, toggle, h("a", { href: href.layer(entry.layer), class: "flow-layer-link" }, "units ›")), body);
      const draw = () => {
        const isOpen = open.has(entry.layer);
        box.classList.toggle("open", isOpen);
        toggle.setAttribute("aria-expanded", String(isOpen));
        toggle.replaceChildren(h("span", { class: "caret" }, isOpen ? "▾" : "▸"), " ", h("strong", {}, entry.layer),
          ` ${meta.kind || ""} · ${shapeText(shape)}`);
        if (isOpen) {
          body.replaceChildren(mapGrid(entry, entry.layer, shape));
        } else {
          const k = Math.min(entry.units, MEAN_MAPS);
          const deck = h("button", { type: "button", class: "flow-mean", title: `${entry.layer}: click to open its ${entry.units} feature maps`,
            onclick: () => { open.add(entry.layer); draw(); save(); } }, meanCanvas(entry, shape));
          body.replaceChildren(deck, h("span", { class: "hint" },
            `mean of ${k === entry.units ? `all ${entry.units}` : `${k} of ${entry.units}`} maps; click to open`));
        }
      };
      toggle.addEventListener("click", () => {
        if (open.has(entry.layer)) open.delete(entry.layer); else open.add(entry.layer);
        draw();
        save();
      });
      draw();
      return box;
    });
    return h("div", { class: "flow-page" },
      h("h1", {}, `Layer view · image ${flow.image}`),
      pager(at > 0 && [`image ${order[at - 1]}`, href.flow(order[at - 1])], ["model", href.model()],
        at >= 0 && at + 1 < order.length && [`image ${order[at + 1]}`, href.flow(order[at + 1])]),
      h("div", { class: "flow-input" }, flow.thumb ? pic(flow.thumb, `image ${flow.image}`, "input-pic") : null,
        h("span", { title: flow.source || "" }, flow.source ? baseName(flow.source) : "")),
      h("div", { class: "flow-actions" },
        h("button", { type: "button", id: "open-all", onclick: () => { flow.layers.forEach((l) => open.add(l.layer)); save(); render(); } }, "open all"),
        h("button", { type: "button", id: "close-all", onclick: () => { open.clear(); save(); render(); } }, "close all")),
      h("ol", { class: "flow-stack" }, sections.map((s) => h("li", {}, s))));
  }

  // ------------------------------------------------------------------ search
  async function searchView(route) {
    const text = route.text || "";
    crumbs([[`search “${text}”`, href.search(text)]]);
    $("#search").value = text;
    const results = text.trim() ? await api.search(text) : [];
    return h("div", { class: "search-page" },
      h("h1", {}, `Units for “${text}”`),
      h("p", { class: "facts" }, results.length ? `${results.length}${results.length === SEARCH_LIMIT ? "+" : ""} units, best IoU first` : "No unit has this concept or top class."),
      h("ol", { class: "results" }, results.map((r) => h("li", {}, h("a", { href: href.unit(r.layer, r.unit), class: "result" },
        pic(r.vis, `unit ${r.unit}`, "thumb"),
        h("span", { class: "where" }, `${r.layer} · unit ${r.unit}`),
        h("span", { class: "concept" }, r.concept ? `${r.concept}${r.iou !== null && r.iou !== undefined ? ` (IoU ${fmt(r.iou)})` : ""}` : ""),
        h("span", { class: "class" }, r.top_class ? `top class ${r.top_class}` : ""))))));
  }

  async function missingView() {
    crumbs([["not found", null]]);
    throw new Error(`no such page: ${location.hash} (pages: #/, #/layer/L, #/layer/L/unit/U, #/layer/L/atlas, #/flow/I, #/search/TEXT)`);
  }

  // ------------------------------------------------------------------ the router
  const VIEWS = { model: modelView, layer: layerView, unit: unitView, atlas: atlasView, flow: flowView, search: searchView, missing: missingView };
  const TITLES = {
    model: () => "model", layer: (r) => r.layer, unit: (r) => `${r.layer} unit ${r.unit}`, atlas: (r) => `${r.layer} atlas`,
    flow: (r) => `image ${r.image}`, search: (r) => `search ${r.text}`, missing: () => "not found",
  };
  const scrolls = new Map();
  let currentHash = location.hash;
  let generation = 0;

  async function render() {
    const mine = ++generation;
    const route = parseRoute();
    const view = $("#view");
    hideTip();
    view.setAttribute("aria-busy", "true");
    let node;
    try {
      node = await VIEWS[route.view](route);
    } catch (error) {
      node = h("div", { class: "error", role: "alert" }, error.message || String(error));
    }
    if (mine !== generation) return; // a newer navigation won
    view.replaceChildren(node);
    view.dataset.view = node.classList.contains("error") ? "error" : route.view;
    view.removeAttribute("aria-busy");
    document.title = `${TITLES[route.view](route)} · convscope atlas`;
    window.scrollTo(0, scrolls.get(location.hash) || 0);
  }

  window.addEventListener("hashchange", () => {
    scrolls.set(currentHash, window.scrollY);
    currentHash = location.hash;
    render();
  });

  document.addEventListener("keydown", (e) => {
    if (e.altKey || e.ctrlKey || e.metaKey || /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(e.target.tagName)) return;
    const link = e.key === "ArrowLeft" ? $("#view .pager a.prev") : e.key === "ArrowRight" ? $("#view .pager a.next") : null;
    if (link && !e.target.closest(".atlas-viewport")) { e.preventDefault(); location.hash = link.getAttribute("href"); }
  });

  $("#search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("#search").value.trim();
    if (text) location.hash = href.search(text);
  });

  if ("scrollRestoration" in history) history.scrollRestoration = "manual";
  api.model().then((model) => { $("#model-name").textContent = model.model || ""; }, () => {});
  render();
})();
