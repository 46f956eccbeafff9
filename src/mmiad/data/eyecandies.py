"""Reader for the native Eyecandies layout (Bonfiglioli et al., ACCV 2022), without an offline conversion step.

Native layout: ``<root>/<Category>/<split>/data/<idx>_<item>`` with the splits ``train`` (1000 good), ``val``
(100 good), ``test_public`` (25 good + 25 bad, with ground truth) and ``test_private`` (no annotations). Each
sample has 17 items; the ones used here are ``image_4.png`` (RGB with the left spotlight on, the image CFM and
M3DM use), ``depth.png`` (16-bit depth normalised to 0..65535), ``info_depth.yaml`` (the ``normalization``
``min``/``max`` bounds in metres), ``pose.txt`` (the 4×4 camera pose) and ``mask.png`` (the union of all
defect masks, 8-bit).

CFM (``processing/preprocess_eyecandies.py``) and M3DM (``utils/preprocess_eyecandies.py``) convert every sample
offline into an MVTec-style TIFF. This module computes the same organized point cloud on the fly, so nothing has
to be written next to the dataset:

1. de-normalise: ``depth = png / 65535 * (max - min) + min`` (Eyecandies website, "Depth Map De-Normalization");
2. back-project with a pinhole camera, focal length 711.11 px and principal point at ``(W/2, H/2)`` (not
   ``(W-1)/2``), then map camera points to the world with the *inverse* of ``pose.txt`` (the website snippet
   both repos copied computes ``inv(K @ pose)``);
3. drop the background with the repos' heuristic (:func:`background_mask`);
4. reorder the axes to ``[0, 2, 1]`` and scale them by ``[0.1, -0.1, 0.1]`` (:func:`to_mvtec_axes`).

Differences from the official conversion, all deliberate: background points are written as exact zeros (the
official code leaves a constant point whose x is 0, which only its any-coordinate-is-zero validity test drops);
arithmetic is float64 until the final float32 cast; test samples are labelled by their mask exactly as the
repos do, but are paired by index rather than by counting files and dividing by 17.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmiad.data.errors import DataError
from mmiad.data.formats import DatasetFormat, register_format
from mmiad.data.io import check_coordinates, open_image, read_mask
from mmiad.data.sample import GOOD, LABEL_ANOMALOUS, LABEL_NORMAL, LABEL_UNKNOWN, SampleRecord

FOCAL_LENGTH = 711.11
"""Focal length in pixels of the single camera used for every image (``FOCAL_LENGTH`` in both repos' scripts and
the ``depth2pc`` stage of the eyecandies package)."""

DEPTH_PNG_MAX = 65535.0
"""The depth PNG spans ``[min, max]`` metres over ``0..65535`` (Eyecandies website, item table)."""

BACKGROUND_MIN_HEIGHT = 0.02
"""Points less than this far above the estimated background plane are background (CFM/M3DM heuristic)."""

BACKGROUND_MAX_DISTANCE = 1.8
"""Points farther than this along the plane from the bottom-centre pixel are background (CFM/M3DM heuristic)."""

BACKGROUND_MAX_LATERAL = 1.0
"""Points with ``|x| >`` this (world x, before the axis reorder) are background (CFM/M3DM heuristic)."""

AXIS_ORDER = (0, 2, 1)
"""World axes as stored by CFM/M3DM: x, then the world z, then the world y."""

AXIS_SCALE = (0.1, -0.1, 0.1)
"""Scale applied after the reorder by CFM/M3DM; it brings the scene to roughly MVTec 3D-AD's magnitudes."""

RGB_ITEM = "image_4"
"""The RGB item CFM and M3DM copy as the sample's image (left spotlight on)."""

SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test_public", "predict": "test_private"}
"""Our split names mapped to the Eyecandies folders; ``test_private`` has no labels, so it is our ``predict``."""

UNKNOWN_DEFECT = "unknown"
BAD = "bad"
_TRUE_WORDS = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------------------------------------------
# Small file readers
# --------------------------------------------------------------------------------------------------------------


