"""Labelled video datasets for training: the lists (which file, which class) and the clips.

**Lists.** Every source gives a `LabelledVideos`: records (path, label index, label name) and the
class names (index -> name). The sources, all found by `open_dataset`:

* a folder per class, ``root/<class>/**/<video>`` (the UCF101/HMDB51 layout), classes sorted;
* a list file: ``path,label`` / ``path<TAB>label`` / ``path label`` lines, the label a class name or
  a 0-based index, paths relative to the file, an optional header line, ``#`` comments;
* the official splits: UCF101 ``classInd.txt`` + ``trainlist0N.txt`` / ``testlist0N.txt`` (1-based
  class numbers; the test lists have no label, the class is the folder), HMDB51
  ``<class>_test_splitN.txt`` (``video.avi 1``: 1 train, 2 test, 0 unused; classes sorted), the
  Kinetics CSVs (``label,youtube_id,time_start,time_end,split[,is_cc]``; the video of a row is
  ``<youtube_id>_<start:06d>_<end:06d>.<ext>`` anywhere below `root`: in ``<label>/`` as the
  ActivityNet crawler and mmaction2 write it, in ``<label_with_underscores>/`` after mmaction2's
  ``rename_classnames.sh``, or flat (as some archives unpack); classes are the sorted labels, which
  is the order of the released 400-way heads).

A split file names videos that may be missing on disk (Kinetics downloads always lose some): they are
left out and reported by one `MissingVideosWarning` (count and first few), and kept in
`LabelledVideos.missing`. Malformed lines, unknown labels, empty classes and validation classes that
training lacks are one-line `VMZError`s raised here, before any training starts.

**Clips.** `VideoClipDataset` implements the `vmz_jax.train.data.Dataset` protocol: `load(index,
epoch, seed)` decodes one clip. Training draws a random clip (random temporal offset), a random short
side, a random crop and a random mirror; validation takes the centre clip and the centre crop at the
smallest short side. Every random choice comes from ``np.random.default_rng((seed, epoch, index))``,
so a clip is a function of its arguments. Only the frames of the clip are decoded: ffmpeg seeks to
the clip's first frame (`decode(start=...)`, which decodes from the keyframe before it and drops the
rest) and stops after the clip's span (``-frames:v``), one frame in memory at a time. The first load
of a file also probes it and counts its video packets (two short ffmpeg runs, no decoding), so the
clip start is drawn from the frames the stream really holds.

Short-side jitter: VMZ's Caffe2 trainer (``c2/tools/train_net.py --jitter_scales 128,160`` passed to
``VideoInputOp``) picks the short edge *from the listed values* (uniform over the list, so 128 or 160),
while PySlowFast draws it from the whole range. ``jitter="range"`` (the default) draws
an integer uniformly in [min, max]; ``jitter="choice"`` reproduces Caffe2's pick among
``frame_size``'s values. By default the range follows the crop: 8/7 to 10/7 of it, so 128-160 for
112 crops (VMZ's) and 256-320 for 224 crops (PySlowFast's ``TRAIN_JITTER_SCALES`` default).

Audio (`audio=True`, the audio-visual models): `load` returns ``((clip, logmels), label)``, logmels
the clip's (100, 40) float32 block of VMZ's log-mels (`vmz_jax.video.audio`): the track's log-mels
stretched over the video's frames so that one clip's span covers 100 rows (``align_audio=1``), cut
from the clip's first frame (`clip_at`; upstream's training-time audio, decoded from the seek point,
is not reproduced). A video without audio gets zeros, as VMZ's ``AVInput`` gives; no error.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from vmz_jax.errors import VMZError
from vmz_jax.video import audio as sound
from vmz_jax.video import decode as video
from vmz_jax.video.inputs import VIDEO_SUFFIXES
from vmz_jax.video.preprocess import MEAN, STD, crop_origins, resize_short_side, resized_size

__all__ = [
    "LabelledVideos",
    "MissingVideosWarning",
    "VideoClipDataset",
    "VideoRecord",
    "default_frame_size",
    "from_folders",
    "from_list",
    "hmdb51",
    "kinetics",
    "open_dataset",
    "read_classes",
    "split_validation",
    "train_val",
    "ucf101",
]

StrPath = str | os.PathLike[str]
Subset = Literal["train", "test"]
Jitter = Literal["range", "choice"]

#: How many missing videos a warning names.
SHOW_MISSING = 5
_HEADER_PATH = frozenset({"path", "video", "file", "filename", "video_path", "videopath", "name", "clip"})
_HEADER_LABEL = frozenset({"label", "class", "label_name", "class_name", "category", "target", "action"})


class MissingVideosWarning(UserWarning):
    """Videos named by a split or list file that are not on disk (they are left out)."""


@dataclass(frozen=True)
class VideoRecord:
    """One labelled video: its path, its class index and that class's name."""

    path: str
    label: int
    label_name: str


