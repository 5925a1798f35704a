// convscope explorer: the page over the JSON API of `convscope serve` (vanilla JS, no framework, no network
// beyond this server). Every API error is shown in the panel that asked, never as an alert.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, image: null, methods: {}, busy: 0 };

// ------------------------------------------------------------------ requests
function setBusy(delta, text) {
  state.busy = Math.max(0, state.busy + delta);
  $("busy").hidden = state.busy === 0;
  if (text) $("busy-text").textContent = text;
  for (const b of document.querySelectorAll("form button")) b.disabled = state.busy > 0;
}

async function api(path, params, options) {
  const url = new URL(path, window.location.href);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error("the server did not answer (is `convscope serve` still running?)");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    throw new Error(`unexpected answer from the server (HTTP ${response.status})`);
  }
  if (!response.ok) throw new Error(data && data.error ? data.error : `HTTP ${response.status}`);
  return data;
}

async function run(label, errorBox, work) {
  const box = $(errorBox);
  box.hidden = true;
  box.textContent = "";
  setBusy(+1, label);
  try {
    return await work();
  } catch (err) {
    box.textContent = err.message || String(err);
    box.hidden = false;
    return null;
  } finally {
    setBusy(-1);
  }
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v;
    else if (k === "className") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const fmt = (x, digits = 3) => (typeof x === "number" ? Number(x.toPrecision(digits)).toString() : String(x));
const shape = (s) => (s ? s.slice(1).join("×") : "");

// ------------------------------------------------------------------ set-up from /api/info
async function init() {
  const info = await run("Loading model facts…", "image-error", () => api("/api/info"));
  if (!info) return;
  state.info = info;
  const [h, w] = info.input_size;
  $("model-meta").textContent = `${info.model} · input ${h}×${w} · ${info.num_classes} classes · ${info.layers.length} layers · ${info.device}`;
  $("upload-limit").textContent = `${Math.round(info.limits.max_upload / 1048576)} MB`;
  $("max-steps").textContent = info.limits.max_steps;
  $("max-size").textContent = info.limits.max_size;
  $("steps").max = info.limits.max_steps;
  $("size").max = info.limits.max_size;

  const select = $("image-select");
  for (const s of info.samples) select.append(el("option", { value: s.id, text: `${s.name}: ${s.description}` }));
  const layers = $("layer-names");
  for (const l of info.layers) {
    layers.append(el("option", { value: l.name, label: `${l.type} ${shape(l.output_shape)}${l.receptive_field ? " · RF " + l.receptive_field : ""}` }));
  }
  const classes = $("class-names");
  info.labels.forEach((label, i) => classes.append(el("option", { value: label, label: String(i) })));
  const method = $("method");
  const families = {};
  for (const m of info.methods) {
    state.methods[m.name] = m;
    if (!families[m.family]) {
      families[m.family] = el("optgroup", { label: m.family });
      method.append(families[m.family]);
    }
    families[m.family].append(el("option", { value: m.name, text: m.name }));
  }
  method.value = state.methods.gradcam ? "gradcam" : info.methods[0].name;
  showOptions();
  if (info.default_layer) {
    $("explain-layer").placeholder = info.default_layer;
    $("layer-name").placeholder = info.default_layer;
    $("objective").placeholder = `${info.default_layer}:0`;
  }
  const first = info.samples.find((s) => s.name === "chelsea") || info.samples[0];
  if (first && !state.image) {
    select.value = first.id;
    await chooseImage(first.id);
  }
}

// ------------------------------------------------------------------ image and prediction
function showImage(data, caption) {
  state.image = data.id;
  $("preview").src = data.preview;
  $("preview-caption").textContent = `${caption}: ${data.width}×${data.height} px (shown as the network sees it)`;
  $("preview-figure").hidden = false;
}

async function chooseImage(id) {
  if (!id) return;
  const data = await run("Loading image…", "image-error", () => api("/api/image", { image: id }));
  if (!data) return;
  const option = [...$("image-select").options].find((o) => o.value === id);
  showImage(data, option ? option.textContent.split(":")[0] : id);
  await predict();
}

async function upload(file) {
  if (!file) return;
  const limit = state.info ? state.info.limits.max_upload : Infinity;
  if (file.size > limit) {
    const box = $("image-error");
    box.textContent = `${file.name} is ${(file.size / 1048576).toFixed(1)} MB, over the upload limit of ${Math.round(limit / 1048576)} MB`;
    box.hidden = false;
    return;
  }
  const data = await run(`Uploading ${file.name}…`, "image-error", () =>
    api("/api/image", {}, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } }));
  if (!data) return;
  const select = $("image-select");
  let option = [...select.options].find((o) => o.value === data.id);
  if (!option) {
    option = el("option", { value: data.id, text: `upload: ${file.name}` });
    select.append(option);
  }
  select.value = data.id;
  showImage(data, file.name);
  await predict();
}

