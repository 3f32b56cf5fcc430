// The chat page: attachments, the conversation (kept in this page only), settings, send / stop.
import { ApiError, listModels, streamChat } from "./chat.js";
import { assistantBubble, scrollDown, show, thumb, userBubble } from "./view.js";

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), empty: $("empty"), banner: $("banner"), model: $("model"), thumbs: $("thumbs"),
  prompt: $("prompt"), send: $("send"), stop: $("stop"), file: $("file"), attach: $("attach"),
  composer: $("composer"), composerError: $("composer-error"), drop: $("drop"),
  settings: $("settings"), settingsToggle: $("settings-toggle"), settingsError: $("settings-error"),
  key: $("api-key"), crops: $("num-crops"), maxTokens: $("max-tokens"), temperature: $("temperature"),
  schema: $("schema"), newChat: $("new-chat"),
};

const MAX_IMAGE_BYTES = 20 * 2 ** 20;  // the server's default --max-image-bytes
const IMAGE_NAME = /\.(png|jpe?g|gif|webp|bmp|tiff?|ico)$/i;
const state = {
  history: [],   // OpenAI messages of the finished turns
  pending: [],   // attachments of the next message: {name, url}
  controller: null,
  model: null,
};

// ---------------------------------------------------------------- settings (kept in localStorage)

const STORED = ["key", "crops", "maxTokens", "temperature", "schema"];

function loadSettings() {
  for (const name of STORED) {
    const value = localStorage.getItem("phi3v." + name);
    if (value !== null) ui[name].value = value;
  }
}

function saveSetting(name) {
  localStorage.setItem("phi3v." + name, ui[name].value);
}

function number(input, label, lo, hi, integer) {
  const raw = input.value.trim();
  if (!raw) return undefined;
  const v = Number(raw);
  if (!Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) {
    throw new Error(`${label} must be ${integer ? "a whole number" : "a number"} from ${lo} to ${hi}.`);
  }
  return v;
}

// The request fields the settings ask for; throws an Error naming the bad field.
function requestSettings() {
  const out = {
    num_crops: number(ui.crops, "Crops per image", 1, 64, true),
    max_tokens: number(ui.maxTokens, "Max tokens", 1, 1e9, true),
    temperature: number(ui.temperature, "Temperature", 0, 2, false),
  };
  const text = ui.schema.value.trim();
  if (text) {
    let schema;
    try {
      schema = JSON.parse(text);
    } catch (e) {
      throw new Error(`The JSON schema is not valid JSON: ${e.message}`);
    }
    if (typeof schema !== "object" || schema === null || Array.isArray(schema)) {
      throw new Error("The JSON schema must be a JSON object.");
    }
    out.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
  }
  return Object.fromEntries(Object.entries(out).filter(([, v]) => v !== undefined));
}

function toggleSettings(open) {
  ui.settings.hidden = !open;
  ui.settingsToggle.setAttribute("aria-expanded", String(open));
}

// ---------------------------------------------------------------- the model (also checks the key)

// Asks the server for its model id; returns an error message ("" when it worked), also shown in the banner.
let asked = 0;  // a newer question (the key changed meanwhile) wins over a late answer to an older one
async function refreshModel() {
  const mine = ++asked;
  let problem = "";
  let ids = [];
  try {
    ids = await listModels(ui.key.value.trim());
  } catch (e) {
    problem = e.message;
  }
  if (mine !== asked) return problem;
  state.model = ids[0] || null;
  if (!state.model && !problem) problem = "The server lists no model.";
  ui.model.textContent = state.model || "";
  show(ui.banner, problem);
  return problem;
}

// ---------------------------------------------------------------- attachments

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

// Attachments are read one batch after another, so they keep the order they were given in.
let reading = Promise.resolve();
function addFiles(files) {
  reading = reading.then(() => readFiles(files));
  return reading;
}

async function readFiles(files) {
  const problems = [];
  for (const file of files) {
    if (!file.type.startsWith("image/") && !IMAGE_NAME.test(file.name)) {
      problems.push(`${file.name || "the pasted item"} is not an image.`);
    } else if (file.size > MAX_IMAGE_BYTES) {
      problems.push(`${file.name} is over ${MAX_IMAGE_BYTES / 2 ** 20} MiB.`);
    } else {
      let url = await readAsDataURL(file);
      if (!url.startsWith("data:image/")) url = url.replace(/^data:[^;,]*/, "data:image/png");  // no type known
      state.pending.push({ name: file.name || "pasted image", url });
    }
  }
  if (problems.length) show(ui.composerError, problems.join(" "));
  renderThumbs();
}

