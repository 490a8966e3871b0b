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

const strokes = []; // each stroke: a list of {x, y} in canvas pixels
let drawing = null; // the stroke under the pointer, if any
let sent = 0; // sequence number of the latest prediction request
let shown = 0; // sequence number of the answer on screen: older answers are dropped
let lastSentAt = 0;
let timer = null;

for (let d = 0; d < 10; d++) {
  const li = document.createElement("li");
  li.dataset.digit = d;
  li.innerHTML = `<span class="label">${d}</span><span class="track"><span class="fill"></span></span><span class="pct">0%</span>`;
  bars.appendChild(li);
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
      const response = await fetch("/api/predict?image=true", {
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
  if (p.digit === null) {
    showEmpty(p.error);
    return;
  }
  digitOut.textContent = p.digit;
  confidenceOut.textContent = `${(100 * p.confidence).toFixed(1)}% sure`;
  seenImg.src = p.image;
  bars.querySelectorAll("li").forEach((li, d) => {
    const percent = 100 * p.probabilities[d];
    li.querySelector(".fill").style.width = `${percent}%`;
    li.querySelector(".pct").textContent = `${percent.toFixed(1)}%`;
    li.classList.toggle("top", d === p.digit);
    li.setAttribute("aria-label", `${d}: ${percent.toFixed(1)} percent`);
  });
}

function showEmpty(message) {
  digitOut.textContent = "?";
  confidenceOut.textContent = message || "Draw a digit";
  seenImg.removeAttribute("src");
  bars.querySelectorAll("li").forEach((li) => {
    li.querySelector(".fill").style.width = "0";
    li.querySelector(".pct").textContent = "0%";
    li.classList.remove("top");
  });
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

async function uploadFiles(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  let answer;
  try {
    const response = await fetch("/api/predict?image=true", { method: "POST", body: form });
    answer = await response.json();
    if (!response.ok) {
      showStatus(answer.detail || `HTTP ${response.status}`);
      return;
    }
  } catch (error) {
    showStatus(`Cannot reach the server: ${error.message}`);
    return;
  }
  answer.predictions.forEach((p, i) => fileResults.prepend(fileResult(files[i], p)));
}

function fileResult(file, p) {
  const li = document.createElement("li");
  const original = document.createElement("img");
  original.src = URL.createObjectURL(file);
  original.alt = `${file.name} as uploaded`;
  li.appendChild(original);
  if (p.image) {
    const seen = document.createElement("img");
    seen.src = p.image;
    seen.className = "model-input";
    seen.alt = `${file.name} as the model saw it`;
    li.appendChild(seen);
  }
  const text = document.createElement("div");
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = file.name;
  text.appendChild(name);
  const verdict = document.createElement("div");
  if (p.digit === null) {
    verdict.className = "error";
    verdict.textContent = p.error;
  } else {
    verdict.innerHTML = `<span class="file-digit"></span> ${(100 * p.confidence).toFixed(1)}%`;
    verdict.querySelector(".file-digit").textContent = p.digit;
  }
  text.appendChild(verdict);
  li.appendChild(text);
  return li;
}

async function showModel() {
  try {
    const info = await (await fetch("/api/info")).json();
    const accuracy = info.model.test_accuracy;
    document.getElementById("model").textContent =
      `${info.model.checkpoint}` +
      (accuracy == null ? "" : `, test accuracy ${(100 * accuracy).toFixed(2)}%`) +
      ` (${info.backend})`;
  } catch (error) {
    document.getElementById("model").textContent = "unknown (server unreachable)";
  }
}

clearAll();
showModel();
