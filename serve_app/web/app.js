// sdgate's page: plain JS, no build step. It talks to the same origin's API: /v1/models,
// /v1/jobs (live progress over Server-Sent Events, read with fetch() because EventSource cannot
// send the Authorization header), /v1/images/generations when the jobs API is absent,
// /v1/gallery and /v1/images/{key}.png. An init image (img2img) goes as a data: URL in `init_image`.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "sdgate.token";
const GALLERY_PAGE = 12;
const MAX_SEED = 4294967295;
const MAX_IMAGE_BYTES = 4 * 1024 * 1024;  // client/protocol.py MAX_IMAGE_BYTES: the server refuses more
const state = { models: {}, last: null, imageUrl: null, blob: null, galleryNext: null, socketPort: 5555, busy: false,
                init: null };  // init: {file, dataUrl} of the image to start from, or null
// What the progress bar showed, in order ("indeterminate" or a fraction): the browser tests read it.
window.sdgateProgressLog = [];

// -- the token: asked once, kept in localStorage ------------------------------------------------

let tokenAsk = null;

function askToken() {
  if (tokenAsk) return tokenAsk;  // several requests answered 401 at once share one question
  tokenAsk = new Promise((resolve) => {
    const dialog = $("token-dialog");
    $("token").value = localStorage.getItem(TOKEN_KEY) || "";
    dialog.addEventListener("close", () => {
      const token = $("token").value.trim();
      if (dialog.returnValue === "save" && token) {
        localStorage.setItem(TOKEN_KEY, token);
        resolve(true);
      } else {
        resolve(false);
      }
      tokenAsk = null;
    }, { once: true });
    dialog.showModal();
    $("token").focus();
  });
  return tokenAsk;
}

// fetch() with the stored token; on 401 asks for a token once and retries.
async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const headers = new Headers(options.headers || {});
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers.set("Authorization", "Bearer " + token);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401 || attempt > 0) return response;
    if (!(await askToken())) return response;
  }
}

async function errorText(response) {
  return (await apiError(response)).message;
}

// An Error of an API answer, with the OpenAI error body's `param` (the field at fault) when it has one.
async function apiError(response) {
  let message = `${response.status} ${response.statusText}`, param = null;
  try {
    const body = await response.json();
    if (body && body.error) { message = body.error.message; param = body.error.param || null; }
  } catch (_) { /* not JSON */ }
  return Object.assign(new Error(message), { param });
}

// -- models and the form ----------------------------------------------------------------------

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) throw new Error("could not list the models: " + (await errorText(response)));
  const select = $("model");
  select.textContent = "";
  for (const model of (await response.json()).data) {
    state.models[model.id] = model;
    const option = new Option(model.id + (model.live_workers === 0 ? " (no workers)" : ""), model.id);
    select.add(option);
    if (model.default) select.value = model.id;
  }
  applyDefaults();
}

function applyDefaults() {
  const model = state.models[$("model").value];
  if (!model) return;
  const d = model.defaults, limits = model.limits;
  if (!state.init) { $("width").value = d.width; $("height").value = d.height; }  // else: the image's size
  $("steps").value = d.steps;
  $("guidance").value = d.guidance_scale; $("scheduler").value = d.scheduler;
  $("width").max = $("height").max = limits.max_side;
  $("steps").max = limits.max_steps;
}

function readForm() {
  const params = { prompt: $("prompt").value.trim(), model: $("model").value || undefined };
  const negative = $("negative_prompt").value.trim();
  if (negative) params.negative_prompt = negative;
  for (const [field, id] of [["width", "width"], ["height", "height"], ["steps", "steps"], ["seed", "seed"]]) {
    if ($(id).value !== "") params[field] = parseInt($(id).value, 10);
  }
  if ($("guidance").value !== "") params.guidance_scale = parseFloat($("guidance").value);
  params.scheduler = $("scheduler").value;
  if (state.init) {
    params.init_image = state.init.dataUrl;
    params.strength = strengthValue();
  }
  return params;
}

// The slider's value, rounded to its 0.05 steps (the browser's arithmetic may leave 0.30000000000000004).
function strengthValue() {
  return Math.round(parseFloat($("strength").value) * 100) / 100;
}