@dataclass
class LabelledVideos:
    """Labelled videos and the class list their labels index. `source` says where they came from
    (for messages); `missing` holds the videos the source named that are not on disk."""

    records: list[VideoRecord]
    classes: list[str]
    source: str
    missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> VideoRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[VideoRecord]:
        return iter(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], np.int64)

    def counts(self) -> np.ndarray:
        """Videos per class, (num_classes,)."""
        return np.bincount(self.labels, minlength=len(self.classes)) if self.records else \
            np.zeros(len(self.classes), np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray, source: str | None = None) -> LabelledVideos:
        return LabelledVideos([self.records[int(i)] for i in indices], list(self.classes),
                              source or self.source, [])

    def with_classes(self, classes: Sequence[str], role: str = "these videos") -> LabelledVideos:
        """The same videos labelled by index into `classes` (matched by name): how a validation set
        takes the class order of its training set. A class name `classes` lacks is an error."""
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({r.label_name for r in self.records if r.label_name not in index})
        if unknown:
            raise VMZError(f"{self.source}: {len(unknown)} class(es) of {role} are not among the "
                           f"{len(classes)} training classes: {_few(unknown)}")
        records = [dataclasses.replace(r, label=index[r.label_name]) for r in self.records]
        return LabelledVideos(records, list(classes), self.source, list(self.missing))


def _few(items: Sequence[str], n: int = SHOW_MISSING) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank, non-comment lines; CRLF (UCF101's lists) and a BOM ok."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise VMZError(f"{path}: no such file ({what})") from None
    except IsADirectoryError:
        raise VMZError(f"{path}: is a directory, not {what}") from None
    except OSError as exc:
        raise VMZError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise VMZError(f"{path}: {what} is not UTF-8 text") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]


