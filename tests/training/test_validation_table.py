"""Bad configs and bad data are refused before any heavy work, each with a message that names the
value, the constraint and the fix (issue 9, part 4).

Config cases go through `load_run_config` (what `attnres-train` runs before it starts anything);
data cases through `check_data` / `load_tokenizer` (what the trainer runs on every rank before it
builds the model) on damaged copies of the built-in corpus, preprocessed by the project's own
tools. The oracle of every case is the constraint itself, written out in the table.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_attnres.config.load import load_run_config, parse_overrides
from megatron_attnres.data.datasets import check_data
from megatron_attnres.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "true"]
KDA = ["--hybrid-layer-pattern", "G-GEGEGE"]  # tiny.yaml's 4 layers with KDA mixers

# id, overrides of configs/tiny.yaml (argv as typed, or a dict of values as a script passes them),
# then three substrings of the message: the value, the constraint, the fix.
CONFIG_CASES = [
    ("wrong-type-cli", ["--train-iters", "ten"], "'ten'", "is not a int", "train_iters: 100"),
    (
        "wrong-type-value",
        {"hidden_size": "64"},
        "hidden_size='64'",
        "is a str, not a int",
        "give a int",
    ),
    ("non-positive-size", ["--hidden-size", "0"], "hidden_size=0", "must be >= 1", "use 1 or more"),
    (
        "non-positive-optional",
        ["--num-query-groups", "0"],
        "num_query_groups=0",
        "must be >= 1",
        "or null for the default",
    ),
    ("negative-count", ["--eval-iters", "-1"], "eval_iters=-1", "must be >= 0", "use 0 or more"),
    ("negative-lr", ["--lr", "-0.1"], "lr=-0.1", "must be >= 0", "use 0 or more"),
    ("zero-epsilon", ["--norm-epsilon", "0"], "norm_epsilon=0.0", "must be > 0", "positive"),
    (
        "save-interval-zero",
        ["--save-interval", "0"],
        "save_interval=0",
        "must be >= 1",
        "or null for the default",
    ),
    ("adam-beta", ["--adam-beta2", "1.0"], "adam_beta2=1.0", "must be in [0, 1)", "use e.g."),
    (
        "attn-res-mode",
        ["--attn-res-mode", "blocks"],
        "attn_res_mode='blocks'",
        "not supported",
        "use block or full",
    ),
    (
        "optimizer",
        ["--optimizer", "lamb"],
        "optimizer='lamb'",
        "not supported",
        "use adam, sgd or muon",
    ),
    (
        "lr-decay-style",
        ["--lr-decay-style", "step"],
        "lr_decay_style='step'",
        "not supported",
        "inverse-square-root or WSD",
    ),
    (
        "score-function",
        ["--moe-router-score-function", "relu"],
        "moe_router_score_function='relu'",
        "not supported",
        "use softmax, sigmoid or sqrtsoftplus",
    ),
    (
        "wandb-mode",
        ["--wandb-mode", "cloud"],
        "wandb_mode='cloud'",
        "not supported",
        "offline, online or disabled",
    ),
    (
        "position-embedding",
        ["--position-embedding-type", "alibi"],
        "'alibi'",
        "not supported",
        "use rope, none or learned_absolute",
    ),
    (
        "hidden-by-heads",
        ["--hidden-size", "66"],
        "hidden_size=66",
        "not divisible by num_attention_heads=4",
        "set kv_channels",
    ),
    (
        "heads-by-groups",
        ["--num-query-groups", "3"],
        "num_query_groups=3",
        "does not divide num_attention_heads=4",
        "use a divisor of 4",
    ),
    (
        "heads-by-tp",
        ["--tensor-model-parallel-size", "3", "--sequence-parallel", "true"],
        "num_attention_heads=4",
        "not divisible by tensor_model_parallel_size=3",
        "use a TP size that divides 4",
    ),
    (
        "groups-vs-tp",
        [
            "--num-attention-heads",
            "12",
            "--hidden-size",
            "96",
            "--num-query-groups",
            "4",
            "--tensor-model-parallel-size",
            "6",
            "--sequence-parallel",
            "true",
        ],
        "num_query_groups=4",
        "one must divide the other",
        "change num_query_groups",
    ),
    (
        "vocab-by-tp",
        ["--vocab-size", "1001", *SP2],
        "vocab_size=1001",
        "not divisible by tensor_model_parallel_size=2",
        "use 1002",
    ),
    (
        "ffn-by-tp",
        ["--ffn-hidden-size", "129", *SP2],
        "ffn_hidden_size=129",
        "not divisible by the TP size 2",
        "use a multiple of 2",
    ),
    (
        "moe-ffn-by-etp",
        ["--moe-ffn-hidden-size", "63", *SP2],
        "moe_ffn_hidden_size=63",
        "not divisible by the expert-TP size 2",
        "use a multiple of 2",
    ),
    (
        "shared-expert-by-tp",
        ["--moe-shared-expert-intermediate-size", "65", *SP2],
        "moe_shared_expert_intermediate_size=65",
        "not divisible by the TP size 2",
        "use a multiple of 2",
    ),
    (
        "ep-by-experts",
        ["--expert-model-parallel-size", "3"],
        "num_experts=4",
        "not divisible by expert_model_parallel_size=3",
        "use an EP size dividing 4",
    ),
    (
        "ep-without-experts",
        ["--num-experts", "null", "--expert-model-parallel-size", "2"],
        "expert_model_parallel_size=2",
        "without experts",
        "set num_experts",
    ),
    (
        "moe-pattern-without-experts",
        ["--num-experts", "null", "--hybrid-layer-pattern", "*E*E"],
        "hybrid_layer_pattern='*E*E'",
        "num_experts is unset",
        "use '-' (dense MLP) symbols",
    ),
    (
        "topk-above-experts",
        ["--moe-router-topk", "5"],
        "moe_router_topk=5",
        "between 1 and num_experts=4",
        "1..4 experts",
    ),
    (
        "topk-zero",
        ["--moe-router-topk", "0"],
        "moe_router_topk=0",
        "between 1 and num_experts=4",
        "1..4 experts",
    ),
    (
        "topk-one-softmax",
        [
            "--moe-router-topk",
            "1",
            "--moe-router-score-function",
            "softmax",
            "--moe-router-enable-expert-bias",
            "false",
        ],
        "moe_router_topk=1",
        "zero router gradient",
        "moe_router_score_function: sigmoid",
    ),
    (
        "expert-bias-softmax",
        ["--moe-router-score-function", "softmax"],
        "moe_router_score_function='softmax'",
        "needs sigmoid or sqrtsoftplus",
        "moe_router_enable_expert_bias: false",
    ),
    (
        "first-k-dense-all",
        ["--moe-first-k-dense", "4"],
        "moe_first_k_dense=4",
        "no MoE layer",
        "num_experts: null for a dense model",
    ),
    (
        "block-layers-above-depth",
        ["--attn-res-block-layers", "5"],
        "attn_res_block_layers=5",
        "with 4 transformer layers",
        "use at most 4 layers per depth block",
    ),
    (
        "sp-without-tp",
        ["--sequence-parallel", "true"],
        "sequence_parallel=true",
        "tensor_model_parallel_size=1",
        "set sequence_parallel: false",
    ),
    (
        "moe-tp-without-sp",
        ["--tensor-model-parallel-size", "2"],
        "sequence_parallel=false",
        "refuses to train with TP",
        "set sequence_parallel: true",
    ),
    (
        "seq-by-tp-under-sp",
        ["--seq-length", "127", *SP2],
        "seq_length=127",
        "not divisible by tensor_model_parallel_size=2",
        "e.g. 128",
    ),
    (
        "vpp-without-pp",
        ["--virtual-pipeline-model-parallel-size", "2"],
        "virtual_pipeline_model_parallel_size=2",
        "pipeline_model_parallel_size=1",
        "virtual_pipeline_model_parallel_size: null",
    ),
    (
        "more-stages-than-blocks",
        ["--pipeline-model-parallel-size", "4"],
        "into 4 pipeline stages",
        "cannot split 2 depth blocks",
        "use at most 2 stages",
    ),
    (
        "cut-inside-depth-block",
        ["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "*-|*E*E*E"],
        "'*-|*E*E*E'",
        "falls inside a depth block",
        "cut after sublayer 4 instead",
    ),
    (
        "qk-layernorm-attention",
        ["--qk-layernorm", "true"],
        "qk_layernorm=true",
        "QK norms are wired for MLA latents only",
        "qk_layernorm: false",
    ),
    (
        "kda-heads-positive",
        ["--linear-num-key-heads", "0"],
        "linear_num_key_heads=0",
        "must be >= 1",
        "use 1 or more",
    ),
    (
        "kda-head-dim-positive",
        ["--linear-key-head-dim", "-16"],
        "linear_key_head_dim=-16",
        "must be >= 1",
        "use 1 or more",
    ),
    (
        "kda-conv-positive",
        ["--linear-conv-kernel-dim", "0"],
        "linear_conv_kernel_dim=0",
        "must be >= 1",
        "use 1 or more",
    ),
    (
        "kda-field-null",
        {"hybrid_layer_pattern": "G-GEGEGE", "linear_key_head_dim": None},
        "linear_key_head_dim=None",
        "not a int",
        "linear_key_head_dim: 16",
    ),
    (
        "kda-heads-by-tp",
        [*KDA, "--linear-num-key-heads", "3", *SP2],
        "linear_num_key_heads=3",
        "not divisible by tensor_model_parallel_size=2",
        "use a TP size that divides 3",
    ),
    (
        "kda-head-dim-by-tp",
        [*KDA, "--linear-key-head-dim", "15", *SP2],
        "linear_key_head_dim=15",
        "not divisible by tensor_model_parallel_size=2",
        "use a TP size that divides 15",
    ),
    (
        "kda-head-dim-above-fla",
        [*KDA, "--linear-key-head-dim", "512"],
        "linear_key_head_dim=512",
        "above 256, the largest KDA head fla-core's chunk_kda",
        "use at most 256",
    ),
    (
        "nope-without-mla",
        ["--mla-use-nope", "true"],
        "mla_use_nope=true",
        "has no MLA ('+') layer",
        "set mla_use_nope: false, or multi_latent_attention: true",
    ),
    (
        "global-by-micro",
        ["--global-batch-size", "12"],
        "global_batch_size=12",
        "not a multiple of micro_batch_size=8",
        "make it micro_batch_size x data-parallel size",
    ),
    (
        "min-lr-above-lr",
        ["--min-lr", "0.01"],
        "min_lr=0.01",
        "above lr=0.003",
        "use min_lr <= 0.003",
    ),
    (
        "warmup-past-decay",
        ["--lr-warmup-iters", "300"],
        "lr_warmup_iters=300",
        "must be below lr_decay_iters",
        "shorten the warmup",
    ),
    (
        "wsd-past-decay",
        ["--lr-wsd-decay-iters", "500"],
        "lr_wsd_decay_iters=500",
        "longer than the decay phase",
        "use at most 200",
    ),
    (
        "muon-distributed",
        ["--optimizer", "muon", "--use-distributed-optimizer", "true"],
        "use_distributed_optimizer=true",
        "drift apart",
        "use_distributed_optimizer: false",
    ),
    (
        "split-malformed",
        ["--split", "98,x,0"],
        "'98,x,0'",
        "not 1 to 3 comma-separated non-negative numbers",
        "use e.g. '98,2,0'",
    ),
    (
        "split-train-empty",
        ["--split", "0,100,0"],
        "split='0,100,0'",
        "train split no documents",
        "give it a positive weight",
    ),
    (
        "blend-odd",
        ["--data-path", "0.3 a 0.7"],
        "'0.3 a 0.7'",
        "odd number of tokens (3)",
        "'WEIGHT PREFIX [WEIGHT PREFIX ...]'",
    ),
    (
        "blend-weight",
        ["--data-path", "-1 a 1 b"],
        "blend weight '-1'",
        "not a positive number",
        "weights > 0",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "value", "constraint", "fix"),
    [c[1:] for c in CONFIG_CASES],
    ids=[c[0] for c in CONFIG_CASES],
)
def test_invalid_config_is_refused(overrides, value, constraint, fix):
    with pytest.raises(ValueError) as err:
        load_run_config(
            TINY, parse_overrides(overrides) if isinstance(overrides, list) else overrides
        )
    message = str(err.value)
    assert value in message and constraint in message and fix in message, message


def test_the_table_is_large_enough():
    assert len({c[0] for c in CONFIG_CASES}) == len(CONFIG_CASES) >= 25
    assert len({c[0] for c in DATA_CASES}) == len(DATA_CASES) >= 8


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes(path):
    load_run_config(path)


# Valid neighbours of the refused cases: the rules must not catch these.
VALID_VARIANTS = {
    "dense": {"num_experts": None},
    "full-attnres": {"attn_res_mode": "full"},
    "no-attnres-any-block-size": {"enable_attention_residuals": False, "attn_res_block_layers": 9},
    "tp2-with-sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    "tp4-replicating-2-kv-heads": {
        "num_attention_heads": 8,
        "num_query_groups": 2,
        "tensor_model_parallel_size": 4,
        "sequence_parallel": True,
    },
    "pp2-vpp2": {
        "pipeline_model_parallel_size": 2,
        "virtual_pipeline_model_parallel_size": 2,
        "attn_res_block_layers": 1,
    },
    "ep2-top1-sigmoid": {"expert_model_parallel_size": 2, "moe_router_topk": 1},
    "mla-with-qk-norm": {"multi_latent_attention": True, "qk_layernorm": True},
    "mla-nope": {"multi_latent_attention": True, "mla_use_nope": True},
    "kda-tp2": {
        "hybrid_layer_pattern": "G-GEGEGE",
        "tensor_model_parallel_size": 2,
        "sequence_parallel": True,
    },
    "kda-and-mla-nope": {
        "hybrid_layer_pattern": "G-+EGEGE",
        "mla_use_nope": True,
        "linear_key_head_dim": 256,
    },
    # KDA fields are only checked where there are KDA layers
    "kda-fields-without-kda": {
        "linear_num_key_heads": 3,
        "linear_key_head_dim": 512,
        "tensor_model_parallel_size": 2,
        "sequence_parallel": True,
    },
    "cosine-no-warmup": {"lr_decay_style": "cosine", "lr_warmup_iters": 0, "min_lr": 0.0},
}


@pytest.mark.parametrize("overrides", VALID_VARIANTS.values(), ids=VALID_VARIANTS)
def test_valid_variants_pass(overrides):
    load_run_config(TINY, overrides)


def test_kda_needs_fla_core(monkeypatch):
    """A KDA pattern without fla-core importable is refused with the install command; the same
    config passes while fla-core is there (negative control)."""
    import sys

    load_run_config(TINY, parse_overrides(KDA))
    monkeypatch.setitem(sys.modules, "fla", None)  # what an absent package looks like to find_spec
    with pytest.raises(ValueError) as err:
        load_run_config(TINY, parse_overrides(KDA))
    message = str(err.value)
    assert "'G-GEGEGE' has KDA ('G') layers" in message and "pip install fla-core" in message
    load_run_config(TINY)  # no KDA layer: fla-core is not needed


def test_the_trainer_exits_2_with_the_message_before_starting(capsys, monkeypatch):
    from megatron_attnres.train import trainer as train

    def started(*args, **kwargs):  # refused before the process group (or anything) started
        raise AssertionError("the trainer started its process group on a refused config")

    monkeypatch.setattr(train, "init_distributed", started)
    assert train.main(["--config", str(TINY), "--num-query-groups", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnres-train: error: num_query_groups=3 does not divide")


# -- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The built-in corpus, tokenised (vocab 1024, as configs/tiny.yaml) and preprocessed."""
    from megatron_attnres.data.preprocess import prepare_builtin_data

    return prepare_builtin_data(tmp_path_factory.mktemp("good"), vocab_size=1024)


