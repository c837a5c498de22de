"""The table of every released VMZ checkpoint this project can load.

Sources: VMZ's PyTorch ``model_urls`` (``pt/vmz/models/utils.py``), moabitcoin/ig65m-pytorch
releases and VMZ's Caffe2 model zoo (``c2/tutorials/model_zoo.md``, ``models.md``); see
``shared/spec/PRETRAINED.md``.

Naming: the canonical names of the ``.pth`` checkpoints are VMZ's own
(``ig_ft_kinetics_32frms`` ...). Caffe2-only checkpoints get names in the same style
(``kinetics_32frms`` = trained from scratch on Kinetics-400). Where a ``.pth`` and a ``.pkl`` exist
for the same (arch, name), the ``.pth`` is the entry under that name and the ``.pkl`` is
``<name>_caffe2``.

``dataset`` is the training set of the last stage, whose labels the head predicts (``kinetics400``,
``ig65m``, ``sports1m``); the training history is in ``notes``. This module does not import jax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from vmz_jax.errors import VMZError

Format = Literal["pth", "pkl"]

KINETICS400 = "kinetics400"
IG65M = "ig65m"
SPORTS1M = "sports1m"
AUDIOSET = "audioset"

_HEX8 = re.compile(r"[0-9a-f]{8}")
_RUN_ID = re.compile(r"_f(\d+)\.(?:pth|pkl)$")


@dataclass(frozen=True)
class Pretraining:
    """One released checkpoint: where it is and what its network expects and outputs."""

    arch: str
    name: str
    url: str
    num_classes: int
    clip_length: int
    crop_size: int
    fmt: Format
    sha256_prefix: str | None
    dataset: str
    notes: str
    # The arch's default weights (`default_pretraining`, what `extract`/`classify` load unless told):
    # its Kinetics-400 fine-tuned checkpoint with the best published accuracy. At most one per arch.
    default: bool = False

    def __post_init__(self) -> None:
        if self.fmt not in ("pth", "pkl"):
            raise ValueError(f"{self.key}: fmt must be 'pth' or 'pkl', not {self.fmt!r}")
        if self.sha256_prefix is not None and not _HEX8.fullmatch(self.sha256_prefix):
            raise ValueError(f"{self.key}: sha256_prefix must be 8 lowercase hex digits")
        if min(self.num_classes, self.clip_length, self.crop_size) <= 0:
            raise ValueError(f"{self.key}: num_classes, clip_length and crop_size must be positive")

    @property
    def key(self) -> str:
        """VMZ's flat key, ``<arch>_<name>`` (e.g. ``ir_csn_152_ig65m_32frms``)."""
        return f"{self.arch}_{self.name}"

    @property
    def filename(self) -> str:
        """Name to store the download under: the URL's last path segment, unquoted, no spaces."""
        return unquote(PurePosixPath(urlsplit(self.url).path).name).replace(" ", "")

    @property
    def run_id(self) -> str | None:
        """The Caffe2 training run id (``f<digits>`` in the file name; not a checksum), if any."""
        m = _RUN_ID.search(self.filename)
        return m.group(1) if m else None


_MOABIT = "https://github.com/moabitcoin/ig65m-pytorch/releases/download/v1.0.0/"
_VMZ_GH = "https://github.com/bjuncek/VMZ/releases/download/test_models/"


def _dropbox(id_and_file: str) -> str:
    return f"https://www.dropbox.com/s/{id_and_file}?dl=1"


def _acc(top1: float, top5: float | None = None) -> str:
    t5 = f"/{top5:.1f}" if top5 is not None else " (top-5 not published)"
    return f"Kinetics-400 video@1/@5 {top1:.1f}{t5} (Caffe2 evaluation)"


def _e(
    arch: str,
    name: str,
    url: str,
    num_classes: int,
    clip_length: int,
    crop_size: int,
    dataset: str,
    notes: str,
    sha256_prefix: str | None = None,
    default: bool = False,
) -> Pretraining:
    ext = PurePosixPath(urlsplit(url).path).suffix.lstrip(".")
    if ext not in ("pth", "pkl"):
        raise ValueError(f"{url}: not a .pth or .pkl file")
    fmt: Format = "pth" if ext == "pth" else "pkl"
    return Pretraining(
        arch, name, url, num_classes, clip_length, crop_size, fmt, sha256_prefix, dataset, notes, default
    )


