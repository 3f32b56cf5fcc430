"""Structured output: JSON-schema constrained decoding on token ids, with llguidance.

- `check_schema` turns a user schema into llguidance's grammar text and validates it (no
  tokenizer needed). It is cached by the schema's canonical JSON, so SamplingParams can call it
  on every request: an invalid schema is a ValueError with llguidance's message.
- `Grammars` holds the token table of one tokenizer (built once, on first use, from the real
  `tokenizer.json`; ids past the tokenizer's table, up to the model's vocab size, are never
  allowed) and one compiled matcher per schema, which new sequences deep-copy.
- Each step, `fill_masks` writes one packed bitmask row (1 bit per token id) per row of the
  batch on the CPU, only for constrained rows (the others stay all-ones), and sends the batch's
  masks to the device in one copy; the sampler applies them with one `masked_fill`. After the
  step's host copy, `accept` feeds each constrained row its sampled token and says whether the
  grammar is complete, which ends the sequence ("stop") without an extra eos step.

JSON is generated compact but readable, with ", " and ": " separators and no other whitespace
(so a model can never run away in whitespace). A schema may override this with llguidance's
"x-guidance" options, e.g. {"x-guidance": {"item_separator": ","}}.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}  # "any JSON object" (OpenAI json_object)
_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_WRAPPER_KEYS = {"name", "schema", "strict", "description"}


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise ValueError("structured output needs the llguidance package: pip install llguidance") from e
    return llguidance


def canonical(schema: dict[str, Any]) -> str:
    """The cache key of a schema: its compact JSON (key order kept: it is the order of generation)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def parse_schema(schema: dict[str, Any] | str) -> dict[str, Any]:
    """A schema given as a dict or JSON text -> dict. Raises ValueError with a clear message."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON object (a dict), got {type(schema).__name__}")
    if "schema" in schema and isinstance(schema["schema"], dict) and set(schema) <= _WRAPPER_KEYS:
        raise ValueError("json_schema looks like an OpenAI response_format wrapper ({name, schema, strict}): "
                         "pass the schema itself (its 'schema' member)")
    return schema


@lru_cache(maxsize=1024)
def _grammar(key: str) -> str:
    llg = _llg()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(key, defaults=_OPTIONS)
    except ValueError as e:
        raise ValueError(f"json_schema is not usable: {e}") from None
    err = llg.LLMatcher.validate_grammar(grammar)
    if err:
        raise ValueError(f"json_schema is not usable: {' '.join(err.split())}")
    return grammar


def check_schema(schema: dict[str, Any] | str) -> dict[str, Any]:
    """Parse and validate a JSON schema (compiling it once per distinct schema). Returns the dict."""
    schema = parse_schema(schema)
    _grammar(canonical(schema))
    return schema


def grammar_key(params: Any) -> str | None:
    """The canonical schema of a SamplingParams' constraint, or None when it has none."""
    if getattr(params, "json_schema", None) is not None:
        return canonical(parse_schema(params.json_schema))
    if getattr(params, "json_object", False):
        return canonical(JSON_OBJECT_SCHEMA)
    return None


class Grammars:
    """Token table of one tokenizer + compiled schemas + the per-step mask buffer."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Sequence[int], cache_size: int = 256) -> None:
        self.tokenizer_json, self.vocab_size = tokenizer_json, int(vocab_size)
        self.eos_ids = [int(i) for i in eos_ids]
        self._eos = frozenset(self.eos_ids)
        self.words = (self.vocab_size + 31) // 32  # int32 words per mask row
        self.cache_size = cache_size
        self._tok: Any = None
        self._exec: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._buf: torch.Tensor | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> "Grammars":
        """From a phi3v `Tokenizer` (its exact tokenizer.json, padding and truncation off)."""
        return cls(tokenizer.to_json(), vocab_size, eos_ids)

    def _table(self) -> Any:
        if self._tok is None:
            llg = _llg()
            with self._lock:
                if self._tok is None:
                    self._exec = llg.LLExecutor()
                    self._tok = llg.LLTokenizer(self.tokenizer_json, n_vocab=self.vocab_size, eos_token=self.eos_ids)
        return self._tok

    def matcher(self, params: Any) -> Any | None:
        """A fresh matcher for a request's constraint (None when unconstrained). Raises ValueError."""
        key = grammar_key(params)
        if key is None:
            return None
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
        if template is None:
            grammar = _grammar(key)
            template = _llg().LLMatcher(self._table(), grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"json_schema is not usable: {template.get_error()}")
            with self._lock:
                self._compiled[key] = template
                while len(self._compiled) > self.cache_size:
                    self._compiled.popitem(last=False)
        return template.deep_copy()

    @torch.inference_mode()
    def fill_masks(self, rows: list[tuple[int, Any]], batch: int, device: torch.device) -> torch.Tensor:
        """Packed masks (batch, words) int32 on `device`: bit t of a row set = token t allowed.
        `rows` = (row index, matcher) of the constrained rows; every other row allows all."""
        buf = self._buf
        if buf is None or buf.shape[0] < batch:
            pin = device.type == "cuda"
            buf = self._buf = torch.empty((max(batch, 8), self.words), dtype=torch.int32, pin_memory=pin)
        masks = buf[:batch]
        masks.fill_(-1)
        self._table()
        if len(rows) == 1:
            i, m = rows[0]
            row = masks[i]
            m.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
        else:
            self._exec.unsafe_compute_mask_ptr([(m, i) for i, m in rows], masks.data_ptr(), self.words * 4, batch)
        # one host-to-device copy; the step's token copy (a sync) ends before the buffer is reused
        return masks.to(device, non_blocking=True)

    def accept(self, m: Any, token: int) -> bool:
        """Feed the sampled token; True when the sequence must end (the grammar is complete)."""
        if token in self._eos:  # allowed by the mask only where the JSON is complete
            return True
        if not m.consume_token(token):
            log.warning("grammar rejected token %d (%s): ending the sequence", token, m.get_error())
            return True
        return m.is_stopped()
