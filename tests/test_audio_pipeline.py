"""Audio in the video pipeline: each clip's log-mels travel with its frames through the batcher to a
model that takes (clips, logmels), and the index says whether a video's audio was there.

The model here is a stand-in with the audio-visual interface (``model(clips, logmels, head=...)``,
``model.heads``, ``model.features`` -> audio/visual/joint) whose outputs expose its inputs, so that
the log-mels each clip received can be checked against `vmz_jax.video.audio` run directly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.videos import make_video
from vmz_jax.errors import VMZError
from vmz_jax.models.forward import make_forward
from vmz_jax.video import audio, pipeline
from vmz_jax.video.batcher import Batcher, Engine
from vmz_jax.video.clips import ClipSampling
from vmz_jax.video.decode import ffmpeg_exe
from vmz_jax.video.inputs import VideoJob
from vmz_jax.video.preprocess import Preprocess


class TinyAV(nnx.Module):
    """Audio features: each clip's log-mels averaged over time (40); visual: the clip's mean colour (3)."""

    def __init__(self, num_classes: int = 5):
        rngs = nnx.Rngs(0)
        self.fc1 = nnx.Linear(43, 8, rngs=rngs)
        self.fc = nnx.Linear(8, num_classes, rngs=rngs)
        self.fc_audio = nnx.Linear(40, num_classes, rngs=rngs)
        self.fc_visual = nnx.Linear(3, num_classes, rngs=rngs)

    def features(self, clips: jax.Array, logmels: jax.Array) -> dict[str, jax.Array]:
        a, v = logmels.mean(axis=1), clips.mean(axis=(1, 2, 3))
        return {"audio": a, "visual": v, "joint": jax.nn.relu(self.fc1(jnp.concatenate([v, a], axis=-1)))}

    def heads(self, clips: jax.Array, logmels: jax.Array) -> dict[str, jax.Array]:
        f = self.features(clips, logmels)
        return {"av": self.fc(f["joint"]), "audio": self.fc_audio(f["audio"]),
                "visual": self.fc_visual(f["visual"])}

    def __call__(self, clips: jax.Array, logmels: jax.Array, head: str = "av") -> jax.Array:
        return self.heads(clips, logmels)[head]


class TinyAudio(nnx.Module):
    """An audio-only model: ``model(logmels)``, ``model.features(logmels)``."""

    def __init__(self) -> None:
        self.fc = nnx.Linear(40, 3, rngs=nnx.Rngs(1))

    def features(self, logmels: jax.Array) -> jax.Array:
        return logmels.mean(axis=1)

    def __call__(self, logmels: jax.Array) -> jax.Array:
        return self.fc(self.features(logmels))


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True)


def _with_track(video: Path, name: str, source: str) -> Path:
    out = video.with_name(name)
    _ffmpeg("-i", str(video), "-f", "lavfi", "-i", source, "-map", "0:v", "-map", "1:a", "-c:v", "copy",
            "-c:a", "aac", str(out))
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("av")
    plain = make_video(d, "plain", frames=60, size=(32, 24))  # 2.4 s at 25 fps, no audio
    return {"silent": plain,
            "sound": _with_track(plain, "sound.mp4", "sine=f=600:r=22050:d=2.4,volume=2"),
            "short": _with_track(plain, "short.mp4", "anoisesrc=r=16000:d=1:a=0.3:seed=4")}


def _options(**kw):
    base = dict(sampling=ClipSampling(clip_len=8, num_clips=3), preprocess=Preprocess(short_side=24),
                batch_size=2, workers=2, audio=True)
    return pipeline.Options(**{**base, **kw})


def _expected_audio(path: Path, sampling: ClipSampling) -> np.ndarray:
    track = audio.decode_audio(path)
    total = 60
    raw = audio.log_mels(track.samples)
    if sampling.num_clips and sampling.num_clips > 1:
        blocks = audio.clip_log_mels(raw, video_frames=total, clip_span=sampling.span,
                                     num_clips=sampling.num_clips)
    else:
        blocks = audio.clip_log_mels(raw, video_frames=total, clip_span=sampling.span,
                                     starts=sampling.starts(total))
    return blocks.mean(axis=1)


PLANS = [ClipSampling(clip_len=8, num_clips=3), ClipSampling(clip_len=8, stride=20),
         ClipSampling(clip_len=8, num_clips=1)]


@pytest.mark.parametrize("sampling", PLANS)
def test_each_clip_gets_its_own_log_mels(videos, sampling):
    model = TinyAV()
    (result,) = pipeline.run(model, [videos["sound"]], "extract", _options(sampling=sampling))
    assert result.error is None, result.error
    out = result.outputs
    assert set(out) == {"audio", "visual", "joint"}
    want = _expected_audio(videos["sound"], sampling)
    assert out["audio"].shape == (len(result.clips), 40) == want.shape
    np.testing.assert_allclose(out["audio"], want, rtol=1e-5, atol=1e-6)
    assert out["audio"].max() > 10  # the tone is heard
    # The visual side is the pipeline's ordinary clips.
    visual = pipeline.run_forward(make_forward(model.fc_visual, lambda net, x: x.mean(axis=(1, 2, 3))),
                                  [videos["sound"]], _options(sampling=sampling, audio=False))
    np.testing.assert_allclose(out["visual"], next(visual).outputs, rtol=1e-6)
    assert result.info["audio"] == "present" and result.info["audio_codec"] == "aac"
    assert result.info["audio_rate"] == 22050 and not result.warnings


def test_missing_and_short_audio_are_reported_not_fatal(videos, capsys, tmp_path):
    model = TinyAV()
    jobs = [VideoJob(str(videos[k]), k) for k in ("silent", "short", "sound")]
    summary = pipeline.write(model, jobs, tmp_path, "extract", _options(), progress=False)
    assert summary.done == 3 and summary.failed == 0
    index = {json.loads(line)["output"]: json.loads(line) for line in (tmp_path / "index.jsonl").open()}
    assert {k: v["audio"] for k, v in index.items()} == {
        "silent.npz": "missing", "short.npz": "short", "sound.npz": "present"}
    assert "no audio track" in index["silent.npz"]["warnings"][0]
    assert "stretched over the video" in index["short.npz"]["warnings"][0]
    assert index["sound.npz"]["shape"] == {"audio": [3, 40], "visual": [3, 3], "joint": [3, 8]}
    silent = np.load(tmp_path / "silent.npz")
    assert silent["audio"].shape == (3, 40) and not silent["audio"].any()  # zeros, as VMZ's op gives
    short = np.load(tmp_path / "short.npz")["audio"]
    assert (short > 5).all()  # 1 s of noise stretched over the 2.4 s video reaches every clip
    assert "warning" in capsys.readouterr().err


def test_classify_with_a_head(videos, tmp_path):
    model = TinyAV()
    job = [VideoJob(str(videos["sound"]), "sound")]
    for head in ("av", "audio", "visual"):
        out = tmp_path / head
        pipeline.write(model, job, out, "classify", _options(head=head), progress=False)
        (line,) = (out / "index.jsonl").read_text().splitlines()
        assert json.loads(line)["head"] == head
    (logits,) = pipeline.run(model, [videos["sound"]], "logits", _options(head="audio"))
    want = np.asarray(model.fc_audio(jnp.asarray(_expected_audio(videos["sound"], _options().sampling))))
    np.testing.assert_allclose(logits.outputs, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling", PLANS[:2])
def test_an_audio_only_model_gets_the_raw_log_mels(videos, sampling):
    # VMZ's audio-only input has no video to align to: 1 s blocks of the raw frames (100 a second).
    (result,) = pipeline.run(TinyAudio(), [videos["sound"]], "extract", _options(sampling=sampling))
    raw = audio.log_mels(audio.decode_audio(videos["sound"]).samples)
    if sampling.num_clips:
        want = audio.uniform_clips(raw, sampling.num_clips)
    else:
        want = np.stack([audio.clip_at_seconds(raw, s / 25) for s in sampling.starts(60)])
    np.testing.assert_allclose(result.outputs, want.mean(axis=1), rtol=1e-5, atol=1e-6)
    aligned = pipeline.run(TinyAudio(), [videos["sound"]], "extract", _options(sampling=sampling,
                                                                              align_audio=True))
    np.testing.assert_allclose(next(aligned).outputs, _expected_audio(videos["sound"], sampling),
                               rtol=1e-5, atol=1e-6)


def test_options_refuse_what_audio_models_cannot_do():
    with pytest.raises(VMZError, match="head"):
        pipeline.Options(head="both")
    with pytest.raises(VMZError, match="mean pooling"):
        pipeline.Options(audio=True, pool_spatial="max")
    with pytest.raises(VMZError, match="conv_head"):
        pipeline.audio_output("conv_head")
    assert pipeline.audio_output("logits", "av") is pipeline.audio_output("logits", "av")


def test_batcher_carries_tuples_of_inputs():
    layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    fwd = make_forward(layer, lambda net, x: net(x[0]) + x[1].sum(axis=(1, 2))[:, None])
    b = Batcher(Engine(fwd, 2))
    rng = np.random.default_rng(0)
    examples = {i: (rng.standard_normal(4).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32))
                for i in range(3)}
    for key, x in examples.items():
        b.add("g", key, x)
    b.add("g", "plain", (np.ones(4, np.float32), np.ones((2, 5), np.float32)))  # another shape: own bucket
    b.close("g")
    b.finish()
    (done,) = b.take()
    for key, (x, m) in examples.items():
        np.testing.assert_allclose(done.outputs[key], np.asarray(layer(jnp.asarray(x))) + m.sum(), rtol=1e-5)
    assert b.batches == 3 and b.padded_rows == 1 + 1


# --- end to end, with a registry audio-visual model and the command line ----------------------------------

@pytest.fixture(scope="module")
def av_checkpoint(tmp_path_factory):
    """Random weights of the smallest audio-visual model, 400 classes (Kinetics labels apply)."""
    import vmz_jax
    from vmz_jax.models import build

    model = build("av_r2plus1d_18", 400, rngs=nnx.Rngs(3), clip_length=4)
    path = tmp_path_factory.mktemp("avck") / "av18"
    vmz_jax.save(model, path)
    return path, model


def _cli_args(path, videos, *more):
    return ["--arch", "av_r2plus1d_18", "--checkpoint", str(path), "--clip-len", "4", "--num-clips", "2",
            "--frame-size", "24", "--quiet", *more, str(videos["sound"]), str(videos["silent"])]


def _sound_log_mels(videos):
    sampling = ClipSampling(clip_len=4, num_clips=2)
    return audio.clip_log_mels(audio.log_mels(audio.decode_audio(videos["sound"]).samples),
                               video_frames=60, clip_span=sampling.span, num_clips=2)


@pytest.mark.slow  # builds and compiles a real audio-visual ResNet-18 pair: 20-40 s on two cores
def test_classify_from_the_command_line(videos, av_checkpoint, tmp_path):
    from vmz_jax.cli import main

    path, model = av_checkpoint
    assert main(["classify", *_cli_args(path, videos, "--head", "audio", "--out", str(tmp_path))]) == 0
    lines = [json.loads(line) for line in (tmp_path / "sound.jsonl").open()]
    logmels = jnp.asarray(_sound_log_mels(videos))
    model.eval()
    probs = np.asarray(jax.nn.softmax(model(jnp.zeros((2, 4, 24, 32, 3)), logmels, head="audio")))
    assert [c["top"][0]["index"] for c in lines[:2]] == list(probs.argmax(axis=1))
    # the CLI's compiled forward may run other convolution kernels than this eager call
    # (conv.CPU_CONVOLUTIONS: Eigen on AMX CPUs): float32 summation order, 2e-5 relative seen
    np.testing.assert_allclose([c["top"][0]["score"] for c in lines[:2]], probs.max(axis=1), rtol=1e-4)
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").open()]
    assert sorted(r["audio"] for r in index) == ["missing", "present"]
    assert all(r["head"] == "audio" for r in index)


@pytest.mark.slow
def test_extract_from_the_command_line(videos, av_checkpoint, tmp_path):
    from vmz_jax.cli import main

    path, model = av_checkpoint
    assert main(["extract", *_cli_args(path, videos, "--audio", "--out", str(tmp_path))]) == 0
    features = np.load(tmp_path / "sound.npz")
    assert {k: features[k].shape for k in features} == {k: (2, d) for k, d in model.feature_dims.items()}
    model.eval()
    want = np.asarray(model.audio.features(jnp.asarray(_sound_log_mels(videos))))  # the audio tower's input
    np.testing.assert_allclose(features["audio"], want, rtol=2e-5, atol=2e-5)
    silent = np.load(tmp_path / "plain.npz")  # the video without audio: zero log-mels, still features
    assert {k: silent[k].shape for k in silent} == {k: (2, d) for k, d in model.feature_dims.items()}


@pytest.mark.parametrize("argv,fragment", [
    (["extract", "--audio", "--arch", "r2plus1d_34"], "--audio needs an audio or audio-visual model"),
    (["classify", "--head", "audio", "--arch", "r2plus1d_34"], "--head chooses among"),
    (["classify", "--head", "visual", "--arch", "a_resnet_18"], "--head chooses among"),
])
def test_audio_usage_errors_are_one_line(capsys, tmp_path, argv, fragment):
    from vmz_jax.cli import main

    assert main([*argv, "--out", str(tmp_path), "v.mp4"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err
