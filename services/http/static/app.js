// sdmesh's page: a form for POST v1/jobs, the job followed over its server-sent events, a gallery of results.
// It talks only to this front's own endpoints (relative URLs, so it also works under a proxy's prefix).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "sdmesh.apiKey";

const page = {
  info: null,       // GET v1/info, once it answered
  busy: false,      // a generation is being sent or followed
  job: null,        // the running job's id
  init: "",         // the init image, a data: URL
  mask: "",
};

// --- talking to the front ---------------------------------------------------------

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const init = { method, headers: headers(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const answer = await fetch(path, init);
  const text = await answer.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!answer.ok) {
    const message = (data && data.error && data.error.message) || `${answer.status} ${answer.statusText}`;
    if (answer.status === 401) showKey(true);
    throw new ApiError(answer.status, message);
  }
  return data;
}

// The job's server-sent events, read with fetch so the Authorization header goes too (EventSource sends none).
async function follow(id, onEvent) {
  const answer = await fetch(`v1/jobs/${encodeURIComponent(id)}/events`, { headers: headers() });
  if (!answer.ok || !answer.body) throw new ApiError(answer.status, `the job's events: ${answer.status}`);
  const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
      if (event === "done") return;
    }
  }
}

// --- the model's facts --------------------------------------------------------------

async function loadInfo() {
  try {
    const chosen = $("served-model").value;
    const info = await api("GET", chosen ? `v1/info?model=${encodeURIComponent(chosen)}` : "v1/info");
    page.info = info;
    showKey(info.api_key_required);
    const size = `${info.default_width || 512}×${info.default_height || 512}`;
    $("model").textContent = `${info.model || "model"} · ${info.kind} · ${size}`;
    applyInfo(info);
    say("Ready.");
    setError("");
  } catch (e) {
    $("model").textContent = e.status === 401 ? "an API key is needed" : "not connected";
    setError(e.status === 401 ? e.message : `Could not reach the server: ${e.message}`);
  }
}

function applyInfo(info) {
  // several models behind the gateway: pick one; its own sizes and samplers follow
  const models = info.models || [];
  const picker = $("served-model");
  picker.replaceChildren(...models.map((name) => new Option(name, name, false, name === info.served_model)));
  $("model-row").hidden = models.length < 2;
  const multiple = info.size_multiple || 8;
  for (const [id, size] of [["width", info.default_width], ["height", info.default_height]]) {
    const input = $(id);
    input.step = multiple;
    input.min = multiple;
    input.value = size || 512;
  }
  $("steps").max = info.max_steps;
  if (Number($("steps").value) > info.max_steps) $("steps").value = info.max_steps;
  $("count").max = info.max_images;
  const sampler = $("sampler");
  sampler.replaceChildren();
  for (const name of info.samplers) {
    const option = new Option(name, name, false, name === info.default_sampler);
    sampler.add(option);
  }
  if (!info.samplers.length) sampler.add(new Option("model's default", ""));
}

function showKey(required) {
  $("key-row").hidden = !required;
}

// --- a generation -------------------------------------------------------------------

function request() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    n: number("count") || 1,
    width: number("width") || undefined,
    height: number("height") || undefined,
    steps: number("steps") || undefined,
    guidance_scale: $("guidance").value === "" ? undefined : number("guidance"),
    sampler: $("sampler").value || undefined,
    seed: $("seed").value === "" ? -1 : number("seed"),
    model: page.info ? page.info.served_model : undefined,
  };
  if (page.init) {
    body.init_image = page.init;
    body.strength = number("strength");
    if (page.mask) body.mask = page.mask;
  }
  return body;
}

async function generate() {
  if (page.busy) return;
  setError("");
  if (!$("prompt").value.trim()) {
    setError("Write a prompt first.");
    $("prompt").focus();
    return;
  }
  running(true);
  setProgress(0);
  if (!page.info) await loadInfo(); // a key was just typed in: the model's samplers and limits
  const body = request();
  say("Sending…");
  if (window.matchMedia("(max-width: 760px)").matches) $("progress").scrollIntoView({ block: "center" });
  let job;
  try {
    job = await api("POST", "v1/jobs", body);
  } catch (e) {
    running(false);
    say("Not started.");
    setError(e.message);
    if (e.status === 401) $("api-key").focus();
    return;
  }
  page.job = job.id;
  $("status").dataset.job = job.id;
  show(job);
  let last = job;
  try {
    await follow(job.id, (event, status) => {
      last = status;
      show(status);
    });
    if (!isDone(last)) last = await api("GET", `v1/jobs/${encodeURIComponent(job.id)}`);
  } catch {
    // the stream broke (a proxy, the network): ask for the job until it ends
    try {
      last = await poll(job.id);
    } catch (e2) {
      setError(e2.message);
    }
  }
  finish(last, body);
}

async function poll(id) {
  for (;;) {
    const status = await api("GET", `v1/jobs/${encodeURIComponent(id)}`);
    show(status);
    if (isDone(status)) return status;
    await new Promise((r) => setTimeout(r, 500));
  }
}

function isDone(status) {
  return ["succeeded", "failed", "cancelled"].includes(status.state);
}

