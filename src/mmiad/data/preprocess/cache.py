"""A cache of preprocessed copies of a dataset; the input dataset is never written to.

The official scripts overwrite the dataset's TIFFs in place, so a dataset silently becomes "CFM-preprocessed" or
"M3DM-preprocessed" and cannot be told apart afterwards. Here every profile writes its own copy under::

    <cache_root>/preprocessed/<profile>-<fingerprint>/<source>-<hash>/<category>/<split>/<defect>/xyz/<stem>.tiff

where ``<source>-<hash>`` names the source dataset root (so two datasets with the same category names never
collide). A JSON sidecar next to each TIFF records the size and mtime of the source files; an entry is reused only
when they still match. Every file is written to a temporary name in the same folder and then renamed, and the
sidecar is written last, so a killed run never leaves an entry that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mmiad.data.errors import DataError
from mmiad.data.formats import get_format, load_sample
from mmiad.data.io import write_rgb, write_xyz
from mmiad.data.preprocess.profiles import PreprocessProfile, get_profile, preprocess_sample
from mmiad.data.sample import Sample, SampleRecord
from mmiad.utils.atomic import write_json
from mmiad.utils.names import plain_name

CACHED_FORMAT = "mvtec3d"
"""The format that reads a cached copy (an RGB PNG + xyz TIFF pair, whatever the source layout)."""

CACHE_ENV = "MMIAD_CACHE"
SIDECAR_FORMAT = 1


def default_cache_root() -> Path:
    """The cache root: ``$MMIAD_CACHE`` when set, else ``~/.cache/mmiad``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mmiad"


def profile_cache_dir(cache_root: str | Path, profile: PreprocessProfile | str) -> Path:
    """The folder holding every dataset preprocessed with ``profile``."""
    profile = get_profile(profile)
    return Path(cache_root) / "preprocessed" / f"{profile.name}-{profile.fingerprint()}"


def source_key(record: SampleRecord) -> str:
    """A folder name identifying the dataset a record comes from: ``<root name>-<hash of its absolute path>``.

    For the MVTec layout (``<root>/<category>/<split>/<defect>/xyz/<file>``) the root is the dataset root;
    for any other layout it is the folder holding the xyz file, which is always unique.
    """
    xyz_path = Path(record.xyz_path).resolve()
    parents = xyz_path.parents
    layout = (record.defect_type, record.split, record.category)
    mvtec_like = len(parents) > 4 and tuple(parents[i].name for i in (1, 2, 3)) == layout
    root = parents[4] if mvtec_like else xyz_path.parent
    digest = hashlib.sha256(str(root).encode("utf-8")).hexdigest()[:10]
    return f"{root.name or 'root'}-{digest}"


def _file_stat(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sources(record: SampleRecord) -> dict[str, object] | None:
    """What the cached entry depends on; None when a source file is missing (it will then fail to load).

    Besides the RGB and the cloud, any side file the format declares (:meth:`DatasetFormat.sample_files`) is
    stat'ed too; MVTec 3D-AD has none, so its sidecars stay as they were.
    """
    declared = get_format(record.format).sample_files(record)
    try:
        sources: dict[str, object] = {
            "xyz": _file_stat(Path(record.xyz_path)),
            "rgb": _file_stat(Path(record.rgb_path)),
            "extra": [list(item) for item in record.extra],
            "format": record.format,
        }
        side = {role: _file_stat(path) for role, path in declared.items() if role not in ("rgb", "xyz", "gt")}
    except OSError:
        return None
    if side:
        sources["side_files"] = side
    return sources


def _write_json(path: Path, payload: dict[str, object]) -> None:
    write_json(path, payload, indent=1)


def _is_fresh(sidecar: Path, sources: dict[str, object] | None, outputs: list[Path], fingerprint: str) -> bool:
    if sources is None or not sidecar.is_file() or not all(p.is_file() for p in outputs):
        return False
    try:
        stored = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        stored.get("format") == SIDECAR_FORMAT
        and stored.get("fingerprint") == fingerprint
        and stored.get("sources") == sources
        and stored.get("outputs") == [p.name for p in outputs]
    )


def _cached_record(record: SampleRecord, xyz_path: Path, rgb_path: Path | None, tag: str) -> SampleRecord:
    """The record of the cached copy: same metadata and GT, the cleaned TIFF, the cleaned or original RGB.

    Whatever the source format, the copy is an RGB + xyz TIFF pair, read as :data:`CACHED_FORMAT`.
    """
    extra = tuple(item for item in record.extra if item[0] != "preprocessed")
    return dataclasses.replace(
        record,
        xyz_path=xyz_path,
        rgb_path=rgb_path if rgb_path is not None else record.rgb_path,
        extra=(*extra, ("preprocessed", tag)),
        format=CACHED_FORMAT,
    )


