import pytest

from mha.model import AttentionConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 512, "num_heads": 7}, "d_model=512 is not divisible by num_heads=7"),
        ({"d_model": 0}, "d_model must be a positive integer, got 0"),
        ({"num_heads": -2}, "num_heads must be a positive integer, got -2"),
        ({"kdim": 0}, "kdim must be a positive integer or None, got 0"),
    ],
    ids=["heads-not-dividing", "zero-d-model", "negative-heads", "zero-kdim"],
)
def test_bad_config_names_the_values(kwargs, message):
    with pytest.raises(ValueError) as err:
        AttentionConfig(**kwargs)
    assert str(err.value) == message


def test_derived_sizes():
    cfg = AttentionConfig(d_model=96, num_heads=6, kdim=40)
    assert (cfg.head_dim, cfg.key_dim, cfg.value_dim, cfg.same_kv_dims) == (16, 40, 96, False)
