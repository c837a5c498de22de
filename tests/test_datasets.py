"""Labelled video lists (folders, list files, UCF101/HMDB51/Kinetics split files as published) and the
training clips of `VideoClipDataset` (determinism, augmentation, seek-only decoding, failures)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.videos import make_video, truncate, with_audio
from vmz_jax.errors import VMZError
from vmz_jax.train.data import Dataset
from vmz_jax.video import datasets as ds
from vmz_jax.video.decode import DecodeReport, VideoError, decode, probe
from vmz_jax.video.preprocess import MEAN, STD, resize_short_side


def touch(root: Path, *relative: str) -> None:
    for rel in relative:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


# --- lists -----------------------------------------------------------------------------------------


def test_folders_recursive_sorted_and_empty_class(tmp_path):
    touch(tmp_path, "b_cls/x.mp4", "b_cls/sub/y.AVI", "a_cls/z.mkv", "a_cls/notes.txt", ".hidden/q.mp4")
    videos = ds.open_dataset(tmp_path)
    assert videos.classes == ["a_cls", "b_cls"]
    assert [(Path(r.path).name, r.label, r.label_name) for r in videos] == [
        ("z.mkv", 0, "a_cls"), ("x.mp4", 1, "b_cls"), ("y.AVI", 1, "b_cls")]
    (tmp_path / "c_empty").mkdir()
    touch(tmp_path, "c_empty/readme.txt")
    with pytest.raises(VMZError, match="1 class folder.*hold no videos: c_empty"):
        ds.open_dataset(tmp_path)


@pytest.mark.parametrize("sep", [",", "\t", " "])
def test_list_with_names_header_and_relative_paths(tmp_path, sep):
    touch(tmp_path, "v/a 1.mp4" if sep != " " else "v/a1.mp4", "v/b.mp4", "v/c.mp4")
    first = "v/a 1.mp4" if sep != " " else "v/a1.mp4"
    text = f"path{sep}label\n# a comment\n{first}{sep}run\nv/b.mp4{sep}jump\n\nv/c.mp4{sep}run\n"
    (tmp_path / "list.txt").write_text(text)
    videos = ds.open_dataset(tmp_path / "list.txt")
    assert videos.classes == ["jump", "run"]
    assert [r.label for r in videos] == [1, 0, 1]
    assert videos[0].path == str(tmp_path / first)


def test_list_with_indices_and_class_file(tmp_path):
    touch(tmp_path, "a.mp4", "b.mp4")
    (tmp_path / "list.csv").write_text("a.mp4,2\nb.mp4,0\n")
    videos = ds.open_dataset(tmp_path / "list.csv")
    assert videos.classes == ["0", "1", "2"] and [r.label for r in videos] == [2, 0]
    (tmp_path / "names.json").write_text('["x", "y", "z"]')
    named = ds.open_dataset(tmp_path / "list.csv", classes=tmp_path / "names.json")
    assert [r.label_name for r in named] == ["z", "x"]
    with pytest.raises(VMZError, match=r"list.csv: line 1: class index 2 is outside the 2 classes"):
        ds.open_dataset(tmp_path / "list.csv", classes=["x", "y"])
    (tmp_path / "bad.csv").write_text("a.mp4,run\nb.mp4,fly\n")
    with pytest.raises(VMZError, match=r"bad.csv: line 2: unknown class 'fly'"):
        ds.open_dataset(tmp_path / "bad.csv", classes=["run", "jump"])
    (tmp_path / "short.csv").write_text("a.mp4,run\nb.mp4\n")
    with pytest.raises(VMZError, match=r"short.csv: line 2 is not 'path,label'"):
        ds.open_dataset(tmp_path / "short.csv")


UCF_CLASSIND = "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n3 Archery\r\n4 HandstandPushups\r\n"
UCF_TRAIN = ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
             "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.avi 1\r\n"
             "ApplyLipstick/v_ApplyLipstick_g08_c01.avi 2\r\n"
             "Archery/v_Archery_g08_c01.avi 3\r\n"
             "HandstandPushups/v_HandStandPushups_g08_c01.avi 4\r\n")
UCF_TEST = ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\n"
            "Archery/v_Archery_g01_c01.avi\r\n"
            "HandstandPushups/v_HandStandPushups_g01_c01.avi\r\n")


def ucf_tree(tmp_path: Path) -> tuple[Path, Path]:
    notes, root = tmp_path / "ucfTrainTestlist", tmp_path / "UCF-101"
    notes.mkdir()
    (notes / "classInd.txt").write_bytes(UCF_CLASSIND.encode())
    (notes / "trainlist01.txt").write_bytes(UCF_TRAIN.encode())
    (notes / "testlist01.txt").write_bytes(UCF_TEST.encode())
    on_disk = [line.split()[0] for line in (UCF_TRAIN + UCF_TEST).splitlines()]
    on_disk.remove("ApplyLipstick/v_ApplyLipstick_g08_c01.avi")  # named by the list, not downloaded
    on_disk = [p.replace("HandStand", "Handstand") if "g01" in p else p for p in on_disk]  # case differs
    touch(root, *on_disk)
    return notes, root


def test_ucf101_split_files(tmp_path):
    notes, root = ucf_tree(tmp_path)
    with pytest.warns(ds.MissingVideosWarning, match=r"1 of the 5 videos .*v_ApplyLipstick_g08_c01.avi"):
        train = ds.open_dataset(notes, root=root, split=1, subset="train")
    assert train.classes == ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "HandstandPushups"]
    assert [r.label for r in train] == [0, 0, 2, 3]
    assert train.missing == [str(root / "ApplyLipstick/v_ApplyLipstick_g08_c01.avi")]
    test = ds.open_dataset(notes / "classInd.txt", root=root, subset="test")
    assert [(r.label, Path(r.path).name) for r in test] == [
        (0, "v_ApplyEyeMakeup_g01_c01.avi"), (2, "v_Archery_g01_c01.avi"),
        (3, "v_HandstandPushups_g01_c01.avi")]  # found despite the case of the list's name
    same = ds.open_dataset(notes / "testlist01.txt", root=root)
    assert [r.path for r in same] == [r.path for r in test]
    with pytest.raises(VMZError, match="needs the folder of its videos"):
        ds.open_dataset(notes)
    with pytest.raises(VMZError, match="trainlist02.txt: no such file"):
        ds.open_dataset(notes, root=root, split=2)
    (notes / "trainlist01.txt").write_text("Archery/v_Archery_g08_c01.avi 1\n")
    with pytest.raises(VMZError, match=r"line 1: .*folder Archery but labelled 1 \(ApplyEyeMakeup\)"):
        ds.open_dataset(notes, root=root)


def test_hmdb51_split_files(tmp_path):
    notes, root = tmp_path / "testTrainMulti_7030_splits", tmp_path / "hmdb51"
    notes.mkdir()
    published = {"brush_hair": ["April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 ",
                                "April_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 ",
                                "Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi 0 "],
                 "ride_bike": ["Bike_Ride_ride_bike_f_cm_np1_ba_med_0.avi 1 ",
                               "Bike_Ride_ride_bike_f_cm_np1_ba_med_1.avi 2 ",
                               "Missing_ride_bike_f_cm_np1_ba_med_9.avi 1 "]}
    for name, lines in published.items():
        (notes / f"{name}_test_split1.txt").write_text("\n".join(lines) + "\n")
        swapped = [line.replace(" 1 ", " x ").replace(" 2 ", " 1 ").replace(" x ", " 2 ") for line in lines]
        (notes / f"{name}_test_split2.txt").write_text("\n".join(swapped) + "\n")
        for line in lines:
            if not line.startswith("Missing"):
                touch(root / name, line.split()[0])
    with pytest.warns(ds.MissingVideosWarning, match="1 of the 3 videos"):
        train = ds.open_dataset(notes, root=root, split=1)
    assert train.classes == ["brush_hair", "ride_bike"]
    assert [(r.label, Path(r.path).name) for r in train] == [
        (0, "April_09_brush_hair_u_nm_np1_ba_goo_0.avi"), (1, "Bike_Ride_ride_bike_f_cm_np1_ba_med_0.avi")]
    test = ds.open_dataset(notes / "ride_bike_test_split1.txt", root=root, subset="test")
    assert [Path(r.path).name for r in test] == ["April_09_brush_hair_u_nm_np1_ba_goo_1.avi",
                                                 "Bike_Ride_ride_bike_f_cm_np1_ba_med_1.avi"]
    with pytest.warns(ds.MissingVideosWarning):
        split2 = ds.open_dataset(notes / "brush_hair_test_split2.txt", root=root, subset="test")
    assert [r.path for r in split2] == [r.path for r in train]  # the file's split, 1 and 2 swapped
    (notes / "ride_bike_test_split1.txt").write_text("x.avi 3\n")
    with pytest.raises(VMZError, match=r"ride_bike_test_split1.txt: line 1 is not 'video.avi 0\|1\|2'"):
        ds.open_dataset(notes, root=root)


KINETICS_CSV = ('label,youtube_id,time_start,time_end,split,is_cc\n'
                'abseiling,--07WQ2iBlw,1,11,train,0\n'
                '"air drumming",--nQbRBEz2s,104,114,train,0\n'
                '"passing American football (in game)",-9FBRjYTbXo,25,35,train,0\n'
                'abseiling,0wR5jVB-WPk,417,427,train,0\n'
                'abseiling,notOnDisk00,0,10,train,0\n')


def test_kinetics_csv_layouts(tmp_path):
    (tmp_path / "train.csv").write_text(KINETICS_CSV)
    root = tmp_path / "videos_train"
    touch(root, "abseiling/--07WQ2iBlw_000001_000011.mp4",        # crawler layout: the label
          "air_drumming/--nQbRBEz2s_000104_000114.mp4",           # rename_classnames.sh: underscores
          "-9FBRjYTbXo_000025_000035.mkv",                        # flat, another container
          "abseiling/0wR5jVB-WPk_000417_000427.mp4")
    with pytest.warns(ds.MissingVideosWarning, match="notOnDisk00_000000_000010"):
        videos = ds.open_dataset(tmp_path / "train.csv", root=root)
    assert videos.classes == ["abseiling", "air drumming", "passing American football (in game)"]
    assert [(r.label, Path(r.path).relative_to(root).as_posix()) for r in videos] == [
        (0, "abseiling/--07WQ2iBlw_000001_000011.mp4"), (1, "air_drumming/--nQbRBEz2s_000104_000114.mp4"),
        (2, "-9FBRjYTbXo_000025_000035.mkv"), (0, "abseiling/0wR5jVB-WPk_000417_000427.mp4")]
    (tmp_path / "test.csv").write_text("youtube_id,time_start,time_end,split\n--07WQ2iBlw,1,11,test\n")
    with pytest.raises(VMZError, match="no label column"):
        ds.open_dataset(tmp_path / "test.csv", root=root)
    with pytest.raises(VMZError, match=r"2 label\(s\) not in the class list"):
        ds.open_dataset(tmp_path / "train.csv", root=root, classes=["abseiling"])


def test_stratified_validation_split_reproducible(tmp_path):
    touch(tmp_path, *[f"c{c}/v{i:02d}.mp4" for c in range(3) for i in range(10 + 5 * c)])
    videos = ds.open_dataset(tmp_path)
    train, val = ds.split_validation(videos, 0.2, seed=7)
    again = ds.split_validation(videos, 0.2, seed=7)
    other = ds.split_validation(videos, 0.2, seed=8)
    assert [r.path for r in val] == [r.path for r in again[1]]
    assert [r.path for r in val] != [r.path for r in other[1]]
    assert list(val.counts()) == [2, 3, 4] and list(train.counts()) == [8, 12, 16]
    assert {r.path for r in train} | {r.path for r in val} == {r.path for r in videos}
    assert not {r.path for r in train} & {r.path for r in val}


def test_train_val_checks(tmp_path):
    touch(tmp_path, "a.mp4", "b.mp4", "c.mp4")
    (tmp_path / "train.csv").write_text("a.mp4,run\nb.mp4,jump\n")
    (tmp_path / "val.csv").write_text("c.mp4,run\n")
    (tmp_path / "val_bad.csv").write_text("c.mp4,swim\n")
    train = ds.open_dataset(tmp_path / "train.csv")
    _, val = ds.train_val(train, ds.open_dataset(tmp_path / "val.csv"))
    assert val is not None and val.classes == ["jump", "run"] and val[0].label == 1
    with pytest.raises(VMZError, match=r"val_bad.csv: 1 class\(es\) of the validation set are not among"):
        ds.train_val(train, ds.open_dataset(tmp_path / "val_bad.csv"))
    fixed = ds.open_dataset(tmp_path / "train.csv", classes=["jump", "run", "swim"])
    with pytest.raises(VMZError, match=r"1 of the 3 classes have no training videos: swim"):
        ds.train_val(fixed)
    with pytest.raises(VMZError, match="not both"):
        ds.train_val(train, val, val_fraction=0.1)


# --- clips -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    (root / "a").mkdir()
    (root / "b").mkdir()
    make_video(root / "a", "long", frames=300, size=(40, 30), gop=12)
    make_video(root / "a", "short", frames=3, size=(40, 30))
    make_video(root / "b", "mid", frames=40, size=(30, 40), fmt="mpeg4_avi")
    return root


@pytest.mark.parametrize(("audio", "fps"), [(False, None), (True, None), (True, 15)])
def test_seek_decodes_only_the_asked_frames(tmp_path, audio, fps):
    """Exactly frames start .. start + 7 of a decode from the start, also with an audio track (whose
    seek point once made ffmpeg repeat the first frame) and resampled (the grid of the fps filter)."""
    path = make_video(tmp_path, "seek", frames=120, size=(96, 72), gop=10)
    path = with_audio(path, 5.0, "seek_audio.mp4") if audio else path
    info = probe(path)
    full = list(decode(info, fps=fps, strict=False))
    total = 120 * (fps or 25) // 25
    assert len(full) == total and len({f.tobytes() for f in full}) == total  # frames tell their index
    for start in (0, 1, 37, total - 5):
        report = DecodeReport()
        part = list(decode(info, fps=fps, start=(start - 0.5) / (fps or info.fps) if start else None,
                           max_frames=8, report=report))
        assert report.frames == len(part) == min(8, total - start)
        for got, want in zip(part, full[start:start + 8], strict=True):
            np.testing.assert_array_equal(got, want)


def make_dataset(root: Path, **kwargs) -> ds.VideoClipDataset:
    options = dict(clip_len=4, sampling_rate=2, frame_size=(20, 28), crop_size=16)
    return ds.VideoClipDataset(ds.from_folders(root), **{**options, **kwargs})


def test_clips_deterministic_and_augmented(clip_videos):
    train = make_dataset(clip_videos, train=True)
    assert isinstance(train, Dataset) and len(train) == 3 and train.class_names == ["a", "b"]
    clip, label = train.load(0, 0, 0)
    assert clip.shape == (4, 16, 16, 3) and clip.dtype == np.float32 and label == 0
    np.testing.assert_array_equal(clip, train.load(0, 0, 0)[0])
    epochs = [train.load(0, e, 0)[0] for e in range(4)]
    assert not all(np.array_equal(epochs[0], other) for other in epochs[1:])
    draws = [train.draw(0, e, s, 300, 30, 40) for e in range(40) for s in range(2)]
    assert {d.short_side for d in draws} == set(range(20, 29))  # the whole jitter range is drawn
    assert {d.flip for d in draws} == {False, True} and len({d.start for d in draws}) > 20
    val = make_dataset(clip_videos, train=False)
    first = val.load(0, 0, 0)[0]
    for epoch, seed in ((1, 0), (5, 3)):
        np.testing.assert_array_equal(first, val.load(0, epoch, seed)[0])
    d = val.draw(0, 0, 0, 300, 30, 40)
    assert (d.start, d.short_side, d.flip) == ((300 - 7) // 2, 20, False)
    # validation crops are VMZ's centre crops, Caffe2's floored halves: 20x35 leaves 4 and 19
    # (19 // 2 = 9, where rounding would give 10); a portrait frame the same way round
    wide, tall = val.draw(0, 0, 0, 300, 20, 35), val.draw(0, 0, 0, 300, 35, 20)
    assert (wide.top, wide.left, tall.top, tall.left) == (2, 9, 9, 2)
    choice = make_dataset(clip_videos, frame_size=(20, 28), jitter="choice")
    assert {choice.draw(0, e, 0, 300, 30, 40).short_side for e in range(30)} == {20, 28}


def test_clip_content_and_frames_decoded(clip_videos):
    """The long video's clip is its frames start, start + 2, ... (seek landed right), resized, cropped,
    mirrored and normalized as drawn, and only the clip's span was decoded."""
    train = make_dataset(clip_videos, train=True, mean=MEAN, std=STD)
    path = train.videos[0].path
    assert path.endswith("long.mp4")
    full = np.stack(list(decode(probe(path))))
    for epoch in range(3):
        before = train.decoded_frames
        clip, _ = train.load(0, epoch, 11)
        assert train.decoded_frames - before == train.span == 7  # not the 300 frames of the file
        d = train.draw(0, epoch, 11, 300, 30, 40)
        want = resize_short_side(full[d.start:d.start + 7:2], d.short_side, (d.top, d.left, 16, 16))
        want = (want[:, :, ::-1] if d.flip else want) - MEAN
        np.testing.assert_allclose(clip, want / STD, rtol=1e-6, atol=1e-5)