async function predict() {
  if (!state.image) return;
  const data = await run("Predicting…", "image-error", () => api("/api/predict", { image: state.image, top: 5 }));
  const list = $("predictions");
  list.replaceChildren();
  if (!data) return;
  for (const p of data.predictions) {
    const fill = el("span", { className: "fill" });
    fill.style.width = `${Math.max(1, Math.round(100 * p.probability))}%`;
    const button = el("button", { type: "button", title: `explain class ${p.index} (${p.label})` },
      el("span", { className: "label", text: `${p.label}` }),
      el("span", { className: "pct", text: `${(100 * p.probability).toFixed(1)}% · ${p.index}` }),
      el("span", { className: "track" }, fill));
    button.addEventListener("click", () => {
      $("target").value = String(p.index);
      selectTab("explain");
      explain();
    });
    list.append(el("li", {}, button));
  }
}

// ------------------------------------------------------------------ explain
function optionInput(method, opt) {
  const id = `opt-${method.name}-${opt.name}`.replace(/[^A-Za-z0-9_-]/g, "_");
  const types = opt.type;
  const label = el("label", { for: id, text: opt.name });
  let input;
  if (opt.choices) {
    input = el("select", { id });
    for (const c of opt.choices) input.append(el("option", { value: String(c), text: String(c) }));
    input.value = String(opt.default);
  } else if (types.length === 1 && types[0] === "bool") {
    input = el("input", { id, type: "checkbox" });
    input.checked = Boolean(opt.default);
    const field = el("div", { className: "field check", title: opt.help }, input, label);
    input.dataset.option = opt.name;
    input.dataset.default = String(Boolean(opt.default));
    return field;
  } else {
    const numeric = types.every((t) => t === "int" || t === "float");
    input = el("input", { id, type: "text", placeholder: opt.default === null ? "none" : String(opt.default), autocomplete: "off" });
    if (numeric) input.setAttribute("inputmode", types.includes("float") ? "decimal" : "numeric");
  }
  input.dataset.option = opt.name;
  input.dataset.default = opt.default === null ? "" : String(opt.default);
  return el("div", { className: "field", title: opt.help }, label, input, el("span", { className: "hint", text: opt.help }));
}

function showOptions() {
  const m = state.methods[$("method").value];
  const box = $("options");
  box.replaceChildren(el("legend", { text: `${m.name} options` }));
  for (const opt of m.options) box.append(optionInput(m, opt));
  box.hidden = m.options.length === 0;
  $("layer-field").hidden = !m.uses_layer;
  $("method-info").textContent = `${m.family} · cost: ${m.passes}${m.summary ? " · " + m.summary : ""}`;
}

function optionParams() {
  const params = {};
  for (const input of $("options").querySelectorAll("[data-option]")) {
    let value;
    if (input.type === "checkbox") value = String(input.checked);
    else value = input.value.trim();
    if (value !== "" && value !== input.dataset.default) params[`opt.${input.dataset.option}`] = value;
  }
  return params;
}

async function explain() {
  if (!state.image) {
    const box = $("explain-error");
    box.textContent = "choose or upload an image first";
    box.hidden = false;
    return;
  }
  const method = $("method").value;
  const m = state.methods[method];
  const params = {
    image: state.image,
    method,
    layer: m.uses_layer ? $("explain-layer").value.trim() : "",
    target: $("target").value.trim(),
    view: $("view").value,
    ...optionParams(),
  };
  const data = await run(`Explaining with ${method}…`, "explain-error", () => api("/api/explain", params));
  if (!data) return;
  $("explain-image").src = data.image;
  $("explain-image").alt = `${data.method} map for class ${data.target.label}`;
  const parts = [
    `${data.method}${data.layer ? " at " + data.layer : ""}`,
    `class ${data.target.index} (${data.target.label})`,
    `${data.forward_passes} forward + ${data.backward_passes} backward passes`,
    `${data.seconds.toFixed(2)} s`,
  ];
  if (data.extras && typeof data.extras.completeness_error === "number") {
    parts.push(`completeness error ${(100 * data.extras.completeness_error).toFixed(1)}%`);
  }
  if (data.extras && data.extras.engine) parts.push(`engine ${data.extras.engine}`);
  $("explain-caption").textContent = parts.join(" · ");
  $("explain-result").hidden = false;
}