_SCRATCH_K400 = "trained from scratch on Kinetics-400"
_IG_FT = "IG-65M pre-training, fine-tuned on Kinetics-400"
_SP_FT = "Sports-1M pre-training, fine-tuned on Kinetics-400"
_MOABIT_NOTE = "converted to PyTorch by moabitcoin/ig65m-pytorch"
_C2 = "Caffe2 pickle"
_AV = "heads: av, audio, visual; Caffe2 pickle"
# No copy of these two was at hand: the class count is that of the visual pre-training set's head
# (as for the visual Sports-1M / IG-65M files) and the heads are those of a G-Blend net; the port
# checks both against the file and names what it holds if they differ.
_AV_UNSEEN = ("class count (the pre-training set's) and heads (av, audio, visual) assumed, not yet checked "
              "against the file; Caffe2 pickle")

# Order: per arch, the .pth rows first (in the spec's order), then the Caffe2 pickles.
_ENTRIES: tuple[Pretraining, ...] = (
    # ---- R(2+1)D-34, 112x112 --------------------------------------------------------------------
    _e("r2plus1d_34", "ig65m_8frms",
       _MOABIT + "r2plus1d_34_clip8_ig65m_from_scratch-9bae36ae.pth", 487, 8, 112, IG65M,
       f"trained from scratch on IG-65M; 487-class head (ig65m-pytorch issue #3); {_MOABIT_NOTE}",
       "9bae36ae"),
    _e("r2plus1d_34", "ig65m_32frms",
       _MOABIT + "r2plus1d_34_clip32_ig65m_from_scratch-449a7af9.pth", 359, 32, 112, IG65M,
       f"trained from scratch on IG-65M; 359-class head; {_MOABIT_NOTE}",
       "449a7af9"),
    _e("r2plus1d_34", "ig_ft_kinetics_8frms",
       _MOABIT + "r2plus1d_34_clip8_ft_kinetics_from_ig65m-0aa0550b.pth", 400, 8, 112, KINETICS400,
       f"{_IG_FT}; {_acc(74.9, 91.8)}; {_MOABIT_NOTE}",
       "0aa0550b"),
    _e("r2plus1d_34", "ig_ft_kinetics_32frms",
       _MOABIT + "r2plus1d_34_clip32_ft_kinetics_from_ig65m-ade133f1.pth",
       400, 32, 112, KINETICS400,
       f"{_IG_FT}; {_acc(80.0, 94.2)}; {_MOABIT_NOTE}",
       "ade133f1", default=True),
    _e("r2plus1d_34", "ig65m_8frms_caffe2",
       _dropbox("6xwyu1az6oy4ts7/r2plus1d_34_clip8_ig65m_from_scratch_f79708462.pkl"),
       487, 8, 112, IG65M, f"trained from scratch on IG-65M; 487-class head; {_C2}"),
    _e("r2plus1d_34", "ig_ft_kinetics_8frms_caffe2",
       _dropbox("p81twy88kwrrcop/r2plus1d_34_clip8_ft_kinetics_from_ig65m_%20f128022400.pkl"),
       400, 8, 112, KINETICS400, f"{_IG_FT}; {_acc(74.9, 91.8)}; {_C2}"),
    _e("r2plus1d_34", "ig65m_32frms_caffe2",
       _dropbox("eimo232tqw8mwi9/r2plus1d_34_clip32_ig65m_from_scratch_f102649996.pkl"),
       359, 32, 112, IG65M,
       f"trained from scratch on IG-65M; 359-class head (no last_out_L487 blob); {_C2}"),
    _e("r2plus1d_34", "ig_ft_kinetics_32frms_caffe2",
       _dropbox("z41ff7vs0bzf6b8/r2plus1d_34_clip32_ft_kinetics_from_ig65m_%20f106169681.pkl"),
       400, 32, 112, KINETICS400, f"{_IG_FT}; {_acc(80.0, 94.2)}; {_C2}"),
    # ---- R(2+1)D-152, 32x112x112 ----------------------------------------------------------------
    _e("r2plus1d_152", "ig65m_32frms",
       _VMZ_GH + "r2plus1d_152_ig65m_from_scratch_f106380637.pth", 359, 32, 112, IG65M,
       "trained from scratch on IG-65M"),
    _e("r2plus1d_152", "ig_ft_kinetics_32frms",
       _VMZ_GH + "r2plus1d_152_ft_kinetics_from_ig65m_f107107466.pth", 400, 32, 112, KINETICS400,
       f"{_IG_FT}; {_acc(81.6, 95.3)}", default=True),
    _e("r2plus1d_152", "sports1m_ft_kinetics_32frms",
       _VMZ_GH + "r2plus1d_152_ft_kinetics_from_sports1m_f128957437.pth", 400, 32, 112,
       KINETICS400, f"{_SP_FT}; {_acc(79.5, 94.0)}"),
    _e("r2plus1d_152", "kinetics_32frms",
       _dropbox("9770y063u3z5bmb/r2plus1d_152_kinetics_from_scratch_f127858918.pkl"),
       400, 32, 112, KINETICS400, f"trained from scratch on Kinetics-400; {_acc(77.3)}; {_C2}"),
    _e("r2plus1d_152", "sports1m_32frms",
       _dropbox("w5cdqeyqukuaqt7/r2plus1d_152_sports1m_from_scratch_f127111290.pkl"),
       487, 32, 112, SPORTS1M,
       f"trained from scratch on Sports-1M; {_C2} only (VMZ's model_urls entry is empty)"),
    _e("r2plus1d_152", "sports1m_ft_kinetics_32frms_caffe2",
       _dropbox("twvcpe30rxuaf45/r2plus1d_152_ft_kinetics_from_sports1m_f128957437.pkl"),
       400, 32, 112, KINETICS400, f"{_SP_FT}; {_acc(79.5, 94.0)}; {_C2}"),
    _e("r2plus1d_152", "ig65m_32frms_caffe2",
       _dropbox("oqdg176p7nqc84v/r2plus1d_152_ig65m_from_scratch_f106380637.pkl"),
       359, 32, 112, IG65M, f"trained from scratch on IG-65M; {_C2}"),
    _e("r2plus1d_152", "ig_ft_kinetics_32frms_caffe2",
       _dropbox("tmxuae8ubo5gipy/r2plus1d_152_ft_kinetics_from_ig65m_f107107466.pkl"),
       400, 32, 112, KINETICS400, f"{_IG_FT}; {_acc(81.6, 95.3)}; {_C2}"),
    # ---- ir-CSN-152, 32x224x224 -----------------------------------------------------------------
    _e("ir_csn_152", "ig65m_32frms",
       _VMZ_GH + "irCSN_152_ig65m_from_scratch_f125286141.pth", 359, 32, 224, IG65M,
       "trained from scratch on IG-65M"),
    _e("ir_csn_152", "ig_ft_kinetics_32frms",
       _VMZ_GH + "irCSN_152_ft_kinetics_from_ig65m_f126851907.pth", 400, 32, 224, KINETICS400,
       f"{_IG_FT}; {_acc(82.6, 95.3)}", default=True),
    _e("ir_csn_152", "sports1m_32frms",
       _VMZ_GH + "irCSN_152_Sports1M_from_scratch_f99918785.pth", 487, 32, 224, SPORTS1M,
       "trained from scratch on Sports-1M"),
    _e("ir_csn_152", "sports1m_ft_kinetics_32frms",
       _VMZ_GH + "irCSN_152_ft_kinetics_from_Sports1M_f101599884.pth", 400, 32, 224, KINETICS400,
       f"{_SP_FT}; {_acc(78.2, 93.0)}"),
    _e("ir_csn_152", "kinetics_32frms",
       _dropbox("46gcm7up60ssx5c/irCSN_152_kinetics_from_scratch_f98268019.pkl"),
       400, 32, 224, KINETICS400, f"{_SCRATCH_K400}; {_acc(76.5, 92.1)}; {_C2}"),
    _e("ir_csn_152", "sports1m_32frms_caffe2",
       _dropbox("woh99y2hll1mlqv/irCSN_152_sports1m_from_scratch_f99918785.pkl"),
       487, 32, 224, SPORTS1M, f"trained from scratch on Sports-1M; {_C2}"),
    _e("ir_csn_152", "sports1m_ft_kinetics_32frms_caffe2",
       _dropbox("zuoj1aqouh6bo6k/irCSN_152_ft_kinetics_from_sports1m_f101599884.pkl"),
       400, 32, 224, KINETICS400, f"{_SP_FT}; {_acc(78.2, 93.0)}; {_C2}"),
    _e("ir_csn_152", "ig65m_32frms_caffe2",
       _dropbox("r0kppq7ox6c57no/irCSN_152_ig65m_from_scratch_f125286141.pkl"),
       359, 32, 224, IG65M, f"trained from scratch on IG-65M; {_C2}"),
    _e("ir_csn_152", "ig_ft_kinetics_32frms_caffe2",
       _dropbox("gmd8r87l3wmkn3h/irCSN_152_ft_kinetics_from_ig65m_f126851907.pkl"),
       400, 32, 224, KINETICS400, f"{_IG_FT}; {_acc(82.6, 95.3)}; {_C2}"),
    # ---- ip-CSN-152, 32x224x224 -----------------------------------------------------------------
    _e("ip_csn_152", "ig65m_32frms",
       _VMZ_GH + "ipCSN_152_ig65m_from_scratch_f130601052.pth", 359, 32, 224, IG65M,
       "trained from scratch on IG-65M"),
    _e("ip_csn_152", "ig_ft_kinetics_32frms",
       _VMZ_GH + "ipCSN_152_ft_kinetics_from_ig65m_f133090949.pth", 400, 32, 224, KINETICS400,
       f"{_IG_FT}; {_acc(82.5, 95.3)}", default=True),
    _e("ip_csn_152", "sports1m_32frms",
       _VMZ_GH + "ipCSN_152_Sports1M_from_scratch_f111018543.pth", 487, 32, 224, SPORTS1M,
       "trained from scratch on Sports-1M"),
    _e("ip_csn_152", "sports1m_ft_kinetics_32frms",
       _VMZ_GH + "ipCSN_152_ft_kinetics_from_Sports1M_f111279053.pth", 400, 32, 224, KINETICS400,
       f"{_SP_FT}; {_acc(78.8, 93.5)}"),
    _e("ip_csn_152", "kinetics_32frms",
       _dropbox("3fihu6ti60047mu/ipCSN_152_kinetics_from_scratch_f129594342.pkl"),
       400, 32, 224, KINETICS400, f"{_SCRATCH_K400}; {_acc(77.8, 92.8)}; {_C2}"),
    _e("ip_csn_152", "sports1m_32frms_caffe2",
       _dropbox("70di7o7qz6gjq6x/ipCSN_152_sports1m_from_scratch_f111018543.pkl"),
       487, 32, 224, SPORTS1M, f"trained from scratch on Sports-1M; {_C2}"),
    _e("ip_csn_152", "sports1m_ft_kinetics_32frms_caffe2",
       _dropbox("ir7cr0hda36knux/ipCSN_152_ft_kinetics_from_sports1m_f111279053.pkl"),
       400, 32, 224, KINETICS400, f"{_SP_FT}; {_acc(78.8, 93.5)}; {_C2}"),
    _e("ip_csn_152", "ig65m_32frms_caffe2",
       _dropbox("1ryvx8k7kzs8od6/ipCSN_152_ig65m_from_scratch_f130601052.pkl"),
       359, 32, 224, IG65M, f"trained from scratch on IG-65M; {_C2}"),
    _e("ip_csn_152", "ig_ft_kinetics_32frms_caffe2",
       _dropbox("zpp3p0vn2i7bibl/ipCSN_152_ft_kinetics_from_ig65m_f133090949.pkl"),
       400, 32, 224, KINETICS400, f"{_IG_FT}; {_acc(82.5, 95.3)}; {_C2}"),
    # ---- ir-CSN-50, 32x224x224 (Caffe2 only) ----------------------------------------------------
    _e("ir_csn_50", "ig65m_32frms",
       _dropbox("1cqzndm1zobxvhh/irCSN_50_pretrained_ig65m_f231921860.pkl"),
       359, 32, 224, IG65M, f"trained from scratch on IG-65M; accuracy not published; {_C2}"),
    _e("ir_csn_50", "ig_ft_kinetics_32frms",
       _dropbox("b6o2mvoqrvupatt/irCSN_50_ft_kinetics_from_ig65m_f233743920.pkl"),
       400, 32, 224, KINETICS400, f"{_IG_FT}; accuracy not published; {_C2}", default=True),
    # ---- C3D, 16x112x112 (Caffe2 only) ----------------------------------------------------------
    _e("c3d", "kinetics_16frms",
       _dropbox("z6w799mqet65mkq/c3d_kinetics_from_scratch_f129282105.pkl"),
       400, 16, 112, KINETICS400, f"{_SCRATCH_K400}; {_acc(66.6, 86.7)}; {_C2}"),
    _e("c3d", "sports1m_16frms",
       _dropbox("s2ooup80wal8o5d/c3d_sports1m_from_scratch_f129642950.pkl"),
       487, 16, 112, SPORTS1M, f"trained from scratch on Sports-1M; {_C2}"),
    _e("c3d", "sports1m_ft_kinetics_16frms",
       _dropbox("jadubfxhh5hdyp5/c3d_ft_kinetics_from_sports1m_f131638306.pkl"),
       400, 16, 112, KINETICS400, f"{_SP_FT}; {_acc(67.4, 87.2)}; {_C2}", default=True),
    # ---- R(2+1)D-34 32x112, Kinetics from scratch / Sports-1M fine-tuned (VMZ c2/tutorials/models.md)
    _e("r2plus1d_34", "kinetics_32frms", _dropbox("y6c6jf7myv2w6iq/r2.5d_d34_l32.pkl"),
       400, 32, 112, KINETICS400, f"{_SCRATCH_K400}; {_acc(72.4, 90.6)}; {_C2}"),
    _e("r2plus1d_34", "sports1m_ft_kinetics_32frms",
       _dropbox("odd9smqn2t54run/r2.5d_d34_l32_ft_sports1m.pkl"),
       400, 32, 112, KINETICS400, f"{_SP_FT}; {_acc(74.2, 92.1)}; {_C2}"),
    # ---- the 18-layer family of "A Closer Look at Spatiotemporal Convolutions", Kinetics from
    # scratch, 8 and 16 frames (VMZ c2/tutorials/models.md): (arch, 8-frame id, 16-frame id, file
    # stem, video@1/@5 at 8 and 16 frames)
    *(_e(arch, f"kinetics_{frames}frms", _dropbox(f"{dropbox_id}/{stem}_l{frames}.pkl"),
         400, frames, 112, KINETICS400, f"{_SCRATCH_K400}; {_acc(*acc)}; {_C2}", default=frames == 16)
      for arch, stem, per_length in (
          ("r2plus1d_18", "r2.5d_d18", ((8, "wzgx4d80mrh7pnf", (65.3, 85.2)),
                                        (16, "94d2ruqn6tp7xno", (68.5, 87.5)))),
          ("r3d_18", "r3d_d18", ((8, "n3ax2591imcy9ly", (62.3, 83.4)),
                                 (16, "8tqp8uhjmedflu1", (64.7, 85.0)))),
          ("r2d_18", "r2d_d18", ((8, "ju4fah9dksn08s1", (60.0, 81.2)),
                                 (16, "hyw8ltzvhadxgia", (59.4, 81.3)))),
          ("r2df_18", "r2df_d18", ((8, "4jexszps3564za3", (60.0, 81.8)),
                                   (16, "4yy0tdfebdy0ptr", (60.9, 81.9)))),
          ("mc2_18", "mc2_d18", ((8, "lkmhyjok8odtv8e", (63.0, 83.8)),
                                 (16, "xmtqk2w3p60yly0", (64.8, 85.1)))),
          ("mc3_18", "mc3_d18", ((8, "3jxzhc3kduyrpik", (63.3, 84.2)),
                                 (16, "rpgbzjewagjeu2f", (65.2, 85.8)))),
          ("mc4_18", "mc4_d18", ((8, "vx2xee36et823gs", (63.0, 84.2)),
                                 (16, "lrjwye0ldsgi2p2", (65.6, 85.6)))),
          ("mc5_18", "mc5_d18", ((8, "z6fxv6jr30i2lwz", (62.9, 84.2)),
                                 (16, "3qp62d3159rzwsj", (65.6, 85.5)))),
          ("rmc2_18", "rmc2_d18", ((8, "vnjpzq7li2b7tk2", (62.7, 83.9)),
                                   (16, "70k3p0xz6rjcdtb", (65.4, 85.5)))),
          ("rmc3_18", "rmc3_d18", ((8, "1vwjomlc45ox6u1", (62.8, 83.7)),
                                   (16, "n8eulubwh6l3o0b", (65.5, 85.7)))),
          ("rmc4_18", "rmc4_d18", ((8, "zots41ng2xs2ezu", (62.8, 83.3)),
                                   (16, "di3wwadbapc61rn", (65.6, 85.3)))),
          ("rmc5_18", "rmc5_d18", ((8, "3e56jjx6x1qot4x", (61.6, 83.1)),
                                   (16, "lb5jaji177hid7p", (63.5, 84.2)))),
      )
      for frames, dropbox_id, acc in per_length),
    _e("c3d", "kinetics_16frms_closer_look", _dropbox("hbzn4ykva64avxu/c3d_l16.pkl"),
       400, 16, 112, KINETICS400, f"{_SCRATCH_K400} (the 18-layer family's C3D); {_acc(63.4, 84.6)}; {_C2}"),
    # ---- audio-visual, Gradient-Blending (VMZ c2/tutorials/model_zoo.md, gradient_blending.md) -------
    # 32 (16) x 224 x 224 clips with 100 x 40 log-mels. Files trained with G-Blend (`g_b_*`) hold the
    # three heads: `last_out_L<n>` ("av"), `a_last_out_L<n>` ("audio"), `v_last_out_L<n>` ("visual").
    _e("av_ip_csn_152", "kinetics_32frms", _dropbox("13d5jgq65nd5sn6/g_b_ip_csn_152_kinetics.pkl"),
       400, 32, 224, KINETICS400, f"{_SCRATCH_K400} with Gradient-Blending; {_acc(79.1, 93.9)}; {_AV}"),
    _e("av_ip_csn_152", "sports1m_audioset_ft_kinetics_32frms",
       _dropbox("ubcy09t8ghes9m7/g_b_ip_csn_152_sports_audioset_ft_kinetics.pkl"), 400, 32, 224, KINETICS400,
       f"Sports-1M + AudioSet pre-training, fine-tuned on Kinetics-400 with Gradient-Blending; "
       f"{_acc(80.4, 94.8)}; {_AV}"),
    _e("av_ip_csn_152", "ig_audioset_ft_kinetics_32frms",
       _dropbox("9ja3rlmr568qemt/g_b_ip_csn_152_ig_audioset_ft_kinetics.pkl"), 400, 32, 224, KINETICS400,
       f"IG-65M + AudioSet pre-training, fine-tuned on Kinetics-400 with Gradient-Blending; "
       f"{_acc(83.3, 96.0)}; {_AV}", default=True),
    _e("av_ip_csn_152", "sports1m_audioset_32frms",
       _dropbox("u4dgz0z09aaim9x/sports1m_audioset_ip_csn_152.pkl"), 487, 32, 224, SPORTS1M,
       f"Sports-1M + AudioSet pre-training only; {_AV_UNSEEN}"),
    _e("av_ip_csn_152", "ig_audioset_32frms", _dropbox("bgxf62o9yzx7zfy/ig_audioset_ip_csn_152.pkl"),
       359, 32, 224, IG65M, f"IG-65M + AudioSet pre-training only; {_AV_UNSEEN}"),
    _e("av_r2plus1d_101", "audioset_16frms", _dropbox("7e36vogqyea152p/g_b_r2_plus_1d_101_audioset.pkl"),
       527, 16, 224, AUDIOSET, f"trained from scratch on AudioSet (527 classes) with Gradient-Blending; "
       f"accuracy not published in the model zoo; {_AV}"),
)  # fmt: skip

