"""The extract/classify pipeline end to end on videos made here: equality with a PyTorch pipeline
(ig65m's resize + normalize + the reference model), exact clip counts, outputs, bad input, skipping,
several devices and several processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.parity import make_pair, relative_error
from tests.test_checkpoint import random_params
from tests.videos import make_video, truncate
from vmz_jax.cli import main
from vmz_jax.video import decode as video
from vmz_jax.video import pipeline
from vmz_jax.video.clips import ClipSampling
from vmz_jax.video.preprocess import MEAN, STD, Preprocess
from vmz_jax.weights import checkpoint
from vmz_jax.weights import download as dl

REPO = Path(__file__).resolve().parents[1]
ARCH = "r2plus1d_10"


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(dl.HOME_ENV, str(tmp_path / "home"))


@pytest.fixture(scope="module")
def pair():
    return make_pair(ARCH, seed=3, num_classes=11)


@pytest.fixture(scope="module")
def odd_video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("v"), "odd", frames=11, size=(321, 239), fps=24)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A random-weight checkpoint of a small network with 400 classes (so Kinetics labels apply)."""
    directory = tmp_path_factory.mktemp("ck") / "r2plus1d_10"
    checkpoint.save(directory, random_params(ARCH, 400, seed=1), {"arch": ARCH, "num_classes": 400})
    return directory