def _copy(good, tmp_path) -> Path:
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{good.data_prefix}{suffix}", f"{prefix}{suffix}")
    return prefix


def _write(prefix: Path, documents, dtype=np.uint16) -> Path:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def missing_bin(good, tmp):
    (p := _copy(good, tmp)).with_suffix(".bin").unlink()
    return dict(blend=str(p))


def missing_idx(good, tmp):
    (p := _copy(good, tmp)).with_suffix(".idx").unlink()
    return dict(blend=f"0.5 {good.data_prefix} 0.5 {p}")


def directory(good, tmp):
    _copy(good, tmp)
    return dict(blend=str(tmp))


def suffix(good, tmp):
    return dict(blend=f"{_copy(good, tmp)}.bin")


def corrupt_header(good, tmp):
    idx = (p := _copy(good, tmp)).with_suffix(".idx")
    idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    return dict(blend=str(p))


def truncated_idx(good, tmp):
    _cut((p := _copy(good, tmp)).with_suffix(".idx"), -10)
    return dict(blend=str(p))


def truncated_bin(good, tmp):
    _cut((p := _copy(good, tmp)).with_suffix(".bin"), -2)
    return dict(blend=str(p))


def empty(good, tmp):
    return dict(blend=str(_write(tmp / "empty", [])))