def preprocess_dataset(
    records: Sequence[SampleRecord],
    profile: PreprocessProfile | str,
    cache_root: str | Path | None = None,
    *,
    progress: bool = False,
) -> tuple[list[SampleRecord], list[DataError]]:
    """Preprocess every record into the cache (reusing fresh entries) and return records pointing at the copies.

    The cleaned RGB is written only when the profile zeroes it; otherwise the returned record keeps the original
    RGB. Ground-truth paths always keep pointing at the original masks. With an identity profile (``none``) nothing
    needs cleaning and the records are returned unchanged, without reading any file; so are records of a format
    whose reader already removes the background (Eyecandies: the official code preprocesses it no further).

    Args:
        records: Samples to preprocess; their files may live anywhere.
        profile: A profile or a profile name.
        cache_root: Cache root; :func:`default_cache_root` when None.
        progress: Show a tqdm progress bar.

    Returns:
        The records of the preprocessed copies (in input order, bad samples left out) and one DataError per bad
        sample (unreadable file, size mismatch, nothing left after cleaning).
    """
    profile = get_profile(profile)
    if profile.is_identity:
        return list(records), []
    root = cache_root if cache_root is not None else default_cache_root()
    iterator: Sequence[SampleRecord] = records
    if progress:
        from tqdm import tqdm

        iterator = tqdm(records, desc=f"preprocess ({profile.name})", unit="sample")
    done: list[SampleRecord] = []
    errors: list[DataError] = []
    for record in iterator:
        try:
            done.append(preprocess_record(record, profile, root)[0])
        except DataError as error:
            errors.append(error)
    return done, errors


def needs_preprocessing(record: SampleRecord, profile: PreprocessProfile | str) -> bool:
    """Whether a record's cloud goes through the profile: the one place the dataset format decides it.

    Not with an identity profile, and not for a format whose reader already removes the background (Eyecandies:
    the official code preprocesses it no further, and the border-plane removal would find no border).
    """
    return not get_profile(profile).is_identity and not get_format(record.format).background_removed


def preprocess_record(
    record: SampleRecord,
    profile: PreprocessProfile | str,
    cache_root: str | Path | None = None,
    *,
    load: Callable[[SampleRecord], Sample] = load_sample,
) -> tuple[SampleRecord, Sample | None]:
    """One record's preprocessed copy: (its record, the cleaned sample when it was computed now, else None).

    A fresh cache entry is reused without reading the source; otherwise the source is read once through
    ``load`` and the cleaned sample is returned with the record, so a caller that scores it next does not read
    it again. Records that need no preprocessing (:func:`needs_preprocessing`) come back unchanged.

    Raises:
        DataError: for a name that is not plain, an unreadable sample or nothing left after cleaning.
    """
    profile = get_profile(profile)
    if not needs_preprocessing(record, profile):
        return record, None
    base = profile_cache_dir(cache_root if cache_root is not None else default_cache_root(), profile)
    fingerprint = profile.fingerprint()
    tag = f"{profile.name}-{fingerprint}"
    for part in (record.category, record.split, record.defect_type, record.stem, Path(record.xyz_path).stem):
        plain_name(part, source=record.xyz_path)
    folder = base / source_key(record) / record.category / record.split / record.defect_type
    xyz_out = folder / "xyz" / f"{Path(record.xyz_path).stem}.tiff"
    rgb_out = folder / "rgb" / f"{record.stem}.png" if profile.zero_rgb_background else None
    outputs = [xyz_out] if rgb_out is None else [xyz_out, rgb_out]
    sidecar = xyz_out.with_suffix(".json")
    sources = _sources(record)
    cached = _cached_record(record, xyz_out, rgb_out, tag)
    if _is_fresh(sidecar, sources, outputs, fingerprint):
        return cached, None
    cleaned = preprocess_sample(load(record), profile)
    sidecar.unlink(missing_ok=True)
    write_xyz(xyz_out, cleaned.xyz)  # atomic, as every writer of mmiad.data.io
    if rgb_out is not None:
        write_rgb(rgb_out, cleaned.rgb)
    payload = {
        "format": SIDECAR_FORMAT,
        "fingerprint": fingerprint,
        "profile": dataclasses.asdict(profile),
        "sources": sources,
        "outputs": [p.name for p in outputs],
    }
    _write_json(sidecar, payload)
    return cached, dataclasses.replace(cleaned, record=cached)