class _Locator:
    """Existence checks with a case-insensitive fallback within a folder, for list entries that differ
    from the file on disk only in case (lists written on case-insensitive file systems; UCF101 mixes
    ``HandstandPushups`` and ``HandStandPushups``); one listdir per folder, only for names not found
    as given."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, str]] = {}

    def find(self, path: str) -> str | None:
        if os.path.isfile(path):
            return path
        folder, name = os.path.split(path)
        if folder not in self._folders:
            try:
                self._folders[folder] = {n.lower(): n for n in os.listdir(folder or ".")}
            except OSError:
                self._folders[folder] = {}
        real = self._folders[folder].get(name.lower())
        return os.path.join(folder, real) if real else None


def _resolve(entries: list[tuple[str, int, str]], classes: list[str], source: str) -> LabelledVideos:
    """Records for the entries found on disk; the others reported as missing."""
    locator = _Locator()
    records, missing = [], []
    for path, label, name in entries:
        found = locator.find(path)
        if found is None:
            missing.append(path)
        else:
            records.append(VideoRecord(found, label, name))
    videos = LabelledVideos(records, classes, source, missing)
    if missing:
        warnings.warn(f"{source}: {len(missing)} of the {len(entries)} videos it names are not on disk "
                      f"and are left out: {_few(missing)}", MissingVideosWarning, stacklevel=3)
    if not records:
        raise VMZError(f"{source}: none of the {len(entries)} videos it names are on disk"
                       + (f" (first looked for: {missing[0]})" if missing else ""))
    return videos


# -------------------------------------------------------------------------------------------------
# The sources


def from_folders(root: StrPath) -> LabelledVideos:
    """A folder per class: every video below ``root/<class>/`` (recursively, suffixes as
    `vmz_jax.video.inputs` knows them) is of that class; classes sorted by name."""
    root = os.fsdecode(root)
    if not os.path.isdir(root):
        raise VMZError(f"{root}: not a directory")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise VMZError(f"{root}: no class folders (expected {root}/<class>/<video>)")
    records, empty = [], []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(os.path.join(root, name), followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(folder, f) for f in sorted(files)
                      if not f.startswith(".") and Path(f).suffix.lower() in VIDEO_SUFFIXES]
        if not found:
            empty.append(name)
        records += [VideoRecord(p, label, name) for p in found]
    if empty:
        raise VMZError(f"{root}: {len(empty)} class folder(s) hold no videos: {_few(empty)}")
    return LabelledVideos(records, classes, root)


def read_classes(spec: StrPath | Sequence[str]) -> list[str]:
    """Class names, index order: a list, or a file holding a JSON list, UCF101 ``classInd.txt``
    lines (``1 ApplyEyeMakeup``: 1-based numbers), or one name per line."""
    if not isinstance(spec, (str, os.PathLike)):
        names = [str(x) for x in spec]
    else:
        path = os.fsdecode(spec)
        lines = _read_lines(path, "the class list")
        text = "\n".join(line for _, line in lines)
        if text.startswith("["):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as exc:
                raise VMZError(f"{path}: not a JSON list of class names ({exc})") from None
            if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
                raise VMZError(f"{path}: expected a JSON list of class name strings")
        elif lines and all(re.match(r"^\d+\s+\S", line) for _, line in lines):
            numbered = {}
            for _, line in lines:
                number, name = line.split(None, 1)
                numbered[int(number)] = name.strip()
            if sorted(numbered) != list(range(1, len(numbered) + 1)):
                raise VMZError(f"{path}: class numbers are not 1..{len(numbered)}")
            names = [numbered[i] for i in range(1, len(numbered) + 1)]
        else:
            names = [line for _, line in lines]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise VMZError(f"class list {spec if isinstance(spec, str) else ''}: repeated names "
                       f"{_few(duplicates)}")
    if not names:
        raise VMZError(f"class list {spec if isinstance(spec, str) else ''}: no classes")
    return names


def _split_line(line: str, delimiter: str) -> list[str]:
    if delimiter == " ":
        return line.rsplit(None, 1)  # a path may hold spaces, a label token may not
    return [x.strip() for x in next(csv.reader(io.StringIO(line), delimiter=delimiter))]


def from_list(path: StrPath, *, root: StrPath | None = None,
              classes: StrPath | Sequence[str] | None = None) -> LabelledVideos:
    """A list file of ``path<sep>label`` lines (sep a comma, a tab or spaces, detected from the
    first line; an optional header). Labels are all class names or all 0-based indices. Names:
    the classes are `classes` if given (others are an error), else the sorted names found; indices:
    they index `classes` if given, else the classes are "0".."max". Paths are relative to `root`,
    by default the list file's folder."""
    path = os.fsdecode(path)
    lines = _read_lines(path, "the list of videos")
    if not lines:
        raise VMZError(f"{path}: the list of videos is empty")
    first = lines[0][1]
    delimiter = "\t" if "\t" in first else "," if "," in first else " "
    rows = [(n, _split_line(line, delimiter)) for n, line in lines]
    if rows and len(rows[0][1]) == 2 and (rows[0][1][0].lower() in _HEADER_PATH
                                          or rows[0][1][1].lower() in _HEADER_LABEL):
        rows = rows[1:]
    bad = [n for n, row in rows if len(row) != 2 or not row[0] or not row[1]]
    if bad:
        raise VMZError(f"{path}: line {bad[0]} is not 'path{delimiter.strip() or ' '}label' "
                       f"({len(bad)} such line(s))")
    if not rows:
        raise VMZError(f"{path}: the list of videos has a header only")
    base = os.fsdecode(root) if root is not None else os.path.dirname(os.path.abspath(path))
    names = read_classes(classes) if classes is not None else None
    as_index = all(re.fullmatch(r"\d+", label) for _, (_, label) in rows)
    if as_index:
        numbers = [int(label) for _, (_, label) in rows]
        names = names if names is not None else [str(i) for i in range(max(numbers) + 1)]
        out = [(n, number) for (n, _), number in zip(rows, numbers, strict=True) if number >= len(names)]
        if out:
            raise VMZError(f"{path}: line {out[0][0]}: class index {out[0][1]} is outside the "
                           f"{len(names)} classes ({len(out)} such line(s))")
    else:
        names = names if names is not None else sorted({label for _, (_, label) in rows})
        index = {name: i for i, name in enumerate(names)}
        unknown = [(n, label) for n, (_, label) in rows if label not in index]
        if unknown:
            raise VMZError(f"{path}: line {unknown[0][0]}: unknown class {unknown[0][1]!r} "
                           f"({len(unknown)} line(s) with classes not in the class list)")
        numbers = [index[label] for _, (_, label) in rows]
    entries = [(os.path.join(base, p), number, names[number])
               for (_, (p, _)), number in zip(rows, numbers, strict=True)]
    return _resolve(entries, names, path)