def float_tokens(good, tmp):
    return dict(blend=str(_write(tmp / "floats", [[5.0] * 300], dtype=np.float32)))


def foreign_token_ids(good, tmp):
    docs = [[7] * 200 for _ in range(5)]
    docs[3][150] = 5000  # an id of a larger tokenizer
    return dict(blend=str(_write(tmp / "foreign", docs)), split="100,0,0")


def too_few_tokens(good, tmp):
    return dict(blend=str(_write(tmp / "short", [[7] * 50])), split="100,0,0")


def split_without_tokens(good, tmp):
    return dict(blend=str(_write(tmp / "one", [[7] * 300])), split="98,2,0")


def odd_blend(good, tmp):
    return dict(blend=f"0.3 {good.data_prefix} 0.7")


def bad_weight(good, tmp):
    return dict(blend=f"0 {good.data_prefix} 1 {good.data_prefix}")


def model_vocab_too_small(good, tmp):
    return dict(blend=str(good.data_prefix), model_vocab_size=512)


def missing_tokenizer(good, tmp):
    return dict(blend=str(good.data_prefix), tokenizer=tmp / "nope.model")


def corrupt_tokenizer(good, tmp):
    (bad := tmp / "bad.model").write_bytes(b"not a sentencepiece model")
    return dict(blend=str(good.data_prefix), tokenizer=bad)


