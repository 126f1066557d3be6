"""`attnres-train --dry-run`: the rank layout of a run, computed without starting anything.

For a world of N ranks it lists every rank's host, local rank and its tensor / pipeline / data /
expert parallel coordinates (Megatron's own RankGenerator with initialize_model_parallel's
default order "tp-cp-ep-dp-pp", so the table is what the real run builds), and every pipeline
chunk's sublayers, transformer layers and depth blocks. It checks that TP x PP x DP = N, that
every sublayer is assigned exactly once and that pipeline cuts fall on depth-block boundaries.
No process group is created (no NCCL, no GPU needed).
"""

from megatron.core.parallel_state import RankGenerator

from megatron_attnres.config.megatron import (
    expert_tensor_parallel_size,
    layer_pattern,
    transformer_config,
)
from megatron_attnres.config.run import RunConfig
from megatron_attnres.mcore.model import pipeline_pattern
from megatron_attnres.mcore.pipeline import chunk_first_layers

ORDER = "tp-cp-ep-dp-pp"  # megatron.core.parallel_state.initialize_model_parallel's default


def _sizes(run: RunConfig, world_size: int) -> dict[str, int]:
    tp, pp, ep = (
        run.tensor_model_parallel_size,
        run.pipeline_model_parallel_size,
        run.expert_model_parallel_size,
    )
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor x pipeline parallel = {tp} x "
            f"{pp}; use a multiple of {tp * pp} ranks or change the plan"
        )
    etp = expert_tensor_parallel_size(run)
    if world_size % (etp * ep * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by expert-tensor x expert x pipeline "
            f"parallel = {etp} x {ep} x {pp}; use a multiple of {etp * ep * pp} ranks"
        )
    return dict(
        tp=tp, pp=pp, dp=world_size // (tp * pp), ep=ep, etp=etp, edp=world_size // (etp * ep * pp)
    )


def _coordinates(generator: RankGenerator, token: str) -> dict[int, tuple[int, int]]:
    """rank -> (index of its `token` group, position inside that group)."""
    out = {}
    for group_index, ranks in enumerate(generator.get_ranks(token)):
        for position, rank in enumerate(ranks):
            out[rank] = (group_index, position)
    return out


def _chunks(run: RunConfig) -> tuple[str, list[dict]]:
    config = transformer_config(run)
    pattern = pipeline_pattern(config, layer_pattern(run))
    schedule, P = config.depth_block_schedule(), run.pipeline_model_parallel_size
    chunks = []
    for chunk, (first, segment) in enumerate(
        zip(chunk_first_layers(pattern), pattern.split("|"), strict=True)
    ):
        last = first + len(segment) - 1
        chunks.append(
            dict(
                chunk=chunk,
                pp_rank=chunk % P,
                vstage=chunk // P,
                sublayers=[first, last],
                transformer_layers=[(first + 1) // 2, (last + 1) // 2],
                depth_blocks=[schedule.block_index(first), schedule.block_index(last)],
                starts_depth_block=schedule.starts_block(first),
            )
        )
    return pattern, chunks


def dry_run_layout(run: RunConfig, world_size: int, gpus_per_node: int) -> dict:
    sizes = _sizes(run, world_size)
    dense = RankGenerator(tp=sizes["tp"], ep=1, dp=sizes["dp"], pp=sizes["pp"], cp=1, order=ORDER)
    expert = RankGenerator(
        tp=sizes["etp"], ep=sizes["ep"], dp=sizes["edp"], pp=sizes["pp"], cp=1, order=ORDER
    )
    tp, pp, dp = (_coordinates(dense, t) for t in ("tp", "pp", "dp"))
    ep = _coordinates(expert, "ep")
    pattern, chunks = _chunks(run)
    ranks = []
    for rank in range(world_size):
        ranks.append(
            dict(
                rank=rank,
                host=rank // gpus_per_node,
                local_rank=rank % gpus_per_node,
                tp=tp[rank][1],
                pp=pp[rank][1],
                dp=dp[rank][1],
                ep=ep[rank][1],
                chunks=[c["chunk"] for c in chunks if c["pp_rank"] == pp[rank][1]],
            )
        )
    covered = sorted(i for c in chunks for i in range(c["sublayers"][0], c["sublayers"][1] + 1))
    num_sublayers = len(pattern.replace("|", ""))
    checks = dict(
        product_matches_world=sizes["tp"] * sizes["pp"] * sizes["dp"] == world_size,
        every_sublayer_once=covered == list(range(1, num_sublayers + 1)),
        cuts_on_depth_block_boundaries=all(c["starts_depth_block"] for c in chunks),
    )
    return dict(
        world_size=world_size,
        gpus_per_node=gpus_per_node,
        **sizes,
        vp=run.virtual_pipeline_model_parallel_size or 1,
        pattern=pattern,
        chunks=chunks,
        ranks=ranks,
        checks=checks,
    )


def format_layout(layout: dict) -> str:
    head = (
        f"world {layout['world_size']} = TP {layout['tp']} x PP {layout['pp']} x DP "
        f"{layout['dp']} (experts: EP {layout['ep']} x expert-DP {layout['edp']}), "
        f"virtual stages {layout['vp']}"
    )
    lines = [
        head,
        f"pattern {layout['pattern']}",
        "",
        "chunk  pp  vstage  sublayers    layers     depth blocks",
    ]
    for c in layout["chunks"]:
        lines.append(
            f"{c['chunk']:5d}  {c['pp_rank']:2d}  {c['vstage']:6d}  "
            f"{c['sublayers'][0]:4d}-{c['sublayers'][1]:<6d} "
            f"{c['transformer_layers'][0]:3d}-{c['transformer_layers'][1]:<6d} "
            f"{c['depth_blocks'][0]:3d}-{c['depth_blocks'][1]}"
        )
    lines += ["", " rank  host  local   tp   pp   dp   ep  chunks"]
    for r in layout["ranks"]:
        lines.append(
            f"{r['rank']:5d}  {r['host']:4d}  {r['local_rank']:5d}  {r['tp']:3d}  "
            f"{r['pp']:3d}  {r['dp']:3d}  {r['ep']:3d}  {r['chunks']}"
        )
    lines += ["", "checks: " + ", ".join(f"{k}={v}" for k, v in layout["checks"].items())]
    return "\n".join(lines)
