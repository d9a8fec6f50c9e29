"""JSON mode (OpenAI's response_format={"type": "json_object"}): the answer is one JSON object.

A masked diffusion model fills a block's positions in any order, but whether a token may follow the text
so far is a left-to-right question. So a JSON-mode block is decoded from the left: each step commits the
block's first masked position with the most likely token that keeps the answer a prefix of a JSON object,
then the positions after it, one by one, while their most likely valid token is at least `threshold`
likely (the threshold decoder, run from the left; the model's logits for those positions came from the
same forward, as every parallel decoder's do). Once the object is closed, EOS fills the rest of the block
and the answer ends there; an answer cut by max_tokens stays a prefix of one.

Tokens are checked as bytes (`JsonPrefix`, a pushdown automaton of RFC 8259 with the root an object, no
whitespace before or after it and at most MAX_WHITESPACE bytes of it in a row): a byte-level BPE token may
hold half a UTF-8 character. `vocabulary_bytes` reads each token's bytes off the
tokenizer once per engine. A position's candidates are its JSON_CANDIDATES most likely tokens, checked in
order; where none fits, the whole vocabulary is ranked (one more host read).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RESPONSE_FORMATS = ("json_object", "json_schema")  # any JSON object; one held to a JSON Schema (json_schema.py)


def openai_response_format(value) -> tuple[str | None, dict | None]:
    """GenerationConfig's (response_format, json_schema) of OpenAI's `response_format` object: {"type": "text"} ->
    (None, None), {"type": "json_object"} -> ("json_object", None), {"type": "json_schema", "json_schema": {"name":
    ..., "schema": {...}}} -> ("json_schema", the schema, not checked here). Raises ValueError saying what is allowed;
    the API and the batch job both read requests' response_format with it."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None, None
    if kind == "json_object":
        return kind, None
    spec = value.get("json_schema") if kind == "json_schema" else None
    if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
        return kind, spec["schema"]
    got = f"type {kind!r} without a json_schema.schema object" if kind == "json_schema" else \
        f"type {kind!r}" if isinstance(value, dict) else f"a {type(value).__name__}"
    raise ValueError('must be {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"name": '
                     f'..., "schema": {{...}}}}}}, got {got}')


# Tokens per position checked against the grammar before the whole vocabulary is ranked; sampling draws among
# the valid ones of them.
JSON_CANDIDATES = 64
# Whitespace bytes allowed in a row outside strings: a newline and indentation, not a model padding forever.
MAX_WHITESPACE = 16

_WHITESPACE = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}

# Modes: what the next byte may be.
(_VALUE, _ARRAY_FIRST, _OBJECT_FIRST, _KEY, _COLON, _AFTER, _STRING, _ESCAPE, _UNICODE, _UTF8, _LITERAL,
 _MINUS, _ZERO, _INT, _DOT, _FRAC, _EXP, _EXP_SIGN, _EXP_DIGITS, _DONE) = range(20)
_NUMBER_ENDS = frozenset((_ZERO, _INT, _FRAC, _EXP_DIGITS))  # a number may end here (the next byte decides)
_BETWEEN = frozenset((_VALUE, _ARRAY_FIRST, _OBJECT_FIRST, _KEY, _COLON, _AFTER))  # whitespace may come


