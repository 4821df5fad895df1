"""Fuzzing the loaders: any exception other than loralens's own error type is a bug.

Inputs are real files mutated by hypothesis: a PEFT adapter folder saved by real ``peft`` (its
``adapter_config.json`` and ``adapter_model.safetensors``), a ``.bin`` written by ``torch.save`` and a base
``model.safetensors``; and CondLoRA folders in the authors' format (``peft_type: ConditionalLORA``) with
mutated configs and random tensor names, shapes and dtypes. Each mutation goes through the public loader, which
must either succeed or raise a :class:`~loralens.errors.LoralensError`.

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
from safetensors.torch import save_file

import checkpoints
from loralens.errors import LoralensError
from loralens.io.adapters import load_lora_adapter, read_base_weights
from loralens.io.base_weights import open_base
from loralens.io.condlora import load_condlora_adapter, materialise_condlora
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


# ------------------------------------------------------------------------------------------- CondLoRA folders

CONDLORA_CONFIG_KEYS = [
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "modules_to_save",
    "base_model_name_or_path",
    "task_type",
    "use_x",
    "lora_x_scaling",
    "fan_in_fan_out",
    "lora_dropout",
    "layers_to_transform",
]
condlora_keys = st.sampled_from(
    [
        "query.linear_for_lora_A",
        "query.linear_for_lora_B",
        "value.linear_for_lora_A",
        "value.linear_for_lora_B",
        "key.linear_for_lora_A",
        ".linear_for_lora_A",
        "self.query.linear_for_lora_B",
        "linear_for_lora_x",
        "query.linear_for_lora_x",
        "base_model.model.classifier.weight",
        "base_model.model.",
    ]
) | st.text(max_size=24).filter(lambda k: k != "__metadata__")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8]
DTYPES += [torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64]
tensor_specs = st.tuples(
    st.lists(st.sampled_from([0, 1, 2, 4, 5, 16, 32]), max_size=3),  # shape
    st.sampled_from(DTYPES),
    st.sampled_from(["random", "zeros", "nan", "inf"]),
)


def _tensor(shape: list[int], dtype: torch.dtype, fill: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if fill == "zeros":
        t = torch.zeros(shape, dtype=torch.float64)
    elif fill != "random" and t.numel():
        t.view(-1)[0] = float("nan") if fill == "nan" else float("inf")
    if dtype in (torch.int64, torch.int8, torch.uint8, torch.bool):
        return torch.nan_to_num(t, posinf=1, neginf=-1).clamp(0, 1).to(dtype)
    return t.to(dtype)


@pytest.fixture(scope="module")
def condlora_folder(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """A valid CondLoRA adapter (r = 4, query + value) of :func:`tiny_bert` in the authors' format."""
    return checkpoints.condlora_adapter(tmp_path_factory.mktemp("condlora"), hidden=32, base_name=str(tiny_bert))


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(CONDLORA_CONFIG_KEYS), json_values, min_size=1, max_size=4),
    drop=st.sets(st.sampled_from(CONDLORA_CONFIG_KEYS), max_size=3),
    keep_type=st.booleans(),
)
def test_mutated_condlora_config(
    condlora_folder: Path, tiny_bert: Path, changes: dict[str, Any], drop: set[str], keep_type: bool
) -> None:
    config = json.loads((condlora_folder / "adapter_config.json").read_text())
    config.update(changes)
    for key in drop:
        config.pop(key, None)
    if keep_type:  # most mutations should get past the peft_type check
        config["peft_type"] = "ConditionalLORA"
    with _scratch() as folder:
        shutil.copy(condlora_folder / "adapter_model.safetensors", folder)
        (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
        _only_loralens_errors(_load_and_use, folder, tiny_bert)


@FUZZ
@given(
    tensors=st.dictionaries(condlora_keys, tensor_specs, max_size=5),
    keep=st.sets(st.sampled_from(["query", "value"]), max_size=2),
    r=st.sampled_from([1, 2, 4, 5]),
    targets=st.sampled_from([["query", "value"], ["query"], ["attention.self.value"], ["key"]]),
    pickle=st.booleans(),
)
def test_random_condlora_tensors(
    condlora_folder: Path,
    tiny_bert: Path,
    tensors: dict[str, tuple[list[int], torch.dtype, str]],
    keep: set[str],
    r: int,
    targets: list[str],
    pickle: bool,
) -> None:
    config = json.loads((condlora_folder / "adapter_config.json").read_text()) | {"r": r, "target_modules": targets}
    valid = {k: v for k, v in _valid_thetas(condlora_folder).items() if k.split(".")[0] in keep}
    state = valid | {k: _tensor(*spec, seed=n) for n, (k, spec) in enumerate(tensors.items())}
    with _scratch() as folder:
        (folder / "adapter_config.json").write_text(json.dumps(config))
        if pickle:  # the authors' code saves adapter_model.bin
            torch.save(state, folder / "adapter_model.bin")
        else:
            try:
                save_file(state, str(folder / "adapter_model.safetensors"))
            except Exception:  # noqa: BLE001  safetensors itself cannot write this (e.g. a complex dtype): skip
                return
        _only_loralens_errors(_load_and_use, folder, tiny_bert)


def _valid_thetas(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _load_and_use(folder: Path, tiny_bert: Path) -> None:
    """Load, read every property, and materialise every layer's A_l, B_l on the tiny base."""
    adapter = load_condlora_adapter(folder)
    _ = (adapter.r, adapter.lora_alpha, adapter.scaling, adapter.target_modules, adapter.saved_modules)
    _ = adapter.base_model_name_or_path
    materialise_condlora(open_base(tiny_bert), adapter)
