"""Megatron-Core's optimizer and learning-rate schedule for a run."""

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_attnres.config.run import RunConfig
from megatron_attnres.train.engine import make_optimizer


def optimizer_and_scheduler(run: RunConfig, chunks):
    """Megatron-Core's optimizer and OptimizerParamScheduler (steps counted in samples, as in
    Megatron-LM). Weight decay applies to matrices only: Megatron's default grouping exempts
    biases and 1-D parameters (norm gains, AttnRes pseudo-queries and key-norm gains)."""
    options = dict(
        optimizer=run.optimizer,
        lr=run.lr,
        min_lr=run.min_lr,
        weight_decay=run.weight_decay,
        clip_grad=run.clip_grad,
        bf16=run.bf16,
        use_distributed_optimizer=run.use_distributed_optimizer,
    )
    if run.optimizer in ("adam", "muon"):
        options.update(adam_beta1=run.adam_beta1, adam_beta2=run.adam_beta2, adam_eps=run.adam_eps)
    if run.optimizer == "muon":
        options.update(muon_tp_mode=run.muon_tp_mode)
    if run.optimizer == "sgd":
        options.update(sgd_momentum=run.sgd_momentum)
    optimizer = make_optimizer(chunks, **options)
    gbs = run.global_batch_size
    decay_iters = run.lr_decay_iters or run.train_iters
    wsd_iters = run.lr_wsd_decay_iters or max(1, round(0.2 * decay_iters))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=run.lr,
        min_lr=run.min_lr,
        lr_warmup_steps=run.lr_warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style=run.lr_decay_style,
        start_wd=run.weight_decay,
        end_wd=run.weight_decay,
        wd_incr_steps=run.train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_iters * gbs,
        lr_wsd_decay_style=run.lr_wsd_decay_style,
    )
    return optimizer, scheduler