def test_clips_drawn_from_the_stream_frames_not_the_header(tmp_path):
    """40 video frames with a 1.7 s audio track: the header (duration x fps) says 42; clips are drawn
    from the 40 the stream holds, so none runs past the end. With a 4 s track (100 promised) the
    file is judged cut off, as `decode` judges whole files; the verdict is remembered."""
    (tmp_path / "a").mkdir()
    video = make_video(tmp_path, "v", frames=40, size=(40, 30), gop=8)
    with_audio(video, 1.7, "v_audio.mp4").rename(tmp_path / "a" / "v_audio.mp4")
    data = make_dataset(tmp_path, flip=False)
    path = data.videos[0].path
    assert probe(path).expected_frames() == 42 and data.inspect(path)[1] == 40
    full = np.stack(list(decode(probe(path), strict=False)))
    late = [e for e in range(60) if data.draw(0, e, 0, 40, 30, 40).start == 40 - 7]
    assert late  # the last possible clip gets drawn
    for epoch in late[:2] + [0]:
        d = data.draw(0, epoch, 0, 40, 30, 40)
        want = resize_short_side(full[d.start:d.start + 7:2], d.short_side, (d.top, d.left, 16, 16))
        np.testing.assert_allclose(data.load(0, epoch, 0)[0], (want - MEAN) / STD, rtol=1e-6, atol=1e-5)
    long_audio = with_audio(video, 4.0, "v_audio.mp4").replace(tmp_path / "a" / "v_audio.mp4")
    data = make_dataset(tmp_path)
    for _ in range(2):
        with pytest.raises(VideoError, match=r"v_audio.mp4: truncated .*holds 40 of the 100 frames"):
            data.load(0, 0, 0)
        long_audio.unlink(missing_ok=True)  # the second time, from memory


