"""The run configuration of `attnres-train`: one flat dataclass, Megatron-LM's argument names.

Keys are Megatron-LM's command-line names with underscores (`--micro-batch-size` ->
`micro_batch_size`) wherever Megatron has one. Each field carries its documentation (the string
after it) and its own range or choice as dataclass field metadata (`at_least`, `above`,
`half_open`, `one_of` below); config/rules.py reads that metadata and holds the rules that relate
fields to each other. Loading (YAML + command-line overrides) is in config/load.py.
"""

from dataclasses import dataclass, field


def at_least(minimum: int) -> dict:
    """Field metadata: the value must be >= `minimum` (None, where the type allows it, means
    "default" and is not checked)."""
    return {"at_least": minimum}


def above(bound: int) -> dict:
    """Field metadata: the value must be > `bound` (None, where allowed, is not checked)."""
    return {"above": bound}


def half_open(low: float, high: float, hint: str) -> dict:
    """Field metadata: the value must lie in [low, high); `hint` is the fix the error suggests."""
    return {"half_open": (low, high), "hint": hint}


def one_of(*allowed, fix: str | None = None) -> dict:
    """Field metadata: the value must be one of `allowed` (None among them: null is allowed).
    `fix`, where given, is the error's whole "use ..." text (choices that need explaining)."""
    return {"one_of": allowed, "fix": fix}


