// The page of the SCHP service: send an image to /v1/parse?output=json, show the overlay beside the
// image, toggle classes, read the class under the pointer, download the label PNG and the overlay.
// Plain script, no dependencies: it works with no network beyond this server.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { labels: [], map: null, width: 0, height: 0, pixels: null, enabled: [], stem: "image", file: null, pngUrl: null, overlayUrl: null };

function authHeaders() {
  const token = $("token").value || sessionStorage.getItem("schp-token") || "";
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!isError);
}

async function errorText(response) {
  try { const body = await response.json(); return `${response.status}: ${body.detail}`; }
  catch (e) { return `${response.status} ${response.statusText}`; }
}

async function loadModel() {
  const health = await (await fetch("/healthz")).json();
  $("model").textContent = `model: ${health.dataset} · checkpoint ${health.checkpoint} · ${health.device} · ${health.backend}`;
  if (health.token_required) $("token-row").hidden = false;
  const response = await fetch("/v1/labels", { headers: authHeaders() });
  if (!response.ok) { setStatus("labels: " + await errorText(response), true); return false; }
  const body = await response.json();
  state.labels = body.labels;
  state.enabled = body.labels.map(() => true);
  drawLegend(null);
  return true;
}

function drawLegend(counts) {
  const legend = $("legend");
  legend.textContent = "";
  state.labels.forEach((label, i) => {
    const li = document.createElement("li");
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = state.enabled[i]; box.dataset.index = i; box.id = "class-" + i;
    box.addEventListener("change", () => { state.enabled[i] = box.checked; drawOverlay(); });
    const swatch = document.createElement("span");
    swatch.className = "swatch"; swatch.style.background = label.color;
    const name = document.createElement("label");
    name.htmlFor = box.id; name.textContent = label.name;
    const count = document.createElement("span");
    count.className = "count";
    const n = counts ? (counts[i] || 0) : null;
    count.textContent = n === null ? "" : n.toLocaleString();
    if (n === 0) li.classList.add("absent");
    li.append(box, swatch, name, count);
    legend.append(li);
  });
}

function base64Blob(text, type) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}

