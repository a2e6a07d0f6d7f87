// bnnserve playground: draw or drop an image, convert it to the model's input (shape and value
// range read from GET v2/models/{name}), run V2 inference, show label, probabilities, latency.
// No build step, no libraries; every URL is relative, so the page works under any root path.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, metadata: null, serving: {}, timer: null };
// For tests and the curious: what was last sent and received.
window.playground = { lastInput: null, lastShape: null, lastResult: null, models: 0 };

// --- HTTP -----------------------------------------------------------------------------------
function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const message = (data && data.error) || response.statusText;
    throw new Error(response.status === 401 ? `${message} (enter the API key above)` : message);
  }
  return { data, response };
}

function versionPath(name, version) {
  const base = `v2/models/${encodeURIComponent(name)}`;
  return version ? `${base}/versions/${encodeURIComponent(version)}` : base;
}

// --- input geometry: a model's per-instance shape as an image ------------------------------
// [C, H, W] (C ≤ 4) and [H, W, C] (C ≤ 4) are images; [H, W] is grey; a flat [N] is a square
// grey image when N is a square number, else a one-row strip; other channel counts repeat grey.
function geometry(dims) {
  if (dims.length === 3 && dims[0] <= 4) return { c: dims[0], h: dims[1], w: dims[2], order: "chw" };
  if (dims.length === 3 && dims[2] <= 4) return { c: dims[2], h: dims[0], w: dims[1], order: "hwc" };
  if (dims.length === 3) return { c: dims[0], h: dims[1], w: dims[2], order: "chw" };
  if (dims.length === 2) return { c: 1, h: dims[0], w: dims[1], order: "chw" };
  const n = dims.reduce((a, b) => a * b, 1);
  const side = Math.round(Math.sqrt(n));
  if (side * side === n) return { c: 1, h: side, w: side, order: "chw" };
  return { c: 1, h: 1, w: n, order: "chw" };
}

// Box-average the drawing pad down to h × w; (h, w, 3) intensities in [0, 1].
function downsample(h, w) {
  const pad = $("pad");
  const src = pad.getContext("2d").getImageData(0, 0, pad.width, pad.height).data;
  const out = new Float32Array(h * w * 3);
  for (let y = 0; y < h; y++) {
    const y0 = Math.floor((y * pad.height) / h), y1 = Math.max(y0 + 1, Math.floor(((y + 1) * pad.height) / h));
    for (let x = 0; x < w; x++) {
      const x0 = Math.floor((x * pad.width) / w), x1 = Math.max(x0 + 1, Math.floor(((x + 1) * pad.width) / w));
      const sum = [0, 0, 0];
      for (let sy = y0; sy < y1; sy++) {
        for (let sx = x0; sx < x1; sx++) {
          const i = (sy * pad.width + sx) * 4;
          sum[0] += src[i]; sum[1] += src[i + 1]; sum[2] += src[i + 2];
        }
      }
      const count = (y1 - y0) * (x1 - x0) * 255;
      for (let k = 0; k < 3; k++) out[(y * w + x) * 3 + k] = sum[k] / count;
    }
  }
  return out;
}

// The pad as the model's input: flat row-major values in the model's trained value range.
function modelInput() {
  const parameters = state.metadata.parameters || {};
  const dims = state.metadata.inputs[0].shape.slice(1);
  const g = geometry(dims);
  const rgb = downsample(g.h, g.w);
  const [low, high] = parameters.value_range || [0, 1];
  const integer = Boolean(parameters.integer_valued);
  const invert = $("invert").checked;
  const value = (y, x, channel) => {
    const i = (y * g.w + x) * 3;
    let v = g.c === 1 || g.c > 4 ? (rgb[i] + rgb[i + 1] + rgb[i + 2]) / 3 : rgb[i + Math.min(channel, 2)];
    if (invert) v = 1 - v;
    v = low + v * (high - low);
    return integer ? Math.round(v) : v;
  };
  const data = [];
  if (g.order === "hwc") {
    for (let y = 0; y < g.h; y++) for (let x = 0; x < g.w; x++) for (let c = 0; c < g.c; c++) data.push(value(y, x, c));
  } else {
    for (let c = 0; c < g.c; c++) for (let y = 0; y < g.h; y++) for (let x = 0; x < g.w; x++) data.push(value(y, x, c));
  }
  drawPreview(g, rgb, invert);
  return { data, shape: [1, ...dims] };
}