// -- the init image (img2img) ---------------------------------------------------------------------

// What the server accepts, by the file's first bytes as client/protocol.py sniff_image reads them.
async function sniffImage(blob) {
  const b = new Uint8Array(await blob.slice(0, 12).arrayBuffer());
  const ascii = (from, to) => String.fromCharCode(...b.subarray(from, to));
  if (b.length >= 8 && [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a].every((v, i) => b[i] === v)) return "png";
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "jpeg";
  if (b.length >= 12 && ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return "webp";
  return null;
}

function readDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
    reader.readAsDataURL(blob);
  });
}

function sizeText(bytes) {
  return bytes < 1024 * 1024 ? `${Math.max(1, Math.round(bytes / 1024))} KB` : `${(bytes / 1048576).toFixed(1)} MiB`;
}

function initError(message) {
  $("init-error").textContent = message;
  $("init-error").hidden = !message;
}

// Check `file` (a File, or a Blob with a name given) and make it the init image; a refused one
// leaves the previous init image in place and says why.
async function setInit(file, name) {
  if (!(file instanceof File)) file = new File([file], name || "image.png", { type: file.type || "image/png" });
  const input = $("init-file");
  const keepPrevious = () => {
    const files = new DataTransfer();
    if (state.init) files.items.add(state.init.file);
    input.files = files.files;
  };
  if (file.size > MAX_IMAGE_BYTES) {
    keepPrevious();
    initError(`${file.name} is ${sizeText(file.size)}; the limit is 4 MiB. Scale it down or save it as JPEG.`);
    return false;
  }
  if (!(await sniffImage(file))) {
    keepPrevious();
    initError(`${file.name} is not a PNG, JPEG or WebP image; open it in an image editor and save it as one of them.`);
    return false;
  }
  let dataUrl;
  try {
    dataUrl = await readDataUrl(file);
  } catch (err) {
    keepPrevious();
    initError(`${file.name} could not be read: ${err.message}`);
    return false;
  }
  initError("");
  if (!state.init && ($("width").value !== "" || $("height").value !== "")) {
    $("width").value = ""; $("height").value = "";  // empty: the server takes the image's size
  }
  state.init = { file, dataUrl };
  if (input.files[0] !== file) {  // dropped or taken from a result: the file field names it too
    const files = new DataTransfer();
    files.items.add(file);
    input.files = files.files;
  }
  const thumb = $("init-thumb");
  thumb.alt = "Init image: " + file.name;
  thumb.onload = () => {
    $("init-name").textContent = `${file.name}, ${thumb.naturalWidth}×${thumb.naturalHeight}, ${sizeText(file.size)}`;
  };
  $("init-name").textContent = `${file.name}, ${sizeText(file.size)}`;
  thumb.src = dataUrl;
  $("width").placeholder = $("height").placeholder = "the image's";
  $("init-set").hidden = false;
  $("strength-row").hidden = false;
  return true;
}

function removeInit() {
  state.init = null;
  $("init-file").value = "";
  $("init-thumb").removeAttribute("src");
  $("init-set").hidden = true;
  $("strength-row").hidden = true;
  initError("");
  $("width").placeholder = $("height").placeholder = "";
  const model = state.models[$("model").value];
  if (model && $("width").value === "" && $("height").value === "") {
    $("width").value = model.defaults.width; $("height").value = model.defaults.height;
  }
  $("init-file").focus();
}

// "Use as init" (A1111's "send to img2img"): a result's PNG becomes the image to start from.
async function useAsInit(blob, key) {
  if (!blob) return;
  if (await setInit(blob, `sdgate-${(key || "image").slice(0, 12)}.png`)) {
    $("init-zone").scrollIntoView({ block: "nearest", behavior: "smooth" });
    $("strength").focus({ preventScroll: true });
  }
}

