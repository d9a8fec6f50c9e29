"""JSON mode held to a JSON Schema (OpenAI's response_format={"type": "json_schema", ...}).

`compile_schema` turns a schema into rules the decoding can check byte by byte, and refuses what it would not
enforce (a clear error naming the keyword and where it is) rather than ignore it. `SchemaPrefix` is JsonPrefix
with those rules: a value must be of a kind its schema allows (object, array, string, number / integer, boolean,
null), an object's keys are its declared properties, each at most once (minProperties..maxProperties of them), and
it closes only when its required ones are there; an array holds minItems..maxItems items of its `items` schema; a
string with an `enum` (or `const`) is one of them. The JSON-mode decoding (json_mode.block_step) is the same: only
the states differ.

Supported: type (a name or a list), properties, required, additionalProperties (false; an object without
`properties` may hold any keys), minProperties / maxProperties (beside properties), items, minItems, maxItems,
enum / const (strings and null), anyOf whose branches are of different kinds (Optional[X] in pydantic), $ref to
#/$defs/... or #/definitions/... (recursion included), and annotations (title, description, default, examples,
...), which constrain nothing. The root is an object.
Keys and enum strings are written as json.dumps writes them (no escapes where none are needed).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from .json_mode import (_AFTER, _ARRAY_FIRST, _COLON, _DONE, _ESCAPE, _KEY, _MINUS, _OBJECT_FIRST, _STRING, _UNICODE,
                        _UTF8, _VALUE, _WHITESPACE, JsonPrefix)

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly"})
KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "minProperties", "maxProperties",
                      "items", "minItems", "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions"})
KINDS = ("object", "array", "string", "number", "boolean", "null")
_TYPES = {"object": "object", "array": "array", "string": "string", "number": "number", "integer": "number",
          "boolean": "boolean", "null": "null"}
_FIRST_BYTE_KIND = {ord("{"): "object", ord("["): "array", ord('"'): "string", ord("t"): "boolean",
                    ord("f"): "boolean", ord("n"): "null", ord("-"): "number", **{d: "number" for d in b"0123456789"}}
_NUMBER_BYTES = frozenset(b"0123456789.eE+-")


class SchemaError(ValueError):
    pass


@dataclass(eq=False)
class ObjectRule:
    properties: dict[str, Node] = field(default_factory=dict)
    keys: dict[bytes, str] = field(default_factory=dict)  # each property's key as written, quotes included
    required: frozenset[str] = frozenset()
    free: bool = False  # any keys, any values (no `properties`)
    min_properties: int = 0
    max_properties: int | None = None


@dataclass(eq=False)
class ArrayRule:
    items: Node | None = None
    min_items: int = 0
    max_items: int | None = None


@dataclass(eq=False)
class Node:
    """What a value may be: per kind, its rule (object / array), the enum's encoded strings (string, or None for
    any), whether it must be an integer (number); None for boolean and null. `branches`: anyOf's (and a $ref
    definition's alias), whose kinds join this node's once every definition is compiled (recursion allowed)."""
    kinds: dict[str, object] = field(default_factory=dict)
    branches: list[Node] = field(default_factory=list)
    where: str = "the root"
    flat: dict[str, object] | None = None

    def allowed(self) -> dict[str, object]:
        """Its kinds and its branches' (computed once, when first asked for)."""
        if self.flat is None:
            self.flat = _flatten(self, [])
        return self.flat


def _flatten(node: Node, visiting: list[Node]) -> dict[str, object]:
    if any(node is v for v in visiting):
        raise SchemaError(f"the schema at {node.where} refers to itself through anyOf / $ref alone: no value fits")
    out = dict(node.kinds)
    for branch in node.branches:
        for kind, rule in (branch.flat if branch.flat is not None else _flatten(branch, visiting + [node])).items():
            if kind in out:
                raise SchemaError(f"anyOf at {node.where}: two branches allow {kind} values; branches must differ in kind "
                                  f"({', '.join(KINDS)}) so that a value's first byte picks its branch")
            out[kind] = rule
    return out


def _any_node() -> Node:
    node = Node()
    node.kinds = {"object": ObjectRule(free=True), "array": ArrayRule(items=node), "string": None, "number": False,
                  "boolean": None, "null": None}
    return node


