"""Defects found by an adversarial review, one test each."""

from flexrope import RotaryEmbedding


def test_config_json_head_dim_under_the_family_name_of_it():
    # JetMoe keeps the head dim in kv_channels, Zamba 2 in attention_head_dim (its kv_channels is another
    # number): the config objects map head_dim onto them, a plain config.json does not; hidden / heads differs
    jetmoe = {"model_type": "jetmoe", "hidden_size": 2048, "num_attention_heads": 32, "kv_channels": 128,
              "max_position_embeddings": 64}
    zamba2 = {"model_type": "zamba2", "hidden_size": 2560, "num_attention_heads": 32, "kv_channels": 80,
              "attention_head_dim": 160, "max_position_embeddings": 64}
    assert RotaryEmbedding.from_hf_config(jetmoe).head_dim == 128
    assert RotaryEmbedding.from_hf_config(zamba2).head_dim == 160