def _strip_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    cut = line.find(" #")
    return line if cut < 0 else line[:cut]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _split_pair(text: str, path: Path, lineno: int) -> tuple[str, str]:
    key, sep, value = text.partition(":")
    if not sep or not key.strip() or (value and not value.startswith(" ")) or key.strip().startswith("-"):
        raise DataError(path, f"malformed YAML at line {lineno}: expected 'key: value', got {text.strip()!r}")
    return _unquote(key.strip()), value.strip()


def parse_simple_yaml(path: str | Path) -> dict[str, str]:
    """Parse the small block-style YAML files of Eyecandies into a flat ``{"a.b": "value"}`` dict.

    Only nested ``key: value`` mappings (and one-line ``{k: v, ...}`` mappings) are supported, which is all that
    ``info_depth.yaml`` holds; this keeps PyYAML out of mmiad's dependencies. Values stay strings.

    Raises:
        DataError: naming the file and line for anything else (lists, block scalars, bad indentation).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"unreadable YAML ({error})") from error
    result: dict[str, str] = {}
    parents: list[tuple[int, str]] = []  # (indent, key) of the mappings that enclose the current line
    opener_indent: int | None = None  # indent of the previous line when it opened a mapping
    last_indent = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).rstrip()
        if not line.strip() or line.strip() in ("---", "..."):
            continue
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        if body.startswith("\t") or (opener_indent is None and indent > last_indent):
            raise DataError(path, f"malformed YAML at line {lineno}: unexpected indentation")
        while parents and parents[-1][0] >= indent:
            parents.pop()
        key, value = _split_pair(body, path, lineno)
        full_key = ".".join([k for _, k in parents] + [key])
        opener_indent, last_indent = None, indent
        if not value:
            parents.append((indent, key))
            opener_indent = indent
        elif value.startswith("{") and value.endswith("}"):
            for item in filter(None, (part.strip() for part in value[1:-1].split(","))):
                sub_key, sub_value = _split_pair(item, path, lineno)
                result[f"{full_key}.{sub_key}"] = _unquote(sub_value)
        elif value[0] in "[{|>&*!":
            raise DataError(path, f"malformed YAML at line {lineno}: unsupported value {value!r}")
        else:
            result[full_key] = _unquote(value)
    return result


def read_depth_info(path: str | Path) -> tuple[float, float]:
    """The ``(min, max)`` depth normalisation bounds, in metres, from an ``info_depth.yaml``."""
    path = Path(path)
    values = parse_simple_yaml(path)
    bounds = []
    for key in ("normalization.min", "normalization.max"):
        if key not in values:
            raise DataError(path, f"missing '{key}' (expected 'normalization:' with 'min:' and 'max:')")
        try:
            bounds.append(float(values[key]))
        except ValueError as error:
            raise DataError(path, f"'{key}' is not a number: {values[key]!r}") from error
    low, high = bounds
    if not (np.isfinite(low) and np.isfinite(high) and high >= low):
        raise DataError(path, f"invalid depth bounds min={low}, max={high}")
    return low, high


def read_depth_png(path: str | Path, depth_min: float, depth_max: float) -> np.ndarray:
    """Read a 16-bit depth PNG and de-normalise it to metres (H×W float64)."""
    path = Path(path)
    with open_image(path, "depth PNG") as image:
        mode = image.mode
        raw = np.asarray(image)
    if not mode.startswith("I") or raw.ndim != 2:
        raise DataError(path, f"expected a 16-bit single-channel depth PNG, got mode {mode} of shape {raw.shape}")
    if raw.size and (raw.min() < 0 or raw.max() > DEPTH_PNG_MAX):
        raise DataError(path, f"depth values outside 0..65535 ({raw.min()}..{raw.max()})")
    return raw.astype(np.float64) / DEPTH_PNG_MAX * (depth_max - depth_min) + depth_min


def read_pose(path: str | Path) -> np.ndarray:
    """Read the 4×4 rigid camera pose of ``pose.txt`` (whitespace-separated rows)."""
    path = Path(path)
    try:
        pose = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except FileNotFoundError as error:
        raise DataError(path, "file not found") from error
    except (OSError, ValueError) as error:
        raise DataError(path, f"unreadable pose matrix ({error})") from error
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        raise DataError(path, f"expected a finite 4×4 pose matrix, got shape {pose.shape}")
    if not np.allclose(pose[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise DataError(path, f"last row of the pose must be [0 0 0 1], got {pose[3].tolist()}")
    if abs(np.linalg.det(pose[:3, :3])) < 1e-9:
        raise DataError(path, "the pose rotation is singular")
    return pose


# --------------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------------


def backproject(
    depth: np.ndarray, pose: np.ndarray, focal_length: float = FOCAL_LENGTH, *, invert_pose: bool = True
) -> np.ndarray:
    """Organized world points (H×W×3 float64) of a metric depth map.

    Pixel ``(row v, column u)`` at depth ``d`` is the camera point ``(d(u - W/2)/f, d(v - H/2)/f, d)``.
    CFM and M3DM then apply ``inv(pose)`` (``invert_pose=True``, the default, because the background thresholds
    were tuned in that frame). The eyecandies package's own ``depth2pc`` stage applies ``pose`` itself, matching
    the dataset's description of it as the camera pose relative to the world: pass ``invert_pose=False`` for that.
    """
    depth = np.asarray(depth, dtype=np.float64)
    height, width = depth.shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    camera = np.stack(
        [depth * (cols - width / 2) / focal_length, depth * (rows - height / 2) / focal_length, depth], axis=-1
    )
    transform = np.linalg.inv(pose) if invert_pose else np.asarray(pose, dtype=np.float64)
    return camera @ transform[:3, :3].T + transform[:3, 3]


def background_mask(points: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """H×W bool, True for background, with the CFM/M3DM heuristic on world points (before the axis reorder).

    The top-centre and bottom-centre pixels are assumed to lie on the background surface. (The official code
    reads flat indices 256 and -256 of a 512-wide image, which are exactly these pixels; mmiad uses column W//2
    for any width.) The line between them is rotated about the x axis onto the z axis with the bottom-centre
    point as origin; a point is background when its rotated y is above ``-BACKGROUND_MIN_HEIGHT``, its rotated z
    beyond ``BACKGROUND_MAX_DISTANCE``, or ``|x|`` beyond ``BACKGROUND_MAX_LATERAL``.

    Raises:
        ValueError: when the two anchor pixels are invalid or coincide, so no plane direction exists.
    """
    height, width = points.shape[:2]
    top, bottom = points[0, width // 2], points[height - 1, width // 2]
    if valid is not None and not (valid[0, width // 2] and valid[height - 1, width // 2]):
        raise ValueError("background plane undefined: the top- or bottom-centre pixel has no valid depth")
    delta_y, delta_z = top[1] - bottom[1], top[2] - bottom[2]
    norm = float(np.hypot(delta_y, delta_z))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("background plane undefined: the top- and bottom-centre points coincide")
    cos, sin = delta_z / norm, delta_y / norm
    rel_y, rel_z = points[..., 1] - bottom[1], points[..., 2] - bottom[2]
    height_above = cos * rel_y - sin * rel_z
    along = sin * rel_y + cos * rel_z
    return (
        (height_above > -BACKGROUND_MIN_HEIGHT)
        | (along > BACKGROUND_MAX_DISTANCE)
        | (np.abs(points[..., 0]) > BACKGROUND_MAX_LATERAL)
    )


def to_mvtec_axes(points: np.ndarray) -> np.ndarray:
    """Reorder world axes to ``AXIS_ORDER`` and scale by ``AXIS_SCALE``, as CFM/M3DM store them."""
    return points[..., list(AXIS_ORDER)] * np.asarray(AXIS_SCALE)


# --------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------


def read_eyecandies_xyz(record: SampleRecord) -> np.ndarray:
    """The organized point cloud (H×W×3 float32, invalid and background points exactly 0) of an Eyecandies record.

    Uses ``record.extra``: ``info_depth_path`` and ``pose_path`` (required), ``depth_path`` (default
    ``record.xyz_path``), ``focal_length`` (default :data:`FOCAL_LENGTH`), ``remove_background`` (default true).
    """
    extra = record.extra_dict()
    depth_path = Path(extra.get("depth_path", record.xyz_path))
    missing = [key for key in ("info_depth_path", "pose_path") if key not in extra]
    if missing:
        raise DataError(depth_path, f"Eyecandies record lacks {', '.join(missing)} in its extra fields")
    try:
        focal_length = float(extra.get("focal_length", FOCAL_LENGTH))
    except ValueError as error:
        raise DataError(depth_path, f"invalid focal_length {extra['focal_length']!r}") from error
    depth_min, depth_max = read_depth_info(extra["info_depth_path"])
    depth = read_depth_png(depth_path, depth_min, depth_max)
    pose = read_pose(extra["pose_path"])
    points = backproject(depth, pose, focal_length)
    valid = np.isfinite(depth) & (depth > 0) & np.isfinite(points).all(axis=-1)
    if extra.get("remove_background", "true").strip().lower() in _TRUE_WORDS:
        try:
            valid &= ~background_mask(points, valid)
        except ValueError as error:
            raise DataError(depth_path, str(error)) from error
    world = to_mvtec_axes(points)
    world[~valid] = 0.0
    check_coordinates(depth_path, world)
    return world.astype(np.float32)


def eyecandies_files(record: SampleRecord) -> dict[str, Path]:
    """Every file :func:`read_eyecandies_xyz` and the RGB/mask readers open for ``record``, by role.

    The side files come from ``record.extra`` as the reader takes them; a record that lacks one declares the
    depth PNG in its place, so the reader's own error (naming what is missing) is what the user sees.
    """
    extra = record.extra_dict()
    depth = Path(extra.get("depth_path", record.xyz_path))
    files = {"rgb": Path(record.rgb_path), "xyz": depth}
    for role, key in (("info_depth", "info_depth_path"), ("pose", "pose_path")):
        files[role] = Path(extra.get(key, depth))
    if record.gt_path is not None:
        files["gt"] = Path(record.gt_path)
    return files


def _data_dir(root: Path, category: str, split_folder: str) -> Path:
    return root / category / split_folder / "data"


def list_eyecandies_categories(root: str | Path) -> list[str]:
    """Category folders under ``root`` that hold at least one Eyecandies split with a ``data/`` folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset root not found")
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and any(_data_dir(root, p.name, folder).is_dir() for folder in SPLIT_FOLDERS.values())
    )


