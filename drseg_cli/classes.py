"""Class lists: parse ``"road,building"`` strings or class files with synonyms, and validate them.

A class file has one class per line; ``building: house, roof`` gives synonyms that are
prompted alongside the name; blank lines and ``#`` comments are skipped. SegEarth-OV's class
files (``configs/cls_*.txt``: ``road,parking lot``, the first name is the class) are read as
they are: a line without a colon lists the name and its synonyms separated by commas. On the
command line the same is written ``"road,building:house|roof"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from drseg_cli.errors import UsageError

MAX_CLASSES = 254  # uint8 masks: 0..253 are classes, 255 is nodata
MAX_NAME_CHARS = 200


@dataclass(frozen=True)
class ClassSpec:
    """One class: the name written to outputs plus synonyms used only for prompting."""

    name: str
    synonyms: tuple[str, ...] = ()

    @property
    def prompt_names(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


def _split_entry(entry: str, synonym_sep: str, where: str) -> ClassSpec:
    name, _, rest = entry.partition(":")
    name = " ".join(name.split())
    synonyms = tuple(" ".join(s.split()) for s in rest.split(synonym_sep)) if rest else ()
    if not name:
        raise UsageError(f"{where}: empty class name in {entry.strip()!r}")
    if any(not s for s in synonyms):
        raise UsageError(f"{where}: empty synonym for class {name!r}")
    return ClassSpec(name, tuple(dict.fromkeys(s for s in synonyms if s != name)))


def parse_classes(spec: str) -> list[ClassSpec]:
    """Parse ``--classes``: a path to a class file, or a comma-separated list."""
    path = Path(spec)
    looks_like_file = "," not in spec and path.suffix.lower() in {".txt", ".csv", ".names"}
    if looks_like_file or _is_file(path):
        if not path.is_file():
            raise UsageError(f"{spec}: class file not found")
        return parse_class_file(path)
    entries = spec.split(",")
    if all(not e.strip() for e in entries):
        raise UsageError("--classes: the class list is empty")
    classes = [_split_entry(e, "|", "--classes") for e in entries]
    return validate_classes(classes, "--classes")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a long class list is not a valid file name
        return False


def parse_class_file(path: Path) -> list[ClassSpec]:
    """Read a class file: one class per line, ``name: synonym, synonym`` or (SegEarth-OV's
    files) ``name,synonym,synonym``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: class file is not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read class file ({exc.strerror})") from None
    classes = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:  # SegEarth-OV's format: name,synonym,...
            line = line.replace(",", ":", 1)
        if line:
            classes.append(_split_entry(line, ",", f"{path}:{lineno}"))
    if not classes:
        raise UsageError(f"{path}: class file has no classes")
    return validate_classes(classes, str(path))


def validate_classes(classes: Sequence[ClassSpec], where: str) -> list[ClassSpec]:
    """Reject duplicate, over-long or too many class names with a one-line error."""
    if len(classes) > MAX_CLASSES:
        raise UsageError(f"{where}: {len(classes)} classes given, at most {MAX_CLASSES} supported")
    seen: dict[str, str] = {}
    for c in classes:
        if len(c.name) > MAX_NAME_CHARS:
            raise UsageError(
                f"{where}: class name {c.name[:30]!r}... is {len(c.name)} characters "
                f"(at most {MAX_NAME_CHARS})"
            )
        key = c.name.casefold()
        if key in seen:
            raise UsageError(f"{where}: duplicate class name {c.name!r}")
        seen[key] = c.name
    return list(classes)


def holdout_indices(holdout: Sequence[str] | None, names: Sequence[str]) -> list[int]:
    """Indices of the held-out classes (``--holdout-classes``), checked against ``names``."""
    if not holdout:
        return []
    unknown = [h for h in holdout if h not in names]
    if unknown:
        raise UsageError(
            f"--holdout-classes: {', '.join(unknown)} not among the classes ({', '.join(names)})"
        )
    held = sorted({list(names).index(h) for h in holdout})
    if len(held) == len(names):
        raise UsageError("--holdout-classes: at least one class must remain seen")
    return held


def parse_name_list(value: str | Sequence[str] | None) -> list[str]:
    """``'a,b'`` (or a list) → class names, blanks dropped."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [v.strip() for v in items if v.strip()]
