"""Inputs that gave silently wrong numbers or unclear messages.

Rows run the real console entry point as :mod:`test_bad_input` does (exit code, exactly one ``error:`` or
``warning:`` line with the expected words, nothing left behind). The numeric cases are checked against float64
references built from PEFT itself: its merged DoRA weight, and the base weight and update of the module PEFT
builds when it loads an adapter whose ``fan_in_fan_out`` flag contradicts the base.

Permission cases: the tests run as root, who may read any file. The Python interpreter lives under ``/root``
(mode 0700), so a subprocess dropped to another user (``setpriv``) could not even start it; the fault is made
in-process instead, with the *effective* user id set to ``nobody`` around the one call and restored after (the
real and saved ids stay root). Each of those tests first proves that the file really is unreadable then.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file

import checkpoints
from clitools import BadInput, run_bad_input, run_cli
from loralens.analyses.lowrank import amplification_report, rank_overlap, spectra_report
from loralens.errors import FanInFanOutWarning, UnsupportedAdapterError
from loralens.io.adapters import load_lora_adapter, read_base_weights
from loralens.io.base_weights import open_base

QUERY0 = "encoder.layer.0.attention.self.query.weight"
NOBODY = 65534


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _edit_tensor(path: Path, key_end: str, make: Callable[[torch.Tensor], torch.Tensor]) -> None:
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(key_end))
    save_file(tensors | {key: make(tensors[key])}, str(path))


def _index(folder: Path) -> Path:
    return folder / "model.safetensors.index.json"


def _shard_of(folder: Path, key: str) -> str:
    return json.loads(_index(folder).read_text())["weight_map"][key]


@pytest.fixture(scope="module")
def sharded_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tiny_bert`'s twin saved as several shards with model.safetensors.index.json."""
    return checkpoints.bert_base(tmp_path_factory.mktemp("bert-sharded"), layers=2, hidden=32, fmt="sharded")