_REGISTRY: dict[str, dict[str, Pretraining]] = {}
for _p in _ENTRIES:
    _names = _REGISTRY.setdefault(_p.arch, {})
    if _p.name in _names:
        raise AssertionError(f"duplicate registry entry {_p.arch}/{_p.name}")
    _names[_p.name] = _p
del _p, _names

# VMZ's alternative names (pt/vmz/models/utils.py model_urls), after the arch prefix is stripped.
_ALIASES: dict[str, dict[str, str]] = {
    "r2plus1d_34": {
        "8_ig65m": "ig65m_8frms",
        "32_ig65m": "ig65m_32frms",
        "8_kinetics": "ig_ft_kinetics_8frms",
        "32_kinetics": "ig_ft_kinetics_32frms",
    },
}

_DEFAULTS: dict[str, Pretraining] = {}
for _p in _ENTRIES:
    if _p.default:
        if _p.arch in _DEFAULTS:
            raise AssertionError(f"two defaults for {_p.arch}: {_DEFAULTS[_p.arch].name}, {_p.name}")
        _DEFAULTS[_p.arch] = _p
del _p


def list_archs() -> list[str]:
    """Architectures with at least one released checkpoint."""
    return list(_REGISTRY)


def list_pretrainings(arch: str) -> list[str]:
    """Canonical pretraining names of ``arch``, .pth first; [] if it has no released weights."""
    return list(_REGISTRY.get(arch, {}))