function watchInitZone() {
  const zone = $("init-zone");
  const hasFiles = (event) => event.dataTransfer && Array.from(event.dataTransfer.types).includes("Files");
  $("init-file").addEventListener("change", () => {
    const file = $("init-file").files[0];
    if (file) setInit(file);
    else if (state.init) removeInit();  // the picker's own "clear"
  });
  $("init-remove").addEventListener("click", removeInit);
  $("strength").addEventListener("input", () => { $("strength-value").textContent = strengthValue().toFixed(2); });
  zone.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", (event) => {
    if (!zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
  });
  zone.addEventListener("drop", (event) => {
    zone.classList.remove("dragging");
    if (!hasFiles(event)) return;
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) setInit(file);
  });
  // A file dropped beside the zone would make the browser open it, leaving the page and its form.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => { if (hasFiles(event)) event.preventDefault(); });
  }
}

// -- progress -------------------------------------------------------------------------------------

function showProgress(text, fraction) {
  const bar = $("progress");
  $("progress-box").hidden = false;
  if (fraction === null) {
    bar.removeAttribute("value");  // indeterminate
    window.sdgateProgressLog.push("indeterminate");
  } else {
    bar.max = 1;
    bar.value = fraction;
    window.sdgateProgressLog.push(fraction);
  }
  $("progress-text").textContent = text;
}

function describeJob(job) {
  if (job.state === "queued") {
    const position = job.queue_position == null ? "" : ` (position ${job.queue_position})`;
    return "Queued" + position + (job.eta_s == null ? "" : `, about ${Math.ceil(job.eta_s)} s`);
  }
  const step = job.step == null ? 0 : job.step;
  return `Step ${step} of ${job.steps}` + (job.eta_s == null ? "" : `, about ${Math.ceil(job.eta_s)} s left`);
}

function onJob(job) {
  const fraction = job.steps ? Math.min(1, (job.step || 0) / job.steps) : 0;
  showProgress(describeJob(job), fraction);
}

// Server-Sent Events from a fetch() body: yields {event, data} per message.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: data.join("\n") };
    }
  }
}

// -- generating -----------------------------------------------------------------------------------

async function generate(params) {
  if (state.busy) return;
  if (!params.prompt) { $("prompt").focus(); return; }
  state.busy = true;
  $("generate").disabled = true;
  $("error").hidden = true;
  initError("");
  $("empty").hidden = true;
  $("preview").hidden = true;
  window.sdgateProgressLog = [];
  showProgress("Sending…", 0);
  try {
    const response = await api("/v1/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...params, previews: 1 }),
    });
    if (response.status === 404 || response.status === 405) {
      await generateWithoutJobs(params);  // a gateway without the jobs API
    } else if (!response.ok) {
      throw await apiError(response);
    } else {
      await followJob(await response.json(), params);
    }
  } catch (err) {
    showError(err.message || String(err));
    if (["init_image", "strength", "mask"].includes(err.param)) initError(err.message);  // beside the field too
  } finally {
    state.busy = false;
    $("generate").disabled = false;
  }
}

async function followJob(job, params) {
  onJob(job);
  if (job.state !== "done") {
    const events = await api(`/v1/jobs/${encodeURIComponent(job.id)}/events`, { headers: { Accept: "text/event-stream" } });
    if (!events.ok) throw new Error(await errorText(events));
    for await (const message of readEvents(events)) {
      const data = JSON.parse(message.data);
      if (message.event === "progress") onJob(data);
      else if (message.event === "preview") {
        $("preview").src = "data:image/png;base64," + data.b64_png;
        $("preview").hidden = false;
      } else if (message.event === "done") { job = data; break; }
      else if (message.event === "error") {
        throw new Error((data.error && data.error.message) || `the job ended ${data.state}`);
      }
    }
    while (job.state !== "done") {  // the stream broke off: ask until the job ends
      const polled = await api(`/v1/jobs/${encodeURIComponent(job.id)}`);
      if (!polled.ok) throw new Error(await errorText(polled));
      job = await polled.json();
      if (job.state === "failed" || job.state === "cancelled") throw new Error((job.error && job.error.message) || job.state);
      onJob(job);
      if (job.state !== "done") await new Promise((r) => setTimeout(r, 1000));
    }
  }
  showProgress(job.cached ? "Done (from the cache)" : "Done", 1);
  const image = await api(job.image_url || `/v1/images/${job.key}.png`);
  if (!image.ok) throw new Error(await errorText(image));
  showResult(job.key, await image.blob(), job.params || params);
}