# make(good, tmp_path) -> the bad input, then the value, the constraint and the fix ({tmp} is
# tmp_path); substrings of the message as in CONFIG_CASES.
DATA_CASES = [
    (missing_bin, "{tmp}/copy.bin", "does not exist", "attnres-preprocess-data"),
    (missing_idx, "{tmp}/copy.idx", "does not exist", "attnres-preprocess-data"),
    (directory, "prefix {tmp} is a directory", "without the suffix", "e.g. {tmp}/copy"),
    (suffix, "{tmp}/copy.bin", "ends in a suffix", "name it without .bin/.idx"),
    (corrupt_header, "starts with b'NOTANIDX!'", "not a Megatron .idx", "again"),
    (truncated_idx, "{tmp}/copy.idx has", "truncated or corrupt", "again"),
    (truncated_bin, "{tmp}/copy.bin has", "the pair does not match", "again"),
    (empty, "{tmp}/empty is empty", "0 documents", "drop it from the blend"),
    (float_tokens, "float32", "token ids are integers", "again"),
    (
        foreign_token_ids,
        "document 3 holds token id 5000",
        "outside the tokenizer's ids 0..1023",
        "set tokenizer_model to that tokenizer",
    ),
    (
        too_few_tokens,
        "has 50 tokens",
        "fewer than one sample of seq_length + 1 = 129",
        "use a smaller seq_length",
    ),
    (split_without_tokens, "valid split of data prefix {tmp}/one", "no tokens", "change the split"),
    (
        odd_blend,
        "has an odd number of tokens (3)",
        "'WEIGHT PREFIX [WEIGHT PREFIX ...]'",
        "or a single PREFIX",
    ),
    (bad_weight, "blend weight '0'", "not a positive number", "weights > 0"),
    (
        model_vocab_too_small,
        "tokenizer vocab size 1024",
        "larger than the model's padded vocab size 512",
        "set the model's vocab_size to at least 1024",
    ),
    (missing_tokenizer, "{tmp}/nope.model", "does not exist", "attnres-train-tokenizer"),
    (
        corrupt_tokenizer,
        "{tmp}/bad.model",
        "not a readable sentencepiece model",
        "written by attnres-train-tokenizer",
    ),
]


