// convscope explorer: the page over the JSON API of `convscope serve` (vanilla JS, no framework, no network
// beyond this server). Every API error is shown in the panel that asked, never as an alert.
"use strict";

const $ = (id) => document.getElementById(id);
// gen: bumped whenever the image changes; seq: the newest request of each panel. A response whose
// gen or seq is no longer current is dropped, so a result for a previous image never lands beside a new one.
const state = { info: null, image: null, methods: {}, busy: 0, gen: 0, seq: {}, job: null };
// The per-launch token: `convscope serve` prints it in the URL (?token=...), every API call sends it.
const TOKEN = new URLSearchParams(window.location.search).get("token") || "";
// Uploads are kept per page (browser tab): a random id, kept across reloads of the tab.
const CLIENT = (() => {
  let id = sessionStorage.getItem("convscope-client");
  if (!id) {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    id = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("convscope-client", id);
  }
  return id;
})();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// A job estimated (from its first steps) to take longer than this many seconds stops and asks first.
const BUDGET_SECONDS = 20;
// Panels whose jobs do not depend on the image shown (they survive an image change).
const IMAGE_FREE = ["visualize", "batch"];

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
  const opts = { ...(options || {}) };
  opts.headers = { ...(opts.headers || {}), "X-Convscope-Token": TOKEN, "X-Convscope-Client": CLIENT };
  let response;
  try {
    response = await fetch(url, opts);
  } catch (err) {
    throw new Error("the server did not answer (is `convscope serve` still running?)");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    throw new Error(`unexpected answer from the server (HTTP ${response.status})`);
  }
  if (!response.ok) {
    let message = data && data.error ? data.error : `HTTP ${response.status}`;
    if (response.status === 403 && /token/.test(message) && !TOKEN) {
      message += " (this page was opened without the ?token=... that `convscope serve` printed)";
    }
    throw new Error(message);
  }
  return data;
}

// ------------------------------------------------------------------ jobs (long calls, with progress and cancel)
function showJob(text, fraction) {
  $("job").hidden = false;
  $("job-text").textContent = text;
  $("job-progress").value = Math.max(0, Math.min(1, fraction || 0));
}

async function cancelJob() {
  const job = state.job;
  state.job = null;
  $("job").hidden = true;
  if (job) {
    try { await api(`/api/jobs/${job.id}/cancel`, {}, { method: "POST" }); } catch (err) { /* gone already */ }
  }
}

// Queue a job and poll it; the result, or null when it was cancelled or is stale (another image, a
// newer request of the same panel). Errors throw (shown by run()).
async function runJob(kind, params, label, panel, gen, seq) {
  if (state.job) await cancelJob();  // one job at a time from this page
  const budget = state.noBudget ? "" : BUDGET_SECONDS;
  state.noBudget = false;
  const job = await api("/api/jobs", { kind, budget, ...params }, { method: "POST" });
  state.job = { id: job.id, panel };
  showJob(`${label}: waiting`, 0);
  const current = () => state.job && state.job.id === job.id && (gen === null || gen === state.gen) && seq === state.seq[panel];
  while (true) {
    await sleep(150);
    if (!current()) return null;
    const j = await api(`/api/jobs/${job.id}`);
    if (!current()) return null;
    if (j.status === "queued") showJob(`${label}: waiting (${j.position} ahead)`, 0);
    else if (j.status === "running") {
      const steps = j.total ? ` ${j.stage} ${j.done}/${j.total}` : "";
      const left = j.fraction > 0.02 ? ` · about ${Math.ceil((j.elapsed * (1 - j.fraction)) / j.fraction)} s left` : "";
      showJob(`${label}:${steps} · ${j.elapsed.toFixed(1)} s${left}`, j.fraction);
    } else {
      state.job = null;
      $("job").hidden = true;
      if (j.status === "done") return j.result;
      if (j.status === "cancelled") throw new Error(`cancelled (${j.reason})`);
      if (j.status === "estimate") {
        const err = new Error(`${label} would take about ${Math.round(j.estimate_seconds)} s ` +
          `(${j.total} steps of ${j.stage}; the budget is ${j.budget} s).`);
        err.estimate = j;
        throw err;
      }
      throw new Error(j.error);
    }
  }
}

