"""adapter_config.json validation: each bad value gets a message naming the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loralens.errors import CheckpointError
from loralens.io.peft_config import check_lora_config

GOOD = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}


def test_a_peft_written_config_passes() -> None:
    check_lora_config(dict(GOOD, layers_to_transform=[0, 3], base_model_name_or_path="x/y"), Path("c.json"))
    check_lora_config(dict(GOOD, layers_to_transform=2, rank_pattern={"q.*": 4}, alpha_pattern={"v": 2.5}), Path("c"))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"peft_type": "ConditionalLORA"}, "where a LoRA adapter is expected; load it as a CondLoRA adapter"),
        ({"peft_type": None}, "no 'peft_type'"),
        ({"peft_type": ["LORA"]}, "is not supported"),
        ({"r": None}, "r is None; expected a positive integer"),
        ({"r": 0}, "r is 0"),
        ({"r": True}, "r is True"),
        ({"r": "8"}, "r is '8'"),
        ({"lora_alpha": None}, "lora_alpha is None; expected a finite number"),
        ({"lora_alpha": float("nan")}, "lora_alpha is nan"),
        ({"rank_pattern": [1]}, "rank_pattern is [1]; expected an object"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern key '(' is refused: not a valid regular expression"),
        ({"rank_pattern": {"q": -1}}, "rank_pattern['q'] is -1; expected a positive integer"),
        ({"alpha_pattern": {"q": "x"}}, "alpha_pattern['q'] is 'x'; expected a finite number"),
        ({"use_rslora": "yes"}, "use_rslora is 'yes'; expected true or false"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out is 1"),
        ({"layers_to_transform": [0, -1]}, "layers_to_transform is [0, -1]"),
        ({"layers_to_transform": []}, "layers_to_transform is []"),
        ({"base_model_name_or_path": 3}, "base_model_name_or_path is 3"),
    ],
)
def test_bad_values_name_the_file_and_key(change: dict[str, Any], words: str) -> None:
    with pytest.raises(CheckpointError, match="^cfg/adapter_config.json: ") as info:
        check_lora_config(dict(GOOD, **change), Path("cfg/adapter_config.json"))
    assert words in str(info.value) and "\n" not in str(info.value)
