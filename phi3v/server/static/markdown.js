// A small Markdown subset rendered straight into DOM nodes. Model output is untrusted: every piece of
// it becomes a text node (createTextNode / textContent), never markup, so `<script>` or `<img onerror>`
// in an answer shows as text. Links keep only http(s) and mailto targets.
//
// Blocks: paragraphs (single newlines kept as line breaks), # headings, ``` fenced code (an unclosed
// fence runs to the end, as while streaming), - * + and 1. lists, > quotes, --- rules.
// Inline: `code`, **bold**, __bold__, *italic*, _italic_, [text](url).

const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^\s*>\s?(.*)$/;
const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const INLINE = new RegExp([
  "(`+)([^`][\\s\\S]*?)\\1(?!`)",                          // 1,2 code span
  "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",                   // 3 bold
  "(?<!\\w)__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)",            // 4 bold
  "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",                 // 5 italic
  "(?<!\\w)_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?!\\w)",      // 6 italic
  "\\[([^\\]\\n]+)\\]\\(\\s*([^()\\s]+)\\s*\\)",          // 7,8 link
].join("|"), "g");
const SAFE_URL = /^(https?:\/\/|mailto:)/i;

function el(doc, tag, parent) {
  const node = doc.createElement(tag);
  parent.appendChild(node);
  return node;
}

// Inline spans of `text` appended to `parent` as nodes.
function inline(doc, text, parent) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.appendChild(doc.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[1] !== undefined) {
      el(doc, "code", parent).textContent = m[2];
    } else if (m[3] !== undefined || m[4] !== undefined) {
      inline(doc, m[3] ?? m[4], el(doc, "strong", parent));
    } else if (m[5] !== undefined || m[6] !== undefined) {
      inline(doc, m[5] ?? m[6], el(doc, "em", parent));
    } else if (SAFE_URL.test(m[8])) {
      const a = el(doc, "a", parent);
      a.setAttribute("href", m[8]);
      a.setAttribute("target", "_blank");
      a.setAttribute("rel", "noopener noreferrer nofollow");
      inline(doc, m[7], a);
    } else {
      parent.appendChild(doc.createTextNode(m[0]));  // javascript:, data:, relative...: shown as typed
    }
  }
  if (last < text.length) parent.appendChild(doc.createTextNode(text.slice(last)));
}

// Lines joined by <br> inside `parent`.
function lines(doc, rows, parent) {
  rows.forEach((row, i) => {
    if (i) el(doc, "br", parent);
    inline(doc, row, parent);
  });
}

function list(doc, rows, i, parent) {
  const ordered = /\d/.test(ITEM.exec(rows[i])[2]);
  const node = el(doc, ordered ? "ol" : "ul", parent);
  const start = ordered ? parseInt(ITEM.exec(rows[i])[2], 10) : 1;
  if (ordered && start !== 1) node.setAttribute("start", String(start));
  let item = null;
  for (; i < rows.length; i++) {
    const m = ITEM.exec(rows[i]);
    if (m && /\d/.test(m[2]) === ordered) {
      item = [m[3]];
      lines(doc, item, el(doc, "li", node));
    } else if (item && rows[i].trim() && /^\s+/.test(rows[i])) {
      item.push(rows[i].trim());  // an indented continuation of the last item: redraw it
      const li = node.lastChild;
      li.replaceChildren();
      lines(doc, item, li);
    } else {
      break;
    }
  }
  return i;
}

function blocks(doc, rows, parent) {
  let i = 0;
  while (i < rows.length) {
    const row = rows[i];
    let m;
    if (!row.trim()) {
      i++;
    } else if ((m = FENCE.exec(row))) {
      const code = [];
      for (i++; i < rows.length && !rows[i].trim().startsWith(m[1]); i++) code.push(rows[i]);
      i++;
      const pre = el(doc, "pre", parent);
      const c = el(doc, "code", pre);
      if (m[2]) c.dataset.lang = m[2];
      c.textContent = code.join("\n");
    } else if ((m = HEADING.exec(row))) {
      inline(doc, m[2], el(doc, "h" + Math.min(6, m[1].length + 2), parent));
      i++;
    } else if (RULE.test(row)) {
      el(doc, "hr", parent);
      i++;
    } else if (QUOTE.test(row)) {
      const inner = [];
      for (; i < rows.length && (m = QUOTE.exec(rows[i])); i++) inner.push(m[1]);
      blocks(doc, inner, el(doc, "blockquote", parent));
    } else if (ITEM.test(row)) {
      i = list(doc, rows, i, parent);
    } else {
      const para = [];
      for (; i < rows.length && rows[i].trim() && !FENCE.test(rows[i]) && !HEADING.test(rows[i])
             && !QUOTE.test(rows[i]) && !ITEM.test(rows[i]) && !RULE.test(rows[i]); i++) para.push(rows[i]);
      lines(doc, para, el(doc, "p", parent));
    }
  }
}

// Replaces the children of `target` with `text` rendered as Markdown.
export function renderMarkdown(target, text) {
  const doc = target.ownerDocument;
  const frag = doc.createDocumentFragment();
  blocks(doc, String(text).replace(/\r\n?/g, "\n").split("\n"), frag);
  target.replaceChildren(frag);
}