def test_ffmpeg_resize_crops_the_same_view(tmp_path):
    """ffmpeg's scaler instead of the exact resize uses the same draw: at the native short side both
    resizes are the identity, so the views agree to a level of 0-255 (RGB conversion rounding); a
    real shrink gives the same shape."""
    (tmp_path / "a").mkdir()
    make_video(tmp_path / "a", "v", frames=30, size=(160, 120), gop=10)
    native = dict(frame_size=120, crop_size=64)
    exact, fast = make_dataset(tmp_path, **native), make_dataset(tmp_path, resize="ffmpeg", **native)
    for epoch in range(3):
        a, b = exact.load(0, epoch, 5)[0], fast.load(0, epoch, 5)[0]
        assert exact.draw(0, epoch, 5, 30, 120, 160).top > 0
        np.testing.assert_allclose(a, b, atol=1.01 / STD.min())
    shrink = make_dataset(tmp_path, resize="ffmpeg", frame_size=(80, 100), crop_size=64)
    assert shrink.load(0, 0, 0)[0].shape == (4, 64, 64, 3)


def test_short_video_pads_with_last_frame(clip_videos):
    val = make_dataset(clip_videos, train=False, sampling_rate=1, clip_len=6)
    index = next(i for i, r in enumerate(val.videos) if r.path.endswith("short.mp4"))
    clip, _ = val.load(index, 0, 0)
    assert clip.shape[0] == 6
    for t in range(3, 6):
        np.testing.assert_array_equal(clip[t], clip[2])
    assert not np.array_equal(clip[1], clip[2])