def torch_pipeline(ref: torch.nn.Module, frames: np.ndarray, short_side: int, crop: int | None = None,
                   pool: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """ig65m-pytorch's transform: float, (C, T, H, W), interpolate(scale_factor), normalize, centre
    crop; then the reference network: pooled layer4 features and logits of one clip."""
    clip = torch.from_numpy(frames).float().permute(3, 0, 1, 2)
    scale = short_side / min(clip.shape[-2:])
    clip = F.interpolate(clip, scale_factor=scale, mode="bilinear", align_corners=False)
    clip = (clip - torch.from_numpy(MEAN).reshape(3, 1, 1, 1)) / torch.from_numpy(STD).reshape(3, 1, 1, 1)
    if crop:
        # VMZ's centre crop, placed as Caffe2's VideoInputOp does: (H - c) / 2 in C++ ints, i.e. floored
        # (ig65m-pytorch's CenterCrop rounds half to even; its extract does not crop)
        h, w = clip.shape[-2:]
        i, j = (h - crop) // 2, (w - crop) // 2
        clip = clip[..., i:i + crop, j:j + crop]
    with torch.no_grad():
        out = ref.forward_stages(clip[None].contiguous())
    layer4 = out["layer4"]
    reduce = torch.amax if pool == "max" else torch.mean
    features = reduce(reduce(layer4, dim=(3, 4)), dim=2)
    return features[0].numpy(), out["logits"][0].numpy()


@pytest.mark.parametrize("pool,crop", [("mean", None), ("max", 24)])
def test_features_and_logits_equal_the_torch_pipeline(pair, odd_video, pool, crop):
    ref, model = pair
    short_side, clip_len = 32, 4
    frames = np.stack(list(video.decode(video.probe(odd_video))))
    assert frames.shape == (11, 239, 321, 3)
    options = pipeline.Options(
        sampling=ClipSampling(clip_len=clip_len),
        preprocess=Preprocess(short_side=short_side, crop="center" if crop else "none", crop_size=crop),
        pool_spatial=pool, pool_temporal=pool, batch_size=3)
    (features,) = pipeline.run(model, [odd_video], "extract", options)
    (logits,) = pipeline.run(model, [odd_video], "logits", options)
    assert features.outputs.shape == (2, 512) and logits.outputs.shape == (2, 11)  # 11 // 4 clips
    for k in range(2):
        want_f, want_l = torch_pipeline(ref, frames[4 * k:4 * k + 4], short_side, crop, pool)
        assert relative_error(features.outputs[k], want_f) < 1e-5
        assert relative_error(logits.outputs[k], want_l) < 1e-5
    assert [(c.start, c.end) for c in features.clips] == [(0, 4), (4, 8)]


def test_features_of_one_video(pair, odd_video, tmp_path):
    _, model = pair
    options = pipeline.Options(sampling=ClipSampling(clip_len=4), preprocess=Preprocess(short_side=32),
                               batch_size=3)
    (result,) = pipeline.run(model, [odd_video], "extract", options)
    np.testing.assert_array_equal(pipeline.features(model, odd_video, options), result.outputs)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(video.VideoError, match="empty.mp4: empty file"):
        pipeline.features(model, tmp_path / "empty.mp4", options)


def test_three_crops_are_views_of_each_clip(pair, odd_video):
    ref, model = pair
    options = pipeline.Options(sampling=ClipSampling(clip_len=4, num_clips=1),
                               preprocess=Preprocess(short_side=32, crop="three"), batch_size=2)
    (result,) = pipeline.run(model, [odd_video], "extract", options)
    assert result.outputs.shape == (1, 3, 512)
    frames = np.stack(list(video.decode(video.probe(odd_video))))[3:7]  # centred: (11 - 4) // 2
    clip = torch.from_numpy(frames).float().permute(3, 0, 1, 2)
    clip = F.interpolate(clip, scale_factor=32 / 239, mode="bilinear", align_corners=False)
    clip = (clip - torch.from_numpy(MEAN).reshape(3, 1, 1, 1)) / torch.from_numpy(STD).reshape(3, 1, 1, 1)
    assert clip.shape[-2:] == (31, 42)  # floor(239 * 32 / 239) is 31 in float arithmetic
    for view, left in enumerate([0, 5, 11]):  # j * 11 // 2: Caffe2's integer arithmetic
        with torch.no_grad():
            want = ref.forward_stages(clip[None, :, :, 0:31, left:left + 31].contiguous())["features"]
        assert relative_error(result.outputs[0, view], want[0].numpy()) < 1e-5


@pytest.mark.parametrize("fmt,fps,frames,plan,expected", [
    ("h264_mp4", 25, 23, {"clip_len": 4}, [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]),
    ("mpeg4_avi", 24, 17, {"clip_len": 4, "sampling_rate": 2}, [(0, 7), (8, 15)]),
    ("vp9_webm", 30, 20, {"clip_len": 4, "stride": 3}, [(s, s + 4) for s in range(0, 17, 3)]),
    ("mjpeg_mkv", 25, 21, {"clip_len": 4, "num_clips": 3}, [(0, 4), (8, 12), (17, 21)]),
])
def test_clip_counts_and_times_are_exact(pair, tmp_path, fmt, fps, frames, plan, expected):
    _, model = pair
    path = make_video(tmp_path, "v", frames=frames, size=(48, 36), fps=fps, fmt=fmt)
    options = pipeline.Options(sampling=ClipSampling(**plan), preprocess=Preprocess(short_side=24))
    (result,) = pipeline.run(model, [path], "extract", options)
    assert result.error is None and result.info["frames"] == frames
    assert [(c.start, c.end) for c in result.clips] == expected
    assert result.outputs.shape == (len(expected), 512)
    assert result.clips[-1].end_s == pytest.approx(expected[-1][1] / fps, abs=1e-6)


def test_short_videos_pad_or_skip_with_a_warning(pair, tmp_path):
    _, model = pair
    path = make_video(tmp_path, "short", frames=3, size=(48, 36))
    padded, skipped = (next(pipeline.run(model, [path], "extract", pipeline.Options(
        sampling=ClipSampling(clip_len=4, short=short), preprocess=Preprocess(short_side=24))))
        for short in ("pad", "skip"))
    assert padded.outputs.shape == (1, 512) and padded.clips[0].padded == 1
    assert skipped.outputs.shape == (0, 512) and skipped.clips == []
    assert "shorter than one clip" in padded.warnings[0] and "1 clip(s) padded" in padded.warnings[0]
    assert "no clips" in skipped.warnings[0]


def test_rotated_and_portrait_videos_give_upright_clips(pair, tmp_path):
    _, model = pair
    videos = [make_video(tmp_path, "rot", frames=8, size=(64, 48), rotation=90),
              make_video(tmp_path, "portrait", frames=8, size=(48, 64))]
    options = pipeline.Options(sampling=ClipSampling(clip_len=4), preprocess=Preprocess(short_side=24))
    results = {r.job.name: r for r in pipeline.run(model, videos, "extract", options)}
    assert results["rot"].info["rotation"] == 90
    for r in results.values():
        assert (r.info["width"], r.info["height"]) == (48, 64) and r.outputs.shape == (2, 512)
    # Upright frames of the same size and motion: similar, not equal, features.
    assert relative_error(results["rot"].outputs, results["portrait"].outputs) < 0.5


def test_ffmpeg_resize_is_close_to_exact(pair, odd_video):
    _, model = pair
    results = {}
    for resize in ("exact", "ffmpeg"):
        options = pipeline.Options(sampling=ClipSampling(clip_len=4),
                                   preprocess=Preprocess(short_side=32, resize=resize))
        (results[resize],) = pipeline.run(model, [odd_video], "extract", options)
    assert results["ffmpeg"].outputs.shape == results["exact"].outputs.shape == (2, 512)
    error = relative_error(results["ffmpeg"].outputs, results["exact"].outputs)
    assert 1e-5 < error < 0.2


def test_fps_resampling_changes_the_frame_count(pair, tmp_path):
    _, model = pair
    path = make_video(tmp_path, "v", frames=50, size=(48, 36), fps=25)
    options = pipeline.Options(sampling=ClipSampling(clip_len=4), preprocess=Preprocess(short_side=24),
                               fps=10)
    (result,) = pipeline.run(model, [path], "extract", options)
    assert result.info["frames"] == 20 and result.info["decoded_fps"] == 10
    assert len(result.clips) == 5 and result.clips[1].start_s == pytest.approx(0.4)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_fifty_videos_two_corrupt(capsys, tmp_path, ckpt):
    folder = tmp_path / "videos"
    folder.mkdir()
    frames = {}
    for i in range(48):
        fps = (24, 25, 30)[i % 3]
        frames[f"v{i:02d}"] = 8 + i % 5
        make_video(folder, f"v{i:02d}", frames=frames[f"v{i:02d}"], size=(40, 30), fps=fps)
    (folder / "corrupt_random.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    truncate(make_video(tmp_path, "whole", frames=20, size=(40, 30)), 0.5, name="corrupt_cut.mp4")
    os.replace(tmp_path / "corrupt_cut.mp4", folder / "corrupt_cut.mp4")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "extract", folder, "--out", out, "--arch", ARCH, "--checkpoint", ckpt,
                        "--clip-len", "4", "--frame-size", "16", "--batch-size", "8", "--workers", "2")
    assert code == 2
    npys = sorted(p.stem for p in out.glob("*.npy"))
    assert npys == sorted(frames)
    for name, n in frames.items():
        assert np.load(out / f"{name}.npy").shape == (n // 4, 512)
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["video"]).name for f in failures) == ["corrupt_cut.mp4", "corrupt_random.mp4"]
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 48 and all(len(r["clip_times"]) == r["clips"] for r in index)
    assert "2 of 50 videos failed" in err.strip().splitlines()[-1]
    assert not list(out.glob(".*"))  # no temporary files left

    # A second run skips the 48 and retries the 2; --overwrite redoes everything.
    stamp = (out / "v00.npy").stat().st_mtime_ns
    code, err = run_cli(capsys, "extract", folder, "--out", out, "--arch", ARCH, "--checkpoint", ckpt,
                        "--clip-len", "4", "--frame-size", "16", "--quiet")
    assert code == 2 and (out / "v00.npy").stat().st_mtime_ns == stamp
    assert len((out / "index.jsonl").read_text().splitlines()) == 48
    code, _ = run_cli(capsys, "extract", folder / "v00.mp4", "--out", out, "--arch", ARCH, "--checkpoint",
                      ckpt, "--clip-len", "4", "--frame-size", "16", "--overwrite", "--quiet")
    assert code == 0 and (out / "v00.npy").stat().st_mtime_ns != stamp


