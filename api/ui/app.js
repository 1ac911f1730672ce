// editfarm web UI: plain JavaScript, no build step, no dependencies.
//
// Every API call carries "Authorization: Bearer <key>"; the key the user typed is kept in
// sessionStorage (this tab only). Live progress comes from GET /v1/jobs/{id}/events, read with
// fetch() + a ReadableStream because EventSource cannot send an Authorization header.
"use strict";

(() => {
  const KEY_STORAGE = "editfarm.apiKey";
  // the page is served at <base>/ui/, the API lives at <base>/
  const API_BASE = new URL("../", document.baseURI);
  const MAX_IMAGE_BYTES = 25 * 1024 * 1024;
  const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];
  const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
  const RECENT_PAGE = 12;

  // What each operation needs from the form. Operations the server announces but this page does
  // not know get the defaults of DEFAULT_OP.
  const OPS = {
    edit: { label: "Edit", image: true, prompt: true, tools: [],
      help: "Describe the change. To change only part of the picture, use Inpaint and draw a box." },
    inpaint: { label: "Inpaint", image: true, prompt: true, tools: ["box", "brush", "erase"], needsRegion: true,
      help: "Paint over the area to repaint (or draw boxes), then describe what should be there." },
    outpaint: { label: "Outpaint", image: true, prompt: false, tools: [],
      help: "Extend the picture beyond its borders; optionally describe what the new area shows." },
    move: { label: "Move", image: true, prompt: false, tools: ["box"], maxBoxes: 1,
      help: "Draw one box around the object, then say how far to move it." },
    upscale: { label: "Upscale", image: true, prompt: false, tools: [],
      help: "Make the image larger and sharper." },
    generate: { label: "Generate", image: false, prompt: true, tools: [],
      help: "Describe the picture to create." },
  };
  const DEFAULT_OP = { image: true, prompt: true, tools: [], help: "" };
  const STATUS_LABELS = {
    queued: "Queued", running: "Rendering", succeeded: "Done", failed: "Failed", canceled: "Canceled",
  };

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  };

  const state = {
    key: null,
    operations: ["edit"],
    models: [],            // GET /v1/models: [{name, operations, default_for, state, ...}] ([]: unknown)
    requestFields: null,   // the fields POST /v1/jobs declares (null: unknown → send everything)
    operation: "edit",
    image: null,           // {dataUrl, name, type, size, width, height}
    boxes: [],             // [[x0, y0, x1, y1]] relative to the image
    maskPainted: false,
    tool: "box",
    currentJobId: null,
    watcher: null,         // AbortController of the event stream being read
    recentCursor: null,
  };

  // -- errors ------------------------------------------------------------------------------------

  class UiError extends Error {
    constructor(message, { status = 0, code = "", param = null, retryAfter = null } = {}) {
      super(message);
      this.status = status;
      this.code = code;
      this.param = param;
      this.retryAfter = retryAfter;
    }
  }

  const sentence = (text) => {
    const t = String(text || "").trim();
    if (!t) return t;
    const s = t[0].toUpperCase() + t.slice(1);
    return /[.!?]$/.test(s) ? s : s + ".";
  };

  async function errorFrom(response) {
    let code = "", message = "", param = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || "";
        message = body.error.message || "";
        param = body.error.param || null;
      }
    } catch (_) { /* not JSON */ }
    const retryAfter = parseInt(response.headers.get("Retry-After") || "", 10);
    const status = response.status;
    let text;
    if (status === 401) text = "Your API key was not accepted. Please sign in again.";
    else if (status === 429) {
      text = "The render farm is busy right now." +
        (retryAfter > 0 ? ` Try again in ${retryAfter} seconds.` : " Try again in a moment.");
    } else if (status === 503) text = "The service is temporarily unavailable. Try again in a moment.";
    else if (status >= 500) text = "Something went wrong on the server. Try again in a moment.";
    else text = sentence(message) || `The request was refused (HTTP ${status}).`;
    return new UiError(text, { status, code, param, retryAfter: retryAfter > 0 ? retryAfter : null });
  }

  let toastTimer = null;
  function toast(message, kind = "error") {
    const box = $("toast");
    $("toast-text").textContent = message;
    box.dataset.kind = kind;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, kind === "error" ? 12000 : 6000);
  }

  function handleError(error, where = null) {
    if (error && error.name === "AbortError") return;
    const message = error instanceof UiError ? error.message
      : "Something unexpected happened. Please try again.";
    if (error instanceof UiError && error.status === 401) {
      signOut("Your API key was not accepted. Please sign in again.");
      return;
    }
    if (!(error instanceof UiError)) console.error(error);
    if (where) {
      where.textContent = message;
      where.hidden = false;
    } else {
      toast(message);
    }
  }

  // -- API ---------------------------------------------------------------------------------------

  const apiUrl = (path) => new URL(path.replace(/^\//, ""), API_BASE).toString();

  async function api(path, { method = "GET", body, signal, key = state.key } = {}) {
    const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
    const init = { method, headers, signal, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(apiUrl(path), init);
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new UiError("Could not reach the server. Check your connection and try again.");
    }
    if (!response.ok) throw await errorFrom(response);
    return response.json();
  }

  async function loadCapabilities() {
    try {
      const response = await fetch(apiUrl("openapi.json"), { cache: "no-store" });
      const doc = await response.json();
      const schemas = (doc.components && doc.components.schemas) || {};
      const resolve = (s) => (s && s.$ref ? schemas[s.$ref.split("/").pop()] : s) || {};
      // operations: the Operation enum, or every `operation` enum/const of the request schemas
      const ops = new Set((schemas.Operation && schemas.Operation.enum) || []);
      // fields: JobRequest's properties, or those of every variant when it is a oneOf/anyOf union
      const request = resolve(schemas.JobRequest);
      const variants = [request, ...[...(request.oneOf || []), ...(request.anyOf || [])].map(resolve)];
      const fields = new Set();
      for (const variant of variants) {
        for (const [name, prop] of Object.entries(variant.properties || {})) {
          fields.add(name);
          if (name !== "operation") continue;
          const p = resolve(prop);
          for (const value of [...(p.enum || []), ...(p.const !== undefined ? [p.const] : [])]) ops.add(value);
        }
      }
      if (ops.size) state.operations = [...ops];
      if (fields.size) state.requestFields = fields;
    } catch (_) {
      state.operations = ["edit"];
      state.requestFields = null;
    }
    renderOperations();
  }

  // -- sign in / out -----------------------------------------------------------------------------

  function showView(signedIn) {
    $("login-view").hidden = signedIn;
    $("app-view").hidden = !signedIn;
    $("session").hidden = !signedIn;
  }

  async function signIn(key, { silent = false } = {}) {
    const error = $("login-error");
    error.hidden = true;
    const button = $("login-button");
    button.disabled = true;
    button.textContent = "Signing in…";
    try {
      await api("/v1/jobs?limit=1", { key });
      state.key = key;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      $("session-label").textContent = `Signed in (key …${key.slice(-4)})`;
      showView(true);
      loadRecent(true);
      loadModels();
    } catch (e) {
      if (e instanceof UiError && e.status === 401) {
        sessionStorage.removeItem(KEY_STORAGE);
        if (!silent) {
          error.textContent = "That API key was not accepted. Check it and try again.";
          error.hidden = false;
        }
      } else {
        handleError(e, error);
      }
      showView(false);
    } finally {
      button.disabled = false;
      button.textContent = "Sign in";
    }
  }

  function signOut(message = null) {
    stopWatching();
    state.key = null;
    state.models = [];
    sessionStorage.removeItem(KEY_STORAGE);
    showView(false);
    $("recent-list").replaceChildren();
    clearResult();
    if (message) {
      $("login-error").textContent = message;
      $("login-error").hidden = false;
    }
    $("api-key").focus();
  }

  // -- operations --------------------------------------------------------------------------------

  const opInfo = (name) => OPS[name] || { ...DEFAULT_OP, label: sentence(name).replace(/\.$/, "") };

  function renderOperations() {
    const known = Object.keys(OPS);
    // once the models are known, only the operations some model serves
    const served = state.models.length
      ? state.operations.filter((o) => state.models.some((m) => (m.operations || []).includes(o)))
      : state.operations;
    const offered = served.length ? served : state.operations;
    const ordered = [...known.filter((o) => offered.includes(o)),
      ...offered.filter((o) => !known.includes(o))];
    if (!ordered.includes(state.operation)) state.operation = ordered[0] || "edit";
    const box = $("operations");
    box.querySelectorAll("label").forEach((node) => node.remove());
    for (const name of ordered) {
      const input = el("input", { type: "radio", name: "operation", value: name, id: `op-${name}`,
        checked: name === state.operation });
      input.addEventListener("change", () => selectOperation(name));
      box.append(el("label", { class: "op", for: `op-${name}` }, input, el("span", { text: opInfo(name).label })));
    }
    selectOperation(state.operation);
  }

  function selectOperation(name) {
    state.operation = name;
    const info = opInfo(name);
    $("operation-help").textContent = info.help;
    $("image-section").hidden = !info.image;
    $("prompt").placeholder = info.prompt ? "e.g. make the sky purple" : "optional";
    for (const block of document.querySelectorAll(".op-fields")) {
      block.hidden = !block.dataset.ops.split(" ").includes(name);
    }
    for (const button of document.querySelectorAll(".tool")) {
      button.hidden = !info.tools.includes(button.dataset.tool);
    }
    $("brush-size-label").hidden = !info.tools.includes("brush");
    $("toolbar").hidden = info.tools.length === 0;
    if (!info.tools.includes(state.tool)) setTool(info.tools[0] || null);
    if (info.maxBoxes && state.boxes.length > info.maxBoxes) {
      state.boxes = state.boxes.slice(-info.maxBoxes);
      drawBoxes();
    }
    $("mask-canvas").hidden = !info.tools.includes("brush");
    updateStageHint();
    renderModels();
  }

  // -- models (GET /v1/models) -------------------------------------------------------------------

  async function loadModels() {
    if (!state.key) return;
    try {
      const listing = await api("/v1/models");
      state.models = Array.isArray(listing.data) ? listing.data : [];
    } catch (e) {
      // a server without models (404) or a passing failure: no picker, jobs get the default model
      if (e instanceof UiError && e.status === 401) { handleError(e); return; }
      state.models = [];
    }
    renderOperations();
  }

  function workersText(model) {
    const ready = (model.state && model.state.workers_ready) || 0;
    if (ready > 0) return `${ready} worker${ready === 1 ? "" : "s"}`;
    return "no workers: jobs wait";
  }

  const defaultModelFor = (op) => state.models.find((m) => (m.default_for || []).includes(op)) || null;

  function renderModels() {
    const select = $("model-select");
    const op = state.operation;
    const serving = state.models.filter((m) => (m.operations || []).includes(op));
    // one model (or none known) leaves nothing to choose
    $("model-section").hidden = state.models.length < 2;
    const previous = select.value;
    const fallback = defaultModelFor(op);
    const options = [el("option", { value: "", text: fallback
      ? `(default) ${fallback.name} — ${workersText(fallback)}` : "(default)" })];
    for (const model of serving) {
      options.push(el("option", { value: model.name,
        text: `${model.name} · ${(model.operations || []).join(", ")} — ${workersText(model)}` }));
    }
    select.replaceChildren(...options);
    // keep the choice while the model serves the new operation, else back to the default
    select.value = serving.some((m) => m.name === previous) ? previous : "";
    describeModel();
  }

  function describeModel() {
    const name = $("model-select").value;
    const model = name ? state.models.find((m) => m.name === name) : defaultModelFor(state.operation);
    const info = $("model-info");
    if (!model) {
      info.textContent = state.models.length ? "No model of this cluster serves this operation." : "";
      return;
    }
    const s = model.state || {};
    const parts = [`${model.name} serves ${(model.operations || []).map((o) => opInfo(o).label.toLowerCase()).join(", ")}.`];
    parts.push((s.workers_ready || 0) > 0
      ? `${workersText(model)} ready, ${s.queued || 0} queued, ${s.running || 0} rendering.`
      : `No workers are running it now: its jobs wait in the queue until one starts (${s.queued || 0} waiting).`);
    if (typeof s.median_render_s === "number") parts.push(`About ${s.median_render_s.toFixed(1)} s a render.`);
    info.textContent = parts.join(" ");
  }

  function setTool(tool) {
    state.tool = tool;
    for (const button of document.querySelectorAll(".tool")) {
      button.setAttribute("aria-pressed", String(button.dataset.tool === tool));
    }
    $("box-canvas").dataset.tool = tool || "none";
    updateStageHint();
  }

  function updateStageHint() {
    const hints = {
      box: state.operation === "move" ? "Drag on the image to draw a box around the object to move."
        : "Drag on the image to draw a box around the area to change.",
      brush: "Paint over the area to repaint.",
      erase: "Paint to erase parts of the mask.",
    };
    $("stage-hint").textContent = hints[state.tool] || "";
  }

  // -- the image ---------------------------------------------------------------------------------

  function readAsDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(new UiError("That file could not be read."));
      reader.readAsDataURL(file);
    });
  }

  function loadImageElement(img, src) {
    return new Promise((resolve, reject) => {
      img.onload = () => resolve(img);
      img.onerror = () => reject(new UiError("That file could not be opened as an image."));
      img.src = src;
    });
  }

  async function useFile(file) {
    try {
      if (!file) return;
      if (!IMAGE_TYPES.includes(file.type)) {
        throw new UiError("That file is not a PNG, JPEG or WebP image.");
      }
      if (file.size > MAX_IMAGE_BYTES) {
        throw new UiError("That image is larger than 25 MB. Please choose a smaller one.");
      }
      const dataUrl = await readAsDataUrl(file);
      const img = $("source-image");
      await loadImageElement(img, dataUrl);
      state.image = { dataUrl, name: file.name, type: file.type, size: file.size,
        width: img.naturalWidth, height: img.naturalHeight };
      $("stage").style.setProperty("--aspect", String(img.naturalWidth / img.naturalHeight));
      // the mask is painted at the image's own size (it is sent as an image of that size); boxes are
      // drawn at screen resolution (see drawBoxes)
      const mask = $("mask-canvas");
      mask.width = img.naturalWidth;
      mask.height = img.naturalHeight;
      state.boxes = [];
      state.maskPainted = false;
      $("drop-zone").hidden = true;
      $("editor").hidden = false;
      drawBoxes();
      $("image-info").textContent =
        `${file.name} · ${img.naturalWidth}×${img.naturalHeight} · ${formatBytes(file.size)}`;
      $("form-error").hidden = true;
    } catch (error) {
      handleError(error, $("form-error"));
    }
  }

  function clearImage() {
    state.image = null;
    state.boxes = [];
    state.maskPainted = false;
    $("source-image").removeAttribute("src");
    $("editor").hidden = true;
    $("drop-zone").hidden = false;
    $("file-input").value = "";
    drawBoxes();
  }

  // -- drawing: boxes and the mask ---------------------------------------------------------------

  const clamp01 = (v) => Math.min(1, Math.max(0, v));
  let drag = null;     // {x0, y0, x1, y1} while drawing a box
  let stroke = null;   // last point while painting

  function pointerPosition(event) {
    const rect = $("box-canvas").getBoundingClientRect();
    return [clamp01((event.clientX - rect.left) / rect.width), clamp01((event.clientY - rect.top) / rect.height)];
  }

  function drawBoxes() {
    const canvas = $("box-canvas");
    const rect = canvas.getBoundingClientRect();
    const scale = window.devicePixelRatio || 1;
    const [width, height] = [Math.round(rect.width * scale), Math.round(rect.height * scale)];
    if (width > 0 && (canvas.width !== width || canvas.height !== height)) {
      canvas.width = width;
      canvas.height = height;
    }
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const line = 2 * scale;
    const all = state.boxes.map((b) => ({ box: b, pending: false }));
    if (drag) all.push({ box: [drag.x0, drag.y0, drag.x1, drag.y1], pending: true });
    all.forEach(({ box, pending }, index) => {
      const [x0, y0, x1, y1] = [Math.min(box[0], box[2]), Math.min(box[1], box[3]),
        Math.max(box[0], box[2]), Math.max(box[1], box[3])];
      const x = x0 * canvas.width, y = y0 * canvas.height;
      const w = (x1 - x0) * canvas.width, h = (y1 - y0) * canvas.height;
      ctx.fillStyle = "rgba(59, 130, 246, 0.15)";
      ctx.fillRect(x, y, w, h);
      ctx.lineWidth = line;
      ctx.setLineDash(pending ? [6 * scale, 4 * scale] : []);
      ctx.strokeStyle = "#2563eb";
      ctx.strokeRect(x, y, w, h);
      if (!pending) {
        const size = Math.round(14 * scale);
        ctx.font = `bold ${size}px system-ui, sans-serif`;
        ctx.fillStyle = "#2563eb";
        ctx.fillRect(x, y, size * 1.4, size * 1.4);
        ctx.fillStyle = "#fff";
        ctx.fillText(String(index + 1), x + size * 0.35, y + size * 1.1);
      }
    });
    renderBoxList();
  }

  function renderBoxList() {
    const list = $("box-list");
    list.replaceChildren(...state.boxes.map((box, index) => {
      const pct = (v) => `${Math.round(v * 100)}%`;
      const text = `Box ${index + 1}: ${pct(box[0])}, ${pct(box[1])} → ${pct(box[2])}, ${pct(box[3])}`;
      return el("li", { class: "chip" }, el("span", { text }),
        el("button", { type: "button", class: "link", "aria-label": `Remove box ${index + 1}`, text: "×",
          onclick: () => { state.boxes.splice(index, 1); drawBoxes(); } }));
    }));
  }

  function paintTo(point) {
    const canvas = $("mask-canvas");
    const ctx = canvas.getContext("2d");
    const scale = canvas.width / Math.max(1, canvas.getBoundingClientRect().width);
    const [x, y] = [point[0] * canvas.width, point[1] * canvas.height];
    const [px, py] = stroke ? [stroke[0] * canvas.width, stroke[1] * canvas.height] : [x, y];
    ctx.globalCompositeOperation = state.tool === "erase" ? "destination-out" : "source-over";
    ctx.strokeStyle = "rgb(236, 72, 153)";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number($("brush-size").value) * scale;
    ctx.beginPath();
    ctx.moveTo(px, py);
    ctx.lineTo(x + 0.01, y);
    ctx.stroke();
    stroke = point;
    if (state.tool === "brush") state.maskPainted = true;
  }

  function onPointerDown(event) {
    if (!state.image || !state.tool || event.button !== 0) return;
    event.preventDefault();
    $("box-canvas").setPointerCapture(event.pointerId);
    const point = pointerPosition(event);
    if (state.tool === "box") {
      drag = { x0: point[0], y0: point[1], x1: point[0], y1: point[1] };
      drawBoxes();
    } else {
      stroke = null;
      paintTo(point);
    }
  }

  function onPointerMove(event) {
    if (!drag && !stroke) return;
    const point = pointerPosition(event);
    if (drag) {
      [drag.x1, drag.y1] = point;
      drawBoxes();
    } else {
      paintTo(point);
    }
  }

  function onPointerUp(event) {
    if (drag) {
      const [x0, x1] = [Math.min(drag.x0, drag.x1), Math.max(drag.x0, drag.x1)];
      const [y0, y1] = [Math.min(drag.y0, drag.y1), Math.max(drag.y0, drag.y1)];
      drag = null;
      if (x1 - x0 >= 0.01 && y1 - y0 >= 0.01) {
        const round = (v) => Math.round(v * 10000) / 10000;
        const box = [round(x0), round(y0), round(x1), round(y1)];
        const max = opInfo(state.operation).maxBoxes;
        state.boxes = max ? [...state.boxes, box].slice(-max) : [...state.boxes, box];
      }
      drawBoxes();
    }
    stroke = null;
    if (event && event.pointerId !== undefined && $("box-canvas").hasPointerCapture(event.pointerId)) {
      $("box-canvas").releasePointerCapture(event.pointerId);
    }
  }

  function clearDrawing() {
    state.boxes = [];
    state.maskPainted = false;
    const mask = $("mask-canvas");
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    drawBoxes();
  }

  function maskDataUrl() {
    // white where painted, black elsewhere, at the image's own size
    const source = $("mask-canvas");
    const out = document.createElement("canvas");
    out.width = source.width;
    out.height = source.height;
    const ctx = out.getContext("2d");
    ctx.drawImage(source, 0, 0);
    ctx.globalCompositeOperation = "source-in";
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.globalCompositeOperation = "destination-over";
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    return out.toDataURL("image/png");
  }

  // -- submitting --------------------------------------------------------------------------------

  function numberField(id, { min = -Infinity, max = Infinity, integer = false, label }) {
    const raw = $(id).value.trim();
    if (raw === "") return null;
    const value = Number(raw);
    if (!Number.isFinite(value) || value < min || value > max || (integer && !Number.isInteger(value))) {
      const range = Number.isFinite(max) ? ` between ${min} and ${max}` : "";
      throw new UiError(`${label} must be a${integer ? " whole" : ""} number${range}.`);
    }
    return value;
  }

  const FIELD_NAMES = {
    boxes: "boxes", mask: "a painted mask", outpaint: "outpainting sizes", move: "the move",
    width: "the width", height: "the height", negative_prompt: "the negative prompt", model: "the model choice",
  };

  function buildRequest() {
    const op = state.operation;
    const info = opInfo(op);
    const body = { operation: op };
    // "(default)" sends no model: the catalog's default for the operation renders it
    if (!$("model-section").hidden && $("model-select").value) body.model = $("model-select").value;
    const prompt = $("prompt").value.trim();
    if (info.image && !state.image) throw new UiError("Choose an image first.");
    if (info.prompt && !prompt) throw new UiError("Write an instruction first.");
    if (prompt) body.prompt = prompt;
    if (info.image) body.image = state.image.dataUrl;
    const seed = numberField("seed", { min: 0, max: 4294967295, integer: true, label: "Seed" });
    if (seed !== null) body.seed = seed;
    const steps = numberField("steps", { min: 2, max: 100, integer: true, label: "Steps" });
    if (steps !== null) body.steps = steps;
    body.output_format = $("output-format").value;
    const negative = $("negative-prompt").value.trim();
    if (negative) body.negative_prompt = negative;

    if (info.tools.includes("box") && state.boxes.length && op !== "move") body.boxes = state.boxes;
    if (info.tools.includes("brush") && state.maskPainted) body.mask = maskDataUrl();
    if (info.needsRegion && !body.boxes && !body.mask) {
      throw new UiError("Paint the area to repaint, or draw a box around it.");
    }
    if (op === "outpaint") {
      const pad = {};
      for (const side of ["left", "right", "top", "bottom"]) {
        pad[side] = numberField(`pad-${side}`, { min: 0, max: 8192, integer: true, label: sentence(side).replace(/\.$/, "") }) || 0;
      }
      if (!pad.left && !pad.right && !pad.top && !pad.bottom) {
        throw new UiError("Say how many pixels to add on at least one side.");
      }
      body.outpaint = pad;
    }
    if (op === "move") {
      if (state.boxes.length !== 1) throw new UiError("Draw one box around the object to move.");
      body.move = {
        box: state.boxes[0],
        dx: numberField("move-dx", { min: -4096, max: 4096, integer: true, label: "Right" }) || 0,
        dy: numberField("move-dy", { min: -4096, max: 4096, integer: true, label: "Down" }) || 0,
        scale: numberField("move-scale", { min: 0.1, max: 10, label: "Scale" }) || 1,
      };
    }
    if (op === "generate" || op === "upscale") {
      const width = numberField("width", { min: 64, max: 8192, integer: true, label: "Width" });
      const height = numberField("height", { min: 64, max: 8192, integer: true, label: "Height" });
      if (width !== null) body.width = width;
      if (height !== null) body.height = height;
    }
    // leave out what this server does not accept (yet), and say so
    const dropped = [];
    if (state.requestFields) {
      for (const name of Object.keys(body)) {
        if (name !== "operation" && !state.requestFields.has(name)) {
          dropped.push(FIELD_NAMES[name] || name.replace(/_/g, " "));
          delete body[name];
        }
      }
    }
    return { body, dropped };
  }

  async function submitJob(event) {
    event.preventDefault();
    const error = $("form-error");
    error.hidden = true;
    let request;
    try {
      request = buildRequest();
    } catch (e) {
      handleError(e, error);
      return;
    }
    const button = $("submit-button");
    button.disabled = true;
    button.textContent = "Submitting…";
    try {
      const job = await api("/v1/jobs", { method: "POST", body: request.body });
      if (request.dropped.length) {
        toast(`This server does not take ${request.dropped.join(" or ")} yet, so ${
          request.dropped.length > 1 ? "they were" : "that was"} left out.`, "info");
      }
      showJob(job);
      loadRecent(true);
      loadModels();
    } catch (e) {
      handleError(e, error);
      // the catalog may have changed since the page read it (unknown_model, unsupported_operation)
      if (e instanceof UiError && e.param === "model") loadModels();
    } finally {
      button.disabled = false;
      button.textContent = "Render";
    }
  }

  // -- one job: status, progress, previews, results ----------------------------------------------

  function clearResult() {
    state.currentJobId = null;
    $("result").hidden = true;
    $("result-empty").hidden = false;
  }

  function showJob(job) {
    stopWatching();
    state.currentJobId = job.id;
    $("preview").hidden = true;
    $("preview-image").removeAttribute("src");
    renderJob(job);
    if (!TERMINAL.has(job.status)) watch(job.id);
    $("result-card").scrollIntoView({ block: "nearest", behavior: "smooth" });
  }

  function setProgress(step, total) {
    const pct = total > 0 ? Math.round(Math.min(1, step / total) * 100) : 0;
    $("progress-bar").style.width = `${pct}%`;
    $("progress").setAttribute("aria-valuenow", String(pct));
    return pct;
  }

  function statusText(job) {
    const progress = job.progress || { step: 0, total: 0 };
    switch (job.status) {
      case "queued":
        if (job.queue_position === 0) return "Waiting for a free GPU — yours is next.";
        if (job.queue_position > 0) {
          return `Waiting in the queue — ${job.queue_position} job${job.queue_position === 1 ? "" : "s"} ahead.`;
        }
        return "Waiting in the queue.";
      case "running":
        return progress.total > 0 ? `Rendering — step ${progress.step} of ${progress.total}.` : "Starting…";
      case "succeeded": {
        const took = duration(job.started_at, job.finished_at);
        return took ? `Done in ${took}.` : "Done.";
      }
      case "failed":
        return `Failed: ${sentence((job.error && job.error.message) || "the job could not be rendered")}`;
      case "canceled":
        return job.error && job.error.code === "queue_deadline"
          ? "Canceled: it waited in the queue too long." : "Canceled.";
      default:
        return sentence(job.status);
    }
  }

  function renderJob(job) {
    if (job.id !== state.currentJobId) return;
    $("result-empty").hidden = true;
    $("result").hidden = false;
    const badge = $("status-badge");
    badge.textContent = STATUS_LABELS[job.status] || job.status;
    badge.dataset.status = job.status;
    $("status-text").textContent = statusText(job);
    $("cancel-button").hidden = TERMINAL.has(job.status);
    const progress = job.progress || { step: 0, total: 0 };
    setProgress(job.status === "succeeded" ? 1 : progress.step, job.status === "succeeded" ? 1 : progress.total);
    $("progress").hidden = job.status !== "running" && job.status !== "queued";
    if (TERMINAL.has(job.status)) $("preview").hidden = true;

    const outputs = $("outputs");
    outputs.replaceChildren(...(job.outputs || []).map((output, index) => {
      const name = `${job.id}_${index}.${extensionOf(output.content_type)}`;
      return el("figure", { class: "output" },
        el("a", { href: output.url, target: "_blank", rel: "noopener noreferrer" },
          el("img", { src: output.url, alt: `Result ${index + 1}`, class: "result-image", loading: "lazy" })),
        el("figcaption", {},
          el("span", { class: "muted small",
            text: `${output.width}×${output.height} · ${extensionOf(output.content_type).toUpperCase()} · ${formatBytes(output.size_bytes)}` }),
          el("button", { type: "button", class: "secondary download", text: "Download",
            onclick: () => download(output, name) })));
    }));

    const params = job.params || {};
    const rows = [
      ["Operation", opInfo(job.operation || params.operation || "edit").label],
      ["Model", job.model || params.model],
      ["Instruction", params.prompt],
      ["Seed", params.seed],
      ["Steps", params.steps],
      ["Submitted", formatTime(job.created_at)],
      ["Job", job.id],
    ];
    $("job-details").replaceChildren(...rows.filter(([, v]) => v !== undefined && v !== null && v !== "")
      .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
  }

  function showPreview(data) {
    if (!data || !data.url) return;
    $("preview-image").src = data.url;
    $("preview-caption").textContent = data.step ? `Preview at step ${data.step}` : "Preview";
    $("preview").hidden = false;
  }

  async function download(output, name) {
    try {
      const response = await fetch(output.url, { cache: "no-store" });
      if (!response.ok) throw new Error("download failed");
      const url = URL.createObjectURL(await response.blob());
      const link = el("a", { href: url, download: name });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 30000);
    } catch (_) {
      // the object store may not allow cross-origin reads: open the image instead
      window.open(output.url, "_blank", "noopener");
    }
  }

  async function cancelCurrent() {
    const id = state.currentJobId;
    if (!id) return;
    const button = $("cancel-button");
    button.disabled = true;
    try {
      renderJob(await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }));
      loadRecent(true);
    } catch (e) {
      handleError(e);
      try { renderJob(await api(`/v1/jobs/${encodeURIComponent(id)}`)); } catch (_) { /* shown above */ }
    } finally {
      button.disabled = false;
    }
  }

  // -- live events: fetch + ReadableStream (EventSource cannot send Authorization) ---------------

  function stopWatching() {
    if (state.watcher) state.watcher.abort();
    state.watcher = null;
  }

  const sleep = (ms, signal) => new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });

  async function watch(jobId) {
    stopWatching();
    const controller = new AbortController();
    state.watcher = controller;
    const { signal } = controller;
    let failures = 0;
    let retryMs = 1000;
    while (!signal.aborted) {
      let outcome;
      try {
        outcome = await readEvents(jobId, signal, (ms) => { retryMs = ms; });
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof UiError && error.status >= 400 && error.status < 500 && error.status !== 429) {
          handleError(error);
          return;
        }
        outcome = { done: false, events: 0 };
      }
      if (outcome.done || signal.aborted) break;
      failures = outcome.events > 0 ? 0 : failures + 1;
      if (failures >= 3) {
        await poll(jobId, signal);  // the stream keeps failing: fall back to polling
        break;
      }
      await sleep(Math.min(10000, retryMs * Math.max(1, failures)), signal);
    }
    if (state.watcher === controller) state.watcher = null;
  }

  async function readEvents(jobId, signal, onRetry) {
    let response;
    try {
      response = await fetch(apiUrl(`/v1/jobs/${encodeURIComponent(jobId)}/events`), {
        headers: { Authorization: `Bearer ${state.key}`, Accept: "text/event-stream" },
        cache: "no-store", signal,
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new UiError("Lost the connection to the server; retrying…");
    }
    if (!response.ok) throw await errorFrom(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let eventName = "";
    let data = [];
    let events = 0;
    const dispatch = () => {
      if (!data.length) { eventName = ""; return false; }
      const name = eventName || "message";
      let payload = null;
      try { payload = JSON.parse(data.join("\n")); } catch (_) { payload = null; }
      eventName = "";
      data = [];
      if (!payload) return false;
      events += 1;
      return onEvent(jobId, name, payload);
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        const lines = buffer.split(/\r\n|\r|\n/);
        buffer = lines.pop();
        for (const line of lines) {
          if (line === "") {
            if (dispatch()) return { done: true, events };
            continue;
          }
          if (line.startsWith(":")) continue;  // keepalive comment
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (field === "event") eventName = value;
          else if (field === "data") data.push(value);
          else if (field === "retry" && /^\d+$/.test(value)) onRetry(Number(value));
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
    return { done: false, events };
  }

  // returns true once the job ended
  function onEvent(jobId, name, payload) {
    if (jobId !== state.currentJobId) return true;
    if (name === "status") {
      renderJob(payload);
    } else if (name === "progress") {
      const pct = setProgress(payload.step, payload.total);
      $("status-text").textContent = `Rendering — step ${payload.step} of ${payload.total} (${pct}%).`;
      const badge = $("status-badge");
      badge.textContent = STATUS_LABELS.running;
      badge.dataset.status = "running";
      $("progress").hidden = false;
    } else if (name === "preview") {
      showPreview(payload);
    } else if (name === "done") {
      renderJob(payload);
      loadRecent(true);
      loadModels();  // queue counts and render times changed
      return true;
    }
    return false;
  }

  async function poll(jobId, signal) {
    while (!signal.aborted && jobId === state.currentJobId) {
      try {
        const job = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { signal });
        renderJob(job);
        if (TERMINAL.has(job.status)) {
          loadRecent(true);
          return;
        }
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof UiError && error.status >= 400 && error.status < 500 && error.status !== 429) {
          handleError(error);
          return;
        }
      }
      await sleep(1500, signal);
    }
  }

  // -- recent jobs -------------------------------------------------------------------------------

  let recentRequest = 0;

  async function loadRecent(reset) {
    if (!state.key) return;
    const ticket = ++recentRequest;
    const params = new URLSearchParams({ limit: String(RECENT_PAGE) });
    const filter = $("recent-filter").value;
    if (filter) params.set("status", filter);
    if (!reset && state.recentCursor) params.set("cursor", state.recentCursor);
    try {
      const page = await api(`/v1/jobs?${params}`);
      if (ticket !== recentRequest) return;  // a newer request was made meanwhile
      const list = $("recent-list");
      const items = (page.data || []).map(recentItem);
      if (reset) list.replaceChildren(...items);
      else list.append(...items);
      state.recentCursor = page.next_cursor || null;
      $("recent-more").hidden = !state.recentCursor;
      $("recent-empty").hidden = list.children.length > 0;
    } catch (e) {
      if (ticket === recentRequest) handleError(e);
    }
  }

  function recentItem(job) {
    const params = job.params || {};
    const output = (job.outputs || [])[0];
    const thumb = output
      ? el("img", { src: output.url, alt: "", class: "thumb", loading: "lazy" })
      : el("span", { class: "thumb placeholder", "aria-hidden": "true",
        text: (opInfo(job.operation || params.operation).label || "?")[0] });
    const title = params.prompt || opInfo(job.operation || params.operation).label;
    const model = job.model || params.model;
    return el("li", {},
      el("button", { type: "button", class: "recent-item", "data-job-id": job.id,
        onclick: () => openJob(job.id) },
        thumb,
        el("span", { class: "recent-text" },
          el("span", { class: "recent-title", text: title }),
          el("span", { class: "muted small", "data-model": model,
            text: [opInfo(job.operation || params.operation).label, model, relativeTime(job.created_at)]
              .filter(Boolean).join(" · ") })),
        el("span", { class: "badge", "data-status": job.status, text: STATUS_LABELS[job.status] || job.status })));
  }

  async function openJob(id) {
    try {
      showJob(await api(`/v1/jobs/${encodeURIComponent(id)}`));
    } catch (e) {
      handleError(e);
    }
  }

  // -- formatting --------------------------------------------------------------------------------

  function extensionOf(contentType) {
    const sub = String(contentType || "").split("/")[1] || "bin";
    return sub === "jpeg" ? "jpg" : sub.split(";")[0];
  }

  function formatBytes(n) {
    if (!(n >= 0)) return "";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function formatTime(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
  }

  function duration(startIso, endIso) {
    const start = Date.parse(startIso || ""), end = Date.parse(endIso || "");
    if (!Number.isFinite(start) || !Number.isFinite(end) || end < start) return "";
    const s = (end - start) / 1000;
    if (s < 60) return `${s.toFixed(1)} s`;
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }

  function relativeTime(iso) {
    const t = Date.parse(iso || "");
    if (!Number.isFinite(t)) return "";
    const s = Math.max(0, (Date.now() - t) / 1000);
    if (s < 45) return "just now";
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return new Date(t).toLocaleDateString();
  }

  // -- wiring ------------------------------------------------------------------------------------

  function wire() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) {
        $("login-error").textContent = "Enter your API key.";
        $("login-error").hidden = false;
        return;
      }
      signIn(key);
    });
    $("logout-button").addEventListener("click", () => signOut());
    $("toast-close").addEventListener("click", () => { $("toast").hidden = true; });

    const drop = $("drop-zone");
    $("file-input").addEventListener("change", (event) => useFile(event.target.files[0]));
    drop.addEventListener("click", (event) => {
      if (event.target.tagName !== "LABEL" && event.target.tagName !== "INPUT") $("file-input").click();
    });
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file-input").click(); }
    });
    for (const target of [drop, $("stage")]) {
      target.addEventListener("dragover", (event) => {
        event.preventDefault();
        event.dataTransfer.dropEffect = "copy";
        drop.classList.add("dragging");
      });
      target.addEventListener("dragleave", () => drop.classList.remove("dragging"));
      target.addEventListener("drop", (event) => {
        event.preventDefault();
        drop.classList.remove("dragging");
        const file = event.dataTransfer.files && event.dataTransfer.files[0];
        if (file) useFile(file);
      });
    }
    document.addEventListener("paste", (event) => {
      if (!state.key || $("app-view").hidden) return;
      const item = [...(event.clipboardData ? event.clipboardData.items : [])]
        .find((i) => i.kind === "file" && IMAGE_TYPES.includes(i.type));
      if (item) useFile(item.getAsFile());
    });
    $("replace-image").addEventListener("click", clearImage);
    $("clear-drawing").addEventListener("click", clearDrawing);
    for (const button of document.querySelectorAll(".tool")) {
      button.addEventListener("click", () => setTool(button.dataset.tool));
    }
    const canvas = $("box-canvas");
    canvas.addEventListener("pointerdown", onPointerDown);
    canvas.addEventListener("pointermove", onPointerMove);
    canvas.addEventListener("pointerup", onPointerUp);
    canvas.addEventListener("pointercancel", onPointerUp);
    if (window.ResizeObserver) new ResizeObserver(() => drawBoxes()).observe($("stage"));
    else window.addEventListener("resize", () => drawBoxes());

    $("seed-random").addEventListener("click", () => {
      const values = new Uint32Array(1);
      crypto.getRandomValues(values);
      $("seed").value = String(values[0]);
    });
    $("job-form").addEventListener("submit", submitJob);
    $("cancel-button").addEventListener("click", cancelCurrent);
    $("recent-refresh").addEventListener("click", () => { loadRecent(true); loadModels(); });
    $("model-select").addEventListener("change", describeModel);
    $("recent-filter").addEventListener("change", () => loadRecent(true));
    $("recent-more").addEventListener("click", () => loadRecent(false));
  }

  async function start() {
    wire();
    await loadCapabilities();
    const saved = sessionStorage.getItem(KEY_STORAGE);
    if (saved) {
      await signIn(saved, { silent: true });
    } else {
      showView(false);
      $("api-key").focus();
    }
    document.body.dataset.ready = "true";
  }

  start();
})();
