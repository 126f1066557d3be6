"""The model signature a checkpoint records covers the Kimi Linear fields: a checkpoint of a model
with other KDA sizes or another MLA rotation setting is refused on load, naming the field; one
written before these fields existed still loads."""

from pathlib import Path

import pytest

from megatron_attnres.checkpoint.format import check_signature, model_signature
from megatron_attnres.config.load import load_run_config
from megatron_attnres.config.megatron import transformer_config

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "kimi_linear_debug.yaml"
PATTERN = "G-GEGE+EGEGEGE+E"


def _signature(**overrides) -> dict:
    run = load_run_config(DEBUG, overrides)
    return model_signature(transformer_config(run), PATTERN, 1024, tied_embeddings=False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mla_use_nope", False),
        ("linear_num_key_heads", 2),
        ("linear_key_head_dim", 8),
        ("linear_conv_kernel_dim", 2),
    ],
)
def test_a_checkpoint_of_other_kimi_fields_is_refused(field, value, tmp_path):
    saved, expected = _signature(**{field: value}), _signature()
    assert saved[field] == value and expected[field] != value  # the run's value is recorded
    with pytest.raises(ValueError, match=f"{field}: checkpoint {value!r}"):
        check_signature(saved, expected, tmp_path)
    assert check_signature(expected, expected, tmp_path) is None  # negative control


def test_a_checkpoint_from_before_the_kimi_fields_still_loads(tmp_path):
    expected = _signature()
    fields = (
        "mla_use_nope",
        "linear_num_key_heads",
        "linear_key_head_dim",
        "linear_conv_kernel_dim",
    )
    old = {k: v for k, v in expected.items() if k not in fields}
    assert check_signature(old, expected, tmp_path) is None