function renderThumbs() {
  ui.thumbs.replaceChildren();
  state.pending.forEach((att, i) => thumb(ui.thumbs, att, () => {
    state.pending.splice(i, 1);
    renderThumbs();
    ui.prompt.focus();
  }));
}

// ---------------------------------------------------------------- the conversation

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  if (busy) ui.stop.focus();
}

const FINISH = { stop: "done", length: "reached Max tokens" };

async function send() {
  if (state.controller) return;
  const text = ui.prompt.value.trim();
  if (!text) {
    show(ui.composerError, "Type a message first.");
    return;
  }
  let params;
  try {
    params = requestSettings();
    show(ui.settingsError, "");
  } catch (e) {
    show(ui.settingsError, e.message);
    toggleSettings(true);
    return;
  }
  if (!state.model) {
    const problem = await refreshModel();
    if (problem) {  // e.g. a missing or wrong API key: said next to the message, which stays in the box
      show(ui.composerError, problem);
      return;
    }
  }
  const images = state.pending;
  const message = { role: "user", content: [
    ...images.map((att) => ({ type: "image_url", image_url: { url: att.url } })), { type: "text", text }] };
  state.pending = [];
  renderThumbs();
  ui.prompt.value = "";
  autosize();
  show(ui.composerError, "");
  ui.empty.hidden = true;
  userBubble(ui.log, text, images);
  const answer = assistantBubble(ui.log);
  scrollDown(true);
  const controller = (state.controller = new AbortController());
  setBusy(true);
  try {
    const body = { model: state.model, messages: [...state.history, message], ...params };
    const done = await streamChat(body, ui.key.value.trim(), controller.signal, (d) => answer.append(d));
    const usage = done.usage ? ` · ${done.usage.completion_tokens} tokens` : "";
    answer.end("done", (FINISH[done.finishReason] || done.finishReason || "done") + usage);
    state.history.push(message, { role: "assistant", content: answer.text });
  } catch (e) {
    if (e.name === "AbortError") {
      answer.end("stopped", "stopped");
      if (answer.text) state.history.push(message, { role: "assistant", content: answer.text });
    } else {
      answer.end("error", e instanceof ApiError ? e.message : `Something went wrong: ${e.message}`);
      if (!answer.text) restoreDraft(text, images);  // nothing came back: fix the message and send again
      if (e.status === 401) refreshModel();
    }
  } finally {
    if (state.controller === controller) state.controller = null;
    setBusy(Boolean(state.controller));
    ui.prompt.focus();
  }
}

function restoreDraft(text, images) {
  if (!ui.prompt.value.trim()) ui.prompt.value = text;
  state.pending = [...images, ...state.pending];
  renderThumbs();
  autosize();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.prompt.focus();
}

function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = Math.min(ui.prompt.scrollHeight + 2, window.innerHeight * 0.4) + "px";
}

// ---------------------------------------------------------------- wiring

function imageFiles(list) {
  return [...(list || [])].filter((f) => f.kind === undefined || f.kind === "file")
    .map((f) => (f.getAsFile ? f.getAsFile() : f)).filter(Boolean);
}

function wire() {
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  ui.prompt.addEventListener("input", () => {
    autosize();
    show(ui.composerError, "");
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && state.controller) stop(); });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  ui.attach.addEventListener("click", () => ui.file.click());
  ui.file.addEventListener("change", async () => {
    await addFiles([...ui.file.files]);
    ui.file.value = "";
  });
  ui.settingsToggle.addEventListener("click", () => toggleSettings(ui.settings.hidden));
  for (const name of STORED) ui[name].addEventListener("change", () => saveSetting(name));
  ui.key.addEventListener("change", refreshModel);
  document.addEventListener("paste", (e) => {
    const files = imageFiles(e.clipboardData?.items).filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  let depth = 0;  // dragenter/dragleave fire for every child crossed
  document.addEventListener("dragenter", (e) => {
    if (![...e.dataTransfer.types].includes("Files")) return;
    depth++;
    ui.drop.hidden = false;
  });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; ui.drop.hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    ui.drop.hidden = true;
    addFiles(imageFiles(e.dataTransfer.files));
  });
}

loadSettings();
wire();
refreshModel();
ui.prompt.focus();
