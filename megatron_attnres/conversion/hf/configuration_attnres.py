"""Configuration of the exported Hugging Face model (Kimi Linear's keys plus Attention Residuals).

Self-contained: exported checkpoint folders ship this file and load it with trust_remote_code=True,
so it imports only transformers and the standard library.

Architecture keys use Kimi Linear's config.json names. Additions:
  mixer_types          per layer: "full_attention" (grouped-query attention with RoPE), "mla"
                       (multi-latent attention), "kda" (Kimi Delta Attention, modeling_kda.py).
                       Derived from Kimi Linear's `linear_attn_config` (full_attn_layers -> "mla",
                       kda_layers -> "kda", 1-based) when absent.
  linear_attn_config   Kimi Linear's KDA settings: {"kda_layers", "full_attn_layers" (1-based),
                       "num_heads" H, "head_dim" D, "short_conv_kernel_size" K}; the last three are
                       required when a layer is "kda".
  attn_res_mode        "none" (standard residual), "full" or "block" (Attention Residuals).
  attn_res_block_size  transformer layers per depth block in block mode (S = 2 x this sublayers).
  attn_res_two_phase   compute depth reads block by block with the two-phase method (exact); False
                       reads every source at once per sublayer.
  mla_latent_norm_eps  eps of the MLA latent norms (q_a_layernorm, kv_a_layernorm); rms_norm_eps is
                       every other norm's. Kimi Linear has no key for it: its RMSNorm's default
                       1e-6 (the default here, so its checkpoints read right).
The shared expert is num_shared_experts x moe_intermediate_size wide (as in Kimi Linear).
"""

from transformers import PretrainedConfig

MIXER_TYPES = ("full_attention", "mla", "kda")
ATTN_RES_MODES = ("none", "full", "block")
ROUTER_ACTIVATIONS = ("sigmoid", "softmax")
KDA_SIZES = ("num_heads", "head_dim", "short_conv_kernel_size")


def _invalid(key: str, value, rule: str) -> ValueError:
    return ValueError(f"invalid AttnResConfig: {key}={value!r}; {rule}")


class AttnResConfig(PretrainedConfig):
    model_type = "kimi_attnres"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 163840,
        hidden_size: int = 2304,
        num_hidden_layers: int = 27,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 9216,
        moe_intermediate_size: int = 1024,
        num_experts: int = 256,
        num_experts_per_token: int = 8,
        num_shared_experts: int = 1,
        first_k_dense_replace: int = 1,
        moe_router_activation_func: str = "sigmoid",
        routed_scaling_factor: float = 1.0,
        moe_renormalize: bool = True,
        use_expert_bias: bool = True,
        num_expert_group: int = 1,
        topk_group: int = 1,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 4096,
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = None,
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        mla_use_nope: bool = True,
        mla_latent_norm_eps: float = 1e-6,
        mixer_types: list[str] | None = None,
        linear_attn_config: dict | None = None,
        attn_res_mode: str = "block",
        attn_res_block_size: int = 3,
        attn_res_two_phase: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_token = num_experts_per_token
        self.num_shared_experts = num_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_router_activation_func = moe_router_activation_func
        self.routed_scaling_factor = routed_scaling_factor
        self.moe_renormalize = moe_renormalize
        self.use_expert_bias = use_expert_bias
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.mla_use_nope = mla_use_nope
        self.mla_latent_norm_eps = mla_latent_norm_eps
        self.linear_attn_config = linear_attn_config
        self.mixer_types = list(mixer_types or self._mixers_from_linear_attn_config())
        self.attn_res_mode = attn_res_mode
        self.attn_res_block_size = attn_res_block_size
        self.attn_res_two_phase = attn_res_two_phase
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_attnres()

    def _mixers_from_linear_attn_config(self) -> list[str]:
        """Kimi Linear lists its 1-based MLA ("full_attn_layers") and KDA layers separately."""
        cfg = self.linear_attn_config or {}
        if "full_attn_layers" not in cfg and "kda_layers" not in cfg:
            return ["full_attention"] * self.num_hidden_layers
        mixers = [None] * self.num_hidden_layers
        for key, mixer in (("full_attn_layers", "mla"), ("kda_layers", "kda")):
            for layer in cfg.get(key, []):
                mixers[layer - 1] = mixer
        return mixers

    @property
    def sublayers_per_block(self) -> int:
        """S: sublayers (mixer, MLP/MoE) per depth block; full AttnRes is S = 1."""
        return 2 * self.attn_res_block_size if self.attn_res_mode == "block" else 1

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense_replace

    def validate_attnres(self) -> None:
        """Refuse values the modeling code cannot run, naming the value and the alternative."""
        layers, k = self.num_hidden_layers, self.attn_res_block_size
        checks = [
            (
                self.attn_res_mode in ATTN_RES_MODES,
                "attn_res_mode",
                self.attn_res_mode,
                f"use one of {ATTN_RES_MODES}",
            ),
            (
                self.attn_res_mode != "block" or (isinstance(k, int) and 1 <= k <= layers),
                "attn_res_block_size",
                k,
                f"block mode needs 1..{layers} layers per depth block (or attn_res_mode='full')",
            ),
            (
                len(self.mixer_types) == layers and set(self.mixer_types) <= set(MIXER_TYPES),
                "mixer_types",
                self.mixer_types,
                f"list {layers} mixers from {MIXER_TYPES}",
            ),
            (
                self.moe_router_activation_func in ROUTER_ACTIVATIONS,
                "moe_router_activation_func",
                self.moe_router_activation_func,
                f"use one of {ROUTER_ACTIVATIONS}",
            ),
            (
                not self.num_experts or 1 <= self.num_experts_per_token <= self.num_experts,
                "num_experts_per_token",
                self.num_experts_per_token,
                f"choose 1..num_experts={self.num_experts}",
            ),
            (
                self.num_expert_group == 1 and self.topk_group == 1,
                "(num_expert_group, topk_group)",
                (self.num_expert_group, self.topk_group),
                "group-limited routing is not implemented; use (1, 1) for plain top-k",
            ),
            (
                self.hidden_act == "silu",
                "hidden_act",
                self.hidden_act,
                "experts are SwiGLU: use 'silu'",
            ),
            (
                self.num_attention_heads % self.num_key_value_heads == 0,
                "num_key_value_heads",
                self.num_key_value_heads,
                f"it must divide num_attention_heads={self.num_attention_heads}",
            ),
        ]
        checks += self._kda_checks()
        for ok, key, value, rule in checks:
            if not ok:
                raise _invalid(key, value, rule)

    def _kda_checks(self) -> list[tuple]:
        if "kda" not in self.mixer_types:
            return []
        lin = self.linear_attn_config or {}
        sizes = [lin.get(key) for key in KDA_SIZES]
        return [
            (
                all(isinstance(v, int) and v > 0 for v in sizes),
                "linear_attn_config",
                self.linear_attn_config,
                f"KDA layers need positive integers {KDA_SIZES} in linear_attn_config",
            ),
        ]