def all_pretrainings() -> tuple[Pretraining, ...]:
    """Every registry entry."""
    return _ENTRIES


def aliases(arch: str) -> dict[str, str]:
    """Alternative names accepted for ``arch`` (VMZ's flat keys too), mapped to canonical names."""
    out: dict[str, str] = {}
    for short, canonical in _ALIASES.get(arch, {}).items():
        out[short] = canonical
        out[f"{arch}_{short}"] = canonical
    return out


def _resolve_name(arch: str, name: str) -> str | None:
    names = _REGISTRY[arch]
    candidates = [name]
    if name.startswith(arch + "_"):
        candidates.append(name[len(arch) + 1 :])
    for cand in candidates:
        if cand in names:
            return cand
        if cand in _ALIASES.get(arch, {}):
            return _ALIASES[arch][cand]
        # "<name>_caffe2" where only a pickle exists under <name>.
        base = cand.removesuffix("_caffe2")
        if base != cand and base in names and names[base].fmt == "pkl":
            return base
    return None


def get_pretraining(arch: str, name: str) -> Pretraining:
    """The checkpoint ``name`` of ``arch``; accepts VMZ's aliases and ``<arch>_<name>`` keys.

    Raises ``VMZError`` naming what exists when the arch or the name is unknown.
    """
    if arch not in _REGISTRY:
        raise VMZError(
            f"no released weights for arch {arch!r}; archs with weights: {', '.join(_REGISTRY)}"
        )
    resolved = _resolve_name(arch, name)
    if resolved is None:
        alias_note = ""
        if arch in _ALIASES:
            alias_note = f" (aliases: {', '.join(aliases(arch))})"
        raise VMZError(
            f"unknown pretraining {name!r} for {arch}; available: "
            f"{', '.join(_REGISTRY[arch])}{alias_note}"
        )
    return _REGISTRY[arch][resolved]


def resolve_key(key: str) -> Pretraining:
    """Look up a flat VMZ key such as ``ir_csn_152_ig65m_32frms`` or ``r2plus1d_34_8_kinetics``."""
    for arch in sorted(_REGISTRY, key=len, reverse=True):
        if key.startswith(arch + "_"):
            return get_pretraining(arch, key)
    raise VMZError(
        f"unknown checkpoint key {key!r}: it must start with one of {', '.join(_REGISTRY)}"
    )


def default_pretraining(arch: str) -> str | None:
    """The name of ``arch``'s default checkpoint (the row flagged ``default``: its Kinetics-400
    fine-tuned weights with the best published accuracy), or None if it has none."""
    entry = _DEFAULTS.get(arch)
    return entry.name if entry is not None else None
