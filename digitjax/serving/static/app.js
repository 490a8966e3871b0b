// The draw-a-digit page: strokes on a canvas, predictions from /api/predict while drawing.
"use strict";

const BRUSH = 20; // px on the 280 px canvas: about an MNIST pen stroke once scaled to 28 px
const THROTTLE_MS = 120; // at most one prediction request this often while drawing

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const digitOut = document.getElementById("digit");
const confidenceOut = document.getElementById("confidence");
const seenImg = document.getElementById("seen");
const bars = document.getElementById("bars");
const statusOut = document.getElementById("status");
const result = document.getElementById("result");

const strokes = []; // each stroke: a list of {x, y} in canvas pixels
let drawing = null; // the stroke under the pointer, if any
let sent = 0; // sequence number of the latest prediction request
let shown = 0; // sequence number of the answer on screen: older answers are dropped
let lastSentAt = 0;
let timer = null;

// The page passes its own ?min_confidence= on to the API (e.g. /?min_confidence=0.99).
const API_QUERY = (() => {
  const query = new URLSearchParams({ image: "true" });
  const min = new URLSearchParams(location.search).get("min_confidence");
  if (min !== null) query.set("min_confidence", min);
  return `/api/predict?${query}`;
})();

makeBars(bars);

// Ten bars, one per digit, in `list` (an <ol>): the main chart and each file's small one.
function makeBars(list) {
  for (let d = 0; d < 10; d++) {
    const li = document.createElement("li");
    li.dataset.digit = d;
    li.innerHTML = `<span class="label">${d}</span><span class="track"><span class="fill"></span></span><span class="pct">0%</span>`;
    list.appendChild(li);
  }
}

// A probability to one decimal, rounded down as the command line does (render.percent):
// 99.97% reads 99.9%, never 100.0%, which would claim a certainty the model does not have.
const percent = (p) => `${(Math.floor(Math.round(p * 1e9) / 1e6) / 10).toFixed(1)}%`;

function setBars(list, probabilities, top) {
  list.querySelectorAll("li").forEach((li, d) => {
    const p = probabilities ? probabilities[d] : 0;
    li.querySelector(".fill").style.setProperty("--p", `${100 * p}%`);
    li.querySelector(".pct").textContent = percent(p);
    li.classList.toggle("top", d === top);
    li.setAttribute("aria-label", `${d}: ${percent(p).slice(0, -1)} percent`);
  });
}

// How an answer reads, from the server's verdict (never from thresholds of the page's own):
// the digit to show big, one line of words, and whether to show both muted.
function describe(p) {
  if (p.verdict === null) return { digit: "?", line: p.error, muted: true };
  if (p.verdict === "not_a_digit") {
    return { digit: "?", line: "That does not look like a digit", muted: true };
  }
  if (p.verdict === "not_sure") {
    return { digit: p.digit, line: `Not sure: maybe ${p.digit} (${percent(p.confidence)})`, muted: true };
  }
  return { digit: p.digit, line: `${percent(p.confidence)} sure`, muted: false };
}

// The raw answer on the element, for tests and for anyone inspecting the page.
function tag(element, p) {
  element.dataset.verdict = p.verdict ?? "error";
  element.dataset.digit = p.digit ?? "";
  element.dataset.confidence = p.confidence ?? "";
  element.dataset.uncertain = p.uncertain ?? "";
}

function clearCanvas() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = BRUSH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
}

function dot(p) {
  ctx.beginPath();
  ctx.arc(p.x, p.y, BRUSH / 2, 0, 2 * Math.PI);
  ctx.fill();
}

function segment(a, b) {
  ctx.beginPath();
  ctx.moveTo(a.x, a.y);
  ctx.lineTo(b.x, b.y);
  ctx.stroke();
}

function redraw() {
  clearCanvas();
  for (const stroke of strokes) {
    dot(stroke[0]);
    for (let i = 1; i < stroke.length; i++) segment(stroke[i - 1], stroke[i]);
  }
}

function canvasPoint(event) {
  const rect = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) * pad.width) / rect.width,
    y: ((event.clientY - rect.top) * pad.height) / rect.height,
  };
}

pad.addEventListener("pointerdown", (event) => {
  if (event.pointerType === "mouse" && event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = [canvasPoint(event)];
  strokes.push(drawing);
  dot(drawing[0]);
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = canvasPoint(e);
    segment(drawing[drawing.length - 1], p);
    drawing.push(p);
  }
  schedulePrediction();
});

function endStroke() {
  if (!drawing) return;
  drawing = null;
  predictNow();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function schedulePrediction() {
  const wait = THROTTLE_MS - (performance.now() - lastSentAt);
  if (wait <= 0) predictNow();
  else if (!timer) timer = setTimeout(predictNow, wait);
}

function predictNow() {
  clearTimeout(timer);
  timer = null;
  if (!strokes.length) return;
  const seq = ++sent;
  lastSentAt = performance.now();
  pad.toBlob(async (blob) => {
    try {
      const response = await fetch(API_QUERY, {
        method: "POST",
        headers: { "Content-Type": "image/png" },
        body: blob,
      });
      const answer = await response.json();
      if (seq <= shown) return; // a newer answer is already on screen
      shown = seq;
      if (!response.ok) showStatus(answer.detail || `HTTP ${response.status}`);
      else showPrediction(answer.predictions[0]);
    } catch (error) {
      if (seq > shown) showStatus(`Cannot reach the server: ${error.message}`);
    }
  }, "image/png");
}

function showStatus(message) {
  statusOut.textContent = message;
}

function showPrediction(p) {
  showStatus("");
  const { digit, line, muted } = describe(p);
  digitOut.textContent = digit;
  confidenceOut.textContent = line;
  result.classList.toggle("muted", muted);
  tag(result, p);
  if (p.image) seenImg.src = p.image;
  else seenImg.removeAttribute("src");
  setBars(bars, p.probabilities, p.verdict === "not_a_digit" ? null : p.digit);
}

function showEmpty() {
  digitOut.textContent = "?";
  confidenceOut.textContent = "Draw a digit";
  result.classList.remove("muted");
  delete result.dataset.verdict;
  seenImg.removeAttribute("src");
  setBars(bars, null, null);
}

function clearAll() {
  strokes.length = 0;
  drawing = null;
  shown = ++sent; // answers still in flight belong to the old drawing
  redraw();
  showEmpty();
  showStatus("");
}

function undo() {
  strokes.pop();
  drawing = null;
  redraw();
  if (strokes.length) predictNow();
  else clearAll();
}

document.getElementById("clear").addEventListener("click", clearAll);
document.getElementById("undo").addEventListener("click", undo);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") clearAll();
  else if ((event.ctrlKey || event.metaKey) && event.key === "z") {
    event.preventDefault();
    undo();
  }
});