class JsonPrefix:
    """The state of a byte string that is a prefix of one JSON object (with nothing after it).

    `feed(data)` is the state after `data` more bytes, or None where they cannot continue a JSON object;
    `complete` is whether the object is closed. States are values: feeding never changes the one fed."""

    __slots__ = ("stack", "mode", "is_key", "pending", "whitespace")

    def __init__(self) -> None:
        self.stack = ""  # open containers, innermost last: "o" object, "a" array
        self.mode = _VALUE
        self.is_key = False  # the open string is an object's key
        self.pending: bytes | int = 0  # a literal's bytes still due / hex digits or UTF-8 continuations due
        self.whitespace = 0  # whitespace bytes in a row

    @property
    def complete(self) -> bool:
        return self.mode == _DONE

    def feed(self, data: bytes) -> JsonPrefix | None:
        s = self._copy()
        for byte in data:
            if not s._step(byte):
                return None
        return s

    def _copy(self) -> JsonPrefix:
        s = object.__new__(type(self))
        s.stack, s.mode, s.is_key, s.pending, s.whitespace = (self.stack, self.mode, self.is_key, self.pending,
                                                             self.whitespace)
        return s

    def _step(self, c: int) -> bool:
        mode = self.mode
        if mode == _STRING:
            if c == 0x22:  # the closing quote
                self.mode = _COLON if self.is_key else _AFTER
            elif c == 0x5C:
                self.mode = _ESCAPE
            elif c < 0x20:
                return False  # control characters must be escaped
            elif c >= 0x80:
                due = 1 if 0xC2 <= c <= 0xDF else 2 if 0xE0 <= c <= 0xEF else 3 if 0xF0 <= c <= 0xF4 else 0
                if not due:
                    return False
                self.mode, self.pending = _UTF8, due
            return True
        if mode == _UTF8 or mode == _UNICODE:  # bytes the string still owes: UTF-8 continuations, \u hex digits
            if not (0x80 <= c <= 0xBF if mode == _UTF8 else c in _HEX):
                return False
            self.pending -= 1
            if not self.pending:
                self.mode = _STRING
            return True
        if mode == _ESCAPE:
            if c not in _ESCAPES:
                return False
            self.mode, self.pending = (_UNICODE, 4) if c == 0x75 else (_STRING, 0)
            return True
        if mode == _LITERAL:
            if c != self.pending[0]:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self._value_done()
            return True
        if mode >= _MINUS and mode != _DONE:
            if self._number(c):
                return True
            if mode not in _NUMBER_ENDS:
                return False
            self._value_done()  # the byte ends the number; it is read as what follows a value
            mode = self.mode
        if c in _WHITESPACE:
            if mode not in _BETWEEN or self.whitespace >= MAX_WHITESPACE or not self.stack:
                return False  # the answer starts with its '{' and ends with its '}'
            self.whitespace += 1
            return True
        self.whitespace = 0
        if mode == _VALUE or mode == _ARRAY_FIRST:
            if mode == _ARRAY_FIRST and c == 0x5D:
                return self._close("a")
            if not self.stack and c != 0x7B:
                return False  # the root is an object
            return self._value(c)
        if mode == _OBJECT_FIRST or mode == _KEY:
            if mode == _OBJECT_FIRST and c == 0x7D:
                return self._close("o")
            if c != 0x22:
                return False
            self.mode, self.is_key = _STRING, True
            return True
        if mode == _COLON:
            if c != 0x3A:
                return False
            self.mode = _VALUE
            return True
        if mode == _AFTER:
            top = self.stack[-1]
            if c == 0x2C:
                self.mode = _KEY if top == "o" else _VALUE
                return True
            if c == (0x7D if top == "o" else 0x5D):
                return self._close(top)
            return False
        return False  # _DONE: nothing follows the object

    def _value(self, c: int) -> bool:
        if c == 0x7B:
            self.stack += "o"
            self.mode = _OBJECT_FIRST
        elif c == 0x5B:
            self.stack += "a"
            self.mode = _ARRAY_FIRST
        elif c == 0x22:
            self.mode, self.is_key = _STRING, False
        elif c == 0x2D:
            self.mode = _MINUS
        elif c == 0x30:
            self.mode = _ZERO
        elif c in _DIGITS:
            self.mode = _INT
        elif c in _LITERALS:
            self.mode, self.pending = _LITERAL, _LITERALS[c]
        else:
            return False
        return True

    def _number(self, c: int) -> bool:
        """Whether `c` continues the number (mode after it set); False leaves the mode as it was."""
        mode, digit = self.mode, c in _DIGITS
        if mode == _MINUS:
            nxt = _ZERO if c == 0x30 else _INT if digit else None
        elif mode == _ZERO or mode == _INT:
            nxt = (_INT if digit and mode == _INT else _DOT if c == 0x2E else _EXP if c in (0x65, 0x45) else None)
        elif mode == _DOT:
            nxt = _FRAC if digit else None
        elif mode == _FRAC:
            nxt = _FRAC if digit else _EXP if c in (0x65, 0x45) else None
        elif mode == _EXP:
            nxt = _EXP_DIGITS if digit else _EXP_SIGN if c in (0x2B, 0x2D) else None
        else:  # _EXP_SIGN, _EXP_DIGITS
            nxt = _EXP_DIGITS if digit else None
        if nxt is None:
            return False
        self.mode = nxt
        return True

    def _close(self, kind: str) -> bool:
        if not self.stack or self.stack[-1] != kind:
            return False
        self.stack = self.stack[:-1]
        self._value_done()
        return True

    def _value_done(self) -> None:
        self.mode = _AFTER if self.stack else _DONE


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the others
    for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return {ch: b for b, ch in chars.items()}


