"""Train the eager reference model on the built-in corpus (the interim default job).

    attnres-train-reference                          # Block AttnRes, 100 steps, about a minute
    attnres-train-reference --mode none --steps 300  # the standard residual for comparison

Prints a progress line every `--log-interval` steps, appends one JSON line per step to
OUTPUT/metrics.jsonl (flushed as it goes, so a crash loses nothing already logged) and saves the
final weights to OUTPUT/model.safetensors. The Megatron-Core trainer replaces this job as the
default once it exists; this one stays as a quick check of the math.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_attnres.attnres.reference import ReferenceConfig, ReferenceModel
from megatron_attnres.attnres.schedule import ResidualMode
from megatron_attnres.data import ByteTokenizer, builtin_corpus_tokens


def tiny_config(mode: str) -> ReferenceConfig:
    """The default tiny MoE: sigmoid router with expert bias, shared expert, dense first layer."""
    return ReferenceConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        first_k_dense=1,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        moe_shared_expert_intermediate_size=64,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        residual_mode=mode,
        layers_per_block=2,
    )


def batches(tokens: torch.Tensor, seq_length: int, batch_size: int, seed: int):
    """Endless deterministic stream of (inputs, labels) windows drawn from `tokens`."""
    generator = torch.Generator().manual_seed(seed)
    if tokens.numel() <= seq_length + 1:
        raise ValueError(
            f"the corpus has {tokens.numel()} tokens, fewer than seq_length + 1 = "
            f"{seq_length + 1}; use a shorter --seq-length"
        )
    while True:
        starts = torch.randint(
            0, tokens.numel() - seq_length - 1, (batch_size,), generator=generator
        )
        window = torch.stack([tokens[s : s + seq_length + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def train(
    cfg: ReferenceConfig,
    steps: int,
    seq_length: int = 64,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 1234,
    expert_bias_update_rate: float = 1e-3,
    log=None,
):
    """Train from scratch; returns (model, per-step cross-entropy losses)."""
    torch.manual_seed(seed)
    model = ReferenceModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    tokens = torch.from_numpy(builtin_corpus_tokens().astype("int64"))
    data = batches(tokens, seq_length, batch_size, seed)
    losses = []
    for step in range(1, steps + 1):
        inputs, labels = next(data)
        total, ce = model.loss(inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.update_expert_bias(expert_bias_update_rate)
        losses.append(ce.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss became {losses[-1]} at step {step}; lower --lr")
        if log is not None:
            log(step, losses[-1], grad_norm.item())
    return model, losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="block", choices=[m.value for m in ResidualMode])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("runs/reference"))
    args = parser.parse_args(argv)
    for name in ("steps", "seq_length", "micro_batch_size", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    cfg = tiny_config(args.mode)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    print(f"reference model, mode={args.mode}: {json.dumps(asdict(cfg))}")
    metrics = (args.output / "metrics.jsonl").open("w")
    tokens_per_step = args.seq_length * args.micro_batch_size
    start = time.perf_counter()

    def log(step, loss, grad_norm):
        elapsed = time.perf_counter() - start
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "elapsed_s": elapsed}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if step % args.log_interval == 0 or step == args.steps:
            eta = elapsed / step * (args.steps - step)
            print(
                f"step {step:>5}/{args.steps}  loss {loss:.4f}  grad_norm {grad_norm:.3f}  "
                f"tokens/s {step * tokens_per_step / elapsed:,.0f}  eta {eta:.0f}s",
                flush=True,
            )

    model, losses = train(
        cfg, args.steps, args.seq_length, args.micro_batch_size, args.lr, args.seed, log=log
    )
    metrics.close()
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(args.output / "model.safetensors"),
    )
    head, tail = losses[: min(10, len(losses))], losses[-min(10, len(losses)) :]
    print(
        f"done: mean loss of the first {len(head)} steps {sum(head) / len(head):.4f}, "
        f"last {len(tail)} steps {sum(tail) / len(tail):.4f}; outputs in {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
