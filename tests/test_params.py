"""The weight-free parameter counter prints the paper's figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dense_lora.models import published_config
from dense_lora.params import count_trainable, main

QKVUD = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def test_counter_prints_the_paper_figures(capsys):
    main(model="llama3-8b")
    out = capsys.readouterr().out
    assert "925,696 |  0.0115%" in out
    assert "1,933,312" in out and "4,194,304" in out
    assert "56,623,104 |  0.705%" in out
    main(model="llama2-7b", r=16)
    assert "917,504" in capsys.readouterr().out


def test_counts_match_the_closed_form():
    config = published_config("llama3-8b")
    count = count_trainable(config, "denselora", 16, QKVUD)
    dims = {
        "q": (4096, 4096),
        "k": (4096, 1024),
        "v": (4096, 1024),
        "up": (4096, 14336),
        "down": (14336, 4096),
    }
    assert count.trainable == sum((i + o + 32 * 16) * 16 for i, o in dims.values())
    assert count.base == 8_030_261_248


def test_cli_on_a_local_config(tmp_path: Path):
    published_config("llama2-7b").save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "dense_lora.params", "--model", str(tmp_path / "config.json"), "--r", "16"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert "917,504" in result.stdout


def test_freeze_counts_only_the_m_matrices():
    """Freeze (train_shared=False): 32 layers x 5 types x r^2, the shared W_e/W_d are frozen buffers."""
    config = published_config("llama3-8b")
    count = count_trainable(config, "denselora", 128, QKVUD, train_shared=False)
    assert count.trainable == 32 * 5 * 128 * 128 == 2_621_440


def test_the_model_aliases_of_the_other_clis_name_their_architecture():
    """`--model smollm2` (finetune.py's alias) counts SmolLM2-135M, as its help says, rather than an error."""
    assert published_config("smollm2").to_dict() == published_config("smollm2-135m").to_dict()
    assert published_config("SmolLM2-135M-Instruct").num_hidden_layers == 30