def _decoder_kinds(tokenizer) -> set[str]:
    """Names of the fast tokenizer's decoder and of its parts (a Sequence's)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return {part.get("type", "") for part in spec.get("decoders", [spec])}


def vocabulary_bytes(tokenizer, size: int) -> list[bytes | None]:
    """Each token id's bytes in decoded text, for ids 0 .. size-1 (the model's embedding rows); None for
    special tokens and ids the tokenizer lacks (never valid JSON). Byte-level BPE tokenizers (GPT-2 /
    Llama-3 / LLaDA style) map back through the byte alphabet; SentencePiece-style ones read '▁' as a space
    and <0xHH> as the byte; other tokens are their own text (a character-level vocabulary)."""
    n = min(size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    kinds = _decoder_kinds(tokenizer)
    alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif alphabet is not None:
            try:
                out.append(bytes(alphabet[ch] for ch in piece))
            except KeyError:  # an added (non-special) token written as plain text
                out.append(piece.encode())
        elif (m := _BYTE_TOKEN.fullmatch(piece)) and "ByteFallback" in kinds:
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode() if "Metaspace" in kinds or "Replace" in kinds
                       else piece.encode())
    return out + [None] * (size - n)


def check_vocabulary(vocab: Sequence[bytes | None]) -> None:
    """A vocabulary that cannot open and close an object cannot serve JSON mode: say so at admission."""
    start = JsonPrefix()
    if not any(b and (s := start.feed(b)) is not None and (s.stack or s.complete) for b in vocab):
        raise ValueError("JSON mode (response_format json_object / json_schema) needs a tokenizer with a token that "
                         "starts a JSON object ('{'); this one has none")
    if not any(b and b"}" in b for b in vocab):
        raise ValueError("JSON mode (response_format json_object / json_schema) needs a tokenizer with a token "
                         "holding '}'; this one has none")


def json_vocabulary(tokenizer, size: int) -> list[bytes | None]:
    """vocabulary_bytes of a tokenizer that can write JSON (check_vocabulary), or a ValueError that says why not."""
    vocab = vocabulary_bytes(tokenizer, size)
    check_vocabulary(vocab)
    return vocab


@dataclass(frozen=True)
class Picker:
    """How a JSON-mode position chooses among its valid candidates (each (token, probability, state), most
    likely first): greedy takes the first; temperature > 0 samples from the tempered probabilities of the
    valid ones, narrowed by min_p, top_k and top_p as GenerationConfig narrows unconstrained sampling."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, valid: list[tuple[int, float, JsonPrefix]], uniform: float) -> tuple[int, float, JsonPrefix]:
        if self.greedy or len(valid) == 1:
            return valid[0]
        weights = [p ** (1.0 / self.temperature) if p > 0 else 0.0 for _, p, _ in valid]
        total = sum(weights)
        if total <= 0:
            return valid[0]
        weights = [w / total for w in weights]
        keep = len(weights)
        if self.min_p > 0:
            keep = sum(1 for w in weights if w >= self.min_p * weights[0])
        if self.top_k > 0:
            keep = min(keep, self.top_k)
        if self.top_p < 1:
            mass, cut = 0.0, 0
            while cut < keep and mass < self.top_p:
                mass += weights[cut]
                cut += 1
            keep = cut
        kept = weights[:max(keep, 1)]
        target, acc = uniform * sum(kept), 0.0
        for j, w in enumerate(kept):
            acc += w
            if target < acc:
                return valid[j]
        return valid[len(kept) - 1]


def block_step(start: JsonPrefix, block: Sequence[int], mask_id: int, eos_id: int, vocab: Sequence[bytes | None],
               top_ids: Sequence[Sequence[int]], top_probs: Sequence[Sequence[float]], threshold: float,
               picker: Picker, uniforms: Sequence[float], rank_all: Callable[[int], tuple[list[int], list[float]]],
               ) -> dict[int, int]:
    """One step of a JSON-mode block: {position: token} to commit.

    `start`: the answer's state before this block; `block`: its tokens, committed ones left of the masks
    (JSON mode commits from the left); top_ids / top_probs [B][k]: each position's most likely tokens,
    most likely first; `rank_all(j)`: position j's whole vocabulary in that order (where none of its top
    tokens fits). The first masked position always gets a token (or EOS where the object is closed, or
    where nothing can continue it: a vocabulary without the bytes it needs)."""
    first = next((j for j, t in enumerate(block) if t == mask_id), None)
    if first is None:
        return {}
    state: JsonPrefix | None = start
    for t in block[:first]:
        state = state.feed(vocab[t]) if vocab[t] is not None else None
        if state is None:
            raise RuntimeError("a JSON-mode block holds tokens that are not a JSON prefix")
    commits: dict[int, int] = {}
    for j in range(first, len(block)):
        if state.complete:
            commits.update((k, eos_id) for k in range(j, len(block)))
            break
        chosen = _choose(state, vocab, top_ids[j], top_probs[j], picker, uniforms[j])
        if chosen is None:
            ids, probs = rank_all(j)
            chosen = _choose(state, vocab, ids, probs, picker, uniforms[j])
        if chosen is None:  # nothing continues the object: end the answer rather than break the grammar
            commits.update((k, eos_id) for k in range(j, len(block)))
            break
        token, prob, after = chosen
        if j > first and prob < threshold:
            break
        commits[j] = token
        state = after
    return commits


def _choose(state: JsonPrefix, vocab: Sequence[bytes | None], ids: Sequence[int], probs: Sequence[float],
            picker: Picker, uniform: float) -> tuple[int, float, JsonPrefix] | None:
    valid = []
    for token, prob in zip(ids, probs):
        data = vocab[token] if token < len(vocab) else None
        after = state.feed(data) if data else None
        if after is not None:
            valid.append((token, prob, after))
            if picker.greedy or len(valid) >= JSON_CANDIDATES:
                break
    return picker.pick(valid, uniform) if valid else None
