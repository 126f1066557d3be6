"""Training diagnostics on a 1-rank Block-AttnRes MoE model, against oracles written here: depth
weights recomputed from the sources the reads saw, norms and gradients from a separate forward
with the test's own hooks, expert load from an independent top-k of the router's input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_attnres.attnres import tolerance
from megatron_attnres.attnres.module import DepthAttention
from megatron_attnres.attnres.reference import ReferenceConfig
from megatron_attnres.mcore.model import build_model
from megatron_attnres.testing.reference_mapping import megatron_config, reference_pattern
from megatron_attnres.train.diagnostics import (
    ModelDiagnostics,
    gather_diagnostics,
    merge_summaries,
)
from tests.reference_helpers import randomise_depth_and_norm_params

pytestmark = pytest.mark.mcore
TOL = tolerance(torch.float32)
VOCAB, SEQ, BATCH, MICROBATCHES = 64, 12, 2, 2
EXPERTS, TOPK, SUBLAYERS_PER_BLOCK = 4, 2, 4
CFG = ReferenceConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=48,
    first_k_dense=1,
    num_experts=EXPERTS,
    moe_router_topk=TOPK,
    moe_ffn_hidden_size=24,
    moe_shared_expert_intermediate_size=16,
    moe_router_score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    moe_aux_loss_coeff=0.01,
    residual_mode="block",
    layers_per_block=2,
)
MOE_LAYERS = ["4", "6", "8"]  # pattern *-*E*E*E


def tiny_model(randomise: bool = True):
    model = build_model(megatron_config(CFG), reference_pattern(CFG), VOCAB, SEQ)
    if randomise:
        randomise_depth_and_norm_params(model)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("expert_bias"):
                    buffer.normal_(0.0, 0.5)  # large enough to change the top-k choice
    return model


def microbatches():
    return [torch.randint(0, VOCAB, (2, BATCH, SEQ)) for _ in range(MICROBATCHES)]


def forward_loss(model, batch):
    tokens, labels = batch
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    logits = model(tokens, positions, None)
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1)) / MICROBATCHES


def captured_step(model, batches):
    diagnostics = ModelDiagnostics([model])
    with diagnostics.capture():
        for batch in batches:
            forward_loss(model, batch).backward()
    return diagnostics


class Recorder:
    """The test's own hooks: read sources and outputs, layer outputs, router inputs."""

    def __init__(self, model):
        self.sources, self.reads, self.outputs, self.router_inputs = {}, {}, {}, {}
        stack = model.decoder
        keyed_reads = [
            (str(layer.layer_number), read)
            for layer, read in zip(stack.layers, stack.depth_reads, strict=True)
        ]
        self.handles = []
        for key, read in [*keyed_reads, ("output", stack.output_read)]:
            self.handles.append(read.register_forward_hook(self._save_read(key)))
        for layer in stack.layers:
            key = str(layer.layer_number)
            self.handles.append(layer.register_forward_hook(self._save(self.outputs, key)))
            if hasattr(layer.mlp, "router"):
                hook = self._save(self.router_inputs, key, arg=True)
                self.handles.append(layer.mlp.router.register_forward_hook(hook))

    def _save_read(self, key):
        def hook(module, args, output):
            self.sources.setdefault(key, []).append([s.detach() for s in args[0]])
            self.reads.setdefault(key, []).append(output.detach())

        return hook

    def _save(self, store, key, arg=False):
        def hook(module, args, output):
            value = args[0] if arg else (output[0] if isinstance(output, tuple) else output)
            store.setdefault(key, []).append(value)

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def oracle_weights(sources, read: DepthAttention) -> torch.Tensor:
    """docs/architecture.md section 3 in float64: a = softmax_i(w . RMSNorm_g(v_i)); shape
    [N, tokens]."""
    values = torch.stack([s.double().reshape(-1, s.shape[-1]) for s in sources])
    keys = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + read.eps)
    scores = keys * read.key_norm_weight.double() @ read.pseudo_query.double()
    return torch.softmax(scores, dim=0)


def expected_layout(key: str) -> tuple[int, bool]:
    """(completed summaries, has partial) of each read, from docs/architecture.md section 3 with
    S = 4."""
    if key == "output":
        return 2, True  # b_0, b_1 and the last block
    n = int(key)
    return (n - 1) // SUBLAYERS_PER_BLOCK + 1, (n - 1) % SUBLAYERS_PER_BLOCK != 0


def rms(tensors) -> float:
    squares = sum(t.detach().double().pow(2).sum().item() for t in tensors)
    return math.sqrt(squares / sum(t.numel() for t in tensors))


def read_of(model, key: str) -> DepthAttention:
    stack = model.decoder
    return stack.output_read if key == "output" else stack.depth_reads[int(key) - 1]


def weights_list(row: dict) -> list[float]:
    return [*row["completed"], *([] if row["partial"] is None else [row["partial"]])]


def test_depth_attention_matches_weights_recomputed_from_the_sources():
    model, batches = tiny_model(), microbatches()
    recorder = Recorder(model)
    summary = captured_step(model, batches).summary()
    recorder.remove()
    json.dumps(summary)  # JSON-serialisable
    depth = summary["depth_attention"]
    assert list(depth) == [str(n) for n in range(1, 9)] + ["output"]
    assert depth["1"] == {"completed": [1.0], "partial": None}
    for key, row in list(depth.items())[1:]:
        completed, has_partial = expected_layout(key)
        assert len(row["completed"]) == completed and (row["partial"] is not None) == has_partial
        seen, outputs = recorder.sources[key], recorder.reads[key]
        weights = [oracle_weights(s, read_of(model, key)) for s in seen]
        for sources, weights_NT, out in zip(seen, weights, outputs, strict=True):
            # The saved sources are the ones the read mixed: sum_i a_i v_i is its output.
            terms = [
                a.reshape(v.shape[:-1]).unsqueeze(-1) * v.double()
                for a, v in zip(weights_NT, sources, strict=True)
            ]
            TOL.assert_close(out.double(), sum(terms), msg=key)
        expected = torch.cat(weights, dim=1).mean(dim=1)
        got = torch.tensor(weights_list(row))
        TOL.assert_close(got, expected.float(), msg=key)
        assert math.isclose(got.sum().item(), 1.0, rel_tol=1e-6)
        assert (expected - 1 / len(expected)).abs().max() > 1e-3, key  # not trivially uniform


