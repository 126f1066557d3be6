"""The depth read of Attention Residuals (docs/architecture.md section 3, paper Eq. 2-6).

Legend for shape suffixes: N depth entries (sources), T tokens (any leading dims flattened),
H hidden.

For sources v_0..v_{N-1} (each [..., H]), pseudo-query w and key-norm gain g:

    k_i = RMSNorm_g(v_i),  s_i = w . k_i,  a = softmax_i(s),  out = sum_i a_i v_i

All arithmetic is float32 for float32 and half inputs (float64 stays float64, for gradcheck);
the result is cast back to the sources' dtype.

Two implementations (plus `depth_weights`, the reference's weights a_i, for diagnostics):
- `depth_read_reference`: stacks the sources and lets autograd do the rest. Readable; the oracle.
- `depth_read` (`LeanDepthRead`): never stacks, keeps only references to the sources plus three
  fp32 scalars per source and token (inverse rms r, unnormalised score t = v.q, weight alpha),
  and recomputes the rest in a hand-written backward:
      q = w * g,  r_j = rsqrt(mean(v_j^2) + eps),  s_j = r_j t_j,  alpha = softmax(s)
      u_j = G . v_j,  ds_j = alpha_j (u_j - sum_k alpha_k u_k)
      dv_j = alpha_j G + ds_j r_j q - ds_j t_j r_j^3 v_j / H
      dq = sum_{tokens, j} ds_j r_j v_j,  dw = dq * g,  dg = dq * w
"""

from collections.abc import Sequence
from functools import partial

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types and float32; float64 stays float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _check_sources(sources: Sequence[torch.Tensor], pseudo_query: torch.Tensor) -> None:
    if len(sources) == 0:
        raise ValueError("depth read needs at least one source tensor, got an empty list")
    first = sources[0]
    for i, src in enumerate(sources):
        if src.shape != first.shape or src.dtype != first.dtype or src.device != first.device:
            raise ValueError(
                f"depth read sources must share shape, dtype and device: source 0 is "
                f"{tuple(first.shape)} {first.dtype} {first.device}, source {i} is "
                f"{tuple(src.shape)} {src.dtype} {src.device}"
            )
    if pseudo_query.shape != (first.shape[-1],):
        raise ValueError(
            f"pseudo-query shape {tuple(pseudo_query.shape)} does not match the sources' hidden "
            f"size {first.shape[-1]}; it must be ({first.shape[-1]},)"
        )