def test_classify_writes_top_k_per_clip_and_per_video(capsys, tmp_path, ckpt):
    path = make_video(tmp_path, "clip", frames=9, size=(40, 30))
    out = tmp_path / "out"
    code, err = run_cli(capsys, "classify", path, "--out", out, "--arch", ARCH, "--checkpoint", ckpt,
                        "--clip-len", "4", "--frame-size", "16", "--top-k", "3")
    assert code == 0, err
    lines = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [line["clip"] for line in lines] == [0, 1, "video"]
    names = json.loads((REPO / "vmz_jax" / "data" / "kinetics400_classes.json").read_text())
    for line in lines:
        assert len(line["top"]) == 3
        assert all(t["label"] == names[t["index"]] for t in line["top"])
        scores = [t["score"] for t in line["top"]]
        assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    (video_line,) = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert video_line["top"] == lines[-1]["top"] and video_line["clips"] == 2
    assert (lines[0]["start"], lines[0]["end"]) == (0.0, 0.16)

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"class {i}" for i in range(400)]))
    code, _ = run_cli(capsys, "classify", path, "--out", tmp_path / "o2", "--arch", ARCH, "--checkpoint",
                      ckpt, "--clip-len", "4", "--frame-size", "16", "--labels", labels, "--quiet")
    first = json.loads((tmp_path / "o2" / "clip.jsonl").read_text().splitlines()[0])
    assert code == 0 and first["top"][0]["label"] == f"class {first['top'][0]['index']}"
    labels.write_text(json.dumps(["a", "b"]))
    code, err = run_cli(capsys, "classify", path, "--out", tmp_path / "o3", "--arch", ARCH, "--checkpoint",
                        ckpt, "--labels", labels)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "2 labels" in err