@pytest.fixture(scope="module")
def dora(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    return checkpoints.dora_adapter(tiny_bert, tmp_path_factory.mktemp("dora"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny GPT-2 base (Conv1D) and a LoRA adapter on attn.c_attn, attn.c_proj and mlp.c_proj."""
    base = checkpoints.gpt2_base(tmp_path_factory.mktemp("gpt2"))
    adapter = checkpoints.lora_adapter(
        base, tmp_path_factory.mktemp("gpt2-lora"), arch="gpt2", targets=["c_attn", "c_proj"]
    )
    return base, adapter


def _flip_fan_in_fan_out(adapter: Path, dst: Path) -> Path:
    folder = _copy(adapter, dst)
    # alpha = r as well, so that the fan_in_fan_out warning is the only one (alpha 8 at r != 8 has its own check)
    _edit_json(
        folder / "adapter_config.json", lambda c: c.update(fan_in_fan_out=not c["fan_in_fan_out"], lora_alpha=c["r"])
    )
    return folder


@pytest.fixture(scope="module")
def rows(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_bert: Path,
    tiny_bert_adapter: Path,
    sharded_bert: Path,
    dora: Path,
    gpt2: tuple[Path, Path],
) -> dict[str, BadInput]:
    tmp = tmp_path_factory.mktemp("bad2")
    base, adapter = str(tiny_bert), str(tiny_bert_adapter)

    def with_adapter(folder: Path) -> list[str]:
        return ["similarity", "--base", base, "--adapter", str(folder)]

    def with_base(folder: Path) -> list[str]:
        return ["similarity", "--base", str(folder), "--adapter", adapter]

    r: dict[str, BadInput] = {}
    # 1. DoRA: amplification and spectra read dW, which for DoRA is not s B A
    r["DoRA: amplification"] = BadInput(["amplification", "--base", base, "--adapter", str(dora)], "DoRA adapter")
    r["DoRA: spectra"] = BadInput(["spectra", "--base", base, "--adapter", str(dora)], "is not s*B*A")
    # 2. fan_in_fan_out that contradicts the base: PEFT's rule, one warning
    bert_fifo = _flip_fan_in_fan_out(tiny_bert_adapter, tmp / "bert-fifo")
    r["fan_in_fan_out true on nn.Linear (BERT)"] = BadInput(
        ["spectra", "--base", base, "--adapter", str(bert_fifo)], "fan_in_fan_out is true, but 'query'", code=0
    )
    gpt2_fifo = _flip_fan_in_fan_out(gpt2[1], tmp / "gpt2-fifo")
    r["fan_in_fan_out false on Conv1D (GPT-2)"] = BadInput(
        ["spectra", "--base", str(gpt2[0]), "--adapter", str(gpt2_fifo)], "the flag is ignored, as PEFT does", code=0
    )
    # 3. shard index entries that leave the model folder
    first_shard = _shard_of(sharded_bert, "embeddings.word_embeddings.weight")
    outside = tmp / "other"
    outside.mkdir()
    shutil.copy(sharded_bert / first_shard, outside / "x.safetensors")
    for case, entry in (("../other", "../other/x.safetensors"), ("absolute", str(outside / "x.safetensors"))):
        folder = _copy(sharded_bert, tmp / f"index-{case.strip('./')}")
        _edit_json(
            _index(folder),
            lambda c, e=entry: c["weight_map"].update({k: e for k, v in c["weight_map"].items() if v == first_shard}),
        )
        r[f"shard index entry {case}"] = BadInput(with_base(folder), "points outside the model folder")
    linked = _copy(sharded_bert, tmp / "index-symlink")
    (linked / first_shard).unlink()
    (linked / first_shard).symlink_to(outside / "x.safetensors")
    r["shard index entry: a symlink leaving the folder"] = BadInput(with_base(linked), "through a symbolic link")
    # 4. permission denied: see test_permission_denied
    # 5. a folder name that is not UTF-8
    r["base folder name not UTF-8"] = BadInput(
        with_base(_copy(tiny_bert, tmp / os.fsdecode(b"base-\xff"))), "not valid UTF-8"
    )
    r["adapter folder name not UTF-8"] = BadInput(
        with_adapter(_copy(tiny_bert_adapter, tmp / os.fsdecode(b"lora-\xfe"))), "not valid UTF-8"
    )
    # 6. layer_replication
    replicated = _copy(tiny_bert_adapter, tmp / "layer-replication")
    _edit_json(replicated / "adapter_config.json", lambda c: c.update(layer_replication=[[0, 2], [1, 2]]))
    r["layer_replication"] = BadInput(with_adapter(replicated), "layer_replication [[0, 2], [1, 2]] is not supported")
    # 7. an index that places a tensor in a shard that lacks it
    disagree = _copy(sharded_bert, tmp / "index-disagrees")
    wrong = next(
        s
        for s in sorted(set(json.loads(_index(disagree).read_text())["weight_map"].values()))
        if s != _shard_of(disagree, QUERY0)
    )
    _edit_json(_index(disagree), lambda c: c["weight_map"].update({QUERY0: wrong}))
    r["index and shard disagree"] = BadInput(
        with_base(disagree), f"the index and the shard disagree: it places tensor {QUERY0!r} in"
    )
    # 8. complex factors and weights
    complex_a = _copy(tiny_bert_adapter, tmp / "complex-a")
    _edit_tensor(complex_a / "adapter_model.safetensors", "lora_A.weight", lambda t: t.to(torch.complex64))
    r["complex adapter factor"] = BadInput(with_adapter(complex_a), "complex dtype torch.complex64")
    complex_w = _copy(tiny_bert, tmp / "complex-w")
    _edit_tensor(complex_w / "model.safetensors", QUERY0, lambda t: t.to(torch.complex64))
    r["complex base weight"] = BadInput(with_base(complex_w), "complex dtype torch.complex64")
    return r


CASES = [
    "DoRA: amplification",
    "DoRA: spectra",
    "fan_in_fan_out true on nn.Linear (BERT)",
    "fan_in_fan_out false on Conv1D (GPT-2)",
    "shard index entry ../other",
    "shard index entry absolute",
    "shard index entry: a symlink leaving the folder",
    "base folder name not UTF-8",
    "adapter folder name not UTF-8",
    "layer_replication",
    "index and shard disagree",
    "complex adapter factor",
    "complex base weight",
]


def test_the_table_is_complete(rows: dict[str, BadInput]) -> None:
    assert list(rows) == CASES


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: str, rows: dict[str, BadInput], tmp_path: Path) -> None:
    run_bad_input(rows[case], tmp_path)


# --------------------------------------------------------------------------------------------- 1. DoRA


def test_dora_update_is_not_sBA_so_dW_analyses_refuse(tiny_bert: Path, dora: Path) -> None:
    """PEFT's merged DoRA weight minus W0 is m (W + s B A) / ||W + s B A||_row - W (float64, from the loaded A, B, m,
    s and W), is far from s B A and of full rank: the reason amplification and spectra refuse. Overlap still works."""
    from peft import PeftModel
    from transformers import BertModel

    adapter, base = load_lora_adapter(dora), open_base(tiny_bert)
    W0 = {k: v.double() for k, v in BertModel.from_pretrained(tiny_bert).state_dict().items()}
    merged = PeftModel.from_pretrained(BertModel.from_pretrained(tiny_bert), dora).merge_and_unload().state_dict()
    checked = 0
    for name, mod in adapter.modules.items():
        assert mod.magnitude is not None
        W, keys = read_base_weights(base, adapter, name)
        for l, key in enumerate(keys):
            w, B, A, m = W[l].double(), mod.B[l].double(), mod.A[l].double(), mod.magnitude[l].double()
            sBA = mod.scaling[l] * B @ A
            V = w + sBA
            reference = m[:, None] * V / torch.linalg.vector_norm(V, dim=1, keepdim=True) - w
            peft_delta = merged[key].double() - W0[key]
            torch.testing.assert_close(peft_delta, reference, rtol=0, atol=1e-5)  # PEFT merges in float32
            assert (peft_delta - sBA).norm() > 0.2 * sBA.norm()  # magnitudes moved by about 30 %
            assert torch.linalg.matrix_rank(peft_delta) == w.shape[0] > mod.ranks[l]
            checked += 1
    assert checked == 4
    for analysis in (amplification_report, spectra_report):
        with pytest.raises(UnsupportedAdapterError, match=r"DoRA adapter .* is not s\*B\*A"):
            analysis(base, adapter)
    overlap = rank_overlap(adapter, adapter, base=base)
    for factor in overlap.modules["value"].factors.values():
        torch.testing.assert_close(factor.diagonal, torch.ones_like(factor.diagonal), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------- 2. fan_in_fan_out


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_fan_in_fan_out_follows_peft(
    arch: str, tmp_path: Path, tiny_bert: Path, tiny_bert_adapter: Path, gpt2: tuple[Path, Path]
) -> None:
    """An adapter whose flag contradicts the base gives PEFT's numbers: spectra of the flipped adapter against a
    float64 reference from the module PEFT builds (its base weight and delta, as (out, in)), one warning."""
    import warnings

    from peft import PeftModel
    from transformers import BertModel, GPT2Model

    base_dir, adapter_dir = (tiny_bert, tiny_bert_adapter) if arch == "bert" else gpt2
    flipped = _flip_fan_in_fan_out(adapter_dir, tmp_path / "flipped")
    adapter, base = load_lora_adapter(flipped), open_base(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = spectra_report(base, adapter)
    ours = [str(w.message) for w in caught if issubclass(w.category, FanInFanOutWarning)]
    assert len(ours) == 1 and "the flag is ignored" in ours[0], ours
    cls = BertModel if arch == "bert" else GPT2Model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own "Setting fan_in_fan_out to ..."
        peft_model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), flipped)
    modules = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    checked = 0
    for name, mod in adapter.modules.items():
        spectra = report.modules[name]
        for l, path in enumerate(mod.paths):
            layer = modules[path.dotted]
            W = layer.get_base_layer().weight.detach().double()
            delta = layer.get_delta_weight("default").detach().double()
            if arch == "gpt2":  # Conv1D stores (in, out)
                W, delta = W.T, delta.T
            r = mod.ranks[l]
            U_d, S_d, _ = np.linalg.svd(delta.numpy())
            U_w = np.linalg.svd(W.numpy())[0]
            np.testing.assert_allclose(spectra.singular_values[l, :r].numpy(), S_d[:r], rtol=1e-5)
            angles = np.sort(scipy.linalg.subspace_angles(U_d[:, :r], U_w[:, :r]))
            np.testing.assert_allclose(spectra.principal_angles[l, :r].numpy(), angles, atol=1e-5)
            checked += 1
    assert checked == 2 * len(adapter.modules) and checked >= 4


# -------------------------------------------------------------------------------------- 3. shard indexes


def test_hugging_face_cache_links_into_blobs_are_followed(tmp_path: Path, sharded_bert: Path) -> None:
    """The one layout where a shard may resolve outside its folder: the hub cache's snapshots link into blobs."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in sharded_bert.iterdir():
        shutil.copy(f, blobs / f"sha-{f.name}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"sha-{f.name}")
    linked, plain = open_base(snapshot), open_base(sharded_bert)
    assert linked.shapes == plain.shapes
    torch.testing.assert_close(linked.read([QUERY0])[QUERY0], plain.read([QUERY0])[QUERY0], rtol=0, atol=0)


# --------------------------------------------------------------------------------------- 4. permissions


@contextlib.contextmanager
def _as_another_user() -> Iterator[None]:
    """Effective user ``nobody`` when running as root (who reads everything), else unchanged."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    """A folder other users may enter (pytest's tmp_path lives under a 0700 folder of root's)."""
    folder = Path(tempfile.mkdtemp(prefix="loralens-perm-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.parametrize("which", ["base weights", "adapter weights"])
def test_permission_denied(
    which: str,
    world_readable_tmp: Path,
    tiny_bert: Path,
    tiny_bert_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base, adapter = _copy(tiny_bert, world_readable_tmp / "base"), _copy(tiny_bert_adapter, world_readable_tmp / "lora")
    for folder in (base, adapter):  # copies of pytest's 0700 folders and safetensors' 0600 files
        folder.chmod(0o755)
        for f in folder.iterdir():
            f.chmod(0o644)
    (cwd := world_readable_tmp / "cwd").mkdir(mode=0o777)
    monkeypatch.chdir(cwd)
    argv = ["similarity", "--base", base, "--adapter", adapter]
    result = run_cli(*argv)
    code, _, err = (
        result.returncode,
        result.stdout,
        result.stderr,
    )  # readable: it works (and every module it needs is imported)
    assert code == 0, err
    target = base / "model.safetensors" if which == "base weights" else adapter / "adapter_model.safetensors"
    target.chmod(0)
    with _as_another_user():
        with pytest.raises(PermissionError):
            target.open("rb")  # the fault is real
        assert (
            target.parent / "config.json" if which == "base weights" else adapter / "adapter_config.json"
        ).read_bytes()
        result = run_cli(*argv)
    code, out, err = result.returncode, result.stdout, result.stderr
    lines = err.strip().splitlines()
    assert code == 2 and out == "", err
    assert len(lines) == 1 and lines[0].startswith(f"error: {target}: permission denied"), err
    assert "chmod" in lines[0] and "corrupt" not in lines[0]
    assert list(cwd.iterdir()) == []
