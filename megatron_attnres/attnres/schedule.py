"""The depth-block schedule as pure functions of (number of sublayers, mode, block size).

Sublayers are numbered like Megatron's HybridModel layers: 1-based `layer_number`, one per pattern
symbol. With S sublayers per depth block, sublayer `n` starts a depth block when
`(n - 1) % S == 0` (docs/architecture.md section 3). Full AttnRes is S = 1. The embedding is
summary b_0.

A sublayer that starts depth block m + 1 reads the completed summaries b_0..b_m; any other sublayer
also reads the partial summary of its own block. The final (output) read sees every completed
summary plus the last, possibly shorter, block: floor((L - 1) / S) + 2 sources.
"""

from dataclasses import dataclass
from enum import StrEnum


class ResidualMode(StrEnum):
    NONE = "none"  # the standard PreNorm residual stream
    FULL = "full"  # every sublayer is its own depth block (S = 1)
    BLOCK = "block"  # Block AttnRes with S sublayers per depth block


def check_positive_int(value: object, name: str, fix: str) -> int:
    """Return `value` if it is a positive integer, else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {fix}")
    return value


@dataclass(frozen=True)
class SourceSpec:
    """Which sources one depth read mixes: b_0..b_{num_completed-1}, then the partial if any."""

    num_completed: int
    has_partial: bool

    @property
    def num_sources(self) -> int:
        return self.num_completed + int(self.has_partial)


@dataclass(frozen=True)
class DepthBlockSchedule:
    num_sublayers: int
    mode: ResidualMode
    sublayers_per_block: int = 1

    def __post_init__(self):
        object.__setattr__(self, "mode", ResidualMode(self.mode))
        check_positive_int(self.num_sublayers, "num_sublayers", "a model needs at least one layer")
        check_positive_int(
            self.sublayers_per_block,
            "sublayers_per_block (the depth-block size)",
            "use 1 for Full AttnRes or 2k for k transformer layers per depth block",
        )
        if self.mode is ResidualMode.FULL and self.sublayers_per_block != 1:
            raise ValueError(
                f"mode 'full' means one sublayer per depth block, got sublayers_per_block="
                f"{self.sublayers_per_block}; use mode 'block' for larger depth blocks"
            )
        if self.mode is ResidualMode.BLOCK and self.sublayers_per_block > self.num_sublayers:
            raise ValueError(
                f"sublayers_per_block={self.sublayers_per_block} exceeds the model's "
                f"{self.num_sublayers} sublayers; use at most {self.num_sublayers}"
            )

    @classmethod
    def from_layers(
        cls, num_layers: int, mode: ResidualMode | str, layers_per_block: int | None = None
    ) -> "DepthBlockSchedule":
        """Schedule for `num_layers` transformer layers (mixer + MLP = 2 sublayers each)."""
        check_positive_int(num_layers, "num_layers", "a model needs at least one layer")
        mode = ResidualMode(mode)
        if mode is ResidualMode.BLOCK:
            check_positive_int(
                layers_per_block,
                "layers_per_block (attn_res_block_layers)",
                f"choose k in 1..{num_layers} transformer layers per depth block",
            )
            if layers_per_block > num_layers:
                raise ValueError(
                    f"layers_per_block={layers_per_block} exceeds num_layers={num_layers}; "
                    f"choose k in 1..{num_layers}"
                )
            return cls(2 * num_layers, mode, 2 * layers_per_block)
        return cls(2 * num_layers, mode, 1)

    @property
    def uses_depth_reads(self) -> bool:
        return self.mode is not ResidualMode.NONE

    @property
    def num_blocks(self) -> int:
        return -(-self.num_sublayers // self.sublayers_per_block)

    def _check_layer_number(self, layer_number: int) -> None:
        if not 1 <= layer_number <= self.num_sublayers:
            raise ValueError(
                f"layer_number {layer_number} is outside 1..{self.num_sublayers} (1-based)"
            )

    def starts_block(self, layer_number: int) -> bool:
        self._check_layer_number(layer_number)
        return (layer_number - 1) % self.sublayers_per_block == 0

    def block_index(self, layer_number: int) -> int:
        """1-based index m of the depth block containing this sublayer (its summary is b_m)."""
        self._check_layer_number(layer_number)
        return (layer_number - 1) // self.sublayers_per_block + 1

    def sources(self, layer_number: int) -> SourceSpec:
        """The sources of the depth read that forms sublayer `layer_number`'s input."""
        block = self.block_index(layer_number)
        return SourceSpec(num_completed=block, has_partial=not self.starts_block(layer_number))

    def final_sources(self) -> SourceSpec:
        """The sources of the output read after the last sublayer."""
        return SourceSpec(num_completed=self.num_blocks, has_partial=True)

    def num_final_sources(self) -> int:
        return self.final_sources().num_sources

    def read_source_counts(self) -> list[int]:
        """Sources of every depth read of one forward (each sublayer's, then the output read);
        [] for the standard residual, which reads nothing."""
        if not self.uses_depth_reads:
            return []
        reads = [self.sources(j).num_sources for j in range(1, self.num_sublayers + 1)]
        return [*reads, self.num_final_sources()]

    def saved_activation_overhead_bytes(
        self, tokens: int, hidden: int, act_bytes: int, recompute_read: bool = True
    ) -> int:
        """Extra bytes autograd keeps for one forward versus the standard residual (mode none).

        Per depth read with two or more sources: three fp32 scalars per source and token (inverse
        rms, score term, weight; a one-source read is the identity and saves nothing). That is
        all with `recompute_read` (the model's default, mcore/read_recompute.py): the sources a
        read keeps (summaries, partial summaries) stand in one for one for the residual streams
        the standard residual's pre-norms keep. Without it every read's result is kept as well
        (by the sublayer's pre-norm, or the final norm after the output read), which adds
        num_sublayers tensors of [tokens, hidden]. `tokens` counts this rank's tokens (s * b,
        divided by TP under sequence parallelism).
        """
        if not self.uses_depth_reads:
            return 0
        scalars = sum(3 * n * tokens * 4 for n in self.read_source_counts() if n >= 2)
        kept_results = 0 if recompute_read else self.num_sublayers * tokens * hidden * act_bytes
        return kept_results + scalars

    def valid_pipeline_cuts(self) -> list[int]:
        """Sublayer offsets c (0 < c < L) where a pipeline stage may end: depth-block boundaries."""
        S = self.sublayers_per_block
        return list(range(S, self.num_sublayers, S))

    def split_stages(self, num_stages: int) -> list[range]:
        """Split the sublayers into `num_stages` contiguous stages cut at depth-block boundaries.

        Whole depth blocks are spread as evenly as possible; earlier stages take the remainder
        (the last stage also carries the output read and the LM head). Returns 1-based
        layer-number ranges.
        """
        check_positive_int(num_stages, "num_stages", "use 1 for no pipeline parallelism")
        if num_stages > self.num_blocks:
            raise ValueError(
                f"cannot split {self.num_blocks} depth blocks into {num_stages} pipeline stages: "
                f"stages are cut at depth-block boundaries; use at most {self.num_blocks} stages "
                f"or smaller depth blocks"
            )
        per_stage, extra = divmod(self.num_blocks, num_stages)
        stages, block = [], 0
        for stage in range(num_stages):
            blocks = per_stage + (1 if stage < extra else 0)
            first = block * self.sublayers_per_block + 1
            block += blocks
            last = min(block * self.sublayers_per_block, self.num_sublayers)
            stages.append(range(first, last + 1))
        return stages

    def summaries_entering(self, first_layer_number: int) -> int:
        """Summaries (b_0 included) a stage starting at `first_layer_number` receives."""
        if not self.starts_block(first_layer_number):
            raise ValueError(
                f"a pipeline stage cannot start at sublayer {first_layer_number}: it is inside a "
                f"depth block; valid first sublayers are 1 + {self.valid_pipeline_cuts()}"
            )
        return self.sources(first_layer_number).num_completed
