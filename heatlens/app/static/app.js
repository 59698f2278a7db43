// heatlens in the browser: upload, choose a class and methods, see the maps side by side.
//
// The server sends each map as float32 values in [0, 1] at the model's input size, and the
// colour maps as 256-entry tables; this page colours and blends them itself, exactly as
// heatlens' Explanation.overlay does, so the opacity slider and the colour map never cause a
// request. Every computation is a job on the server's queue: the page shows its progress and
// can cancel it, and an answer is drawn only in the panel that is still waiting for it.
"use strict";

const $ = (id) => document.getElementById(id);
const KEPT_ANSWERS = 60;

const state = {
  info: null,
  upload: null,
  target: null,
  picture: null,        // ImageData of the image as the model saw it
  panels: new Map(),    // method -> panel
  answers: new Map(),   // request key -> answer (maps and trust scores), most recent last
  run: null,            // the run being browsed
  offset: 0,
};

// ---------- talking to the server ----------

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error || `${response.status} ${response.statusText}`);
  }
  return body;
}

function post(path, body) {
  return api(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
}

// A job: queued, then running with progress, then done. onProgress hears each status.
async function runJob(panel, body, onProgress) {
  let status = await post("/api/jobs", { ...body, wait: 2 });
  panel.jobs.add(status.job);
  try {
    while (status.state === "queued" || status.state === "running") {
      onProgress(status);
      status = await api(`/api/jobs/${status.job}?wait=0.5`);
    }
  } finally {
    panel.jobs.delete(status.job);
  }
  if (status.state === "done") return status.result;
  throw new Error(status.state === "cancelled" ? "cancelled" : status.error);
}

function remember(key, answer) {
  state.answers.delete(key);
  state.answers.set(key, answer);
  while (state.answers.size > KEPT_ANSWERS) {
    state.answers.delete(state.answers.keys().next().value);
  }
  return answer;
}

function say(text) {
  $("message").textContent = text || "";
  $("message").hidden = !text;
}

// ---------- colouring, as Explanation.overlay: (1 - a) * image + a * colours ----------

function roundHalfEven(x) {  // numpy's rint
  const floor = Math.floor(x);
  const part = x - floor;
  if (part !== 0.5) return part < 0.5 ? floor : floor + 1;
  return floor % 2 === 0 ? floor : floor + 1;
}

function blend(values, picture, table, alpha, out) {
  const pixels = picture.data;
  const target = out.data;
  for (let i = 0, p = 0; i < values.length; i += 1, p += 4) {
    const v = Math.min(1, Math.max(0, values[i]));
    const colour = table[Math.min(255, Math.floor(v * 256))];  // matplotlib's lookup
    for (let k = 0; k < 3; k += 1) {
      target[p + k] = roundHalfEven((1 - alpha) * pixels[p + k] + alpha * colour[k]);
    }
    target[p + 3] = 255;
  }
}

function floats(base64) {
  const text = atob(base64);
  const bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i += 1) bytes[i] = text.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

async function pixelsOf(url, width, height) {
  const image = new Image();
  image.src = url;
  await image.decode();
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0, width, height);
  return context.getImageData(0, 0, width, height);
}

function paint(canvas, values, width, height, picture) {
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  const out = context.createImageData(width, height);
  const table = state.info.colormaps[$("cmap").value];
  blend(values, picture, table, Number($("alpha").value), out);
  context.putImageData(out, 0, 0);
}

// ---------- downloads ----------