@dataclass
class RunConfig:
    # -- model: the hybrid pattern is built from these unless hybrid_layer_pattern is given
    num_layers: int = field(default=4, metadata=at_least(1))
    """Transformer layers, each a mixer sublayer + an MLP/MoE sublayer (the hybrid pattern built
    from it has 2 x num_layers symbols); unused when hybrid_layer_pattern is given.
    Megatron-LM: --num-layers."""
    hidden_size: int = field(default=64, metadata=at_least(1))
    """Model width (the residual stream's size). Megatron-LM: --hidden-size."""
    ffn_hidden_size: int = field(default=128, metadata=at_least(1))
    """Inner width of the dense MLP layers. Megatron-LM: --ffn-hidden-size."""
    num_attention_heads: int = field(default=4, metadata=at_least(1))
    """Query heads of each attention layer. Megatron-LM: --num-attention-heads."""
    num_query_groups: int | None = field(default=None, metadata=at_least(1))
    """Key/value heads for grouped-query attention; null: one per query head (multi-head).
    Megatron-LM: --num-query-groups."""
    kv_channels: int | None = field(default=None, metadata=at_least(1))
    """Head size of attention; null: hidden_size / num_attention_heads. Megatron-LM:
    --kv-channels."""
    seq_length: int = field(default=128, metadata=at_least(1))
    """Tokens per training sample. Megatron-LM: --seq-length."""
    vocab_size: int | None = field(default=None, metadata=at_least(1))
    """The model's vocabulary; default (null): the tokenizer's vocabulary padded to a multiple of
    make_vocab_size_divisible_by x TP. Megatron-LM: --vocab-size."""
    make_vocab_size_divisible_by: int = field(default=128, metadata=at_least(1))
    """Pad the tokenizer's vocabulary to a multiple of this x TP (when vocab_size is null).
    Megatron-LM: --make-vocab-size-divisible-by."""
    position_embedding_type: str = field(
        default="rope", metadata=one_of("rope", "none", "learned_absolute")
    )
    """Position embedding of the attention ('*') patterns: rope | none | learned_absolute
    (HybridModel's embeddings); MLA patterns use MLA's own RoPE and ignore it.
    Megatron-LM: --position-embedding-type."""
    rotary_base: int = field(default=10000, metadata=at_least(1))
    """RoPE base (theta). Megatron-LM: --rotary-base."""
    norm_epsilon: float = field(default=1e-5, metadata=above(0))
    """Epsilon of the RMS norms. Megatron-LM: --norm-epsilon (megatron.core's layernorm_epsilon)."""
    init_method_std: float = field(default=0.02, metadata=above(0))
    """Standard deviation of the normal weight init. Megatron-LM: --init-method-std."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output layer weights (false: tied). Megatron-LM:
    --untie-embeddings-and-output-weights."""
    hybrid_layer_pattern: str | None = None
    """One symbol per sublayer, e.g. "*E*E|*E*E" ('*' attention, '+' MLA, 'G' KDA, '-' dense MLP,
    'E' MoE, '|' a pipeline cut); overrides the pattern built from num_layers.
    Megatron-LM: --hybrid-layer-pattern."""
    multi_latent_attention: bool = False
    """Mixers are MLA ('+') instead of attention ('*') in the built pattern.
    Megatron-LM: --multi-latent-attention."""
    q_lora_rank: int | None = field(default=None, metadata=at_least(1))
    """MLA: rank of the low-rank query projection; null: a full-rank query projection.
    Megatron-LM: --q-lora-rank."""
    kv_lora_rank: int = field(default=32, metadata=at_least(1))
    """MLA: rank of the compressed key/value latent. Megatron-LM: --kv-lora-rank."""
    qk_head_dim: int = field(default=16, metadata=at_least(1))
    """MLA: query/key head size without the rotary part. Megatron-LM: --qk-head-dim."""
    qk_pos_emb_head_dim: int = field(default=8, metadata=at_least(0))
    """MLA: rotary (position) channels of each query/key head; 0 = NoPE.
    Megatron-LM: --qk-pos-emb-head-dim."""
    v_head_dim: int = field(default=16, metadata=at_least(1))
    """MLA: value head size. Megatron-LM: --v-head-dim."""
    qk_layernorm: bool = False
    """RMS-norm the MLA query and key latents (wired for MLA only). Megatron-LM: --qk-layernorm."""
    mla_use_nope: bool = False
    """Kimi Linear: keep the qk_pos_emb_head_dim channels but never rotate them (MLA without RoPE);
    this trainer's."""
    mla_latent_norm_epsilon: float = field(default=1e-6, metadata=above(0))
    """Epsilon of the MLA latent RMS norms (Kimi Linear's q_a/kv_a_layernorm, hard-coded 1e-6
    there; norm_epsilon is every other norm's); this trainer's."""
    # -- KDA, Kimi Delta Attention: the 'G' pattern symbol (Megatron-LM's linear-attention names)
    linear_num_key_heads: int = field(default=4, metadata=at_least(1))
    """KDA heads (queries, keys and values have the same count). Megatron-LM:
    --linear-num-key-heads (also used as its linear_num_value_heads)."""
    linear_key_head_dim: int = field(default=16, metadata=at_least(1))
    """KDA head dim (keys, values and the low-rank gate width); at most 256, fla-core's limit.
    Megatron-LM: --linear-key-head-dim (also used as its linear_value_head_dim)."""
    linear_conv_kernel_dim: int = field(default=4, metadata=at_least(1))
    """Kernel size of the short causal convolutions on q, k and v.
    Megatron-LM: --linear-conv-kernel-dim."""
    # -- MoE (num_experts null/0: every MLP sublayer is dense)
    num_experts: int | None = field(default=None, metadata=at_least(0))
    """Routed experts of each MoE layer; null or 0: a dense model. Megatron-LM: --num-experts."""
    moe_first_k_dense: int = field(default=0, metadata=at_least(0))
    """The first k transformer layers keep a dense MLP (built patterns only); this trainer's
    (Megatron-LM says it with --moe-layer-freq)."""
    moe_router_topk: int = 2
    """Experts each token is routed to, 1..num_experts (checked against num_experts).
    Megatron-LM: --moe-router-topk."""
    moe_ffn_hidden_size: int | None = field(default=None, metadata=at_least(1))
    """Inner width of each expert; null: ffn_hidden_size. Megatron-LM: --moe-ffn-hidden-size."""
    moe_shared_expert_intermediate_size: int | None = field(default=None, metadata=at_least(1))
    """Inner width of the shared expert(s); null: none. Megatron-LM:
    --moe-shared-expert-intermediate-size."""
    moe_router_score_function: str = field(
        default="softmax", metadata=one_of("softmax", "sigmoid", "sqrtsoftplus")
    )
    """Router scores: softmax | sigmoid | sqrtsoftplus (the megatron.core router's).
    Megatron-LM: --moe-router-score-function."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free load balancing with a per-expert bias (needs sigmoid or sqrtsoftplus scores).
    Megatron-LM: --moe-router-enable-expert-bias."""
    moe_router_bias_update_rate: float = field(default=1e-3, metadata=at_least(0))
    """Step size of the expert-bias update. Megatron-LM: --moe-router-bias-update-rate."""
    moe_router_topk_scaling_factor: float | None = field(default=None, metadata=above(0))
    """Scale of the top-k routing weights; null: no scaling. Megatron-LM:
    --moe-router-topk-scaling-factor."""
    moe_aux_loss_coeff: float = field(default=0.0, metadata=at_least(0))
    """Weight of the load-balancing auxiliary loss; 0: none. Megatron-LM: --moe-aux-loss-coeff."""
    moe_token_dispatcher_type: str = field(
        default="allgather", metadata=one_of("allgather", "alltoall", "flex")
    )
    """How tokens reach their experts: allgather | alltoall | flex (megatron.core MoELayer's).
    Megatron-LM: --moe-token-dispatcher-type."""
    moe_router_dtype: str | None = field(default=None, metadata=one_of(None, "fp32", "fp64"))
    """Precision of the router logits and weights: fp32 | fp64; null: the parameters' dtype.
    Megatron-LM: --moe-router-dtype."""
    # -- AttnRes (names of Megatron-LM PR #6840)
    enable_attention_residuals: bool = True
    """Attention Residuals: each sublayer's input is a learned softmax mix over earlier depth
    (false: the standard PreNorm residual stream). Megatron-LM PR #6840 name."""
    attn_res_mode: str = field(default="block", metadata=one_of("block", "full"))
    """block (Block AttnRes: reads mix the summaries of depth blocks of attn_res_block_layers
    layers) | full (every sublayer is its own depth block). Megatron-LM PR #6840 name."""
    attn_res_block_layers: int = field(default=1, metadata=at_least(1))
    """Transformer layers per depth block (block mode). Megatron-LM PR #6840 name."""
    attn_res_recompute_read: bool = True
    """Rebuild each depth read's result in backward instead of saving it (less memory).
    Megatron-LM PR #6840 name."""
    # -- parallelism
    tensor_model_parallel_size: int = field(default=1, metadata=at_least(1))
    """Tensor-parallel (TP) ranks. Megatron-LM: --tensor-model-parallel-size."""
    pipeline_model_parallel_size: int = field(default=1, metadata=at_least(1))
    """Pipeline stages (PP); cuts fall between whole depth blocks.
    Megatron-LM: --pipeline-model-parallel-size."""
    virtual_pipeline_model_parallel_size: int | None = field(default=None, metadata=at_least(1))
    """Virtual (interleaved) stages per pipeline rank; null: no interleaving. Megatron-LM's
    args.virtual_pipeline_model_parallel_size (there set by
    --num-virtual-stages-per-pipeline-rank)."""
    expert_model_parallel_size: int = field(default=1, metadata=at_least(1))
    """Expert-parallel (EP) ranks; under EP > 1 each expert is whole on its rank (expert TP 1).
    Megatron-LM: --expert-model-parallel-size."""
    sequence_parallel: bool = False
    """Split activations outside the TP regions along the sequence (needs TP > 1).
    Megatron-LM: --sequence-parallel."""
    use_distributed_optimizer: bool = False
    """Shard the optimizer state over data-parallel ranks (ZeRO-1).
    Megatron-LM: --use-distributed-optimizer."""
    # -- GPU implementation choices; null: what suits this host (config/host.py), resolved when
    #    the config is loaded, so the printed and saved config shows the choice
    transformer_impl: str | None = field(
        default=None, metadata=one_of(None, "local", "transformer_engine")
    )
    """Layer implementations: transformer_engine (TransformerEngine's fused modules, GPUs with TE)
    or local (megatron-core's own modules with SDPA attention, any device); null: TE where CUDA
    and TE are present. Megatron-LM: --transformer-impl."""
    moe_grouped_gemm: bool | None = None
    """Run a rank's experts as one grouped GEMM (TransformerEngine's) instead of one GEMM per
    expert; null: on with the TE spec. Megatron-LM: --moe-grouped-gemm."""
    overlap_grad_reduce: bool | None = None
    """Overlap the data-parallel gradient reduce with the backward pass; null: on with CUDA.
    Megatron-LM: --overlap-grad-reduce."""
    overlap_param_gather: bool | None = None
    """Overlap the distributed optimizer's parameter all-gather with the forward pass (needs
    use_distributed_optimizer); null: on with CUDA and the distributed optimizer.
    Megatron-LM: --overlap-param-gather."""
    batch_p2p_comm: bool | None = None
    """Batch the pipeline's p2p sends and receives into one call; null: on with CUDA (NCCL), off
    on gloo, where it is refused with interleaving (wrong gradients, no error).
    Megatron-LM: batch_p2p_comm (megatron-core's default True)."""
    # -- batch and schedule
    micro_batch_size: int = field(default=4, metadata=at_least(1))
    """Samples per micro-batch on each rank. Megatron-LM: --micro-batch-size."""
    global_batch_size: int = field(default=8, metadata=at_least(1))
    """Samples per optimizer step over all data-parallel ranks (a multiple of micro_batch_size x
    DP). Megatron-LM: --global-batch-size."""
    train_iters: int = field(default=100, metadata=at_least(1))
    """Optimizer steps of the run. Megatron-LM: --train-iters."""
    seed: int = field(default=1234, metadata=at_least(0))
    """Random seed (weight init, data order). Megatron-LM: --seed."""
    bf16: bool = False
    """bfloat16 parameters and compute (false: float32). Megatron-LM: --bf16."""
    # -- optimizer (Megatron-Core's): adam (AdamW: decoupled weight decay), sgd, muon
    optimizer: str = field(default="adam", metadata=one_of("adam", "sgd", "muon"))
    """adam (AdamW: decoupled weight decay) | sgd | muon (Megatron-Core's optimizers).
    Megatron-LM: --optimizer."""
    lr: float = field(default=3e-3, metadata=at_least(0))
    """Peak learning rate (after warmup). Megatron-LM: --lr."""
    min_lr: float = field(default=3e-4, metadata=at_least(0))
    """Learning rate the decay ends at (at most lr). Megatron-LM: --min-lr."""
    weight_decay: float = field(default=0.1, metadata=at_least(0))
    """Weight decay coefficient. Megatron-LM: --weight-decay."""
    adam_beta1: float = field(default=0.9, metadata=half_open(0, 1, "e.g. 0.9 or 0.95"))
    """Adam's first-moment decay, in [0, 1). Megatron-LM: --adam-beta1."""
    adam_beta2: float = field(default=0.95, metadata=half_open(0, 1, "e.g. 0.9 or 0.95"))
    """Adam's second-moment decay, in [0, 1). Megatron-LM: --adam-beta2."""
    adam_eps: float = field(default=1e-8, metadata=above(0))
    """Adam's denominator epsilon. Megatron-LM: --adam-eps."""
    sgd_momentum: float = field(default=0.9, metadata=at_least(0))
    """Momentum of sgd. Megatron-LM: --sgd-momentum."""
    muon_tp_mode: str = field(
        default="duplicated", metadata=one_of("duplicated", "distributed", "blockwise")
    )
    """How Muon orthogonalises a tensor-parallel matrix: duplicated (gather the whole matrix, the
    same update as one rank: this project's default), distributed (Newton-Schulz across the TP
    ranks, also the whole matrix) or blockwise (each TP shard on its own: cheaper, but the update
    depends on the TP size; megatron-core's default). Megatron-LM: --muon-tp-mode."""
    clip_grad: float = field(default=1.0, metadata=at_least(0))
    """Clip the global gradient L2 norm to this. Megatron-LM: --clip-grad."""
    lr_decay_style: str = field(
        default="WSD", metadata=one_of("constant", "linear", "cosine", "inverse-square-root", "WSD")
    )
    """Learning-rate decay after warmup: constant | linear | cosine | inverse-square-root | WSD
    (warmup-stable-decay). Megatron-LM: --lr-decay-style."""
    lr_warmup_iters: int = field(default=10, metadata=at_least(0))
    """Linear warmup steps (below lr_decay_iters). Megatron-LM: --lr-warmup-iters."""
    lr_decay_iters: int | None = field(default=None, metadata=at_least(1))
    """Steps the schedule decays over; default (null): train_iters.
    Megatron-LM: --lr-decay-iters."""
    lr_wsd_decay_iters: int | None = field(default=None, metadata=at_least(1))
    """WSD: length of the final decay; default (null): 20% of the run.
    Megatron-LM: --lr-wsd-decay-iters."""
    lr_wsd_decay_style: str = field(
        default="linear", metadata=one_of("linear", "cosine", "exponential", "minus_sqrt")
    )
    """WSD: shape of the final decay: linear | cosine | exponential | minus_sqrt.
    Megatron-LM: --lr-wsd-decay-style."""
    # -- data
    data_path: list[str] = field(default_factory=lambda: ["builtin"])
    """A Megatron blend (prefix, or "weight prefix weight prefix ...") or "builtin" (the built-in
    corpus, tokenized into the run directory); a string is split on whitespace.
    Megatron-LM: --data-path."""
    split: str = "95,5,0"
    """Train, validation, test weights of the documents (the train one positive).
    Megatron-LM: --split."""
    tokenizer_model: str | None = None
    """The sentencepiece .model the data was preprocessed with (required with a data_path other
    than "builtin"); built for "builtin". Megatron-LM: --tokenizer-model."""
    tokenizer_vocab_size: int = field(default=1024, metadata=at_least(1))
    """Vocabulary of the tokenizer trained for "builtin"; this trainer's."""
    data_cache_path: str | None = None
    """Where the dataset index caches go; default (null): <run_dir>/data_cache.
    Megatron-LM: --data-cache-path."""
    num_workers: int = field(default=0, metadata=at_least(0))
    """DataLoader worker processes (0: load in the main process). Megatron-LM: --num-workers."""
    # -- checkpoints, evaluation, logging
    run_dir: str = "runs/default"
    """Directory of the run: checkpoints, metrics.jsonl, plots, built-in data; this trainer's."""
    save: str | None = None
    """Checkpoint directory; default (null): <run_dir>/checkpoints. Megatron-LM: --save."""
    load: str | None = None
    """Resume from here (the latest checkpoint in it). Megatron-LM: --load."""
    save_interval: int | None = field(default=None, metadata=at_least(1))
    """Save every this many steps; null: only at the end (always also saved at the end).
    Megatron-LM: --save-interval."""
    eval_interval: int = field(default=25, metadata=at_least(1))
    """Validate every this many steps. Megatron-LM: --eval-interval."""
    eval_iters: int = field(default=2, metadata=at_least(0))
    """Validation batches per evaluation (0: no validation). Megatron-LM: --eval-iters."""
    log_interval: int = field(default=1, metadata=at_least(1))
    """Log the training metrics every this many steps. Megatron-LM: --log-interval."""
    diagnostics_interval: int = field(default=25, metadata=at_least(1))
    """Record the AttnRes depth diagnostics every this many steps; this trainer's."""
    wandb_project: str | None = None
    """Weights & Biases project; null: "megatron-attnres". Megatron-LM: --wandb-project."""
    wandb_exp_name: str | None = None
    """Weights & Biases run name. Megatron-LM: --wandb-exp-name."""
    wandb_mode: str = field(default="offline", metadata=one_of("offline", "online", "disabled"))
    """Weights & Biases mode: offline | online | disabled; this trainer's."""
    plots: bool = True
    """Write <run_dir>/plots at the end (attnres-plot); this trainer's."""
    peak_tflops: float | None = field(default=None, metadata=above(0))
    """Peak TFLOP/s per rank, for MFU (e.g. 989 for an H100 in bf16); null: no MFU reported;
    this trainer's."""
    exit_signal_handler: bool = True
    """On SIGTERM/SIGUSR1: save at the end of the step and exit.
    Megatron-LM: --exit-signal-handler."""
    exit_interval: int | None = field(default=None, metadata=at_least(1))
    """Save and exit once the step count is a multiple of this. Megatron-LM: --exit-interval."""
    exit_duration_in_mins: float | None = field(default=None, metadata=above(0))
    """Save and exit after this much wall-clock time (minutes).
    Megatron-LM: --exit-duration-in-mins."""
    # -- fault tolerance (checked by config/rules.py check_checkpoint_options and
    #    check_nan_policy; see README "Fault tolerance")
    keep_last_checkpoints: int | None = 3
    """Checkpoints kept (>= 1): older iter_* are removed after each save; null keeps all;
    this trainer's."""
    finetune: bool = False
    """Load only the model weights from `load` and start at step 0 with a fresh optimizer and
    schedule (needs load, and a save directory other than load). Megatron-LM: --finetune."""
    nan_policy: str = field(
        default="skip",
        metadata=one_of(
            "skip",
            "stop",
            fix="skip (drop the step's update, up to max_skipped_steps times) or stop (save the "
            "last good state and exit)",
        ),
    )
    """On a NaN/Inf loss or gradient: skip (drop the step's update) | stop (save the last good
    state and exit); this trainer's."""
    max_skipped_steps: int = 10
    """skip: the next non-finite step after this many (>= 0) stops the run (0: the first one
    does, like nan_policy=stop); this trainer's."""

    def __post_init__(self):
        if isinstance(self.data_path, str):
            self.data_path = self.data_path.split()