@pytest.mark.parametrize(
    ("make", "value", "constraint", "fix"), DATA_CASES, ids=[c[0].__name__ for c in DATA_CASES]
)
def test_bad_data_is_refused(good, tmp_path, make, value, constraint, fix):
    case = make(good, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        tokenizer = load_tokenizer(case.get("tokenizer", good.tokenizer_model))
        check_data(
            case["blend"],
            tokenizer,
            model_vocab_size=case.get("model_vocab_size", 1024),
            seq_length=128,
            split=case.get("split", "95,5,0"),
        )
    message = str(err.value)
    for part in (value, constraint, fix):
        assert part.replace("{tmp}", str(tmp_path)) in message, message


def test_good_data_passes(good):
    tokenizer = load_tokenizer(good.tokenizer_model)
    infos = check_data(
        f"0.7 {good.data_prefix} 0.3 {good.data_prefix}",
        tokenizer,
        model_vocab_size=1024,
        seq_length=128,
        split="95,5,0",
    )
    assert [i.tokens for i in infos] == [good.summary.tokens] * 2


@pytest.mark.slow
def test_the_trainer_checks_data_before_building_anything(good, tmp_path):
    """End to end: data with a foreign token id stops `attnres-train` with exit code 2 and the
    message, before any step; the datasets (built after the model) were never made."""
    from tests.training.trainer_runs import train

    prefix = foreign_token_ids(good, tmp_path)["blend"]
    done = train(
        tmp_path / "run",
        "--data-path",
        prefix,
        "--split",
        "100,0,0",
        "--tokenizer-model",
        str(good.tokenizer_model),
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "attnres-train: error: data prefix" in done.stderr
    assert "document 3 holds token id 5000" in done.stderr
    assert not (tmp_path / "run" / "data_cache").exists() and "step 1/" not in done.stdout