// ------------------------------------------------------------------ layer views
async function layerView(kind) {
  const layer = $("layer-name").value.trim();
  const max = $("layer-max").value;
  if (kind !== "filters" && !state.image) {
    const box = $("layer-error");
    box.textContent = "choose or upload an image first";
    box.hidden = false;
    return;
  }
  const img = $("layer-image");
  const chart = $("channel-chart");
  const top = $("channel-top");
  let data;
  if (kind === "activations") {
    data = await run("Computing feature maps…", "layer-error", () =>
      api("/api/activations", { image: state.image, layer, max, sort: $("layer-sort").value }));
    if (!data) return;
    $("layer-caption").textContent = `${data.layer}: ${data.shown} of ${data.channels} channels, ${data.height}×${data.width}; ${data.zero_channels} channels are zero everywhere`;
  } else if (kind === "filters") {
    data = await run("Drawing filters…", "layer-error", () => api("/api/filters", { layer, max }));
    if (!data) return;
    $("layer-caption").textContent = data.summary;
  } else {
    data = await run("Measuring channel responses…", "layer-error", () =>
      api("/api/channels", { image: state.image, layer, top: Math.min(Number(max) || 8, 16) }));
    if (!data) return;
    $("layer-caption").textContent = `${data.layer}: mean response of each of ${data.channels} channels (${data.zero_channels} exactly zero); top channels highlighted`;
    drawChannels(data);
  }
  img.hidden = kind === "channels";
  chart.hidden = top.hidden = kind !== "channels";
  if (kind !== "channels") {
    img.src = data.image;
    img.alt = `${kind === "filters" ? "filters" : "feature maps"} of ${data.layer}`;
  }
  $("layer-result").hidden = false;
}

function drawChannels(data) {
  const chart = $("channel-chart");
  const topList = $("channel-top");
  chart.replaceChildren();
  topList.replaceChildren();
  const lo = Math.min(0, ...data.means);
  const hi = Math.max(...data.means, lo + 1e-12);
  const best = new Set(data.top.map((t) => t.channel));
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${data.means.length} 100`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `bar chart of the ${data.means.length} channel means of ${data.layer}`);
  data.means.forEach((v, i) => {
    const h = Math.max(0.5, (100 * (v - lo)) / (hi - lo));
    const bar = document.createElementNS(NS, "rect");
    bar.setAttribute("x", String(i));
    bar.setAttribute("y", String(100 - h));
    bar.setAttribute("width", "1");
    bar.setAttribute("height", String(h));
    bar.setAttribute("class", best.has(i) ? "top" : "");
    const tip = document.createElementNS(NS, "title");
    tip.textContent = `channel ${i}: ${fmt(v)}`;
    bar.append(tip);
    svg.append(bar);
  });
  chart.append(svg);
  for (const t of data.top) {
    const go = el("button", { type: "button", text: "visualize", title: `render ${data.layer}:${t.channel}` });
    go.addEventListener("click", () => {
      $("objective").value = `${data.layer}:${t.channel}`;
      selectTab("visualize");
      visualize();
    });
    topList.append(el("li", {}, `channel ${t.channel}: mean ${fmt(t.mean)}`, go));
  }
}

// ------------------------------------------------------------------ visualize
async function visualize() {
  const objective = $("objective").value.trim() || $("objective").placeholder;
  const params = { objective, steps: $("steps").value, size: $("size").value, seed: $("seed").value };
  const data = await run(`Rendering ${objective}…`, "visualize-error", () => api("/api/visualize", params));
  if (!data) return;
  $("visualize-image").src = data.image;
  $("visualize-image").alt = `image that maximises ${data.objective}`;
  $("visualize-caption").textContent = `${data.objective}: ${data.steps} steps at ${data.size} px, seed ${data.seed}; objective ${fmt(data.value)}; ${data.seconds.toFixed(1)} s`;
  $("visualize-result").hidden = false;
}

// ------------------------------------------------------------------ tabs
function selectTab(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const on = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !on;
  }
}

function wireTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab.id.slice(4)));
    tab.addEventListener("keydown", (e) => {
      const step = e.key === "ArrowRight" ? 1 : e.key === "ArrowLeft" ? -1 : 0;
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      selectTab(next.id.slice(4));
      next.focus();
    });
  });
}

// ------------------------------------------------------------------ wiring
document.addEventListener("DOMContentLoaded", () => {
  wireTabs();
  $("image-select").addEventListener("change", (e) => chooseImage(e.target.value));
  $("upload").addEventListener("change", (e) => upload(e.target.files[0]));
  $("method").addEventListener("change", showOptions);
  $("explain-form").addEventListener("submit", (e) => { e.preventDefault(); explain(); });
  $("layer-form").addEventListener("submit", (e) => { e.preventDefault(); layerView("activations"); });
  $("channels-button").addEventListener("click", () => layerView("channels"));
  $("filters-button").addEventListener("click", () => layerView("filters"));
  $("visualize-form").addEventListener("submit", (e) => { e.preventDefault(); visualize(); });
  init();
});