def _check_split(split: int) -> int:
    if split not in (1, 2, 3):
        raise VMZError(f"split must be 1, 2 or 3 (the official splits), not {split}")
    return split


def _check_subset(subset: str) -> Subset:
    aliases = {"train": "train", "test": "test", "val": "test", "validation": "test"}
    if subset not in aliases:
        raise VMZError(f"subset must be train or test (val), not {subset!r}")
    return aliases[subset]  # type: ignore[return-value]


def ucf101(annotations: StrPath, root: StrPath, *, split: int = 1, subset: str = "train",
           list_file: StrPath | None = None) -> LabelledVideos:
    """UCF101's official split `split`: `annotations` holds ``classInd.txt`` and the train/test
    lists (``ucfTrainTestlist/``), `root` the class folders (``UCF-101/``). `list_file` reads that
    list instead of ``{subset}list0{split}.txt``."""
    annotations, root = os.fsdecode(annotations), os.fsdecode(root)
    classes = read_classes(os.path.join(annotations, "classInd.txt"))
    index = {name: i for i, name in enumerate(classes)}
    if list_file is None:
        list_file = os.path.join(annotations, f"{_check_subset(subset)}list{_check_split(split):02d}.txt")
    list_file = os.fsdecode(list_file)
    entries = []
    for n, line in _read_lines(list_file, "a UCF101 split list"):
        parts = line.split()
        relative = parts[0]
        folder = relative.replace("\\", "/").split("/")[0] if "/" in relative.replace("\\", "/") else None
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise VMZError(f"{list_file}: line {n} is not 'Class/video.avi [number]': {line!r}")
        if len(parts) == 2:
            number = int(parts[1])
            if not 1 <= number <= len(classes):
                raise VMZError(f"{list_file}: line {n}: class number {number} is not in 1..{len(classes)} "
                               "(classInd.txt)")
            label = number - 1
            if folder is not None and folder != classes[label]:
                raise VMZError(f"{list_file}: line {n}: {relative} is in folder {folder} but labelled "
                               f"{number} ({classes[label]}) by classInd.txt")
        else:
            if folder is None or folder not in index:
                raise VMZError(f"{list_file}: line {n}: {relative!r} is not in a class folder of "
                               "classInd.txt")
            label = index[folder]
        entries.append((os.path.join(root, relative), label, classes[label]))
    if not entries:
        raise VMZError(f"{list_file}: the split list is empty")
    return _resolve(entries, classes, list_file)


_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>\d)\.txt$")


def hmdb51(annotations: StrPath, root: StrPath, *, split: int = 1, subset: str = "train") -> LabelledVideos:
    """HMDB51's official split `split`: `annotations` holds the 153 ``<class>_test_split{1,2,3}.txt``
    files (``video.avi 1``: 1 train, 2 test, 0 unused), `root` the class folders; classes sorted."""
    annotations, root = os.fsdecode(annotations), os.fsdecode(root)
    split, wanted = _check_split(split), {"train": "1", "test": "2"}[_check_subset(subset)]
    files = sorted(glob.glob(os.path.join(glob.escape(annotations), f"*_test_split{split}.txt")))
    if not files:
        raise VMZError(f"{annotations}: no HMDB51 split files (*_test_split{split}.txt)")
    classes = sorted(_HMDB_FILE.match(os.path.basename(f)).group("cls") for f in files)  # type: ignore[union-attr]
    entries = []
    for label, name in enumerate(classes):
        file = os.path.join(annotations, f"{name}_test_split{split}.txt")
        for n, line in _read_lines(file, "an HMDB51 split file"):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise VMZError(f"{file}: line {n} is not 'video.avi 0|1|2': {line!r}")
            if parts[1] == wanted:
                entries.append((os.path.join(root, name, parts[0]), label, name))
    if not entries:
        raise VMZError(f"{annotations}: split {split} names no {subset} videos")
    return _resolve(entries, classes, f"{annotations} (HMDB51 split {split}, {subset})")


def _kinetics_index(root: str) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            stem, suffix = os.path.splitext(f)
            if suffix.lower() in VIDEO_SUFFIXES and not f.startswith("."):
                index.setdefault(stem, []).append(os.path.join(folder, f))
    return index