def looks_like_eyecandies(root: str | Path) -> bool:
    """True when ``root`` has the native Eyecandies layout (a ``<cat>/<split>/data/*_info_depth.yaml`` file)."""
    root = Path(root)
    if not root.is_dir():
        return False
    for category in (p for p in root.iterdir() if p.is_dir()):
        for folder in SPLIT_FOLDERS.values():
            data_dir = _data_dir(root, category.name, folder)
            if data_dir.is_dir() and next(data_dir.glob("*_info_depth.yaml"), None) is not None:
                return True
    return False


def _index_key(index: str) -> tuple[int, int | str]:
    return (0, int(index)) if index.isdigit() else (1, index)


def list_eyecandies_records(
    root: str | Path,
    category: str,
    split: str,
    *,
    errors: list[DataError] | None = None,
    rgb_item: str = RGB_ITEM,
    remove_background: bool = True,
    focal_length: float = FOCAL_LENGTH,
) -> list[SampleRecord]:
    """All samples of one category and split, sorted by index.

    Args:
        root: Dataset root holding the category folders.
        category: Category folder name (e.g. ``CandyCane``).
        split: ``train``, ``validation``, ``test`` (``test_public``) or ``predict`` (``test_private``).
        errors: When given, samples with missing or unreadable files are reported here and skipped.
        rgb_item: Which of the six renderings is the RGB image.
        remove_background: Apply :func:`background_mask` when the cloud is loaded.
        focal_length: Camera focal length in pixels.

    Test samples are ``bad`` (label 1, ``gt_path`` = the mask) when their mask has a non-zero pixel and ``good``
    otherwise, the rule both official converters use. Train and validation samples are all good by construction;
    ``predict`` samples have label -1 and defect ``unknown``.

    Raises:
        DataError: for an unknown category or split, or (when ``errors`` is None) the first incomplete sample.
    """
    if split not in SPLIT_FOLDERS:
        raise DataError(None, f"unknown split {split!r}; expected one of {tuple(SPLIT_FOLDERS)}")
    root = Path(root)
    if not (root / category).is_dir():
        raise DataError(root / category, f"category {category!r} not found")
    data_dir = _data_dir(root, category, SPLIT_FOLDERS[split])
    if not data_dir.is_dir():
        return []
    rgb_name = f"{rgb_item}.png"
    required = [rgb_name, "depth.png", "info_depth.yaml", "pose.txt"] + (["mask.png"] if split == "test" else [])
    items: dict[str, set[str]] = {}
    for path in data_dir.iterdir():
        index, sep, item = path.name.partition("_")
        if sep and item in required and path.is_file():
            items.setdefault(index, set()).add(item)

    def report(error: DataError) -> None:
        if errors is None:
            raise error
        errors.append(error)

    records: list[SampleRecord] = []
    for index in sorted(items, key=_index_key):
        absent = [item for item in required if item not in items[index]]
        if absent:
            names = ", ".join(f"{index}_{item}" for item in absent)
            report(DataError(data_dir / f"{index}_{absent[0]}", f"incomplete sample {index}: missing {names}"))
            continue
        label, defect, gt_path = LABEL_NORMAL, GOOD, None
        if split == "predict":
            label, defect = LABEL_UNKNOWN, UNKNOWN_DEFECT
        elif split == "test":
            mask_path = data_dir / f"{index}_mask.png"
            try:
                anomalous = bool(read_mask(mask_path).any())
            except DataError as error:
                report(error)
                continue
            if anomalous:
                label, defect, gt_path = LABEL_ANOMALOUS, BAD, mask_path
        depth_path = data_dir / f"{index}_depth.png"
        records.append(
            SampleRecord(
                rgb_path=data_dir / f"{index}_{rgb_name}",
                xyz_path=depth_path,
                name=index,
                category=category,
                split=split,
                defect_type=defect,
                gt_path=gt_path,
                label=label,
                format=Eyecandies.name,
                extra=(
                    ("depth_path", str(depth_path)),
                    ("info_depth_path", str(data_dir / f"{index}_info_depth.yaml")),
                    ("pose_path", str(data_dir / f"{index}_pose.txt")),
                    ("focal_length", repr(float(focal_length))),
                    ("remove_background", "true" if remove_background else "false"),
                ),
            )
        )
    return records


