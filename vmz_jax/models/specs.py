"""What distinguishes the architectures of the VMZ family, as data (Caffe2 `c2/lib/models/r3d_model.py`)."""

from __future__ import annotations

from dataclasses import dataclass

BLOCKS_PER_STAGE: dict[int, tuple[int, int, int, int]] = {
    10: (1, 1, 1, 1),
    16: (2, 2, 2, 1),
    18: (2, 2, 2, 2),
    26: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# (block output width, bottleneck inner width) per stage. Caffe2 picks the shallow table for every
# depth <= 34, so the 26-layer bottleneck nets keep 64..512 channels and a 512-d feature.
SHALLOW_WIDTHS = ((64, 64), (128, 128), (256, 256), (512, 512))
DEEP_WIDTHS = ((256, 64), (512, 128), (1024, 256), (2048, 512))
DEPTHS = tuple(BLOCKS_PER_STAGE)


@dataclass(frozen=True)
class ResNetSpec:
    """One architecture of the residual family."""

    name: str
    stem: str  # "2plus1d" | "3d" | "2d" | "full_time" (R2D: kernel spans the clip) ; see resnet.Stem
    stage_convs: tuple[str, str, str, str]  # residual conv kind per stage, see layers.CONV_KINDS
    depth: int
    stem_pool: bool = False
    # Caffe2's create_r3d: with clips shorter than 4 (8) frames, stage 3 (4) does not stride in time.
    short_clip_rule: bool = False

    @property
    def bottleneck(self) -> bool:
        return self.depth not in (10, 16, 18, 34)

    @property
    def blocks(self) -> tuple[int, int, int, int]:
        return BLOCKS_PER_STAGE[self.depth]

    @property
    def widths(self) -> tuple[tuple[int, int], ...]:
        return SHALLOW_WIDTHS if self.depth <= 34 else DEEP_WIDTHS

    @property
    def feature_dim(self) -> int:
        return self.widths[-1][0]


def _r3d_family() -> dict[str, ResNetSpec]:
    specs = {}
    for depth in DEPTHS:
        specs[f"r2plus1d_{depth}"] = ResNetSpec(f"r2plus1d_{depth}", "2plus1d", ("2plus1d",) * 4,
                                                depth, short_clip_rule=True)
        specs[f"r3d_{depth}"] = ResNetSpec(f"r3d_{depth}", "3d", ("3d",) * 4, depth,
                                           short_clip_rule=True)
    for depth in (26, 50, 101, 152):
        for kind in ("ir", "ip"):
            name = f"{kind}_csn_{depth}"
            specs[name] = ResNetSpec(name, "3d", (kind,) * 4, depth, stem_pool=True,
                                     short_clip_rule=True)
    return specs


def _mixed_family() -> dict[str, ResNetSpec]:
    specs = {
        "r2d_18": ResNetSpec("r2d_18", "full_time", ("2d",) * 4, 18),
        "r2df_18": ResNetSpec("r2df_18", "2d", ("2d",) * 4, 18),
    }
    for level in (2, 3, 4, 5):
        # MCx: 3-D convolutions in the bottom layers, 2-D above; rMCx the reverse.
        mc = tuple("3d" if stage < level - 1 else "2d" for stage in (1, 2, 3, 4))
        rmc = tuple("3d" if stage >= level - 1 else "2d" for stage in (1, 2, 3, 4))
        specs[f"mc{level}_18"] = ResNetSpec(f"mc{level}_18", "3d", mc, 18)  # type: ignore[arg-type]
        specs[f"rmc{level}_18"] = ResNetSpec(f"rmc{level}_18", "2d", rmc, 18)  # type: ignore[arg-type]
    return specs


RESNET_SPECS: dict[str, ResNetSpec] = {**_r3d_family(), **_mixed_family()}