def kinetics(csv_file: StrPath, root: StrPath, *,
             classes: StrPath | Sequence[str] | None = None) -> LabelledVideos:
    """A Kinetics annotation CSV (``label,youtube_id,time_start,time_end,split``, any extra columns
    ignored); each row's video ``<youtube_id>_<start:06d>_<end:06d>.*`` is looked up anywhere below
    `root` (one walk), preferring a folder named after its label. Classes: `classes`, or the sorted
    labels of the file."""
    csv_file, root = os.fsdecode(csv_file), os.fsdecode(root)
    if not os.path.isdir(root):
        raise VMZError(f"{root}: not a directory (the Kinetics videos)")
    lines = _read_lines(csv_file, "a Kinetics CSV")
    if not lines:
        raise VMZError(f"{csv_file}: empty")
    rows = list(csv.reader([line for _, line in lines]))
    header = [h.strip() for h in rows[0]]
    needed = ("youtube_id", "time_start", "time_end")
    if not all(h in header for h in needed):
        raise VMZError(f"{csv_file}: not a Kinetics CSV (its header lacks {', '.join(needed)})")
    if "label" not in header:
        raise VMZError(f"{csv_file}: has no label column (the Kinetics test set is unlabelled)")
    col = {h: header.index(h) for h in (*needed, "label")}
    parsed = []
    for (n, text), row in zip(lines[1:], rows[1:], strict=True):
        try:
            label = row[col["label"]].strip()
            start, end = int(float(row[col["time_start"]])), int(float(row[col["time_end"]]))
            parsed.append((f"{row[col['youtube_id']].strip()}_{start:06d}_{end:06d}", label))
        except (IndexError, ValueError):
            raise VMZError(f"{csv_file}: line {n} is not label,youtube_id,time_start,time_end,...: "
                           f"{text!r}") from None
    names = read_classes(classes) if classes is not None else sorted({label for _, label in parsed})
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({label for _, label in parsed if label not in index})
    if unknown:
        raise VMZError(f"{csv_file}: {len(unknown)} label(s) not in the class list: {_few(unknown)}")
    found = _kinetics_index(root)
    entries = []
    for stem, label in parsed:
        candidates = found.get(stem, [])
        folders = (label, label.replace(" ", "_"))
        best = next((p for p in candidates if os.path.basename(os.path.dirname(p)) in folders),
                    candidates[0] if candidates else os.path.join(root, label, stem + ".mp4"))
        entries.append((best, index[label], label))
    return _resolve(entries, names, csv_file)


def _kind(spec: str) -> tuple[str, str]:
    """(kind, annotation folder or file) of a dataset spec."""
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "classInd.txt")) and glob.glob(
                os.path.join(glob.escape(spec), "trainlist0*.txt")):
            return "ucf101", spec
        if glob.glob(os.path.join(glob.escape(spec), "*_test_split1.txt")):
            return "hmdb51", spec
        return "folders", spec
    if not os.path.exists(spec):
        raise VMZError(f"{spec}: no such file or directory (the dataset)")
    name = os.path.basename(spec)
    if name == "classInd.txt":
        return "ucf101", os.path.dirname(spec) or "."
    if re.fullmatch(r"(train|test)list0\d\.txt", name):
        return "ucf101-list", spec
    if _HMDB_FILE.match(name):
        return "hmdb51", os.path.dirname(spec) or "."
    with open(spec, encoding="utf-8-sig", errors="replace") as f:
        head = f.readline()
    if "youtube_id" in head and "time_start" in head:
        return "kinetics", spec
    return "list", spec