ANY = _any_node()


def compile_schema(schema) -> Node:
    """The rules of `schema` (a JSON Schema as a dict), or a SchemaError that says what is not supported and where.
    Compiled once per distinct schema: a request's is asked for by the API, its GenerationConfig and the engine, and
    clients send the same schema again and again (the rules are read-only once compiled)."""
    if not isinstance(schema, dict):
        raise SchemaError(f"the schema must be a JSON object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"the schema must be JSON: {e}") from e
    return _compiled(text)


@functools.lru_cache(maxsize=256)
def _compiled(text: str) -> Node:
    schema = json.loads(text)
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    for key in ("definitions", "$defs"):
        if not isinstance(schema.get(key, {}), dict):
            raise SchemaError(f"{key} must be an object of named schemas")
    compiler = _Compiler({name: Node(where=f"#/$defs/{name}") for name in defs})
    for name, sub in defs.items():
        compiler.fill(compiler.defs[name], sub, f"/$defs/{name}")
    root = compiler.node(schema, "")
    for node in compiler.made:  # every anyOf checked (kinds apart, no cycle) before any answer depends on it
        node.allowed()
    if "object" not in root.allowed():
        raise SchemaError("the root of a response_format schema must be an object (type: object)")
    return root


def _where(path: str) -> str:
    """A place in the schema as a JSON pointer ('#/properties/pet'), for error messages."""
    return f"#{path}" if path else "the root"


class _Compiler:
    def __init__(self, defs: dict[str, Node]) -> None:
        self.defs = defs
        self.made: list[Node] = list(defs.values())

    def node(self, schema, path: str) -> Node:
        if schema is True or schema == {}:
            return ANY
        if isinstance(schema, dict) and "$ref" in schema:
            self._check_ref_alone(schema, _where(path))
            return self._ref(schema["$ref"], _where(path))  # the definition's node: recursion needs no copy
        node = Node(where=_where(path))
        self.made.append(node)
        self.fill(node, schema, path)
        return node

    @staticmethod
    def _check_ref_alone(schema: dict, where: str) -> None:
        if set(schema) & KEYWORDS - {"$ref", "$defs", "definitions"}:
            raise SchemaError(f"$ref at {where} with other keywords beside it is not supported")

    def fill(self, node: Node, schema, path: str) -> None:
        where = _where(path)
        if not isinstance(schema, dict):
            raise SchemaError(f"the schema at {where} must be an object, got {schema!r}")
        unknown = sorted(set(schema) - KEYWORDS - ANNOTATIONS)
        if unknown:
            raise SchemaError(f"{', '.join(unknown)} at {where}: not supported (answers would not be held to it); "
                              f"supported keywords: {', '.join(sorted(KEYWORDS))}")
        if "$ref" in schema:  # a definition that is another's alias
            self._check_ref_alone(schema, where)
            node.branches.append(self._ref(schema["$ref"], where))
            return
        if "anyOf" in schema:
            self._any_of(node, schema, where, path)
            return
        kinds = self._kinds(schema, where)
        for kind in kinds:
            node.kinds[kind] = self._rule(kind, schema, where, path, integer=kinds[kind])

    def _ref(self, ref, where: str) -> Node:
        for prefix in ("#/$defs/", "#/definitions/"):
            if isinstance(ref, str) and ref.startswith(prefix) and ref[len(prefix):] in self.defs:
                return self.defs[ref[len(prefix):]]
        raise SchemaError(f"$ref {ref!r} at {where}: only references to #/$defs/<name> or #/definitions/<name> of this "
                          "schema are supported")

    def _any_of(self, node: Node, schema: dict, where: str, path: str) -> None:
        if set(schema) & KEYWORDS - {"anyOf", "$defs", "definitions"}:
            raise SchemaError(f"anyOf at {where} with other keywords beside it is not supported")
        branches = schema["anyOf"]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"anyOf at {where} must be a non-empty list of schemas")
        node.branches += [self.node(branch, f"{path}/anyOf/{i}") for i, branch in enumerate(branches)]

    def _kinds(self, schema: dict, where: str) -> dict[str, bool]:
        """The kinds the schema allows, each with whether a number must be an integer."""
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            if not isinstance(values, list) or not values or not all(v is None or isinstance(v, str) for v in values):
                raise SchemaError(f"enum / const at {where}: only strings and null are supported, got {values!r}")
            return {kind: False for kind, there in (("string", any(isinstance(v, str) for v in values)),
                                                    ("null", None in values)) if there}
        types = schema.get("type")
        if types is None:
            if "properties" in schema:
                return {"object": False}
            if "items" in schema:
                return {"array": False}
            return {kind: False for kind in KINDS}
        names = types if isinstance(types, list) else [types]
        if not names or any(t not in _TYPES for t in names):
            raise SchemaError(f"type {types!r} at {where}: each type must be one of {', '.join(_TYPES)}")
        out: dict[str, bool] = {}
        for t in names:
            kind = _TYPES[t]
            out[kind] = (t == "integer") and out.get(kind, True)  # number beside integer: any number
        return out

    def _rule(self, kind: str, schema: dict, where: str, path: str, integer: bool):
        if kind == "object":
            return self._object(schema, where, path)
        if kind == "array":
            items = schema.get("items", True)
            if isinstance(items, list):
                raise SchemaError(f"items at {where} is a list (tuple validation): not supported; give one schema")
            lo, hi = schema.get("minItems", 0), schema.get("maxItems")
            if type(lo) is not int or lo < 0 or hi is not None and (type(hi) is not int or hi < lo):
                raise SchemaError(f"minItems / maxItems at {where} must be integers with 0 <= minItems <= maxItems")
            return ArrayRule(self.node(items, f"{path}/items"), lo, hi)
        if kind == "string":
            values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
            return None if values is None else tuple(json.dumps(v, ensure_ascii=False).encode()
                                                     for v in values if isinstance(v, str))
        if kind == "number":
            return integer
        return None

    def _object(self, schema: dict, where: str, path: str) -> ObjectRule:
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        lo, hi = schema.get("minProperties", 0), schema.get("maxProperties")
        if type(lo) is not int or lo < 0 or hi is not None and (type(hi) is not int or hi < lo):
            raise SchemaError(f"minProperties / maxProperties at {where} must be integers with 0 <= minProperties <= "
                              "maxProperties")
        if properties is None:
            if (lo, hi) != (0, None):
                raise SchemaError(f"minProperties / maxProperties at {where} are supported beside properties only")
            if extra not in (None, True, {}):
                raise SchemaError(f"additionalProperties at {where}: only false (with properties) or absent is "
                                  "supported")
            if schema.get("required"):
                raise SchemaError(f"required at {where} names properties the schema does not declare")
            return ObjectRule(free=extra is not False)  # additionalProperties false and no properties: {} only
        if not isinstance(properties, dict):
            raise SchemaError(f"properties at {where} must be an object of schemas")
        if extra not in (None, False):
            raise SchemaError(f"additionalProperties at {where}: only false is supported beside properties (answers "
                              "hold the declared properties only)")
        required = schema.get("required", [])
        if not isinstance(required, list) or not set(required) <= set(properties):
            raise SchemaError(f"required at {where} must list declared properties, got {required!r}")
        if lo > len(properties) or len(required) > (len(properties) if hi is None else hi):
            raise SchemaError(f"minProperties / maxProperties at {where}: no object of its properties fits")
        return ObjectRule({name: self.node(sub, f"{path}/properties/{name}") for name, sub in properties.items()},
                          {json.dumps(name, ensure_ascii=False).encode(): name for name in properties},
                          frozenset(required), min_properties=lo, max_properties=hi)