def test_zero_pseudo_queries_give_uniform_rows():
    model = tiny_model(randomise=False)
    summary = captured_step(model, microbatches()[:1]).summary()
    for key, row in summary["depth_attention"].items():
        weights = torch.tensor(weights_list(row))
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / len(weights)), msg=key)


def test_output_and_gradient_rms_match_a_separate_forward():
    model, batches = tiny_model(), microbatches()
    summary = captured_step(model, batches).summary()
    keys = [str(n) for n in range(1, 9)]
    assert list(summary["output_norm"]) == keys and list(summary["grad_norm"]) == keys

    recorder = Recorder(model)
    grads = {key: [] for key in keys}
    for batch in batches:
        loss = forward_loss(model, batch)
        outputs = [recorder.outputs[key][-1] for key in keys]
        for key, grad in zip(keys, torch.autograd.grad(loss, outputs), strict=True):
            grads[key].append(grad)
    recorder.remove()
    for key in keys:
        assert math.isclose(summary["output_norm"][key], rms(recorder.outputs[key]), rel_tol=1e-5)
        assert summary["grad_norm"][key] > 0, key
        assert math.isclose(summary["grad_norm"][key], rms(grads[key]), rel_tol=1e-5), key


def test_moe_load_entropy_and_bias_match_an_independent_top_k():
    model, batches = tiny_model(), microbatches()
    recorder = Recorder(model)
    moe = captured_step(model, batches).summary()["moe"]
    recorder.remove()
    assert list(moe) == MOE_LAYERS
    for key in MOE_LAYERS:
        router = model.decoder.layers[int(key) - 1].mlp.router
        hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h in recorder.router_inputs[key]])
        scores = torch.sigmoid(hidden.double() @ router.weight.double().T)
        # Sigmoid router with expert bias: the bias only selects (docs/architecture.md
        # section 3b).
        chosen = torch.topk(scores + router.expert_bias.double(), TOPK, dim=-1).indices
        counts = torch.bincount(chosen.reshape(-1), minlength=EXPERTS).double()
        assert math.isclose(sum(moe[key]["expert_load"]), 1.0, rel_tol=1e-9)
        TOL.assert_close(torch.tensor(moe[key]["expert_load"]), (counts / counts.sum()).float())
        p = scores / scores.sum(-1, keepdim=True)
        entropy = -(p * p.log()).sum(-1).mean().item()
        assert math.isclose(moe[key]["router_entropy"], entropy, rel_tol=1e-5), key
        bias_abs_mean = router.expert_bias.abs().mean().item()
        assert math.isclose(moe[key]["expert_bias_abs_mean"], bias_abs_mean, rel_tol=1e-6)
        assert bias_abs_mean > 0


def test_uniform_router_has_entropy_log_num_experts():
    model = tiny_model()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.zero_()
    moe = captured_step(model, microbatches()[:1]).summary()["moe"]
    for key in MOE_LAYERS:
        assert math.isclose(moe[key]["router_entropy"], math.log(EXPERTS), rel_tol=1e-6)


class FakeDDP(nn.Module):
    """Stands in for Megatron's DDP / Float16Module wrappers: the model sits in `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def hook_counts(model) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_hooks_exist_only_inside_capture_and_wrappers_are_unwrapped():
    model, batches = tiny_model(), microbatches()
    before = hook_counts(model)
    diagnostics = ModelDiagnostics([FakeDDP(FakeDDP(model))])
    assert hook_counts(model) == before  # constructing registers nothing
    with diagnostics.capture():
        assert sum(hook_counts(model)) > sum(before)
        forward_loss(model, batches[0]).backward()
    assert hook_counts(model) == before
    summary = diagnostics.summary()
    assert set(summary["output_norm"]) == {str(n) for n in range(1, 9)}
    forward_loss(model, batches[1]).backward()  # after exit: nothing is recorded
    assert diagnostics.summary() == summary


def test_gather_and_merge():
    summary = captured_step(tiny_model(), microbatches()[:1]).summary()
    assert gather_diagnostics(summary) == summary  # one gloo rank: rank 0 gets the merge
    # Two pipeline stages with a tensor-parallel replica of the first: one entry per sublayer.
    stage0 = {
        "depth_attention": {"1": {"completed": [1.0], "partial": None}},
        "output_norm": {"1": 1.0, "2": 2.0},
        "grad_norm": {},
        "moe": {},
    }
    replica = {**stage0, "output_norm": {"1": 9.0, "2": 9.0}}
    stage1 = {
        "depth_attention": {"output": {"completed": [0.5], "partial": 0.5}},
        "output_norm": {"10": 3.0, "3": 4.0},
        "grad_norm": {"3": 0.1},
        "moe": {},
    }
    merged = merge_summaries([stage1, stage0, replica])
    assert merged["output_norm"] == {"1": 1.0, "2": 2.0, "3": 4.0, "10": 3.0}
    assert list(merged["output_norm"]) == ["1", "2", "3", "10"]
    assert list(merged["depth_attention"]) == ["1", "output"]
    assert merged["grad_norm"] == {"3": 0.1} and merged["moe"] == {}
