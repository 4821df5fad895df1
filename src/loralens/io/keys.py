"""Pure parsing and matching of checkpoint key names; no file access.

A weight is found by its layer index and its module path inside the layer, never by one
hard-coded prefix: a ``BertModel`` base (``encoder.layer.3.attention.self.query.weight``) pairs with a
task-model adapter (``base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from loralens.errors import CheckpointError, ModelMismatchError

__all__ = [
    "LAYER_CONTAINERS",
    "PEFT_PREFIX",
    "ModulePath",
    "parse_module_path",
    "parse_adapter_key",
    "match_base_weights",
    "module_type_names",
    "peft_pattern_value",
    "compile_module_pattern",
    "PatternError",
]

#: Names of the containers that hold numbered layers in common architectures
#: (BERT ``layer``, Llama ``layers``, GPT-2 ``h``, T5 ``block``, ViT-style ``blocks``).
LAYER_CONTAINERS = ("layer", "layers", "h", "block", "blocks")
#: What PEFT's ``save_pretrained`` puts before the base model's own module names.
PEFT_PREFIX = "base_model.model."

_LAYER_RE = re.compile(rf"(?:^|\.)({'|'.join(LAYER_CONTAINERS)})\.(\d+)\.")
# PEFT LoRA tensors: <module>.lora_A.weight, <module>.lora_B.weight, DoRA <module>.lora_magnitude_vector[.weight]
_ADAPTER_RE = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<factor>[AB])\.weight|(?P<mag>lora_magnitude_vector)(?:\.weight)?)$"
)


@dataclass(frozen=True, order=True)
class ModulePath:
    """A module path split at its numbered layer: ``<prefix>.<container>.<layer>.<tail>``.

    ``prefix`` has PEFT's ``base_model.model.`` removed; ``tail`` is the path inside the layer,
    e.g. ``attention.self.query``.
    """

    prefix: str
    container: str
    layer: int
    tail: str

    @property
    def dotted(self) -> str:
        """The module path without PEFT's prefix, e.g. ``bert.encoder.layer.3.attention.self.query``."""
        return ".".join(s for s in (self.prefix, self.container, str(self.layer), self.tail) if s)

    @property
    def module_type(self) -> tuple[str, str, str]:
        """What all layers of one module type share."""
        return (self.prefix, self.container, self.tail)


def parse_module_path(path: str) -> ModulePath | None:
    """Split a dotted module path at its first numbered layer container; None if it has none."""
    if path.startswith(PEFT_PREFIX):
        path = path[len(PEFT_PREFIX) :]
    m = _LAYER_RE.search(path)
    if m is None:
        return None
    return ModulePath(path[: m.start()], m.group(1), int(m.group(2)), path[m.end() :])


def parse_adapter_key(key: str) -> tuple[str, str] | None:
    """``'...query.lora_A.weight'`` -> ``('...query', 'A')``; ``'B'`` and ``'magnitude'`` likewise; else None."""
    m = _ADAPTER_RE.match(key)
    if m is None:
        return None
    return m.group("module"), ("magnitude" if m.group("mag") else m.group("factor"))


def _prefixes_compatible(a: str, b: str) -> bool:
    """True when one dotted prefix ends with the other (``bert.encoder`` and ``encoder``; ``''`` fits all)."""
    return a == b or not a or not b or a.endswith("." + b) or b.endswith("." + a)