@register_format("eyecandies")
class Eyecandies(DatasetFormat):
    """The native Eyecandies layout (``<Category>/{train,val,test_public,test_private}/data/<idx>_<item>``).

    Tests evaluate on ``test_public``, as the official code does; ``test_private`` (no labels) is ``predict``.
    """

    description = "native Eyecandies (<Category>/{train,val,test_public,test_private}/data/, depth PNG + pose)"
    detect_priority = 20
    background_removed = True

    @classmethod
    def detect(cls, root: Path) -> bool:
        """See :func:`looks_like_eyecandies`."""
        return looks_like_eyecandies(root)

    def categories(self) -> list[str]:
        """See :func:`list_eyecandies_categories`."""
        return list_eyecandies_categories(self.root)

    def records(self, category: str, split: str, *, errors: list[DataError] | None = None) -> list[SampleRecord]:
        """See :func:`list_eyecandies_records`."""
        return list_eyecandies_records(self.root, category, split, errors=errors)

    @classmethod
    def sample_files(cls, record: SampleRecord) -> dict[str, Path]:
        """RGB, depth PNG, ``info_depth.yaml``, ``pose.txt`` and (for a defective test sample) the mask: the cloud
        is computed from three files, and a stale pose would give stale features (see :func:`eyecandies_files`)."""
        return eyecandies_files(record)

    @classmethod
    def read_xyz(cls, record: SampleRecord) -> np.ndarray:
        """The organized cloud computed from depth, camera info and pose (:func:`read_eyecandies_xyz`)."""
        return read_eyecandies_xyz(record)
