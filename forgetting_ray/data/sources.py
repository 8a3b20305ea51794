"""Where corpus and benchmark rows come from: local files, or datasets read through Hugging Face ``datasets``.

A *source* yields ``(origin, row)`` pairs, ``origin`` naming the file and line (or the dataset and row) so
that any later error can point at the offending input, and has a content fingerprint that enters the
cache keys of the stages reading it.  Local files keep the validating readers of :mod:`.readers`; Hub
datasets (``hf://datasets/<id>`` or a :class:`DatasetSpec` mapping) and local dataset folders (the output
of ``save_to_disk``, or data files with a dataset card, laid out like a Hub dataset repository) go through
``datasets.load_dataset`` / ``datasets.load_from_disk`` with the normal Hugging Face cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..config import HF_DATASETS_SCHEME, DatasetSpec, parse_dataset_uri
from ..errors import UserError
from ..store import file_sha256

Row = tuple[str, Any]  # (origin, raw record)
# Files a local dataset folder written by Dataset(Dict).save_to_disk always holds.
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


class DataError(UserError, ValueError):
    """A problem with an input file, dataset or record; the message names the file and line (or the dataset
    and row) or field, and for a source that cannot be opened, how to fix it."""


# ------------------------------------------------------------------------------------------------
# the two kinds of source
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileSource:
    """One local file, read by a validating reader chosen from its suffix."""

    path: Path

    @property
    def label(self) -> str:
        return str(self.path)

    @property
    def default_source(self) -> str:
        return self.path.stem

    def fingerprint(self) -> str:
        return file_sha256(self.path)


@dataclass
class DatasetSource:
    """A dataset opened with Hugging Face ``datasets``; its rows are read once and kept."""

    spec: DatasetSpec
    _rows: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        where = self.spec.path if is_local_dataset(self.spec.path) else f"{HF_DATASETS_SCHEME}{self.spec.path}"
        extras = [f"@{self.spec.revision}" if self.spec.revision else "",
                  f" ({self.spec.name})" if self.spec.name else "", f" [{self.spec.split}]"]
        return where + "".join(extras)

    @property
    def default_source(self) -> str:
        return Path(self.spec.path.rstrip("/")).name

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = [dict(r) for r in open_dataset(self.spec, self.label)]
        return self._rows

    def fingerprint(self) -> str:
        """sha256 of the rows themselves: a moved cache or a re-upload with equal content keeps the key."""
        h = hashlib.sha256()
        for row in self.rows():
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()


Source = FileSource | DatasetSource


# ------------------------------------------------------------------------------------------------
# resolving config entries
# ------------------------------------------------------------------------------------------------
def is_local_dataset(path: str | Path) -> bool:
    """A folder laid out like a dataset: save_to_disk output, or a dataset card with a YAML header."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    if any((p / m).is_file() for m in SAVED_DATASET_MARKERS):
        return True
    card = p / "README.md"
    return card.is_file() and card.read_text(encoding="utf-8", errors="replace").lstrip().startswith("---")


def as_spec(entry: str | DatasetSpec | dict[str, Any]) -> DatasetSpec | None:
    """The dataset spec an entry names, or None when it names local files."""
    if isinstance(entry, DatasetSpec):
        return entry
    if isinstance(entry, dict):
        return DatasetSpec.model_validate(entry)
    if entry.startswith(HF_DATASETS_SCHEME):
        return parse_dataset_uri(entry)
    if is_local_dataset(entry):
        return DatasetSpec(path=str(Path(entry).expanduser().resolve()))
    return None


def resolve_sources(entries: Iterable[str | DatasetSpec | dict[str, Any]], suffixes: Iterable[str]) -> list[Source]:
    """Expand globs and folders of files (sorted, so the order is stable); missing inputs are errors.

    ``suffixes``: the file suffixes a plain folder is expanded into.  A file named twice is read once.
    """
    suffixes = tuple(suffixes)
    out: list[Source] = []
    seen: set[Path] = set()
    for entry in entries:
        spec = as_spec(entry)
        if spec is not None:
            out.append(DatasetSource(spec))
            continue
        for path in _expand(str(entry), suffixes):
            if path not in seen:
                seen.add(path)
                out.append(FileSource(path))
    return out


def _expand(pattern: str, suffixes: tuple[str, ...]) -> list[Path]:
    expanded = Path(pattern).expanduser()
    if glob.has_magic(str(expanded)):
        files = [p for p in sorted(Path(m) for m in glob.glob(str(expanded), recursive=True)) if p.is_file()]
        if not files:
            raise DataError(f"no file matches {pattern!r}")
    elif expanded.is_dir():
        files = sorted(p for p in expanded.iterdir() if p.is_file() and p.suffix in suffixes)
        if not files:
            raise DataError(f"folder {pattern!r} holds no {'/'.join(suffixes)} file and no dataset card "
                              "(README.md with a YAML header) or save_to_disk files")
    elif expanded.is_file():
        files = [expanded]
    else:
        raise DataError(f"input file not found: {pattern!r}")
    return [p.resolve() for p in files]


# ------------------------------------------------------------------------------------------------
# opening a dataset
# ------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def open_dataset(spec: DatasetSpec, label: str | None = None) -> Iterable[dict[str, Any]]:
    """The split's rows (a ``datasets.Dataset`` or, streaming, an ``IterableDataset``), or a DataError."""
    import datasets

    label = label or spec.path
    local = Path(spec.path).expanduser()
    looks_local = spec.path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise DataError(f"{label}: dataset folder not found")
    try:
        if looks_local and any((local / m).is_file() for m in SAVED_DATASET_MARKERS):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise DataError(f"{label}: no split {spec.split!r} (has {sorted(loaded)}); set its 'split'")
                loaded = loaded[spec.split]
            return loaded.to_iterable_dataset() if spec.streaming else loaded
        # A local folder is always streamed: datasets' arrow cache for local files is keyed so that two folders
        # of the same name share it (and an edit can be served stale); streaming reads the files themselves.
        return datasets.load_dataset(
            str(local) if looks_local else spec.path, spec.name, split=spec.split, revision=spec.revision,
            data_files=spec.data_files, streaming=spec.streaming or looks_local,
        )
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; each becomes one line naming the dataset
        raise DataError(_explain(e, spec, label, looks_local)) from None


def _explain(e: Exception, spec: DatasetSpec, label: str, looks_local: bool) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "split" in text.lower() and ("unknown" in text.lower() or "should be one of" in text.lower()):
        return f"{label}: {text}; set the dataset's 'split'"
    if not looks_local and hub_offline():
        return (f"{label}: dataset {spec.path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                "forbids downloading it; download it once where the Hub is reachable (HF_HUB_OFFLINE=0, "
                f"or `hf download --repo-type dataset {spec.path}`), or point at a local copy "
                f"({type(e).__name__}: {text})")
    return f"{label}: cannot load the dataset ({type(e).__name__}: {text})"


def dataset_rows(source: DatasetSource) -> Iterator[Row]:
    """(origin, row) of a dataset source, origin naming the dataset and the 0-based row."""
    for i, row in enumerate(source.rows()):
        yield f"{source.label} row {i}", row