async function generateWithoutJobs(params) {
  showProgress("Rendering… (this server has no jobs API, so no live progress)", null);
  const response = await api("/v1/images/generations", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(params),
  });
  if (!response.ok) throw await apiError(response);
  const body = await response.json();
  const bytes = Uint8Array.from(atob(body.data[0].b64_json), (c) => c.charCodeAt(0));
  const meta = body.sdgate || {};
  showProgress(meta.cached ? "Done (from the cache)" : "Done", 1);
  showResult(meta.key, new Blob([bytes], { type: "image/png" }), meta.params || { ...params, seed: meta.seed });
}

// -- the result -----------------------------------------------------------------------------------

function showError(message) {
  $("progress-box").hidden = true;
  $("error").textContent = message;
  $("error").hidden = false;
}

function normalParams(p) {
  const guidance = p.guidance != null ? p.guidance : p.guidance_scale;
  return { prompt: p.prompt, negative_prompt: p.negative_prompt || "", model: p.model, width: p.width,
           height: p.height, steps: p.steps, guidance, seed: p.seed, scheduler: p.scheduler, strength: p.strength };
}

function showResult(key, blob, rawParams) {
  const params = normalParams(rawParams);
  state.last = { key, params };
  state.blob = blob;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(blob);
  const image = $("image");
  image.src = state.imageUrl;
  image.alt = "Generated image: " + (params.prompt || "");
  image.dataset.key = key || "";
  const list = $("params");
  list.textContent = "";
  for (const [name, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "") continue;
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name.replace("_", " ");
    dd.textContent = String(value);
    list.append(dt, dd);
  }
  if (key) { const kdt = document.createElement("dt"), kdd = document.createElement("dd");
    kdt.textContent = "key"; kdd.textContent = key.slice(0, 16) + "…"; kdd.title = key; list.append(kdt, kdd); }
  const initSha = rawParams.init_image_sha256 || rawParams.init_image && "(sent)";
  if (initSha) { const idt = document.createElement("dt"), idd = document.createElement("dd");
    idt.textContent = "init image"; idd.textContent = initSha.slice(0, 16) + (initSha.length > 16 ? "…" : "");
    idd.title = initSha; list.append(idt, idd); }
  $("download").href = state.imageUrl;
  $("download").download = `sdgate-${(key || "image").slice(0, 12)}.png`;
  $("command").value = bootCommand(params);
  // client/boot.py sends no init image: its command would draw another picture.
  const fromImage = Boolean(initSha || params.strength != null);
  $("copy-command").hidden = fromImage;
  if (fromImage) { $("command").hidden = true; $("command-label").hidden = true; }
  $("figure").hidden = false;
  $("actions").hidden = false;
  $("preview").hidden = true;
  $("empty").hidden = true;
  refreshGallery();
}