async function run(label, errorBox, work, resultBox, gen) {
  const box = $(errorBox);
  box.hidden = true;
  box.textContent = "";
  setBusy(+1, label);
  try {
    return await work();
  } catch (err) {
    if (gen !== undefined && gen !== state.gen) return null;  // about an image no longer shown
    box.textContent = err.message || String(err);
    box.hidden = false;
    if (resultBox) $(resultBox).hidden = true;  // an error clears the previous result
    return null;
  } finally {
    setBusy(-1);
  }
}

// Like run(), for a job: no page-wide busy state (the job bar shows progress and has the cancel
// button; the image can change meanwhile), and nothing shown once the image or the request is stale.
async function runJobPanel(kind, params, label, panel, errorBox, resultBox, retry) {
  const gen = IMAGE_FREE.includes(panel) ? null : state.gen;  // these do not depend on the image shown
  const seq = (state.seq[panel] = (state.seq[panel] || 0) + 1);
  const box = $(errorBox);
  box.hidden = true;
  box.textContent = "";
  try {
    const data = await runJob(kind, params, label, panel, gen, seq);
    const fresh = () => (gen === null || gen === state.gen) && seq === state.seq[panel];
    return data && fresh() ? data : null;
  } catch (err) {
    if ((gen !== null && gen !== state.gen) || seq !== state.seq[panel]) return null;
    box.textContent = err.message || String(err);
    if (err.estimate && retry) {
      const go = el("button", { type: "button", id: `${panel}-run-anyway`, text: "Run anyway" });
      go.addEventListener("click", () => { state.noBudget = true; retry(); });
      box.append(" ", go);
    }
    box.hidden = false;
    $(resultBox).hidden = true;  // an error clears the previous result
    return null;
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
  const link = readLink();
  const compareBox = $("compare-methods");
  for (const m of info.methods) {
    const id = `compare-${m.name}`.replace(/[^A-Za-z0-9_-]/g, "_");
    const box = el("input", { type: "checkbox", id, value: m.name });
    box.checked = ["gradcam", "saliency", "integrated_gradients", "guided_backprop"].includes(m.name);
    compareBox.append(el("label", { for: id, className: "check" }, box, ` ${m.name}`));
  }
  method.value = state.methods[link.get("method")] ? link.get("method") : state.methods.gradcam ? "gradcam" : info.methods[0].name;
  showOptions();
  if (link.get("tab") && $(`tab-${link.get("tab")}`)) selectTab(link.get("tab"));
  if (info.default_layer) {
    $("explain-layer").placeholder = info.default_layer;
    $("layer-name").placeholder = info.default_layer;
    $("objective").placeholder = `${info.default_layer}:0`;
  }
  const linked = link.get("image");
  if (linked && !state.image) {
    if (![...select.options].some((o) => o.value === linked)) select.append(el("option", { value: linked, text: `upload ${linked}` }));
    select.value = linked;
    await chooseImage(linked);
    return;
  }
  const first = info.samples.find((s) => s.name === "chelsea") || info.samples[0];
  if (first && !state.image) {
    select.value = first.id;
    await chooseImage(first.id);
  }
}

// ------------------------------------------------------------------ image and prediction
function imageChanged(id) {
  if (id === state.image) return;
  state.gen += 1;
  $("target").value = "";  // the target class belongs to the previous image
  for (const box of ["explain-result", "compare-result", "layer-result", "explain-error", "layer-error"]) $(box).hidden = true;
  if (state.job && !IMAGE_FREE.includes(state.job.panel)) cancelJob();
}

function showImage(data, caption) {
  imageChanged(data.id);
  state.image = data.id;
  saveLink();
  $("preview").src = data.preview;
  $("preview-caption").textContent = `${caption}: ${data.width}×${data.height} px (shown as the network sees it)`;
  $("preview-figure").hidden = false;
}

async function chooseImage(id) {
  if (!id) return;
  imageChanged(id);
  state.image = null;
  const gen = state.gen;
  const data = await run("Loading image…", "image-error", () => api("/api/image", { image: id }), null, gen);
  if (!data || gen !== state.gen) return;
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
  const gen = state.gen;
  const list = $("predictions");
  list.replaceChildren();
  const data = await run("Predicting…", "image-error", () => api("/api/predict", { image: state.image, top: 5 }), null, gen);
  if (!data || gen !== state.gen) return;
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
  $("method-info").textContent = `${m.family} · cost: ${m.passes}`;
  $("method-description").textContent = m.description || m.summary || "";
  $("method-paper").textContent = m.paper ? `Paper: ${m.paper}` : "";
  saveLink();
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
  const data = await runJobPanel("explain", params, `Explaining with ${method}`, "explain", "explain-error", "explain-result", explain);
  if (!data) return;
  $("explain-image").src = data.image;
  $("explain-image").alt = `${data.method} map for class ${data.target.label}`;
  $("explain-image").dataset.image = params.image;
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
  const advice = $("explain-advice");
  advice.textContent = (data.extras && data.extras.advice) || "";
  advice.hidden = !advice.textContent;
  $("explain-result").hidden = false;
}

// Several methods on one image, one job after another, side by side (Cancel stops the rest).
async function compare() {
  const names = [...document.querySelectorAll("#compare-methods input:checked")].map((i) => i.value);
  const grid = $("compare-result");
  grid.replaceChildren();
  grid.hidden = true;
  if (!state.image || names.length === 0) {
    const box = $("explain-error");
    box.textContent = state.image ? "tick at least one method to compare" : "choose or upload an image first";
    box.hidden = false;
    return;
  }
  const gen = state.gen;
  const image = state.image;
  for (const name of names) {
    const m = state.methods[name];
    const params = {
      image, method: name, layer: m.uses_layer ? $("explain-layer").value.trim() : "",
      target: $("target").value.trim(), view: $("view").value,
    };
    state.noBudget = true;  // ticked knowingly; Cancel stops the rest
    const data = await runJobPanel("explain", params, `Comparing ${name}`, "compare", "explain-error", "compare-result");
    if (!data || gen !== state.gen) return;  // cancelled, failed or another image: stop
    const img = el("img", { src: data.image, alt: `${data.method} map for class ${data.target.label}` });
    img.dataset.image = image;
    const caption = `${data.method}${data.layer ? " at " + data.layer : ""} · ${data.target.label} · ` +
      `${data.forward_passes}+${data.backward_passes} passes · ${data.seconds.toFixed(2)} s`;
    grid.append(el("figure", { className: "result" }, img, el("figcaption", { text: caption })));
    grid.hidden = false;
  }
}

// A batch: every image of the image list (samples and this page's uploads), predicted, kept when the
// top class matches the filter (index, or part of the label), and explained with the chosen method.
async function batch() {
  const filter = $("batch-filter").value.trim().toLowerCase();
  const method = $("method").value;
  const m = state.methods[method];
  const grid = $("batch-result");
  const caption = $("batch-caption");
  grid.replaceChildren();
  grid.hidden = true;
  caption.hidden = true;
  $("explain-error").hidden = true;
  const seq = (state.seq.batchRun = (state.seq.batchRun || 0) + 1);
  const ids = [...$("image-select").options].map((o) => [o.value, o.textContent.split(":")[0]]).filter(([v]) => v);
  let kept = 0;
  for (const [id, name] of ids) {
    let top;
    try {
      top = (await api("/api/predict", { image: id, top: 1 })).predictions[0];
    } catch (err) {
      continue;  // e.g. an upload the server dropped
    }
    if (seq !== state.seq.batchRun) return;
    const match = !filter || String(top.index) === filter || top.label.toLowerCase().includes(filter);
    if (!match) continue;
    kept += 1;
    const params = { image: id, method, layer: m.uses_layer ? $("explain-layer").value.trim() : "", view: $("view").value, ...optionParams() };
    state.noBudget = true;  // asked for knowingly; Cancel stops the rest
    const data = await runJobPanel("explain", params, `Batch ${kept}: ${name}`, "batch", "explain-error", "batch-result");
    if (!data || seq !== state.seq.batchRun) return;
    const img = el("img", { src: data.image, alt: `${data.method} map of ${name}` });
    img.dataset.image = id;
    grid.append(el("figure", { className: "result" }, img, el("figcaption", {
      text: `${name}: ${top.label} ${(100 * top.probability).toFixed(0)}% · ${data.method}` })));
    grid.hidden = false;
  }
  caption.textContent = `${kept} of ${ids.length} images predicted as ${filter ? `“${filter}”` : "anything"}`;
  caption.hidden = false;
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
  const gen = state.gen;
  const seq = (state.seq.layer = (state.seq.layer || 0) + 1);
  const stale = () => gen !== state.gen || seq !== state.seq.layer;
  let data;
  if (kind === "activations") {
    data = await run("Computing feature maps…", "layer-error", () =>
      api("/api/activations", { image: state.image, layer, max, sort: $("layer-sort").value }), "layer-result", gen);
    if (!data || stale()) return;
    $("layer-caption").textContent = `${data.layer}: ${data.shown} of ${data.channels} channels, ${data.height}×${data.width}; ${data.zero_channels} channels are zero everywhere`;
  } else if (kind === "filters") {
    data = await run("Drawing filters…", "layer-error", () => api("/api/filters", { layer, max }), "layer-result");
    if (!data || stale()) return;
    $("layer-caption").textContent = data.summary;
  } else {
    data = await run("Measuring channel responses…", "layer-error", () =>
      api("/api/channels", { image: state.image, layer, top: Math.min(Number(max) || 8, 16) }), "layer-result", gen);
    if (!data || stale()) return;
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
  const data = await runJobPanel("visualize", params, `Rendering ${objective}`, "visualize", "visualize-error", "visualize-result", visualize);
  if (!data) return;
  $("visualize-image").src = data.image;
  $("visualize-image").alt = `image that maximises ${data.objective}`;
  $("visualize-caption").textContent = `${data.objective}: ${data.steps} steps at ${data.size} px, seed ${data.seed}; objective ${fmt(data.value)}; ${data.seconds.toFixed(1)} s`;
  $("visualize-result").hidden = false;
}

// ------------------------------------------------------------------ tabs
// ------------------------------------------------------------------ deep links: #image=...&tab=...&method=...
function saveLink() {
  if (!state.info) return;
  const tab = document.querySelector("[role=tab][aria-selected=true]");
  const link = new URLSearchParams();
  if (state.image) link.set("image", state.image);
  if (tab) link.set("tab", tab.id.slice(4));
  if ($("method").value) link.set("method", $("method").value);
  history.replaceState(null, "", `${window.location.pathname}${window.location.search}#${link}`);
}

function readLink() {
  return new URLSearchParams(window.location.hash.slice(1));
}

function selectTab(name) {
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const on = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !on;
  }
  saveLink();
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
  $("job-cancel").addEventListener("click", () => cancelJob());
  $("compare-button").addEventListener("click", () => compare());
  $("batch-button").addEventListener("click", () => batch());
  window.addEventListener("pagehide", () => {  // the page goes away: its job with it
    if (state.job) fetch(`/api/jobs/${state.job.id}/cancel`, { method: "POST", keepalive: true,
      headers: { "X-Convscope-Token": TOKEN, "X-Convscope-Client": CLIENT } });
  });
  init();
});
