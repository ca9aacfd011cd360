"""What each model family's rotary embedding is, keyed by the ``model_type`` of its (text) config.

The config says theta, scaling, the head dim and a partial rotation; the family's code decides the rest:
how channels pair, whether the rope part is a slice of its own (multi-head latent attention), which layers
rotate at all, and whether positions are multi-axis. That part lives here, one entry per family, checked
against each family's own rotary module and apply function in transformers (tests/test_families.py).
A ``model_type`` missing here is refused, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What a family's code implies beyond its config's numbers.

    interleaved: pairs (2i, 2i+1) rather than (i, i + r/2).
    interleave_field: a config field that decides the pairing where the family has one (it wins when set).
    rope_slice: multi-head latent attention: the rotation runs on its own ``qk_rope_head_dim`` slice of each
        head, whose length already is the rotary dim (a ``partial_rotary_factor`` is not applied on top).
    rotary_dim_field: a config field that gives the rotary dim outright (GPT-J, CodeGen).
    no_rope: how the config marks layers that do not rotate: ``"no_rope_layers"`` (a list, 0 = no RoPE at
        that layer; SmolLM3, Llama 4) or ``"sliding_only"`` (only ``sliding_attention`` layers rotate).
    multiaxis: positions are (3, b, s) M-RoPE or similar: ``MultiAxisRotaryEmbedding.from_hf_config``.
    refused: why flexrope's 1-D module cannot express the family (None where it can).
    """

    interleaved: bool = False
    interleave_field: str | None = None
    rope_slice: bool = False
    rotary_dim_field: str | None = None
    no_rope: str | None = None
    multiaxis: bool = False
    refused: str | None = None


HALF_SPLIT = Family()
INTERLEAVED = Family(interleaved=True)
# multi-head latent attention: the rope slice always interleaved, or as the config's rope_interleave says
MLA = Family(interleaved=True, rope_slice=True)
MLA_FIELD = Family(interleaved=True, interleave_field="rope_interleave", rope_slice=True)
MULTI_AXIS = Family(multiaxis=True)

# Half-split pairing, rotary dim from head_dim (or hidden_size / heads) times any partial_rotary_factor, the
# rotated channels first: the Llama / GPT-NeoX reading, which each of these families' code does.
_HALF_SPLIT_TYPES = """
    afmoe apertus apertus1p5_text arcee aria_text bamba beam bitnet chameleon csm cwm dbrx
    deepseek_ocr2_text dia_decoder dia_encoder diffllama diffusion_gemma_text doge dory dots1
    embedding_gemma2_text emu3_text_model esm esmc eurobert evolla exaone4 exaone_moe falcon falcon_h1
    flex_olmo flint gemma gemma2 gemma3_text gemma3n_text gemma4_text gemma4_unified_text glm4_moe gpt_neox
    gpt_neox_japanese gpt_oss gradium_phonon_tts granite granite4_vision_text granite_docling_text
    granite_swa granitemoe granitemoe_swa granitemoehybrid granitemoeshared gte higgs_audio_v2 hrm_text
    hunyuan_v1_dense hunyuan_v1_moe hy_v3 hyperclovax idefics jais2 jetmoe jina_embeddings_v3 kolibri1
    kolibri1_1 kyutai_speech_to_text laguna lara_mini lasr_encoder lfm2 lfm2_moe lfm3 llama mellum mimi
    mimo_v2_flash minicpm3 minicpm5_moe minimax minimax_m2 minimax_m3_vl_text ministral ministral3 mistral
    mixtral mllama_text_model modernbert modernbert-decoder molmo2_text moshi muse_glimmer_assistant
    muse_glimmer_text muse_spark_text nemotron nemotron3_5_transcribe_asr_audio
    nemotron3_5_transcribe_word_timestamp neucodec nomic_bert olmo olmo2 olmo3 olmo_hybrid olmoe persimmon
    phi phi3 phi4_multimodal phimoe pocket_tts pocket_tts_audio_tokenizer qwen2 qwen2_moe qwen3 qwen3_moe
    qwen3_next seed_oss solar_open stablelm starcoder2 step3p5 t5_gemma_module t5gemma2_decoder timesfm2_5
    ultrabert unlimited_ocr_text vaultgemma voxtral_realtime_text xcodec2 zamba2 zaya
    csm_depth_decoder_model dia_encoder glmasr_encoder mimi_decoder mimi_encoder pocket_tts_audio_tokenizer_decoder
    pocket_tts_audio_tokenizer_encoder qwen2_5_omni_dit qwen3_omni_moe_talker_code_predictor t5gemma2_text
    voxtral_realtime_encoder
""".split()

