// PneumoScope page: plain JavaScript, no build step, talks to the same server only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { card: null, file: null, run: 0, urls: [] };

function show(el, visible) { el.hidden = !visible; }

function setError(message) {
  $("error").textContent = message || "";
  show($("error"), Boolean(message));
}

function setStatus(message) { $("status").textContent = message; }

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${body.error} (HTTP ${response.status})`;
  } catch (_) { /* not JSON */ }
  return `the server answered HTTP ${response.status}`;
}

function objectUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.urls.push(url);
  return url;
}

function releaseUrls() {
  state.urls.forEach((u) => URL.revokeObjectURL(u));
  state.urls = [];
}

async function post(path, file) {
  const form = new FormData();
  form.append("file", file);
  const response = await fetch(path, { method: "POST", body: form });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function renderCard(card) {
  state.card = card;
  $("model-name").textContent = card.name;
  $("model-details").textContent =
    `${card.backend} backend · threshold ${fmt(card.threshold)} · ${card.preprocessing.image_size} px`;
  $("accepted").textContent = `${card.limits.accepted_types.join(", ")}, up to ` +
    `${(card.limits.max_upload_bytes / 2 ** 20).toFixed(0)} MB`;
  $("intended-use").textContent = card.intended_use;
  const list = $("limitations");
  list.replaceChildren(...card.limitations.map((text) => {
    const li = document.createElement("li");
    li.textContent = text;
    return li;
  }));
  const select = $("method");
  select.replaceChildren(...card.explain_methods.map((m) => new Option(m, m)));
  select.disabled = card.explain_methods.length === 0;
  if (card.explain_methods.length === 0) {
    $("heatmap-toggle").disabled = true;
    $("heatmap-toggle").checked = false;
    $("heatmap-toggle").parentElement.title = card.explain_unavailable_reason || "";
  }
  renderMetrics(card.metrics);
}

function renderMetrics(metrics) {
  const keys = ["auc", "sensitivity", "specificity", "accuracy", "f1"];
  const rows = Object.entries(metrics || {}).filter(([, m]) => m);
  const box = $("metrics");
  if (rows.length === 0) {
    box.textContent = "No validation or test metrics are stored in this model file.";
    return;
  }
  const table = document.createElement("table");
  const caption = table.createCaption();
  caption.textContent = "Metrics at the model's threshold (from the model file)";
  const head = table.createTHead().insertRow();
  ["split", ...keys].forEach((k) => {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = k;
    head.appendChild(th);
  });
  const body = table.createTBody();
  rows.forEach(([split, m]) => {
    const tr = body.insertRow();
    tr.insertCell().textContent = split;
    keys.forEach((k) => { tr.insertCell().textContent = fmt(m[k]); });
  });
  box.replaceChildren(table);
}

function renderGate(gate) {
  const notice = $("gate-notice");
  const status = gate ? gate.status : "ok";
  const shown = status === "refuse" || status === "warn";
  notice.className = `gate-notice ${status}`;
  $("gate-message").textContent = shown ? gate.message : "";
  $("gate-reasons").replaceChildren(...(shown ? gate.explanations : []).map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  }));
  show(notice, shown);
  return status;
}

function renderPrediction(result) {
  // Not a chest film: a notice instead of a label, and no probability to show.
  if (renderGate(result.gate) === "refuse") return false;
  const p = result.probability;
  const positive = p >= result.threshold;
  $("probability").textContent = p.toFixed(3);
  const label = $("label");
  label.textContent = result.label;
  label.className = `label ${positive ? "positive" : "negative"}`;
  const fill = $("fill");
  fill.style.width = `${(100 * p).toFixed(1)}%`;
  fill.className = `fill ${positive ? "positive" : ""}`;
  $("bar").setAttribute("aria-valuenow", p.toFixed(3));
  $("bar").setAttribute("aria-valuetext",
    `${p.toFixed(3)}, threshold ${result.threshold.toFixed(3)}: ${result.label}`);
  $("threshold-mark").style.left = `${(100 * result.threshold).toFixed(1)}%`;
  $("threshold-text").textContent = `threshold ${result.threshold.toFixed(2)}`;
  $("threshold-value").textContent = result.threshold.toFixed(3);
  $("threshold-method").textContent = state.card ? state.card.threshold_method : "";
  $("fact-model").textContent = result.model;
  $("fact-backend").textContent = result.backend;
  $("fact-latency").textContent = `${result.latency_ms.toFixed(0)} ms`;
  show($("outcome"), true);
  return true;
}

function applyToggle() {
  const on = $("heatmap-toggle").checked && Boolean($("overlay").getAttribute("src"));
  show($("overlay"), on);
  $("caption").textContent = on
    ? `Heatmap (${$("method").value}) over the image the model was given.`
    : "The image the model was given (grayscale).";
}

async function loadOverlay(file, run) {
  if (!state.card || state.card.explain_methods.length === 0) return;
  const method = $("method").value || "gradcam";
  $("heatmap-toggle").disabled = true;
  try {
    const response = await post(`/v1/explain?title=false&method=${encodeURIComponent(method)}`, file);
    const blob = await response.blob();
    if (run !== state.run) return;
    $("overlay").src = objectUrl(blob);
  } catch (err) {
    if (run === state.run) setError(`Heatmap: ${err.message}`);
  } finally {
    if (run === state.run) $("heatmap-toggle").disabled = false;
    applyToggle();
  }
}

async function analyse(file) {
  const run = ++state.run;
  state.file = file;
  releaseUrls();
  setError("");
  show($("outcome"), false);
  renderGate(null);
  $("overlay").removeAttribute("src");
  applyToggle();
  if (state.card && file.size > state.card.limits.max_upload_bytes) {
    setError(`This file is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ` +
      `${(state.card.limits.max_upload_bytes / 2 ** 20).toFixed(0)} MB.`);
    setStatus("Choose another image.");
    show($("viewer"), false);
    return;
  }
  setStatus("Analysing…");
  const preview = post("/v1/preview", file).then(async (response) => {
    const blob = await response.blob();
    if (run !== state.run) return;
    $("preview").src = objectUrl(blob);
    show($("viewer"), true);
  });
  const prediction = post("/v1/predict", file).then(async (response) => {
    const result = await response.json();
    if (run !== state.run) return false;
    return renderPrediction(result);
  });
  // No heatmap for an image the gate refused: it would explain a label that was not given.
  const overlay = prediction.then((answered) => (answered ? loadOverlay(file, run) : null),
    () => null);
  try {
    await Promise.all([preview, prediction]);
    if (run === state.run) setStatus("Done.");
  } catch (err) {
    if (run !== state.run) return;
    setError(err.message);
    setStatus("This image could not be analysed.");
    show($("viewer"), false);
  }
  await overlay;
}

function setupDrop() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) analyse(file);
  });
  // A file dropped outside the drop zone must not make the browser navigate away.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

async function init() {
  setupDrop();
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) analyse(file);
  });
  $("heatmap-toggle").addEventListener("change", applyToggle);
  $("method").addEventListener("change", () => {
    if (state.file) loadOverlay(state.file, state.run);
  });
  try {
    const response = await fetch("/v1/model");
    if (!response.ok) throw new Error(await errorMessage(response));
    renderCard(await response.json());
  } catch (err) {
    setError(`Could not load the model description: ${err.message}`);
  }
}

document.addEventListener("DOMContentLoaded", init);