def open_dataset(spec: StrPath, *, root: StrPath | None = None, split: int = 1, subset: str = "train",
                 classes: StrPath | Sequence[str] | None = None) -> LabelledVideos:
    """The labelled videos `spec` names, its kind detected:

    * a folder with ``classInd.txt`` and ``trainlist0N.txt`` (or ``classInd.txt`` itself): UCF101,
      split `split`, `subset` train or test; a ``trainlist0N.txt``/``testlist0N.txt``: that list;
    * a folder with ``*_test_split1.txt``: HMDB51, split `split`, `subset`; one of those files: the
      split its name says;
    * a CSV whose header has ``youtube_id`` and ``time_start``: Kinetics;
    * another folder: a folder per class; another file: a list file (`from_list`).

    `root` is where the videos of split files are (required for UCF101, HMDB51 and Kinetics); for a
    list file it replaces the file's folder as the base of relative paths. `classes` fixes the class
    list of a list file or a Kinetics CSV (a list or a file, see `read_classes`).
    """
    spec = os.fsdecode(spec)
    kind, where = _kind(spec)
    if kind in ("ucf101", "ucf101-list", "hmdb51", "kinetics") and root is None:
        raise VMZError(f"{spec}: a {kind.split('-')[0]} split needs the folder of its videos (root)")
    if kind in ("ucf101", "ucf101-list", "hmdb51", "folders") and classes is not None:
        raise VMZError(f"{spec}: the {kind.split('-')[0]} classes are fixed by the dataset; "
                       "a class list applies to list files and Kinetics CSVs")
    if kind == "ucf101":
        return ucf101(where, root, split=split, subset=subset)  # type: ignore[arg-type]
    if kind == "ucf101-list":
        return ucf101(os.path.dirname(spec) or ".", root, list_file=spec)  # type: ignore[arg-type]
    if kind == "hmdb51":
        named = _HMDB_FILE.match(os.path.basename(spec))  # one of the files: its split
        split = int(named.group("split")) if named else split
        return hmdb51(where, root, split=split, subset=subset)  # type: ignore[arg-type]
    if kind == "kinetics":
        return kinetics(spec, root, classes=classes)  # type: ignore[arg-type]
    if kind == "folders":
        if root is not None:
            raise VMZError(f"{spec}: a folder per class holds its own videos; root applies to split "
                           "and list files")
        return from_folders(spec)
    return from_list(spec, root=root, classes=classes)


# -------------------------------------------------------------------------------------------------
# Training and validation sets