// Image files: each is shown with the digit read from it.
const drop = document.getElementById("drop");
const fileInput = document.getElementById("file-input");
const fileResults = document.getElementById("file-results");

fileInput.addEventListener("change", () => {
  uploadFiles([...fileInput.files]);
  fileInput.value = "";
});
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  uploadFiles([...event.dataTransfer.files]);
});

// What one request may carry (/api/info's limits; these are the server's defaults until it
// says): more files are sent in several requests, one after another, rather than refused, and
// a file over the limit alone, so that its refusal names it and costs no other file.
let uploadLimits = { max_files: 64, max_body: 8 << 20, max_file: 4 << 20 };
const PART_OVERHEAD = 1024; // a form part's own headers, with room for a long file name

function inBatches(files) {
  const batches = [];
  let batch = [];
  let bytes = 0;
  for (const file of files) {
    const cost = file.size + PART_OVERHEAD;
    const alone = file.size > uploadLimits.max_file;
    const full = batch.length === uploadLimits.max_files || bytes + cost > uploadLimits.max_body;
    if (batch.length && (alone || full)) {
      batches.push(batch);
      batch = [];
      bytes = 0;
    }
    batch.push(file);
    bytes += cost;
    if (alone) {
      batches.push(batch);
      batch = [];
      bytes = 0;
    }
  }
  if (batch.length) batches.push(batch);
  return batches;
}

async function uploadFiles(files) {
  if (!files.length) return;
  const items = [];
  for (const batch of inBatches(files)) items.push(...(await uploadBatch(batch)));
  fileResults.prepend(...items); // the newest upload first, its files in the order given
}

async function uploadBatch(files) {
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  let response;
  try {
    response = await fetch(API_QUERY, { method: "POST", body: form });
  } catch (error) {
    return [failedUpload(files, `Cannot reach the server: ${error.message}`)];
  }
  // A proxy's error page is not JSON: its status still says what happened.
  const answer = await response.json().catch(() => ({}));
  if (response.ok && answer.predictions) {
    return answer.predictions.map((p, i) => fileResult(files[i], p));
  }
  return [failedUpload(files, answer.detail || `HTTP ${response.status} ${response.statusText}`.trim())];
}

// An upload the server refused as a whole (too large, too many files...): one entry that names
// its files and says why.
function failedUpload(files, message) {
  const li = document.createElement("li");
  li.className = "failed";
  li.dataset.verdict = "error";
  const text = document.createElement("div");
  text.append(textLine("name", files.map((file) => file.name).join(", ")));
  text.append(textLine("error", message));
  li.append(text);
  return li;
}

function textLine(className, content) {
  const div = document.createElement("div");
  div.className = className;
  div.textContent = content;
  return div;
}

function fileResult(file, p) {
  const li = document.createElement("li");
  tag(li, p);
  const original = document.createElement("img");
  original.src = URL.createObjectURL(file);
  original.alt = `${file.name} as uploaded`;
  li.append(original);
  if (p.image) {
    const seen = document.createElement("img");
    seen.src = p.image;
    seen.className = "model-input";
    seen.alt = `${file.name} as the model saw it`;
    li.append(seen);
  }
  const text = document.createElement("div");
  text.append(textLine("name", file.name));
  const { digit, line, muted } = describe(p);
  const verdict = textLine(p.verdict === null ? "error" : "verdict", "");
  verdict.classList.toggle("muted", muted && p.verdict !== null);
  if (p.verdict !== null) {
    const big = document.createElement("span");
    big.className = "file-digit";
    big.textContent = digit;
    verdict.append(big, " ");
  }
  verdict.append(line);
  text.append(verdict);
  if (p.probabilities) {
    const chart = document.createElement("ol");
    chart.className = "bars mini";
    chart.setAttribute("aria-label", `Probability of each digit in ${file.name}`);
    makeBars(chart);
    setBars(chart, p.probabilities, p.verdict === "not_a_digit" ? null : p.digit);
    text.append(chart);
  }
  li.append(text);
  return li;
}

async function showModel() {
  const out = document.getElementById("model");
  try {
    const info = await (await fetch("/api/info")).json();
    uploadLimits = info.limits;
    const { name, step, test_accuracy: accuracy } = info.model;
    out.textContent =
      `${name}` +
      (step == null ? "" : `, step ${step}`) +
      (accuracy == null ? "" : `, test accuracy ${(100 * accuracy).toFixed(2)}%`) +
      ` (${info.backend})`;
  } catch (error) {
    out.textContent = "unknown (server unreachable)";
  }
}

clearAll();
showModel();
