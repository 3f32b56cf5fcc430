// Talking to the server: /v1/models and streamed /v1/chat/completions (server-sent events), with every
// failure turned into an ApiError whose message a person can act on.

export class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

function headers(key) {
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

const HINTS = {
  401: "Enter the server's API key under Settings.",
  413: "The message is too large: attach fewer or smaller images.",
};

// An ApiError for a non-2xx response: the server's OpenAI-shaped message, then what to do about it.
async function failure(resp) {
  let message = "";
  let code = null;
  try {
    const body = await resp.json();
    message = body?.error?.message || "";
    code = body?.error?.code || null;
  } catch {
    // not JSON (a proxy's page): the status line says enough
  }
  let hint = HINTS[resp.status] || "";
  if (resp.status === 429) {
    const after = resp.headers.get("Retry-After");
    hint = `The server is busy: try again${after ? ` in ${after} s` : " shortly"}.`;
  }
  const text = message || resp.statusText || "the request failed";
  return new ApiError(`${text} (HTTP ${resp.status}). ${hint}`.trim(), resp.status, code);
}

async function post(url, init) {
  try {
    return await fetch(url, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`Cannot reach the server (${e.message}).`);
  }
}

// The models the server serves (relative URLs: the page also works under a path prefix).
export async function listModels(key) {
  const resp = await post("v1/models", { headers: headers(key) });
  if (!resp.ok) throw await failure(resp);
  return (await resp.json()).data.map((m) => m.id);
}

// Streams one completion; onDelta(text) for each piece. Resolves {finishReason, usage} at [DONE];
// rejects with AbortError when `signal` aborts (the closed connection makes the server drop the request).
export async function streamChat(body, key, signal, onDelta) {
  const payload = { ...body, stream: true, stream_options: { include_usage: true } };
  const resp = await post("v1/chat/completions",
                          { method: "POST", headers: headers(key), body: JSON.stringify(payload), signal });
  if (!resp.ok) throw await failure(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let finishReason = null;
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return { finishReason, usage };
        const chunk = JSON.parse(data);
        if (chunk.error) {  // an error after the stream started comes in-band
          throw new ApiError(chunk.error.message || "the server failed mid-answer", 200, chunk.error.code);
        }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          if (choice.delta?.content) onDelta(choice.delta.content);
          if (choice.finish_reason) finishReason = choice.finish_reason;
        }
      }
    }
  }
  throw new ApiError("The connection closed before the answer finished.");
}