def test_unreadable_videos_raise_video_error(tmp_path):
    (tmp_path / "x").mkdir()
    good = make_video(tmp_path / "x", "good", frames=30, size=(40, 30))
    truncate(good, 0.3, "cut.mp4")
    truncate(make_video(tmp_path, "avi", frames=100, size=(40, 30), fmt="mpeg4_avi"), 0.4,
             "cut.avi").rename(tmp_path / "x" / "cut.avi")
    (tmp_path / "x" / "text.mp4").write_text("not a video\n")
    data = make_dataset(tmp_path)
    names = [Path(r.path).name for r in data.videos]
    for name in ("cut.mp4", "cut.avi", "text.mp4"):
        for epoch in range(3):  # whichever part the clip is drawn from
            with pytest.raises(VideoError, match=rf"{name}: "):
                data.load(names.index(name), epoch, 0)
    data.load(names.index("good.mp4"), 0, 0)


def test_clip_options_checked(clip_videos):
    with pytest.raises(VMZError, match="a 32 crop does not fit the short side 20"):
        make_dataset(clip_videos, crop_size=32)
    with pytest.raises(VMZError, match="jitter range is"):
        make_dataset(clip_videos, frame_size=(20, 24, 28))
    assert ds.default_frame_size(112) == (128, 160) and ds.default_frame_size(224) == (256, 320)
    assert make_dataset(clip_videos, frame_size=None, crop_size=8).sizes == (9, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_dataset(clip_videos, frame_size=24, train=False)