@pytest.mark.parametrize("argv,fragment", [
    (["extract", "--out", "o", "--arch", ARCH], "no videos given"),
    (["extract", "nothing*.mp4", "--out", "o", "--arch", ARCH], "matches no files"),
    (["extract", "a.mp4", "--out", "o", "--arch", "resnet50"], "unknown architecture"),
    (["extract", "a.mp4", "--out", "o", "--arch", ARCH, "--stride", "2", "--num-clips", "3"],
     "give one of them"),
    (["extract", "a.mp4", "--out", "o", "--arch", "r2plus1d_10"], "has no released Kinetics weights"),
    (["extract", "a.mp4", "--list", "missing.txt", "--out", "o", "--arch", ARCH], "missing.txt"),
])
def test_usage_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert fragment in err


def test_same_names_in_different_folders_clash_unless_a_folder_is_given(capsys, tmp_path, ckpt):
    for sub in ("a", "b"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        make_video(tmp_path / "in" / sub, "x", frames=4, size=(40, 30))
    code, err = run_cli(capsys, "extract", tmp_path / "in/a/x.mp4", tmp_path / "in/b/x.mp4", "--out",
                        tmp_path / "o", "--arch", ARCH, "--checkpoint", ckpt)
    assert code == 2 and "same name" in err
    code, _ = run_cli(capsys, "extract", tmp_path / "in", "--out", tmp_path / "o", "--arch", ARCH,
                      "--checkpoint", ckpt, "--clip-len", "4", "--frame-size", "16", "--quiet")
    assert code == 0 and (tmp_path / "o/a/x.npy").exists() and (tmp_path / "o/b/x.npy").exists()


def test_list_files_and_globs(capsys, tmp_path, ckpt):
    paths = [make_video(tmp_path, f"g{i}", frames=4, size=(40, 30)) for i in range(3)]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# videos\n{paths[0]}\n\n")
    code, _ = run_cli(capsys, "extract", str(tmp_path / "g[12].mp4"), "--list", listing, "--out",
                      tmp_path / "o", "--arch", ARCH, "--checkpoint", ckpt, "--clip-len", "4",
                      "--frame-size", "16", "--quiet")
    assert code == 0 and sorted(p.name for p in (tmp_path / "o").glob("*.npy")) == ["g0.npy", "g1.npy",
                                                                                    "g2.npy"]


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.npy"

    def explode(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        pipeline.atomic_write(target, explode)
    assert list(tmp_path.iterdir()) == []


_SUBPROCESS = """
import sys, json, numpy as np, jax
from flax import nnx
sys.path.insert(0, {repo!r})
from tests.parity import make_pair
from vmz_jax.video import pipeline
from vmz_jax.video.clips import ClipSampling
from vmz_jax.video.preprocess import Preprocess
_, model = make_pair({arch!r}, seed=3, num_classes=11)
options = pipeline.Options(sampling=ClipSampling(clip_len=4), preprocess=Preprocess(short_side=32),
                           batch_size=3)
(r,) = pipeline.run(model, [{video!r}], "extract", options)
engine = pipeline.Engine(model, "extract", options)
np.save({out!r}, r.outputs)
print(json.dumps({{"devices": jax.local_device_count(), "batch": engine.batch_size}}))
"""


def test_batches_are_split_over_several_devices(pair, odd_video, tmp_path):
    _, model = pair
    options = pipeline.Options(sampling=ClipSampling(clip_len=4), preprocess=Preprocess(short_side=32),
                               batch_size=3)
    (single,) = pipeline.run(model, [odd_video], "extract", options)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    code = _SUBPROCESS.format(repo=str(REPO), arch=ARCH, video=str(odd_video), out=str(tmp_path / "f.npy"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"devices": 2, "batch": 4}
    assert relative_error(np.load(tmp_path / "f.npy"), single.outputs) < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_share_the_list(tmp_path, ckpt):
    folder = tmp_path / "videos"
    folder.mkdir()
    for i in range(5):
        make_video(folder, f"v{i}", frames=4, size=(40, 30))
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "vmz_jax.cli", "extract", str(folder), "--out", str(tmp_path / "out"),
         "--arch", ARCH, "--checkpoint", str(ckpt), "--clip-len", "4", "--frame-size", "16", "--quiet",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    out = tmp_path / "out"
    assert sorted(p.stem for p in out.glob("*.npy")) == [f"v{i}" for i in range(5)]
    parts = [[json.loads(line)["video"] for line in (out / f"index.{i:05d}-of-00002.jsonl").read_text()
              .splitlines()] for i in range(2)]
    assert sorted(Path(v).stem for v in parts[0]) == ["v0", "v2", "v4"]
    assert sorted(Path(v).stem for v in parts[1]) == ["v1", "v3"]


def test_keep_truncated_uses_the_frames_that_decode(capsys, tmp_path, ckpt):
    whole = make_video(tmp_path, "whole", frames=40, size=(40, 30), fmt="mjpeg_mkv")
    cut = truncate(whole, 0.6, name="cut.mkv")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "extract", cut, "--out", out, "--arch", ARCH, "--checkpoint", ckpt,
                        "--clip-len", "4", "--frame-size", "16")
    assert code == 2 and "truncated or damaged" in err and not (out / "cut.npy").exists()
    code, err = run_cli(capsys, "extract", cut, "--out", out, "--arch", ARCH, "--checkpoint", ckpt,
                        "--clip-len", "4", "--frame-size", "16", "--keep-truncated")
    (record,) = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert code == 0 and "warning" in err and "truncated or damaged" in record["warnings"][0]
    assert 0 < record["frames"] < 40 and np.load(out / "cut.npy").shape == (record["frames"] // 4, 512)


class _Terminal:
    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_line_counts_videos_and_clips():
    stream = _Terminal()
    bar = pipeline.Progress("vmz-jax extract", 5, True, stream)
    summary = pipeline.Summary(total=5, done=2, skipped=1, failed=1, clips=30)
    bar.update(summary, force=True)
    bar.message("vmz-jax extract: failed: x.mp4: empty file (0 bytes)")
    bar.close(summary)
    assert "4/5 videos (1 failed, 1 skipped), 30 clips" in stream.text and "clips/s" in stream.text
    assert stream.text.count("\r\033[K") == 3 and stream.text.endswith("\n")


@pytest.mark.slow
@pytest.mark.parametrize("arch,short_side", [("r2plus1d_34", 128), ("ir_csn_152", 256)])
def test_full_size_default_contract_equals_the_torch_pipeline(tmp_path, arch, short_side):
    """ig65m's extract at full size: 32-frame clips of a 321x239 video, short side 128 (256 for CSN)."""
    ref, model = make_pair(arch, seed=5, num_classes=400, clip_length=32)
    path = make_video(tmp_path, "v", frames=70, size=(321, 239), fps=30)
    frames = np.stack(list(video.decode(video.probe(path))))
    options = pipeline.Options(sampling=ClipSampling(clip_len=32),
                               preprocess=Preprocess(short_side=short_side))
    (result,) = pipeline.run(model, [path], "extract", options)
    assert result.outputs.shape == (2, model.fc.in_features)
    for k in range(2):
        want, _ = torch_pipeline(ref, frames[32 * k:32 * k + 32], short_side)
        assert relative_error(result.outputs[k], want) < 1e-5