# Channel 2i with 2i+1: rotate_half / cos / sin written over even and odd channels, or complex numbers
_INTERLEAVED_TYPES = """
    blt_global_transformer blt_local_decoder blt_local_encoder blt_patcher cohere ergo ernie4_5 ernie4_5_moe glm
    glm4 helium moonshine moonshine_streaming openai_privacy_filter pe_audio_encoder pe_audio_video_encoder
    pe_video_encoder
""".split()

# Multi-head latent attention whose main attention always interleaves the rope slice (no config field)
_MLA_TYPES = """
    axk2 bailing_hybrid deepseek_v2 deepseek_v32 deepseek_v4 dots3_note_text glm_moe_dsa hy_v4 longcat_flash
    mistral_large4_text
""".split()

# M-RoPE and other multi-axis text positions (their text config's model_type)
_MULTI_AXIS_TYPES = """
    cohere_compass_text cosmos3_edge_text ernie4_5_vl_moe_text glm4v_moe_text glm4v_text
    glm_image_text glm_ocr_text hunyuan_vl_text hy_v4_vl_text neomme paddleocr_vl_text qwen2_5_omni_text
    qwen2_5_omni_thinker qwen2_5_vl_text qwen2_vl_text qwen3_5_moe_text qwen3_5_text qwen3_omni_moe_text
    qwen3_omni_moe_thinker qwen3_vl_moe_text qwen3_vl_text qwen4_exp_text qwen2_5_omni_talker
    qwen3_omni_moe_talker_text
    cohere_compass cosmos3_edge cosmos3_omni ernie4_5_vl_moe glm46v glm4v glm4v_moe glm_image glm_ocr hunyuan_vl
    hy_v4_vl minicpmv4_7 paddleocr_vl qwen2_5_omni qwen2_5_vl qwen2_vl qwen3_5 qwen3_5_moe qwen3_omni_moe qwen3_vl
    qwen3_vl_moe qwen4_exp
""".split()  # the second group: composite configs, or flat config.json files of the older checkpoints

FAMILIES: dict[str, Family] = {
    **{name: HALF_SPLIT for name in _HALF_SPLIT_TYPES},
    **{name: INTERLEAVED for name in _INTERLEAVED_TYPES},
    **{name: MLA for name in _MLA_TYPES},
    **{name: MULTI_AXIS for name in _MULTI_AXIS_TYPES},
    "smollm3": Family(no_rope="no_rope_layers"),
    "llama4_text": Family(interleaved=True, no_rope="no_rope_layers"),  # complex-number rotation: (2i, 2i+1)
    "cohere2": Family(interleaved=True, no_rope="sliding_only"),
    "cohere2_moe": Family(interleaved=True, no_rope="sliding_only"),
    "gptj": Family(interleaved=True, rotary_dim_field="rotary_dim"),
    "codegen": Family(interleaved=True, rotary_dim_field="rotary_dim"),
    "deepseek_v3": MLA_FIELD,
    "axk1": MLA_FIELD,
    "glm4_moe_lite": MLA_FIELD,
    "mistral4": MLA_FIELD,
    "youtu": MLA_FIELD,
    "blt": Family(refused=(
        "BLT holds several transformers with their own sizes (encoder_config, global_config, decoder_config, "
        "patcher_config): pass the sub-config of the one this module serves, e.g. config.global_config")),
    "nanochat": Family(refused=(
        "nanochat rotates by the negated angle (x1 cos + x2 sin, -x1 sin + x2 cos): build "
        "RotaryEmbedding(head_dim=..., theta_base=...) and call it with inverse=True, which rotates by -angle")),
}


def family(model_type: str | None) -> Family | None:
    """The entry of ``model_type``, None where the table has none."""
    return FAMILIES.get(model_type)
