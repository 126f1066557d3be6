"""Eager reference decoder: the executable spec of docs/architecture.md section 3b, in pure torch.

Modes: none (PreNorm residual), full and block AttnRes. Tensors are [batch, seq, hidden].

Weight layout (what a Megatron <-> reference mapping must translate):
  embedding.weight [V, h]; output_layer.weight [V, h] (absent when tied); final_norm.weight [h]
  sublayers.{j}.norm.weight [h]                       pre-norm of sublayer j (0-based)
  sublayers.{j}.fn.{wq [nh*d, h], wk [ng*d, h], wv [ng*d, h], wo [h, nh*d]}   attention
  sublayers.{j}.fn.{gate [f, h], up [f, h], down [h, f]}                      dense SwiGLU MLP
  sublayers.{j}.fn.router.weight [E, h]; buffer sublayers.{j}.fn.expert_bias [E]
  sublayers.{j}.fn.experts.{e}.{gate, up, down}; sublayers.{j}.fn.shared_expert.{gate, up, down}
  depth_reads.{j}.{pseudo_query, key_norm_weight} [h]; output_read.{pseudo_query, key_norm_weight}
Sublayer 2i is layer i's attention, 2i+1 its MLP/MoE (Megatron layer_number = j + 1). Megatron
fuses q/k/v per query group in linear_qkv and stacks [gate; up] in linear_fc1.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_attnres.attnres.module import DepthAttention
from megatron_attnres.attnres.schedule import DepthBlockSchedule, ResidualMode


@dataclass
class ReferenceConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 4  # transformer layers; each is an attention and an MLP/MoE sublayer
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # KV heads for grouped-query attention; None = MHA
    position_embedding_type: str = "rope"  # "rope" (rotate-half) or "none"
    rotary_base: float = 10000.0
    ffn_hidden_size: int = 128  # dense SwiGLU MLP width
    first_k_dense: int = 0  # leading layers with a dense MLP instead of MoE
    num_experts: int = 4  # 0 = no MoE, every MLP is dense
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int = 64
    moe_shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    moe_router_score_function: str = "softmax"  # or "sigmoid"
    moe_router_pre_softmax: bool = False  # softmax over all experts, chosen scores not renormed
    moe_router_enable_expert_bias: bool = False  # selection-only bias (sigmoid router)
    moe_router_topk_scaling_factor: float | None = None
    moe_aux_loss_coeff: float = 0.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    residual_mode: str = "block"
    layers_per_block: int = 2
    init_std: float = 0.02

    def __post_init__(self):
        groups = self.num_query_groups or self.num_attention_heads
        checks = [
            (self.hidden_size % self.num_attention_heads == 0, "hidden_size % num_attention_heads"),
            (self.num_attention_heads % groups == 0, "num_attention_heads % num_query_groups"),
            (
                self.num_experts == 0 or 1 <= self.moe_router_topk <= self.num_experts,
                "moe_router_topk in 1..num_experts",
            ),
            (
                not self.moe_router_enable_expert_bias
                or self.moe_router_score_function == "sigmoid",
                "expert bias needs moe_router_score_function='sigmoid'",
            ),
        ]
        for ok, rule in checks:
            if not ok:
                raise ValueError(f"invalid ReferenceConfig: {rule} does not hold for {self}")
        self.schedule()  # validates residual_mode and layers_per_block

    def schedule(self) -> DepthBlockSchedule:
        k = self.layers_per_block if self.residual_mode == ResidualMode.BLOCK else None
        return DepthBlockSchedule.from_layers(self.num_layers, self.residual_mode, k)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, base: float):
    """Rotate-half RoPE over the whole head dim. x: [b, s, heads, d]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    freqs = torch.outer(torch.arange(x.shape[1], dtype=torch.float32, device=x.device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = cfg.num_attention_heads
        self.groups = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        h, d = cfg.hidden_size, self.head_dim
        self.wq = nn.Linear(h, self.heads * d, bias=False)
        self.wk = nn.Linear(h, self.groups * d, bias=False)
        self.wv = nn.Linear(h, self.groups * d, bias=False)
        self.wo = nn.Linear(self.heads * d, h, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.heads, self.head_dim)
        k = self.wk(x).view(b, s, self.groups, self.head_dim)
        v = self.wv(x).view(b, s, self.groups, self.head_dim)
        if self.cfg.position_embedding_type == "rope":
            q, k = apply_rope(q, self.cfg.rotary_base), apply_rope(k, self.cfg.rotary_base)
        rep = self.heads // self.groups  # query heads per KV head
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Dropless top-k MoE routed like Megatron-Core's TopKRouter (score, bias, renorm, scale)."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts))
        self.experts = nn.ModuleList(
            SwiGLU(cfg.hidden_size, cfg.moe_ffn_hidden_size) for _ in range(cfg.num_experts)
        )
        shared = cfg.moe_shared_expert_intermediate_size
        self.shared_expert = SwiGLU(cfg.hidden_size, shared) if shared else None

    def route(self, logits):
        """Top-k expert indices and their weights [T, k] from fp32 router logits [T, E]."""
        cfg, k = self.cfg, self.cfg.moe_router_topk
        if cfg.moe_router_score_function == "softmax":
            if cfg.moe_router_pre_softmax:
                weights, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)
            else:
                top_logits, idx = logits.topk(k, dim=-1)
                weights = torch.softmax(top_logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            select = scores + self.expert_bias if cfg.moe_router_enable_expert_bias else scores
            idx = select.topk(k, dim=-1).indices  # the bias only selects, it never weights
            weights = scores.gather(1, idx)
            if k > 1:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.moe_router_topk_scaling_factor:
            weights = weights * cfg.moe_router_topk_scaling_factor
        return idx, weights

    def aux_loss(self, logits):
        """Switch load-balancing loss: E * coeff / (k T^2) * sum_e (sum_t p_te) * count_e."""
        cfg, k, T = self.cfg, self.cfg.moe_router_topk, logits.shape[0]
        if cfg.moe_router_score_function == "softmax":
            probs = torch.softmax(logits, dim=-1)
        else:
            probs = torch.sigmoid(logits)
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        counts = torch.bincount(probs.topk(k, dim=-1).indices.flatten(), minlength=probs.shape[1])
        scale = cfg.num_experts * cfg.moe_aux_loss_coeff / (k * T * T)
        return (probs.sum(dim=0) * counts).sum() * scale

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = x.float() @ self.router.weight.float().T
        idx, weights = self.route(logits)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                y = expert(x[token]) * weights[token, slot].unsqueeze(-1).to(x.dtype)
                out = out.index_add(0, token, y)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        aux = x.new_zeros(())
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(idx.flatten(), minlength=len(self.experts))
            if self.cfg.moe_aux_loss_coeff > 0:
                aux = self.aux_loss(logits)
        return out.reshape(shape), aux

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        """Aux-loss-free balancing: push under-loaded experts up, over-loaded down, by `rate`."""
        offset = self.tokens_per_expert.mean() - self.tokens_per_expert
        self.expert_bias += torch.sign(offset) * rate
        self.tokens_per_expert.zero_()


class Sublayer(nn.Module):
    """y = f(pre_norm(x)): one attention or MLP/MoE; returns (raw output, aux loss)."""

    def __init__(self, cfg: ReferenceConfig, fn: nn.Module):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.fn = fn

    def forward(self, x):
        y = self.fn(self.norm(x))
        return y if isinstance(y, tuple) else (y, x.new_zeros(()))


class ReferenceModel(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.schedule = cfg.schedule()
        h = cfg.hidden_size
        self.embedding = nn.Embedding(cfg.vocab_size, h)
        sublayers = []
        for layer in range(cfg.num_layers):
            dense = cfg.num_experts == 0 or layer < cfg.first_k_dense
            mlp = SwiGLU(h, cfg.ffn_hidden_size) if dense else MoE(cfg)
            sublayers += [Sublayer(cfg, Attention(cfg)), Sublayer(cfg, mlp)]
        self.sublayers = nn.ModuleList(sublayers)
        if self.schedule.uses_depth_reads:
            self.depth_reads = nn.ModuleList(DepthAttention(h, cfg.norm_eps) for _ in sublayers)
            self.output_read = DepthAttention(h, cfg.norm_eps)
        self.final_norm = RMSNorm(h, cfg.norm_eps)
        self.output_layer = None if cfg.tie_embeddings else nn.Linear(h, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.init_std)

    def forward(self, tokens):
        """tokens [b, s] -> (logits [b, s, V], summed MoE aux loss)."""
        embedded = self.embedding(tokens)
        aux_total = embedded.new_zeros(())
        if not self.schedule.uses_depth_reads:
            x = embedded
            for sublayer in self.sublayers:
                y, aux = sublayer(x)
                x, aux_total = x + y, aux_total + aux
            out = x
        else:
            completed, partial = [embedded], None  # summaries b_0..b_m, partial summary
            for number, sublayer in enumerate(self.sublayers, start=1):
                if self.schedule.starts_block(number) and partial is not None:
                    completed, partial = completed + [partial], None
                sources = completed if partial is None else completed + [partial]
                y, aux = sublayer(self.depth_reads[number - 1](sources))
                partial = y if partial is None else partial + y
                aux_total = aux_total + aux
            out = self.output_read(completed + [partial])
        head = self.embedding.weight if self.output_layer is None else self.output_layer.weight
        return self.final_norm(out) @ head.T, aux_total

    def loss(self, tokens, labels):
        """Mean next-token cross-entropy plus the MoE aux loss; returns (total, cross-entropy)."""
        logits, aux = self(tokens)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return ce + aux, ce

    def update_expert_bias(self, rate: float) -> None:
        for module in self.modules():
            if isinstance(module, MoE) and self.cfg.moe_router_enable_expert_bias:
                module.update_expert_bias(rate)