function shellQuote(text) {
  return /^[A-Za-z0-9_./:=+-]+$/.test(text) ? text : "'" + String(text).replace(/'/g, "'\\''") + "'";
}

function bootCommand(p) {
  const args = ["python3", "client/boot.py", shellQuote(p.prompt)];
  if (location.hostname && !["127.0.0.1", "localhost"].includes(location.hostname)) args.push("--host", location.hostname);
  if (state.socketPort !== 5555) args.push("--port", String(state.socketPort));
  const flags = [["--model", p.model], ["--width", p.width], ["--height", p.height], ["--steps", p.steps],
                 ["--guidance", p.guidance], ["--scheduler", p.scheduler], ["--seed", p.seed]];
  for (const [flag, value] of flags) if (value !== undefined && value !== null) args.push(flag, shellQuote(String(value)));
  if (p.negative_prompt) args.push("--negative", shellQuote(p.negative_prompt));
  return args.join(" ");
}

async function copyCommand() {
  const field = $("command");
  field.hidden = false;
  $("command-label").hidden = false;
  field.focus();
  field.select();
  try {
    await navigator.clipboard.writeText(field.value);
    $("progress-text").textContent = "Boot command copied.";
  } catch (_) {  // no clipboard API (plain http off localhost): the field stays selected for Ctrl+C
    document.execCommand && document.execCommand("copy");
  }
}

function newSeed() {
  if (!state.last) return;
  const values = new Uint32Array(1);
  crypto.getRandomValues(values);
  $("seed").value = values[0] % (MAX_SEED + 1);
  generate(readForm());
}

function fillForm(p) {
  p = normalParams(p);
  if (p.prompt !== undefined) $("prompt").value = p.prompt;
  $("negative_prompt").value = p.negative_prompt || "";
  if (p.model && state.models[p.model]) $("model").value = p.model;
  for (const id of ["width", "height", "steps", "guidance", "seed"]) if (p[id] != null) $(id).value = p[id];
  if (p.scheduler) $("scheduler").value = p.scheduler;
  if (p.strength != null) {
    $("strength").value = p.strength;
    $("strength-value").textContent = strengthValue().toFixed(2);
  }
}

// -- the gallery ----------------------------------------------------------------------------------

async function loadGallery(before) {
  const query = new URLSearchParams({ limit: String(GALLERY_PAGE) });
  if (before) query.set("before", before);
  const response = await api("/v1/gallery?" + query);
  if (!response.ok) { $("gallery-empty").textContent = await errorText(response); $("gallery-empty").hidden = false; return; }
  const page = await response.json();
  const list = $("gallery");
  if (!before) list.textContent = "";
  for (const item of page.data) list.append(galleryItem(item));
  state.galleryNext = page.next;
  $("more").hidden = !page.next;
  $("gallery-empty").textContent = "Nothing cached yet.";
  $("gallery-empty").hidden = list.children.length > 0;
}

function refreshGallery() { loadGallery(null).catch(() => {}); }

function galleryItem(item) {
  const li = document.createElement("li");
  li.dataset.key = item.key;
  const button = document.createElement("button");
  button.type = "button";
  button.className = "open";
  const img = document.createElement("img");
  const prompt = (item.params && item.params.prompt) || "(prompt not recorded)";
  img.alt = "Gallery: " + prompt;
  img.loading = "lazy";
  const caption = document.createElement("span");
  caption.textContent = prompt;
  button.append(img, caption);
  button.title = prompt;
  const useInit = document.createElement("button");
  useInit.type = "button";
  useInit.className = "use-init";
  useInit.textContent = "Use as init";
  useInit.setAttribute("aria-label", "Use as init: " + prompt);
  li.append(button, useInit);
  let blob = null;
  api(item.image_url).then((r) => (r.ok ? r.blob() : null)).then((b) => {
    if (b) { blob = b; img.src = URL.createObjectURL(b); }
  }).catch(() => {});
  button.addEventListener("click", () => {
    if (!blob) return;
    fillForm(item.params || {});
    showResult(item.key, blob, item.params || {});
    $("result-title").scrollIntoView({ behavior: "smooth" });
  });
  useInit.addEventListener("click", async () => {
    try {
      if (!blob) {  // not loaded yet (lazy, or slow): fetch it now
        const response = await api(item.image_url);
        if (!response.ok) throw new Error(await errorText(response));
        blob = await response.blob();
      }
      await useAsInit(blob, item.key);
    } catch (err) {
      initError("Could not fetch that image: " + (err.message || String(err)));
    }
  });
  return li;
}

// -- start ----------------------------------------------------------------------------------------

async function start() {
  $("generate-form").addEventListener("submit", (event) => { event.preventDefault(); generate(readForm()); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); generate(readForm()); }
  });
  $("model").addEventListener("change", applyDefaults);
  $("new-seed").addEventListener("click", newSeed);
  $("use-init").addEventListener("click", () => useAsInit(state.blob, state.last && state.last.key));
  watchInitZone();
  $("copy-command").addEventListener("click", copyCommand);
  $("more").addEventListener("click", () => loadGallery(state.galleryNext));
  $("token-button").addEventListener("click", () => askToken().then((saved) => saved && start.reload()));
  start.reload = () => { loadModels().catch((e) => showError(e.message)); refreshGallery(); };
  try {
    const health = await (await fetch("/healthz")).json();
    if (health.socket_port) state.socketPort = health.socket_port;
  } catch (_) { /* the boot command keeps the default port */ }
  $("server-note").textContent = location.host;
  start.reload();
}

document.addEventListener("DOMContentLoaded", start);