function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function npy(values, height, width) {  // NumPy's .npy format, version 1.0
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${height}, ${width}), }`;
  header += " ".repeat(63 - ((10 + header.length) % 64)) + "\n";
  const prefix = new Uint8Array(10 + header.length);
  prefix.set([0x93, 78, 85, 77, 80, 89, 1, 0, header.length & 255, header.length >> 8]);
  for (let i = 0; i < header.length; i += 1) prefix[10 + i] = header.charCodeAt(i);
  return new Blob([prefix, values.buffer], { type: "application/octet-stream" });
}

function fileStem(answer) {
  const image = state.upload.name.replace(/\.[^.]*$/, "").replace(/[^\w-]+/g, "_");
  return `heatlens_${image}_${answer.method}_class${answer.class}`;
}

// ---------- panels ----------

function panelFor(method) {
  let panel = state.panels.get(method);
  if (panel) return panel;
  const element = $("panel-template").content.firstElementChild.cloneNode(true);
  element.dataset.method = method;
  panel = { method, element, canvas: element.querySelector("canvas"), values: null,
            answer: null, key: null, jobs: new Set() };
  element.querySelector(".title").textContent = method;
  element.querySelector(".cancel").addEventListener("click", () => cancel(panel));
  element.querySelector(".png").addEventListener("click", () => {
    if (panel.answer) panel.canvas.toBlob((blob) => download(blob, `${fileStem(panel.answer)}.png`));
  });
  element.querySelector(".npy").addEventListener("click", () => {
    if (panel.answer) {
      download(npy(panel.values, panel.answer.height, panel.answer.width),
               `${fileStem(panel.answer)}.npy`);
    }
  });
  panel.canvas.addEventListener("mousemove", (event) => hover(panel, event));
  panel.canvas.addEventListener("mouseleave", () => {
    element.querySelector(".value").innerHTML = "&nbsp;";
  });
  state.panels.set(method, panel);
  return panel;
}

function hover(panel, event) {
  if (!panel.values) return;
  const { width, height } = panel.answer;
  const x = Math.min(width - 1, Math.floor(event.offsetX * width / panel.canvas.clientWidth));
  const y = Math.min(height - 1, Math.floor(event.offsetY * height / panel.canvas.clientHeight));
  panel.element.querySelector(".value").textContent =
    `value ${panel.values[y * width + x].toFixed(3)} at (${x}, ${y})`;
}

function busy(panel, status) {
  panel.element.classList.add("running");
  const bar = panel.element.querySelector("progress");
  if (status && status.total) {
    bar.max = status.total;
    bar.value = status.done;
  } else {
    bar.removeAttribute("value");
  }
  const where = status && status.state === "queued" ? ` (queued, ${status.position} before)` : "";
  panel.element.querySelector(".title").textContent = `${panel.method}${where}`;
}

function show(panel, answer) {
  panel.answer = answer;
  panel.values = floats(answer.map);
  panel.element.classList.remove("running", "failed");
  panel.element.querySelector(".title").textContent = answer.title;
  panel.element.querySelector(".title").title = `layer: ${answer.layer || "none"}; ` +
    `${answer.seconds} s`;
  draw(panel);
}

function draw(panel) {
  if (!panel.values || !state.picture) return;
  paint(panel.canvas, panel.values, panel.answer.width, panel.answer.height, state.picture);
  panel.element.dataset.drawn = panel.key;
}

function fail(panel, message) {
  panel.element.classList.remove("running");
  panel.element.classList.add("failed");
  panel.values = null;
  panel.answer = null;
  panel.element.querySelector(".title").textContent = `${panel.method}: ${message}`;
  panel.canvas.getContext("2d").clearRect(0, 0, panel.canvas.width, panel.canvas.height);
}

// Cancel every job the panel still waits for (a queued job never starts).
async function cancel(panel) {
  const jobs = [...panel.jobs];
  await Promise.all(jobs.map((job) => api(`/api/jobs/${job}`, { method: "DELETE" })
    .catch(() => null)));
}

function requestFor(method) {
  const takesLayer = state.info.methods.find((m) => m.name === method).layer;
  return { image: state.upload.image, method, target: state.target,
           layer: takesLayer ? $("layer").value : "auto" };
}

async function explainPanel(panel) {
  const request = requestFor(panel.method);
  const key = JSON.stringify(request);
  if (panel.key !== key) cancel(panel);  // what it was computing is no longer asked for
  panel.key = key;
  panel.element.querySelector(".trust").textContent = "";
  const kept = state.answers.get(key);
  if (kept) {
    show(panel, kept);
    return true;
  }
  busy(panel, null);
  try {
    const answer = await runJob(panel, { kind: "explain", ...request },
                                (status) => { if (panel.key === key) busy(panel, status); });
    if (panel.key !== key) return false;  // a newer request owns this panel now
    show(panel, remember(key, answer));
    return true;
  } catch (error) {
    if (panel.key === key) fail(panel, error.message);
    return false;
  }
}

async function trustPanel(panel) {
  const key = panel.key;
  const line = panel.element.querySelector(".trust");
  const trustKey = `${key} trust`;
  let answer = state.answers.get(trustKey);
  if (!answer) {
    line.textContent = "scoring faithfulness…";
    try {
      answer = await runJob(panel, { kind: "trust", ...JSON.parse(key) }, (status) => {
        if (panel.key === key && status.total) {
          line.textContent = `scoring faithfulness… ${status.done}/${status.total}`;
        }
      });
    } catch (error) {
      if (panel.key === key) line.textContent = `no scores: ${error.message}`;
      return;
    }
    remember(trustKey, answer);
  }
  if (panel.key !== key) return;
  const part = (metric, better) => {
    const ok = answer.better_than_random[metric];
    return `<span class="${ok ? "good" : "bad"}" title="${better} is better">${metric} ` +
      `${answer.scores[metric].toFixed(3)} (random ${answer.random[metric].toFixed(3)}) ` +
      `${ok ? "✓" : "✗"}</span>`;
  };
  line.innerHTML = `${part("deletion", "lower")} · ${part("insertion", "higher")}`;
  line.title = answer.protocol;
}

function chosenMethods() {
  return [...document.querySelectorAll("#methods input:checked")].map((box) => box.value);
}

async function explainAll() {
  if (!state.upload) return;
  const methods = chosenMethods();
  for (const [method, panel] of state.panels) {
    if (!methods.includes(method)) {
      cancel(panel);
      panel.element.remove();
      state.panels.delete(method);
    }
  }
  const panels = methods.map(panelFor);
  $("panels").replaceChildren(...panels.map((panel) => panel.element));
  const done = await Promise.all(panels.map(explainPanel));
  if ($("trust").checked) {
    for (const [i, panel] of panels.entries()) {
      if (done[i] && state.panels.get(panel.method) === panel) await trustPanel(panel);
    }
  }
}

// ---------- the image and its classes ----------

async function uploadBlob(blob, name) {
  say("");
  $("drop").classList.add("over");
  try {
    const upload = await api(`/api/images?name=${encodeURIComponent(name)}`, {
      method: "POST", headers: { "Content-Type": blob.type || "application/octet-stream" },
      body: blob,
    });
    await setUpload(upload);
  } catch (error) {
    say(`${name}: ${error.message}`);
  } finally {
    $("drop").classList.remove("over");
  }
}

async function setUpload(upload) {
  const size = state.info.input_size;
  state.picture = await pixelsOf(upload.shown, size, size);
  state.upload = upload;
  state.target = upload.predicted;
  $("shown").src = upload.shown;
  $("picture-name").textContent = `${upload.name}, ${upload.width}x${upload.height}`;
  $("picture").hidden = false;
  $("classes").classList.remove("muted");
  $("classes").replaceChildren(...upload.top.map((entry, i) => {
    const label = document.createElement("label");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "class";
    radio.value = entry.class;
    radio.checked = i === 0;
    radio.addEventListener("change", () => {
      state.target = entry.class;
      explainAll();
    });
    label.append(radio, ` ${entry.name} `);
    const probability = document.createElement("span");
    probability.className = "muted";
    probability.textContent = entry.probability.toFixed(3);
    label.append(probability);
    return label;
  }));
  for (const panel of state.panels.values()) panel.values = null;
  await explainAll();
}

// ---------- set-up ----------

function buildControls(info) {
  $("model").textContent = info.model;
  const groups = info.families.map((family) => {
    const methods = info.methods.filter((m) => m.family === family);
    if (!methods.length) return null;
    const fieldset = document.createElement("fieldset");
    const legend = document.createElement("legend");
    legend.textContent = family;
    fieldset.append(legend);
    for (const method of methods) {
      const label = document.createElement("label");
      label.title = method.summary;
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = method.name;
      box.checked = info.default_methods.includes(method.name);
      box.addEventListener("change", explainAll);
      label.append(box, ` ${method.name}`);
      if (method.slow) {
        const slow = document.createElement("span");
        slow.className = "slow";
        slow.textContent = " slow";
        label.append(slow);
      }
      fieldset.append(label);
    }
    return fieldset;
  }).filter(Boolean);
  $("methods").replaceChildren(...groups);

  const layers = info.layers;
  const options = [new Option(`auto: ${layers.auto}`, "auto")];
  for (const candidate of layers.candidates) {
    options.push(new Option(`${candidate.name} (${candidate.type}, ` +
                            `${candidate.shape.join("x")})`, candidate.name));
  }
  $("layer").replaceChildren(...options);
  $("layer-reason").textContent = `auto chooses ${layers.auto}: ${layers.reason}`;
  $("layer").addEventListener("change", explainAll);

  $("cmap").replaceChildren(...Object.keys(info.colormaps).map((name) => new Option(name, name)));
  const redraw = () => {
    $("alpha-value").textContent = Number($("alpha").value).toFixed(2);
    for (const panel of state.panels.values()) draw(panel);
    if (state.entry) drawEntry();
  };
  $("alpha").addEventListener("input", redraw);
  $("cmap").addEventListener("change", redraw);
  $("trust").addEventListener("change", () => { if ($("trust").checked) explainAll(); });
}

function wireUploads() {
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) uploadBlob(file, file.name);
    $("file").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) uploadBlob(file, file.name);
  });
  $("sample").addEventListener("click", async () => {
    const response = await fetch("/api/sample");
    uploadBlob(await response.blob(), "chelsea.jpg");
  });
}

function wireTabs() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => {
      for (const other of document.querySelectorAll(".tab")) {
        other.classList.toggle("active", other === tab);
        $(`view-${other.dataset.view}`).hidden = other !== tab;
      }
      if (tab.dataset.view === "runs" && !state.run) openRuns();
    });
  }
}

// ---------- data-set runs ----------

function fill(select, values, all) {
  select.replaceChildren(new Option(all, ""), ...values.map((v) => new Option(v, v)));
}

async function openRuns() {
  try {
    const runs = await api("/api/runs");
    state.runs = runs;
    $("run").replaceChildren(...runs.map((run) => new Option(run.run, run.run)));
    $("run").addEventListener("change", chooseRun);
    for (const id of ["filter-label", "filter-predicted", "filter-correct", "filter-method",
                      "sort", "descending"]) {
      $(id).addEventListener("change", () => { state.offset = 0; loadRows(); });
    }
    $("previous").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - 50);
      loadRows();
    });
    $("next").addEventListener("click", () => { state.offset += 50; loadRows(); });
    chooseRun();
  } catch (error) {
    say(error.message);
  }
}

function chooseRun() {
  const run = state.runs.find((r) => r.run === $("run").value);
  state.run = run;
  state.offset = 0;
  $("run-about").textContent = `${run.model}: ${run.images} images, ${run.rows} rows, ` +
    `${run.errors} unreadable files`;
  fill($("filter-label"), run.classes.label_name || [], "any");
  fill($("filter-predicted"), run.classes.predicted_name || [], "any");
  fill($("filter-method"), run.methods, "any");
  $("sort").replaceChildren(new Option("index order", ""),
                            ...["probability", ...run.metrics].map((c) => new Option(c, c)));
  loadRows();
}

async function loadRows() {
  const query = new URLSearchParams({ offset: state.offset, limit: 50 });
  const filters = { label: "filter-label", predicted: "filter-predicted",
                    correct: "filter-correct", method: "filter-method", sort: "sort" };
  for (const [name, id] of Object.entries(filters)) {
    if ($(id).value) query.set(name, $(id).value);
  }
  if ($("descending").checked) query.set("descending", "true");
  try {
    const page = await api(`/api/runs/${encodeURIComponent(state.run.run)}/rows?${query}`);
    $("rows-about").textContent = page.total ?
      `rows ${page.offset + 1}-${page.offset + page.rows.length} of ${page.total}` : "no rows";
    const head = document.createElement("tr");
    head.append(...page.columns.map((c) => Object.assign(document.createElement("th"),
                                                          { textContent: c })));
    $("rows").tHead.replaceChildren(head);
    $("rows").tBodies[0].replaceChildren(...page.rows.map((row) => {
      const line = document.createElement("tr");
      line.dataset.row = row.row;
      line.append(...page.columns.map((c) => Object.assign(document.createElement("td"),
                                                            { textContent: cell(row[c]) })));
      line.addEventListener("click", () => openEntry(row.row, line));
      return line;
    }));
  } catch (error) {
    say(error.message);
  }
}

function cell(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(3) : `${value}`;
}

async function openEntry(number, line) {
  for (const other of document.querySelectorAll("#rows tr.chosen")) other.classList.remove("chosen");
  line.classList.add("chosen");
  try {
    const entry = await api(`/api/runs/${encodeURIComponent(state.run.run)}/rows/${number}`);
    for (const map of entry.maps) map.values = floats(map.map);
    entry.picture = entry.shown ? await pixelsOf(entry.shown, entry.width, entry.height)
      : new ImageData(new Uint8ClampedArray(entry.width * entry.height * 4).fill(128),
                      entry.width, entry.height);
    state.entry = entry;
    const figures = entry.maps.map((map) => {
      const figure = document.createElement("figure");
      map.canvas = document.createElement("canvas");
      map.canvas.className = "entry-map";
      map.canvas.dataset.method = map.method;
      figure.append(map.canvas, Object.assign(document.createElement("figcaption"),
                                              { textContent: map.method }));
      return figure;
    });
    const about = document.createElement("div");
    if (entry.note) about.append(Object.assign(document.createElement("p"),
                                               { className: "muted", textContent: entry.note }));
    const list = document.createElement("dl");
    for (const [name, value] of Object.entries(entry.fields)) {
      list.append(Object.assign(document.createElement("dt"), { textContent: name }),
                  Object.assign(document.createElement("dd"),
                                { textContent: typeof value === "object" ? JSON.stringify(value)
                                  : cell(value) }));
    }
    about.append(list);
    const maps = document.createElement("div");
    maps.className = "entry-maps";
    maps.append(...figures);
    $("entry").replaceChildren(maps, about);
    drawEntry();
  } catch (error) {
    say(error.message);
  }
}

function drawEntry() {
  const entry = state.entry;
  for (const map of entry.maps) {
    paint(map.canvas, map.values, entry.width, entry.height, entry.picture);
  }
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (error) {
    say(`the server did not answer: ${error.message}`);
    return;
  }
  buildControls(state.info);
  wireUploads();
  wireTabs();
  $("tab-runs").hidden = !state.info.runs;
  document.body.dataset.ready = "yes";
}

start();