async function cancel() {
  if (!page.job) return;
  say("Cancelling…");
  $("cancel").disabled = true;
  try {
    await api("DELETE", `v1/jobs/${encodeURIComponent(page.job)}`);
  } catch (e) {
    setError(e.message);
  }
}

// --- showing it ---------------------------------------------------------------------

function show(status) {
  setProgress(status.progress || 0);
  if (status.preview) {
    const preview = $("preview");
    preview.src = `data:image/jpeg;base64,${status.preview}`;
    preview.hidden = false;
  }
  if (status.state === "queued") say("Queued…");
  else if (status.state === "running") {
    const stage = { encode: "Encoding the prompt", denoise: "Denoising", decode: "Decoding" }[status.stage];
    let text = stage ? `${stage}` : "Starting";
    if (status.stage === "denoise") text += ` · step ${status.step}/${status.total_steps}`;
    if (status.eta_seconds != null && status.step > 0) text += ` · about ${Math.ceil(status.eta_seconds)} s left`;
    say(`${text}…`);
  }
}

function finish(status, body) {
  running(false);
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  const sentence = (text) => text.charAt(0).toUpperCase() + text.slice(1).replace(/[\s.]*$/, "");
  const notes = (status.notes || []).map((note) => ` ${sentence(note)}.`).join("");
  if (status.state === "succeeded") {
    setProgress(1);
    const images = status.images || [];
    // newest request first, its images in their order: prepend the last one first
    for (let k = images.length; k >= 1; k--) addImage(images[k - 1].b64_json, status.seed, k, images.length, body.prompt);
    say(`Done: ${images.length} image${images.length === 1 ? "" : "s"}, seed ${status.seed}.${notes}`);
  } else if (status.state === "cancelled") {
    setProgress(0);
    say("Cancelled.");
  } else {
    setProgress(0);
    say("Failed.");
    setError((status.error && status.error.message) || "the job failed");
  }
}

function running(on) {
  page.busy = on;
  if (!on) {
    page.job = null;
  }
  const focused = document.activeElement;
  $("generate").disabled = on;
  $("cancel").disabled = !on;
  $("progress").toggleAttribute("aria-busy", on);
  // keep the keyboard's place: the button that was pressed is now disabled
  if (on && focused === $("generate")) $("cancel").focus();
  if (!on && (focused === $("cancel") || focused === document.body)) $("generate").focus();
}

function setProgress(value) {
  const bar = $("progress");
  bar.value = value;
  bar.setAttribute("aria-valuetext", `${Math.round(value * 100)}%`);
}

function say(text) {
  $("status").textContent = text;
}

function setError(text) {
  $("error").textContent = text;
}

function blobUrl(b64, type) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return URL.createObjectURL(new Blob([bytes], { type }));
}

function addImage(b64, seed, k, n, prompt) {
  const url = blobUrl(b64, "image/png");
  const item = document.createElement("li");
  item.className = "card";
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = url;
  img.alt = `${prompt} (seed ${seed}${n > 1 ? `, image ${k} of ${n}` : ""})`;
  img.dataset.seed = seed;
  const caption = document.createElement("figcaption");
  const label = document.createElement("span");
  label.className = "seed";
  label.textContent = n > 1 ? `seed ${seed} · ${k}/${n}` : `seed ${seed}`;
  const download = document.createElement("a");
  download.href = url;
  download.download = n > 1 ? `sdmesh-${seed}-${k}.png` : `sdmesh-${seed}.png`;
  download.textContent = "Download";
  download.setAttribute("aria-label", `Download ${label.textContent}`);
  const use = document.createElement("button");
  use.type = "button";
  use.className = "link";
  use.textContent = "Use seed";
  use.setAttribute("aria-label", `Use seed ${seed}`);
  use.addEventListener("click", () => {
    $("seed").value = seed;
    say(`Seed ${seed} will be used next.`);
    $("seed").focus();
  });
  caption.append(label, download, use);
  figure.append(img, caption);
  item.append(figure);
  $("gallery").prepend(item);
  $("empty").hidden = true;
}

// --- init image and mask ------------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function chooseInit() {
  const file = $("init").files[0];
  page.init = file ? await readFile(file) : "";
  $("init-extra").hidden = !page.init;
  if (page.init) $("init-thumb").src = page.init;
}

async function chooseMask() {
  const file = $("mask").files[0];
  page.mask = file ? await readFile(file) : "";
}

function clearInit() {
  page.init = page.mask = "";
  $("init").value = $("mask").value = "";
  $("init-extra").hidden = true;
  $("init").focus();
}

// --- wiring -------------------------------------------------------------------------

function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, key.value.trim());
    loadInfo();
  });
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  $("form").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      if (e.target === key) localStorage.setItem(KEY_STORE, key.value.trim());
      generate();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && page.job) {
      e.preventDefault();
      cancel();
    }
  });
  $("cancel").addEventListener("click", cancel);
  $("served-model").addEventListener("change", loadInfo);
  $("dice").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 32);
  });
  $("init").addEventListener("change", chooseInit);
  $("mask").addEventListener("change", chooseMask);
  $("clear-init").addEventListener("click", clearInit);
  $("strength").addEventListener("input", () => {
    $("strength-out").value = Number($("strength").value).toFixed(2);
  });
  loadInfo();
}

start();
