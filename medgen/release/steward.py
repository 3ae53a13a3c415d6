"""What the data steward says about a release and medgen cannot know: the modality and anatomy,
the source dataset with its licence and ethics approval, the release's licence, a contact and a
citation (issue 23). They come from `medgen release --card card.yaml` and repeated `--card-field
key=value` (a field on the command line overrides the file), are checked before any work, and
fill the data card; a field left out reads "not provided" there and the release says which.

    modality: MRI (T1-weighted)
    anatomy: brain
    license: CC-BY-4.0
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable

from medgen.errors import ConfigError

NOT_PROVIDED = "not provided"

# The fields a complete card has, with what each holds (the README, the errors and the demo's card.yaml say the same).
STEWARD_FIELDS = {
    "modality": "imaging modality and contrast, e.g. MRI (T1-weighted), CT, chest X-ray",
    "anatomy": "the body part imaged, e.g. brain",
    "source_dataset": "the real data the model learned from: name, version, where it is described",
    "source_license": "the licence or data-use agreement of the source data",
    "ethics_approval": "the approval (board, reference) covering training on the source data and this release, or why none is needed",
    "license": "the licence of this release, an SPDX id such as CC-BY-4.0 or CC0-1.0",
    "contact": "who answers questions and takes reports about this release",
    "citation": "how to cite this release",
}
# Optional: the card works them out when they are left out.
OPTIONAL_FIELDS = {
    "pretty_name": "a short name for the dataset (default: from modality and anatomy)",
    "task_categories": "Hugging Face task ids, comma-separated (default: image-classification for a labelled release, "
                       "else unconditional-image-generation)",
}
CARD_FIELDS = {**STEWARD_FIELDS, **OPTIONAL_FIELDS}


def check_card_fields(fields: dict[str, Any] | None, where: str = "card fields") -> dict[str, str]:
    """`fields` as text, each a known key (ConfigError naming `where`, the key and the valid ones);
    a list becomes "a, b"; empty and null values are left out (a template's blanks are not provided)."""
    out: dict[str, str] = {}
    for key, value in (fields or {}).items():
        key = str(key)
        if key not in CARD_FIELDS:
            close = difflib.get_close_matches(key, CARD_FIELDS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where}: unknown card field {key}; {hint}the fields are {', '.join(CARD_FIELDS)}")
        if isinstance(value, (list, tuple)) and not any(isinstance(v, (dict, list, tuple)) for v in value):
            value = ", ".join(str(v).strip() for v in value if v is not None)
        if isinstance(value, (dict, list, tuple)):
            raise ConfigError(f"{where}: {key}: expected text, got {type(value).__name__} {value!r} (quote it or write it as one line)")
        text = "" if value is None else str(value).strip()
        if text:
            out[key] = text
    return out


def read_card_file(path: str | os.PathLike) -> dict[str, str]:
    """The fields of a card.yaml (a mapping of field: text); ConfigError naming the file, with
    its line and column when the YAML does not parse."""
    import yaml

    from medgen.config import yaml_error

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--card {path}: {'is a folder' if path.is_dir() else 'does not exist'}; pass a YAML file of card fields "
                          f"({', '.join(CARD_FIELDS)})")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        raise yaml_error(path, e) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--card {path} is not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"--card {path} must hold field: value lines ({', '.join(CARD_FIELDS)}), not a {type(loaded).__name__}")
    return check_card_fields(loaded, str(path))


def parse_card_field(item: str) -> tuple[str, str]:
    """`key=value` of `--card-field` (the value may hold '=')."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--card-field {item!r}: expected key=value with key one of {', '.join(CARD_FIELDS)}")
    return key.strip(), value.strip()


def load_card_fields(card: str | os.PathLike | None = None, items: Iterable[str] = ()) -> dict[str, str]:
    """The steward's fields: `card` (a card.yaml) and then the `--card-field` items over it (an
    empty value, `license=`, clears the file's)."""
    fields = read_card_file(card) if card is not None else {}
    given = dict(parse_card_field(item) for item in items)
    check_card_fields(given, "--card-field")
    return {k: v for k, v in {**fields, **given}.items() if v}


def missing_fields(fields: dict[str, str]) -> list[str]:
    """The STEWARD_FIELDS `fields` leaves out (the card says "not provided" for each)."""
    return [k for k in STEWARD_FIELDS if not fields.get(k)]


def card_yaml(fields: dict[str, str], header: str = "") -> str:
    """A card.yaml of `fields`, each after a comment saying what it holds (the demo's example):
    short values on their line, long ones folded (`>-`), several lines kept (`|-`)."""
    import textwrap

    import yaml

    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for key, value in check_card_fields(fields).items():
        lines.append(f"# {key}: {CARD_FIELDS[key]}")
        if "\n" in value:
            lines += [f"{key}: |-", *(f"  {line}" for line in value.splitlines())]
        elif len(key) + len(value) < 100 or "  " in value:  # folding would merge double spaces
            lines.append(yaml.safe_dump({key: value}, allow_unicode=True, width=10_000).rstrip())
        else:
            lines += [f"{key}: >-", *(f"  {line}" for line in textwrap.wrap(value, 98, break_long_words=False, break_on_hyphens=False))]
    return "\n".join(lines) + "\n"