async function bitmapPixels(source, width, height) {
  const bitmap = await createImageBitmap(source, { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" });
  const canvas = new OffscreenCanvas(width || bitmap.width, height || bitmap.height);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

async function parseFile(file) {
  if (!file) return;
  document.body.dataset.state = "parsing";
  state.file = file;
  state.stem = file.name.replace(/\.[^.]*$/, "") || "image";
  setStatus(`parsing ${file.name}…`);
  const started = performance.now();
  let response;
  try {
    response = await fetch("/v1/parse?output=json", { method: "POST", body: file, headers: { ...authHeaders(), "Content-Type": file.type || "application/octet-stream" } });
  } catch (e) {
    setStatus("the server cannot be reached: " + e, true); document.body.dataset.state = "error"; return;
  }
  if (!response.ok) { setStatus(`${file.name}: ${await errorText(response)}`, true); document.body.dataset.state = "error"; return; }
  const result = await response.json();
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  const counts = {};
  result.classes.forEach((c) => { counts[c.index] = c.pixels; });
  await show(file, base64Blob(result.png_base64, "image/png"), state.stem + ".png", counts);
  setStatus(`${file.name}: ${result.width} x ${result.height}, ${result.classes.length} classes, ${seconds} s`);
  document.body.dataset.state = "ready";
}

// A label PNG made elsewhere (simple_extractor.py, or any map in this palette) shown over the image
// last chosen, without running the model: to look at saved results with the same tools.
async function viewMap(mapFile) {
  if (!mapFile) return;
  if (!state.file) { setStatus("choose the image first, then its saved label PNG", true); return; }
  const counts = await show(state.file, mapFile, mapFile.name, null);
  if (!counts) return;
  const present = Object.values(counts).filter((n) => n > 0).length;
  setStatus(`${state.file.name} with the saved map ${mapFile.name}: ${state.width} x ${state.height}, ${present} classes (not parsed here)`);
  document.body.dataset.state = "ready";
}

// Draw `image` (a file) and the label map `png` (a blob in the palette) and enable the downloads;
// returns the per-class pixel counts.
async function show(image, png, pngName, counts) {
  const mapPixels = await bitmapPixels(png);
  const lookup = new Map(state.labels.map((l, i) => [(l.rgb[0] << 16) | (l.rgb[1] << 8) | l.rgb[2], i]));
  const d = mapPixels.data;
  const map = new Uint8Array(mapPixels.width * mapPixels.height);
  const tally = state.labels.map(() => 0);
  for (let i = 0; i < map.length; i++) {
    const c = lookup.get((d[4 * i] << 16) | (d[4 * i + 1] << 8) | d[4 * i + 2]);
    if (c === undefined) { setStatus(`${pngName}: colour at pixel ${i} is not in the ${state.labels.length}-class palette`, true); return null; }
    map[i] = c; tally[c]++;
  }
  state.map = map; state.width = mapPixels.width; state.height = mapPixels.height;
  let picture;
  try { picture = await bitmapPixels(image, state.width, state.height); }
  catch (e) { picture = new ImageData(state.width, state.height); }  // a format the browser cannot show
  state.pixels = picture;
  for (const id of ["image", "overlay"]) { $(id).width = state.width; $(id).height = state.height; }
  $("image").getContext("2d").putImageData(picture, 0, 0);
  counts = counts || Object.fromEntries(tally.map((n, i) => [i, n]));
  drawLegend(counts);
  if (state.pngUrl) URL.revokeObjectURL(state.pngUrl);
  state.pngUrl = URL.createObjectURL(png);
  const link = $("download-png");
  link.href = state.pngUrl; link.download = pngName; link.classList.remove("disabled");
  drawOverlay();
  return counts;
}

function drawOverlay() {
  if (!state.map) return;
  const out = new ImageData(state.width, state.height);
  const src = state.pixels.data, dst = out.data;
  const colors = state.labels.map((l) => l.rgb);
  for (let i = 0; i < state.map.length; i++) {
    const c = state.map[i], k = 4 * i;
    if (c !== 0 && state.enabled[c]) {
      const rgb = colors[c];
      dst[k] = (src[k] + rgb[0] + 1) >> 1; dst[k + 1] = (src[k + 1] + rgb[1] + 1) >> 1; dst[k + 2] = (src[k + 2] + rgb[2] + 1) >> 1;
    } else { dst[k] = src[k]; dst[k + 1] = src[k + 1]; dst[k + 2] = src[k + 2]; }
    dst[k + 3] = 255;
  }
  $("overlay").getContext("2d").putImageData(out, 0, 0);
  $("overlay").toBlob((blob) => {
    if (state.overlayUrl) URL.revokeObjectURL(state.overlayUrl);
    state.overlayUrl = URL.createObjectURL(blob);
    const link = $("download-overlay");
    link.href = state.overlayUrl; link.download = state.stem + "_overlay.png"; link.classList.remove("disabled");
    $("overlay").dataset.drawn = String(Date.now());
  }, "image/png");
}

function hover(event) {
  if (!state.map) return;
  const rect = event.target.getBoundingClientRect();
  const x = Math.floor((event.clientX - rect.left) * state.width / rect.width);
  const y = Math.floor((event.clientY - rect.top) * state.height / rect.height);
  if (x < 0 || y < 0 || x >= state.width || y >= state.height) return;
  const c = state.map[y * state.width + x];
  $("hover").textContent = `x ${x}, y ${y}: ${c} ${state.labels[c].name}`;
  $("hover").dataset.index = c;
}

function setAll(on) {
  state.enabled = state.labels.map(() => on);
  document.querySelectorAll("#legend input").forEach((box) => { box.checked = on; });
  drawOverlay();
}

window.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => parseFile(e.target.files[0]));
  $("map-file").addEventListener("change", (e) => viewMap(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); parseFile(e.dataTransfer.files[0]); });
  for (const id of ["image", "overlay"]) $(id).addEventListener("mousemove", hover);
  $("all").addEventListener("click", () => setAll(true));
  $("none").addEventListener("click", () => setAll(false));
  $("token").addEventListener("change", () => { sessionStorage.setItem("schp-token", $("token").value); loadModel(); });
  loadModel().catch((e) => setStatus("cannot reach the server: " + e, true));
});
