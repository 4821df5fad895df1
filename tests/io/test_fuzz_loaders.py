"""Fuzzing the loaders: any exception other than loralens's own error type is a bug.

Inputs are real files mutated by hypothesis: a PEFT adapter folder saved by real ``peft`` (its
``adapter_config.json`` and ``adapter_model.safetensors``), a ``.bin`` written by ``torch.save`` and a base
``model.safetensors``. Each mutation goes through the public loader, which must either succeed or raise a
:class:`~loralens.errors.LoralensError`.

Budget: ``LORALENS_FUZZ_EXAMPLES`` examples per target (default 150, about a minute for the whole file in CI);
run longer by hand with e.g. ``LORALENS_FUZZ_EXAMPLES=20000 pytest tests/io/test_fuzz_loaders.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loralens.errors import LoralensError
from loralens.io.adapters import load_lora_adapter, read_base_weights
from loralens.io.base_weights import open_base
from loralens.io.files import read_pickle_state_dict, read_safetensors, safetensors_shapes
from loralens.io.keys import match_base_weights, parse_adapter_key, parse_module_path

EXAMPLES = int(os.environ.get("LORALENS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)


@contextmanager
def _scratch() -> Iterator[Path]:
    # hypothesis runs the body many times per test: one fresh folder per example, not pytest's tmp_path
    folder = Path(tempfile.mkdtemp(prefix="loralens-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _only_loralens_errors(call: Any, *args: Any) -> None:
    """Run ``call``; succeed or raise LoralensError, nothing else (other exceptions fail the test)."""
    try:
        call(*args)
    except LoralensError as e:
        assert str(e).strip(), "a LoralensError must say what is wrong"


# ------------------------------------------------------------------------------------------- byte mutations

mutations = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.integers(0, 255)),
        st.tuples(st.just("header_len"), st.integers(0, (1 << 64) - 1), st.just(0)),
    ),
    min_size=1,
    max_size=4,
)


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, value in ops:
        if not buf:
            break
        at = pos % len(buf)
        if op == "flip":
            buf[at] ^= value
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf.insert(at, value)
        else:  # the safetensors header-length prefix (little-endian u64)
            buf[:8] = struct.pack("<Q", pos)
    return bytes(buf)


@FUZZ
@given(ops=mutations)
def test_mutated_adapter_weights(tiny_bert_adapter: Path, ops: list[tuple[str, int, int]]) -> None:
    data = (tiny_bert_adapter / "adapter_model.safetensors").read_bytes()
    with _scratch() as folder:
        shutil.copy(tiny_bert_adapter / "adapter_config.json", folder)
        (folder / "adapter_model.safetensors").write_bytes(_mutate(data, ops))
        _only_loralens_errors(load_lora_adapter, folder)
        _only_loralens_errors(safetensors_shapes, folder / "adapter_model.safetensors")
        _only_loralens_errors(read_safetensors, folder / "adapter_model.safetensors")


@FUZZ
@given(ops=mutations)
def test_mutated_base_weights(tiny_bert: Path, tiny_bert_adapter: Path, ops: list[tuple[str, int, int]]) -> None:
    adapter = load_lora_adapter(tiny_bert_adapter)
    data = (tiny_bert / "model.safetensors").read_bytes()
    with _scratch() as folder:
        shutil.copy(tiny_bert / "config.json", folder)
        (folder / "model.safetensors").write_bytes(_mutate(data, ops))

        def read() -> None:
            read_base_weights(open_base(folder), adapter, "value")

        _only_loralens_errors(read)


@pytest.fixture(scope="module")
def pickled_state_dict(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("bin") / "adapter_model.bin"
    torch.save({"a.lora_A.weight": torch.randn(2, 8), "a.lora_B.weight": torch.randn(8, 2)}, path)
    return path.read_bytes()


@FUZZ
@given(ops=mutations)
def test_mutated_pickles(pickled_state_dict: bytes, ops: list[tuple[str, int, int]]) -> None:
    with _scratch() as folder:
        path = folder / "adapter_model.bin"
        path.write_bytes(_mutate(pickled_state_dict, ops))
        _only_loralens_errors(read_pickle_state_dict, path)


# ------------------------------------------------------------------------------------------- configs

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 40), 1 << 40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=8,
)
CONFIG_KEYS = [
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "base_model_name_or_path",
]


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, min_size=1, max_size=4),
    drop=st.sets(st.sampled_from(CONFIG_KEYS), max_size=3),
)
def test_mutated_adapter_config(tiny_bert_adapter: Path, changes: dict[str, Any], drop: set[str]) -> None:
    config = json.loads((tiny_bert_adapter / "adapter_config.json").read_text())
    config.update(changes)
    for key in drop:
        config.pop(key, None)
    with _scratch() as folder:
        shutil.copy(tiny_bert_adapter / "adapter_model.safetensors", folder)
        # allow_nan: a config with NaN written by another tool must also get a clear answer
        (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
        _only_loralens_errors(load_lora_adapter, folder)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_garbage_config_text(tiny_bert_adapter: Path, text: str) -> None:
    with _scratch() as folder:
        shutil.copy(tiny_bert_adapter / "adapter_model.safetensors", folder)
        (folder / "adapter_config.json").write_text(text, encoding="utf-8", errors="surrogatepass")
        _only_loralens_errors(load_lora_adapter, folder)


# ------------------------------------------------------------------------------------------- key matching

segment = st.sampled_from(
    ["base_model", "model", "bert", "encoder", "layer", "layers", "h", "block", "blocks", "attention", "self"]
    + ["query", "value", "q_proj", "lora_A", "lora_B", "weight", "0", "1", "12", "-1", "", "x.y"]
)
keys = st.lists(segment, min_size=0, max_size=9).map(".".join) | st.text(max_size=60)


@FUZZ
@given(adapter_keys=st.lists(keys, max_size=6), base_keys=st.lists(keys, max_size=8))
def test_key_parsing_and_matching(adapter_keys: list[str], base_keys: list[str]) -> None:
    paths = []
    for key in adapter_keys:
        _only_loralens_errors(parse_adapter_key, key)
        try:
            parsed = parse_module_path(key)
        except LoralensError:
            continue
        if parsed is not None:
            paths.append(parsed)
    _only_loralens_errors(match_base_weights, paths, base_keys)