class SchemaPrefix(JsonPrefix):
    """The state of a byte string that is a prefix of a JSON object held to a compiled schema (compile_schema)."""

    __slots__ = ("frames", "expect", "role", "raw", "candidates", "integer")

    def __init__(self, root: Node) -> None:
        super().__init__()
        self.frames: tuple = ()  # per open container: ("o", ObjectRule, seen keys, current key) / ("a", ArrayRule, n)
        self.expect: Node | None = root  # what the next value may be
        self.role: str | None = None  # the open string is checked as a "key" or an "enum" value
        self.raw = b""  # that string's bytes so far, its opening quote included
        self.candidates: tuple[bytes, ...] = ()
        self.integer = False  # the open number must be an integer

    def _copy(self) -> SchemaPrefix:
        s = super()._copy()
        s.frames, s.expect, s.role, s.raw, s.candidates, s.integer = (self.frames, self.expect, self.role, self.raw,
                                                                      self.candidates, self.integer)
        return s

    def _step(self, c: int) -> bool:
        mode = self.mode
        if _MINUS <= mode < _DONE:  # in a number
            if c in _NUMBER_BYTES:
                return not (self.integer and c in b".eE") and super()._step(c)
            mode = _AFTER  # the byte ends the number and is read as what follows a value
        if self.role is not None and mode in (_STRING, _ESCAPE, _UNICODE, _UTF8):
            if not super()._step(c):
                return False
            raw = self.raw + bytes((c,))
            if self.mode in (_COLON, _AFTER):  # the string closed
                return raw in self.candidates and self._closed_string(raw)
            self.raw = raw
            return any(k.startswith(raw) for k in self.candidates)
        if c in _WHITESPACE:
            return super()._step(c)
        if mode in (_VALUE, _ARRAY_FIRST) and not (mode == _ARRAY_FIRST and c == 0x5D):
            return self._begin_value(c)
        frame = self.frames[-1] if self.frames else None
        if c == 0x22 and mode in (_OBJECT_FIRST, _KEY):
            rule, seen = frame[1], frame[2]
            if not rule.free:
                if rule.max_properties is not None and len(seen) >= rule.max_properties:
                    return False
                self.role, self.raw = "key", b'"'
                self.candidates = tuple(k for k, name in rule.keys.items() if name not in seen)
                if not self.candidates:
                    return False
            return super()._step(c)
        if c == 0x3A and mode == _COLON:
            self.expect = ANY if frame[1].free else frame[1].properties[frame[3]]
            return super()._step(c)
        if c == 0x2C and mode == _AFTER and frame is not None:
            if frame[0] == "o":
                if not frame[1].free and len(frame[2]) in (len(frame[1].properties), frame[1].max_properties):
                    return False  # no property left for another key, or as many as maxProperties
            elif frame[1].max_items is not None and frame[2] >= frame[1].max_items:
                return False
            else:
                self.expect = frame[1].items
            return super()._step(c)
        if c in (0x7D, 0x5D) and mode in (_OBJECT_FIRST, _ARRAY_FIRST, _AFTER) and frame is not None:
            if frame[0] == "o" and c == 0x7D and (not frame[1].required <= frame[2]
                                                  or len(frame[2]) < frame[1].min_properties):
                return False  # a required property is missing, or fewer than minProperties
            if frame[0] == "a" and c == 0x5D and frame[2] < frame[1].min_items:
                return False
            if not super()._step(c):
                return False
            self.frames = self.frames[:-1]
            return True
        return super()._step(c)

    def _begin_value(self, c: int) -> bool:
        kind = _FIRST_BYTE_KIND.get(c)
        node = self.expect
        allowed = node.allowed() if node is not None else {}
        if kind not in allowed:
            return False
        if self.frames and self.frames[-1][0] == "a":
            tag, rule, count = self.frames[-1]
            if rule.max_items is not None and count >= rule.max_items:
                return False
            self.frames = self.frames[:-1] + ((tag, rule, count + 1),)
        if not super()._step(c):
            return False
        rule = allowed[kind]
        self.expect = None
        if kind == "object":
            self.frames += (("o", rule, frozenset(), None),)
        elif kind == "array":
            self.frames += (("a", rule, 0),)
            self.expect = rule.items
        elif kind == "string" and rule is not None:
            self.role, self.raw, self.candidates = "enum", b'"', rule
        elif kind == "number":
            self.integer = rule
        return True

    def _closed_string(self, raw: bytes) -> bool:
        if self.role == "key":
            tag, rule, seen, _ = self.frames[-1]
            name = rule.keys[raw]
            self.frames = self.frames[:-1] + ((tag, rule, seen | {name}, name),)
        self.role, self.raw, self.candidates = None, b"", ()
        return True


def start_state(response_format: str, schema: dict | None) -> JsonPrefix:
    """The state of an empty answer in JSON mode: any object, or one held to `schema`."""
    return SchemaPrefix(compile_schema(schema)) if response_format == "json_schema" else JsonPrefix()