function drawPreview(g, rgb, invert) {
  const preview = $("preview");
  const ctx = preview.getContext("2d");
  const cell = Math.max(1, Math.floor(Math.min(preview.width / g.w, preview.height / g.h)));
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, preview.width, preview.height);
  for (let y = 0; y < g.h; y++) {
    for (let x = 0; x < g.w; x++) {
      const i = (y * g.w + x) * 3;
      const px = [0, 1, 2].map((k) => {
        const v = g.c === 1 ? (rgb[i] + rgb[i + 1] + rgb[i + 2]) / 3 : rgb[i + k];
        return Math.round(255 * (invert ? 1 - v : v));
      });
      ctx.fillStyle = `rgb(${px.join(",")})`;
      ctx.fillRect(x * cell, y * cell, cell, cell);
    }
  }
}

// --- inference ------------------------------------------------------------------------------
async function predict() {
  if (!state.metadata) return;
  const input = modelInput();
  window.playground.lastInput = input.data;
  window.playground.lastShape = input.shape;
  const body = {
    inputs: [{ name: state.metadata.inputs[0].name, shape: input.shape, datatype: "FP32", data: input.data }],
    outputs: [{ name: "probabilities" }, { name: "label" }],
  };
  $("error").textContent = "";
  const started = performance.now();
  try {
    const { data, response } = await api("POST", `${versionPath(state.model, $("version").value)}/infer`, body);
    const roundTrip = performance.now() - started;
    const outputs = Object.fromEntries(data.outputs.map((o) => [o.name, o.data]));
    const timing = /dur=([0-9.]+)/.exec(response.headers.get("Server-Timing") || "");
    $("label").textContent = outputs.label[0];
    $("latency").textContent = `${timing ? `server ${Number(timing[1]).toFixed(2)} ms · ` : ""}` +
      `round trip ${roundTrip.toFixed(1)} ms · version ${data.model_version}`;
    drawBars(outputs.probabilities, state.metadata.parameters.labels || []);
    window.playground.lastResult = { label: outputs.label[0], probabilities: outputs.probabilities, version: data.model_version };
  } catch (error) {
    $("error").textContent = error.message;
  }
}