def match_base_weights(modules: Iterable[ModulePath], base_keys: Iterable[str]) -> dict[ModulePath, str]:
    """Pair each adapter module with the key of its base weight.

    Parameters
    ----------
    modules : iterable of ModulePath
        Adapter modules (from :func:`parse_module_path`).
    base_keys : iterable of str
        All tensor names of the base checkpoint.

    Returns
    -------
    dict
        ``ModulePath -> '<base module path>.weight'``.

    Raises
    ------
    ModelMismatchError
        A module with no weight of the same layer and inner path in the base, or with several.
    """
    index: dict[tuple[int, str, str], list[ModulePath]] = {}
    for key in base_keys:
        if not key.endswith(".weight"):
            continue
        parsed = parse_module_path(key[: -len(".weight")])
        if parsed is not None:
            index.setdefault((parsed.layer, parsed.container, parsed.tail), []).append(parsed)
    result = {}
    for mod in modules:
        candidates = [
            b for b in index.get((mod.layer, mod.container, mod.tail), []) if _prefixes_compatible(mod.prefix, b.prefix)
        ]
        where = f"{mod.container}.{mod.layer}.{mod.tail}"
        if not candidates:
            raise ModelMismatchError(
                f"the base has no weight for adapter module {where!r} (prefix {mod.prefix!r}); "
                "is the adapter for another base model?"
            )
        if len(candidates) > 1:
            names = sorted(c.dotted for c in candidates)
            raise ModelMismatchError(f"adapter module {where!r} matches several base weights {names}; ambiguous base")
        result[mod] = candidates[0].dotted + ".weight"
    return result


def module_type_names(types: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
    """Short display names for module types: the shortest dotted suffix that no other type shares.

    ``('bert.encoder', 'layer', 'attention.self.query')`` becomes ``'query'`` when no other type ends
    in ``query``; otherwise more components are kept, with ``*`` for the layer number
    (``'SelfAttention.q'``, ``'encoder.block.*.layer.0.SelfAttention.q'``).
    """
    full = {t: ".".join(p for p in (t[0], t[1], "*", t[2]) if p) for t in set(types)}
    names = {}
    for t, path in full.items():
        parts = path.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != t and (op == suffix or op.endswith("." + suffix)) for o, op in full.items()):
                break
        names[t] = suffix
    return names


def peft_pattern_value(pattern: Mapping[str, float] | None, module_name: str, default: float) -> float:
    """Value of PEFT's ``rank_pattern`` / ``alpha_pattern`` for a module, with PEFT's own matching rule.

    PEFT (``utils.other.get_pattern_key``) takes the first pattern key ``k`` for which
    ``re.match(rf"(.*\\.)?({k})$", module_name)`` matches; ``module_name`` has no ``base_model.model.``.
    The keys come from strangers' configs, so they are matched by RE2 (:func:`compile_module_pattern`): linear
    time, where Python's backtracking engine can take minutes on a crafted key.
    """
    for key, value in (pattern or {}).items():
        if compile_module_pattern(key).match(module_name):
            return value
    return default


#: Longest pattern key accepted; PEFT's are module names of a few dozen characters.
MAX_PATTERN_LENGTH = 1000


class PatternError(CheckpointError):
    """A ``rank_pattern`` / ``alpha_pattern`` key that cannot be matched safely; the message says why."""


def compile_module_pattern(key: str) -> Any:
    """PEFT's module-name rule ``(.*\\.)?(key)$`` compiled by RE2 (linear-time matching).

    Raises PatternError for a key that is too long, not a valid expression, or uses what only a backtracking
    engine offers (backreferences, lookaround): those are the keys that can hang a matcher.
    """
    if not isinstance(key, str) or len(key) > MAX_PATTERN_LENGTH:
        raise PatternError(f"longer than {MAX_PATTERN_LENGTH} characters")
    return _compile_re2(key)


@functools.lru_cache(maxsize=1024)
def _compile_re2(key: str) -> Any:
    import re2  # google-re2: imported on first use, keeps start-up light

    try:
        re.compile(key)
    except re.error as e:
        raise PatternError(f"not a valid regular expression ({e})") from None
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own message to stderr
    try:
        return re2.compile(rf"(.*\.)?({key})$", options)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise PatternError(
            f"uses a construct that cannot be matched in linear time ({reason}); backreferences and "
            "lookaround are refused in adapter configs"
        ) from None
