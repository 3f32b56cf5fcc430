// Building the page's pieces: thumbnails, the two kinds of message bubble, copying an answer.
// Text from the user or the model only ever goes in through textContent or renderMarkdown.
import { renderMarkdown } from "./markdown.js";

export function make(tag, cls, parent, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

export function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

function nearBottom() {
  const el = document.scrollingElement;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
}

export function scrollDown(force) {
  if (force || nearBottom()) window.scrollTo(0, document.scrollingElement.scrollHeight);
}

export function thumb(parent, att, onRemove) {
  const fig = make("figure", "thumb", parent);
  const img = make("img", "", fig);
  img.alt = att.name;
  img.title = att.name;
  img.addEventListener("error", () => {  // the browser cannot show it; the server will judge it
    fig.classList.add("broken");
    make("figcaption", "", fig, att.name);
  });
  img.src = att.url;
  if (onRemove) {
    const remove = make("button", "remove", fig, "×");
    remove.type = "button";
    remove.setAttribute("aria-label", `Remove ${att.name}`);
    remove.addEventListener("click", onRemove);
  }
  return fig;
}

export function userBubble(log, text, images) {
  const msg = make("article", "msg user", log);
  msg.setAttribute("aria-label", "You");
  if (images.length) {
    const row = make("div", "images", msg);
    images.forEach((att) => thumb(row, att));
  }
  make("div", "text", msg, text);
  return msg;
}

// An answer being written: append(delta) while it streams, end(state, note) once; `text` is the raw Markdown.
export function assistantBubble(log) {
  const msg = make("article", "msg assistant", log);
  msg.setAttribute("aria-label", "Answer");
  msg.dataset.state = "streaming";
  const body = make("div", "md", msg);
  const meta = make("div", "meta", msg);
  const status = make("span", "status", meta, "…");
  status.setAttribute("role", "status");
  const copy = make("button", "copy", meta, "Copy");
  copy.type = "button";
  copy.hidden = true;
  let raw = "";
  let queued = false;
  copy.addEventListener("click", () => copyText(raw, copy));
  return {
    msg,
    append(delta) {  // re-rendered at most once a frame
      raw += delta;
      if (queued) return;
      queued = true;
      requestAnimationFrame(() => {
        queued = false;
        const follow = nearBottom();
        renderMarkdown(body, raw);
        scrollDown(follow);
      });
    },
    get text() { return raw; },
    end(kind, note) {
      renderMarkdown(body, raw);
      msg.dataset.state = kind;
      status.textContent = note;
      copy.hidden = !raw;
      if (kind === "error") {
        const err = make("p", "error", msg, note);
        err.setAttribute("role", "alert");
        status.textContent = "";
      }
    },
  };
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = make("textarea", "visually-hidden", document.body);  // no clipboard API off localhost/https
    area.value = text;
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}