def split_validation(videos: LabelledVideos, fraction: float, seed: int = 0
                     ) -> tuple[LabelledVideos, LabelledVideos]:
    """(train, validation): `fraction` of each class's videos (rounded, at least one kept for
    training) drawn for validation, reproducibly from `seed` and the order of `videos`."""
    if not 0.0 < fraction < 1.0:
        raise VMZError(f"the validation fraction must be between 0 and 1, not {fraction}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5F1D])
    labels = videos.labels
    val: list[int] = []
    for c in range(len(videos.classes)):
        members = np.flatnonzero(labels == c)
        take = min(len(members) - 1, int(round(fraction * len(members))))
        if take > 0:
            val += rng.permutation(members)[:take].tolist()
    chosen = set(val)
    train_idx = [i for i in range(len(videos)) if i not in chosen]
    return (videos.subset(train_idx, f"{videos.source} (training part)"),
            videos.subset(sorted(val), f"{videos.source} (validation part, {fraction:g})"))


def train_val(train: LabelledVideos, val: LabelledVideos | None = None, *,
              val_fraction: float | None = None, seed: int = 0
              ) -> tuple[LabelledVideos, LabelledVideos | None]:
    """The training set and the validation set (given, or `val_fraction` of each training class),
    checked: the validation labels re-indexed by name into the training classes, and an error for a
    class with no training videos or a validation class training lacks."""
    if val is not None and val_fraction:
        raise VMZError("give a validation list or a validation fraction, not both")
    if val_fraction:
        train, val = split_validation(train, val_fraction, seed)
    counts = train.counts()
    if val is not None:
        val = val.with_classes(train.classes, role="the validation set")
        lacking = sorted({train.classes[label] for label in val.labels if counts[label] == 0})
        if lacking:
            raise VMZError(f"{val.source}: {len(lacking)} validation class(es) have no training "
                           f"videos: {_few(lacking)}")
    empty = [train.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise VMZError(f"{train.source}: {len(empty)} of the {len(train.classes)} classes have no "
                       f"training videos: {_few(empty)}")
    return train, val


# -------------------------------------------------------------------------------------------------
# Clips


def default_frame_size(crop_size: int) -> tuple[int, int]:
    """The short-side jitter range for `crop_size` crops: 8/7 to 10/7 of it (128-160 for 112)."""
    return round(crop_size * 8 / 7), round(crop_size * 10 / 7)


#: A clip (T, H, W, 3), or with audio the pair (clip, logmels (100, 40)).
ClipInputs = np.ndarray | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ClipDraw:
    """The random choices of one clip: first frame, short side, crop origin, mirror."""

    start: int
    short_side: int
    top: int
    left: int
    flip: bool


class VideoClipDataset:
    """Clips of labelled videos for `vmz_jax.train.fit`: ``load(index, epoch, seed) -> (clip, label)``
    with clip float32 (clip_len, crop_size, crop_size, 3), normalized ``(x - mean) / std`` on 0-255
    RGB (Caffe2's `VideoInputOp` values by default).

    `frame_size` is the short side: an int, or (min, max) jittered in training (see `jitter`);
    validation uses the min and the centre crop, placed as Caffe2's `VideoInputOp` places it
    (`crop_origins`); None means `default_frame_size(crop_size)`. `sampling_rate` takes every
    n-th frame (of the native rate, or of `fps` if given). `resize="exact"` resizes
    in NumPy exactly like the extract pipeline (computing only the crop); ``"ffmpeg"`` lets ffmpeg
    scale while decoding (about 2x the frames/s at 720p and 1080p, less data through the pipe; no
    gain on short 320x240 clips; a different filter). A video shorter than the clip repeats its last frame. A
    video that cannot be read, or is cut off (see `inspect`), raises `VideoError` naming the file.
    With `audio`, each item is ``((clip, logmels), label)`` (see the module docstring).
    """

    def __init__(self, videos: LabelledVideos, *, clip_len: int = 16, sampling_rate: int = 1,
                 frame_size: int | Sequence[int] | None = None, crop_size: int = 112, train: bool = True,
                 mean: Sequence[float] = tuple(MEAN), std: Sequence[float] = tuple(STD),
                 jitter: Jitter = "range", flip: bool = True, fps: float | None = None,
                 resize: Literal["exact", "ffmpeg"] = "exact", threads: int = 1, audio: bool = False):
        if frame_size is None:
            frame_size = default_frame_size(crop_size)
        sizes = ((int(frame_size),) if isinstance(frame_size, (int, np.integer))
                 else tuple(int(s) for s in frame_size))
        if not sizes or min(sizes) < 1:
            raise VMZError(f"frame_size must be positive short side(s), not {frame_size}")
        if jitter not in ("range", "choice"):
            raise VMZError(f"jitter must be range or choice, not {jitter!r}")
        if jitter == "range" and len(sizes) > 2:
            raise VMZError(f"a jitter range is (min, max), not {len(sizes)} values (use jitter='choice')")
        for name, value in (("clip_len", clip_len), ("sampling_rate", sampling_rate),
                            ("crop_size", crop_size), ("threads", threads)):
            if int(value) < 1:
                raise VMZError(f"{name} must be at least 1, not {value}")
        if crop_size > min(sizes):
            raise VMZError(f"a {crop_size} crop does not fit the short side {min(sizes)}")
        if resize not in ("exact", "ffmpeg"):
            raise VMZError(f"resize must be exact or ffmpeg, not {resize!r}")
        self.videos = videos
        self.clip_len, self.sampling_rate, self.crop_size = int(clip_len), int(sampling_rate), int(crop_size)
        self.sizes, self.jitter, self.train, self.flip = sizes, jitter, bool(train), bool(flip)
        self.mean = np.asarray(mean, np.float32).reshape(3)
        self.std = np.asarray(std, np.float32).reshape(3)
        self.fps, self.resize, self.threads = fps, resize, int(threads)
        self.audio = bool(audio)
        self.decoded_frames = 0  # frames ffmpeg delivered, all loads together (for checks and benchmarks)
        self._infos: dict[str, tuple[video.VideoInfo, int] | str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def class_names(self) -> list[str]:
        return list(self.videos.classes)

    @property
    def span(self) -> int:
        """Frames one clip covers."""
        return (self.clip_len - 1) * self.sampling_rate + 1

    def inspect(self, path: str) -> tuple[video.VideoInfo, int]:
        """`probe(path)` and the frames the video stream holds (of the resampled video with `fps`),
        once per file; a failure is remembered too, so a bad file costs its ffmpeg calls once.

        The count is ffmpeg's count of the stream's packets (no decoding), not the header's
        duration x rate: that is the whole container's duration, longer than the video when the
        audio track is. A file holding fewer than `decode.MIN_DECODED_SHARE` of the frames its header
        promises is cut off (or its audio much longer): `VideoError`, as `decode` judges whole files.
        """
        known = self._infos.get(path)
        if isinstance(known, str):
            raise video.VideoError(known)
        if known is None:
            try:
                info = video.probe(path)
                count = video.count_frames(path, threads=self.threads)
                promised = info.expected_frames()
                if promised and count < video.MIN_DECODED_SHARE * promised:
                    raise video.VideoError(f"{path}: truncated or damaged (its video stream holds "
                                           f"{count} of the {promised} frames its header promises)")
            except video.VideoError as exc:
                self._infos[path] = str(exc)
                raise
            known = self._infos[path] = (info, count)
        info, count = known
        if self.fps and info.fps > 0:
            count = int(count * self.fps / info.fps)  # what the fps filter gives, to a frame
        return info, count

    def draw(self, index: int, epoch: int, seed: int, num_frames: int, height: int, width: int) -> ClipDraw:
        """The random choices of clip `index` in `epoch` (fixed choices in validation), for a video of
        `num_frames` frames of `height` x `width`. Always five draws in one order, so each choice
        depends on (seed, epoch, index) only."""
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])
        room = max(num_frames - self.span, 0)
        u_start, u_size, u_top, u_left, u_flip = rng.random(5)
        if not self.train:
            short = min(self.sizes)
        elif self.jitter == "choice":
            short = self.sizes[min(int(u_size * len(self.sizes)), len(self.sizes) - 1)]
        else:
            lo, hi = min(self.sizes), max(self.sizes)
            short = lo + min(int(u_size * (hi - lo + 1)), hi - lo)
        _, h, w = resized_size(height, width, short)
        if min(h, w) < self.crop_size:  # floor(dim * s) can fall one short of s
            short += 1
            _, h, w = resized_size(height, width, short)
        if self.train:
            start = min(int(u_start * (room + 1)), room)
            top = min(int(u_top * (h - self.crop_size + 1)), h - self.crop_size)
            left = min(int(u_left * (w - self.crop_size + 1)), w - self.crop_size)
            return ClipDraw(start, short, top, left, self.flip and bool(u_flip < 0.5))
        top, left = crop_origins(h, w, "center", self.crop_size)[0]
        return ClipDraw(room // 2, short, top, left, False)

    def read_frames(self, info: video.VideoInfo, start: int, count: int,
                    size: tuple[int, int] | None = None) -> list[np.ndarray]:
        """Frames start .. start + count - 1 of the (resampled) video, decoded from a seek, at most
        `count`; fewer near the end."""
        rate = video.fps_or_default(info, self.fps)
        # Half a frame early: ffmpeg keeps the frames at or after the seek time, and the frame's own
        # timestamp may round a hair below start / rate.
        at = (start - 0.5) / rate if start > 0 and rate == rate else None
        report = video.DecodeReport()
        frames = list(video.decode(info, fps=self.fps, size=size, threads=self.threads, report=report,
                                   start=at, max_frames=count))
        with self._lock:
            self.decoded_frames += report.frames
        return frames

    def clip_log_mels(self, path: str, start: int, num_frames: int) -> np.ndarray:
        """(100, 40) float32: the log-mels of the clip starting at frame `start` of `path` (`num_frames`
        frames), aligned as the module docstring says; zeros without audio."""
        track = sound.decode_audio(path, strict=True)
        rows = sound.log_mels(track.samples, rate=track.rate)
        return sound.clip_log_mels(rows, video_frames=num_frames, clip_span=self.span, starts=[start])[0]

    def load(self, index: int, epoch: int, seed: int) -> tuple[ClipInputs, int]:
        record = self.videos[index]
        info, num_frames = self.inspect(record.path)
        d = self.draw(index, epoch, seed, num_frames, info.height, info.width)
        size = None
        if self.resize == "ffmpeg":
            _, h, w = resized_size(info.height, info.width, d.short_side)
            size = (w, h)
        frames = self.read_frames(info, d.start, self.span, size)
        picked = [frames[min(j * self.sampling_rate, len(frames) - 1)] for j in range(self.clip_len)]
        clip = np.stack(picked)
        window = (d.top, d.left, self.crop_size, self.crop_size)
        if size is None:
            out = resize_short_side(clip, d.short_side, window)
        else:
            out = clip[:, d.top:d.top + self.crop_size, d.left:d.left + self.crop_size].astype(np.float32)
        if d.flip:
            out = out[:, :, ::-1]
        out = np.ascontiguousarray((out - self.mean) / self.std, np.float32)
        if self.audio:
            return (out, self.clip_log_mels(record.path, d.start, num_frames)), record.label
        return out, record.label