function drawBars(probabilities, labels) {
  const bars = $("bars");
  bars.replaceChildren();
  const top = probabilities.indexOf(Math.max(...probabilities));
  probabilities.forEach((p, i) => {
    const name = document.createElement("span");
    name.textContent = labels[i] ?? String(i);
    const track = document.createElement("div");
    const bar = document.createElement("div");
    bar.className = i === top ? "bar top" : "bar";
    bar.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(bar);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * p).toFixed(1)} %`;
    bars.append(name, track, value);
  });
}

// --- models and versions --------------------------------------------------------------------
async function loadModels() {
  const { data } = await api("GET", "v1/models");
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...data.models.map((m) => new Option(m.name, m.name)));
  window.playground.models = data.models.length;
  if (data.models.some((m) => m.name === previous)) select.value = previous;
  state.serving = Object.fromEntries(data.models.map((m) => [m.name, m.serving_version]));
  fillVersions(data.models);
  await selectModel();
}

function fillVersions(models) {
  const model = models.find((m) => m.name === $("model").value);
  const select = $("version");
  const previous = select.value;
  const ready = model ? model.versions.filter((v) => v.state === "READY").map((v) => v.version) : [];
  select.replaceChildren(new Option("newest", ""), ...ready.map((v) => new Option(v, v)));
  if (ready.includes(previous)) select.value = previous;
}

async function selectModel() {
  state.model = $("model").value;
  if (!state.model) {
    $("input-info").textContent = "No model is serving yet: publish one into the repository.";
    return;
  }
  const { data } = await api("GET", versionPath(state.model, $("version").value));
  state.metadata = data;
  const input = data.inputs[0];
  const g = geometry(input.shape.slice(1));
  const range = (data.parameters && data.parameters.value_range) || [0, 1];
  const graph = data.graph || [];
  const format = (data.parameters && data.parameters.format_version) || 1;
  $("input-info").textContent = `Input '${input.name}' ${JSON.stringify(input.shape)} ${input.datatype}: ` +
    `drawn as ${g.w}×${g.h}${g.c === 3 ? " RGB" : ""}, values ${range[0]}..${range[1]}. ` +
    `Format v${format}, ${graph.length} layers (${layerKinds(graph)}).`;
  if (hasInk()) predict();
}

function layerKinds(graph) {
  // "conv2d ×17, add ×8, …": how many layers of each kind, in order of first appearance
  const counts = new Map();
  for (const layer of graph) counts.set(layer.kind, (counts.get(layer.kind) || 0) + 1);
  return [...counts].map(([kind, n]) => (n > 1 ? `${kind} ×${n}` : kind)).join(", ");
}

// --- the repository panel -------------------------------------------------------------------
async function refreshRepository() {
  try {
    const { data } = await api("POST", "v2/repository/index", {});
    $("index").replaceChildren(...data.map((row) => {
      const tr = document.createElement("tr");
      for (const key of ["name", "version", "state", "reason"]) {
        const td = document.createElement("td");
        td.textContent = row[key] || "";
        if (key === "state") td.className = row.state;
        tr.append(td);
      }
      return tr;
    }));
    const { data: listing } = await api("GET", "v1/models");
    for (const m of listing.models) {
      const before = state.serving[m.name];
      if (before && m.serving_version && before !== m.serving_version) {
        const notice = $("live-notice");
        notice.textContent = `${m.name} version ${m.serving_version} is live (was ${before}).`;
        notice.hidden = false;
        state.serving[m.name] = m.serving_version;
        fillVersions(listing.models);
        if (m.name === state.model && !$("version").value) await selectModel();
      }
    }
  } catch (error) {
    $("error").textContent = error.message;
  }
}

// --- drawing and dropping -------------------------------------------------------------------
function clearPad() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  ctx.fillStyle = "black";
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function hasInk() {
  const pad = $("pad");
  const pixels = pad.getContext("2d").getImageData(0, 0, pad.width, pad.height).data;
  for (let i = 0; i < pixels.length; i += 4) if (pixels[i] || pixels[i + 1] || pixels[i + 2]) return true;
  return false;
}

function setUpPad() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  let drawing = false;
  const point = (event) => {
    const rect = pad.getBoundingClientRect();
    return [((event.clientX - rect.left) * pad.width) / rect.width, ((event.clientY - rect.top) * pad.height) / rect.height];
  };
  pad.addEventListener("pointerdown", (event) => {
    drawing = true;
    ctx.strokeStyle = "white";
    ctx.lineWidth = pad.width / 12;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...point(event));
  });
  pad.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    ctx.lineTo(...point(event));
    ctx.stroke();
  });
  const finish = () => {
    if (!drawing) return;
    drawing = false;
    predict();
  };
  pad.addEventListener("pointerup", finish);
  pad.addEventListener("pointerleave", finish);
  pad.addEventListener("dragover", (event) => { event.preventDefault(); pad.classList.add("dragover"); });
  pad.addEventListener("dragleave", () => pad.classList.remove("dragover"));
  pad.addEventListener("drop", (event) => {
    event.preventDefault();
    pad.classList.remove("dragover");
    if (event.dataTransfer.files.length) drawImageFile(event.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) drawImageFile(event.target.files[0]);
  });
}

// Fit the image inside the pad (letterboxed on black), then predict.
function drawImageFile(file) {
  const image = new Image();
  image.onload = () => {
    const pad = $("pad");
    clearPad();
    const scale = Math.min(pad.width / image.width, pad.height / image.height);
    const w = image.width * scale, h = image.height * scale;
    pad.getContext("2d").drawImage(image, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    URL.revokeObjectURL(image.src);
    predict();
  };
  image.src = URL.createObjectURL(file);
}

// --- start ----------------------------------------------------------------------------------
async function start() {
  $("api-key").value = localStorage.getItem("bnnserve-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("bnnserve-api-key", $("api-key").value.trim());
    loadModels().catch((error) => { $("error").textContent = error.message; });
  });
  $("model").addEventListener("change", async () => {
    const { data } = await api("GET", "v1/models");
    fillVersions(data.models);
    await selectModel();
  });
  $("version").addEventListener("change", selectModel);
  $("invert").addEventListener("change", predict);
  $("clear").addEventListener("click", () => { clearPad(); $("label").textContent = "–"; $("bars").replaceChildren(); });
  $("predict").addEventListener("click", predict);
  clearPad();
  setUpPad();
  try {
    await loadModels();
  } catch (error) {
    $("error").textContent = error.message;
  }
  await refreshRepository();
  state.timer = setInterval(refreshRepository, 2000);
}

start();