def depth_read_reference(
    sources: Sequence[torch.Tensor],
    pseudo_query: torch.Tensor,
    key_norm_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Plain autograd depth read (the oracle). Saves O(N) full fp32 tensors for backward."""
    _check_sources(sources, pseudo_query)
    dtype = _compute_dtype(sources[0].dtype)
    values_NTH = torch.stack([src.to(dtype) for src in sources])
    alpha_NT = _softmax_weights(values_NTH, pseudo_query, key_norm_weight, eps)
    out_TH = (alpha_NT.unsqueeze(-1) * values_NTH).sum(dim=0)
    return out_TH.to(sources[0].dtype)


def depth_weights(
    sources: Sequence[torch.Tensor],
    pseudo_query: torch.Tensor,
    key_norm_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The depth read's softmax weights a_i, shape [N, *token_dims], in the compute dtype (fp32
    for fp32 and half inputs). The same computation as `depth_read_reference`, so
    sum_i a_i v_i is its result."""
    _check_sources(sources, pseudo_query)
    dtype = _compute_dtype(sources[0].dtype)
    values_NTH = torch.stack([src.to(dtype) for src in sources])
    return _softmax_weights(values_NTH, pseudo_query, key_norm_weight, eps)


def _softmax_weights(values_NTH, pseudo_query, key_norm_weight, eps) -> torch.Tensor:
    """a = softmax_i(w . RMSNorm_g(v_i)) over the depth axis (docs/architecture.md section 3);
    values are already in the compute dtype."""
    dtype = values_NTH.dtype
    inv_rms_NT1 = torch.rsqrt(values_NTH.pow(2).mean(dim=-1, keepdim=True) + eps)
    keys_NTH = values_NTH * inv_rms_NT1 * key_norm_weight.to(dtype)
    scores_NT = (keys_NTH * pseudo_query.to(dtype)).sum(dim=-1)
    return torch.softmax(scores_NT, dim=0)


class LeanDepthRead(torch.autograd.Function):
    """Memory-lean depth read: saves source references and per-token fp32 scalars only.

    Written for few, large ops (what a CPU or an unfused GPU path pays for): per source the
    forward makes two reductions (v.v and v.q) and one fused multiply-add into the result; the
    backward one reduction (v.G), one matrix-vector product (dq) and two fused multiply-adds (dv).
    `ctx.rebuild(sources)` recomputes the result from the saved weights alpha, bitwise (only the
    weighted sum; mcore/read_recompute.py uses it).
    """

    @staticmethod
    def forward(ctx, pseudo_query, key_norm_weight, eps, *sources):
        hidden, dtype = sources[0].shape[-1], _compute_dtype(sources[0].dtype)
        q_H = pseudo_query.to(dtype) * key_norm_weight.to(dtype)
        values = [src.reshape(-1, hidden).to(dtype) for src in sources]
        sumsq_NT = torch.stack([torch.linalg.vecdot(v_TH, v_TH) for v_TH in values])
        dots_NT = torch.stack([v_TH @ q_H for v_TH in values])
        inv_rms_NT = torch.rsqrt(sumsq_NT.div_(hidden).add_(eps))
        alpha_NT = torch.softmax(inv_rms_NT * dots_NT, dim=0)
        ctx.save_for_backward(
            pseudo_query, key_norm_weight, inv_rms_NT, dots_NT, alpha_NT, *sources
        )
        ctx.rebuild = partial(weighted_sum, alpha_NT)
        return _weighted_sum(alpha_NT, values, sources[0])

    @staticmethod
    def backward(ctx, grad_out):
        pseudo_query, key_norm_weight, inv_rms_NT, dots_NT, alpha_NT, *sources = ctx.saved_tensors
        hidden, dtype = sources[0].shape[-1], _compute_dtype(sources[0].dtype)
        w_H, g_H = pseudo_query.to(dtype), key_norm_weight.to(dtype)
        q_H = w_H * g_H
        grad_TH = grad_out.reshape(-1, hidden).to(dtype)
        values = [src.reshape(-1, hidden).to(dtype) for src in sources]

        u_NT = torch.stack([torch.linalg.vecdot(v_TH, grad_TH) for v_TH in values])
        dscore_NT = alpha_NT * (u_NT - (alpha_NT * u_NT).sum(dim=0, keepdim=True))
        coef_r_NT = dscore_NT * inv_rms_NT
        coef_v_NT = dscore_NT * dots_NT * inv_rms_NT.pow(3) / hidden
        alpha_NT1, coef_r_NT1, coef_v_NT1 = (
            c.unsqueeze(-1) for c in (alpha_NT, coef_r_NT, coef_v_NT)
        )

        grad_sources = []
        dq_H = torch.zeros_like(q_H)
        for j, (src, v_TH) in enumerate(zip(sources, values, strict=True)):
            dq_H.addmv_(v_TH.T, coef_r_NT[j])
            if ctx.needs_input_grad[3 + j]:
                # dv_j = alpha_j G + (ds_j r_j) q - (ds_j t_j r_j^3 / H) v_j
                dv_TH = torch.addcmul(coef_r_NT1[j] * q_H, alpha_NT1[j], grad_TH)
                dv_TH.addcmul_(coef_v_NT1[j], v_TH, value=-1.0)
                grad_sources.append(dv_TH.reshape(src.shape).to(src.dtype))
            else:
                grad_sources.append(None)
        grad_w = (dq_H * g_H).to(pseudo_query.dtype) if ctx.needs_input_grad[0] else None
        grad_g = (dq_H * w_H).to(key_norm_weight.dtype) if ctx.needs_input_grad[1] else None
        return (grad_w, grad_g, None, *grad_sources)


def _weighted_sum(alpha_NT, values, like):
    """sum_j alpha_j v_j over [T, H] values in the compute dtype, accumulated left to right (so
    that equal power-of-two weights give the plain mean bitwise), shaped and typed like `like`."""
    out_TH = values[0] * alpha_NT[0].unsqueeze(-1)
    for j in range(1, len(values)):
        out_TH.addcmul_(alpha_NT[j].unsqueeze(-1), values[j])
    return out_TH.reshape(like.shape).to(like.dtype)


def weighted_sum(alpha_NT: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """The depth read's result from its weights: bitwise what `LeanDepthRead.forward` returned
    for the same sources (the same ops in the same order)."""
    hidden, dtype = sources[0].shape[-1], _compute_dtype(sources[0].dtype)
    values = [src.reshape(-1, hidden).to(dtype) for src in sources]
    return _weighted_sum(alpha_NT, values, sources[0])


def depth_read(
    sources: Sequence[torch.Tensor],
    pseudo_query: torch.Tensor,
    key_norm_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Memory-lean depth read over `sources` (a list, never stacked). See the module docstring."""
    _check_sources(sources, pseudo_query)
    return LeanDepthRead.apply(pseudo_query, key_norm_weight, float(eps), *sources)
