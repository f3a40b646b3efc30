"""The documentation stays true: one configuration reference that matches config.yaml and the
config dataclasses, and relative links that lead somewhere."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgecom import Config

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "operations.md"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# parse_duration lives beside the dataclasses, wherever they are.
parse_duration = importlib.import_module(Config.__module__).parse_duration


def _reference_rows(text: str) -> dict[str, str]:
    """key -> default cell of the table whose header is `| key | default | meaning |`."""
    lines = text.splitlines()
    start = lines.index("| key | default | meaning |")
    rows: dict[str, str] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        key, default = cells[0].strip("`"), cells[1]
        assert key not in rows, f"{key} is documented twice"
        rows[key] = default
    return rows


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


def _dataclass_fields(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    fields: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        nested = f.default_factory
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            fields.update(_dataclass_fields(nested, f"{key}."))
        else:
            fields[key] = f
    return fields


def _documented_default(cell: str) -> object:
    """A default cell is one YAML value in backticks, as config.yaml writes it."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"default {cell!r} is not a single `value`"
    return yaml.safe_load(match.group(1)) if match.group(1) != "" else ""


def _same(documented: object, configured: object, *, duration: bool) -> bool:
    if duration and documented != "" and configured != "":
        return parse_duration(documented) == parse_duration(configured)
    return documented == configured


def _config_yaml() -> dict[str, Any]:
    return _flatten(yaml.safe_load((ROOT / "config.yaml").read_text()))


def _key_problems(reference: str) -> list[str]:
    """What keeps the table in `reference` from listing exactly the configurable keys."""
    documented = set(_reference_rows(reference))
    in_yaml = set(_config_yaml())
    in_dataclasses = set(_dataclass_fields(Config))
    problems = [
        f"{key}: in config.yaml, not in the dataclasses" for key in in_yaml - in_dataclasses
    ]
    problems += [
        f"{key}: in the dataclasses, not in config.yaml" for key in in_dataclasses - in_yaml
    ]
    problems += [f"{key}: missing from docs/operations.md" for key in in_yaml - documented]
    problems += [f"{key}: documented but not a key" for key in documented - in_yaml]
    return sorted(problems)


def test_reference_lists_exactly_the_keys_of_config_yaml_and_the_dataclasses() -> None:
    assert _key_problems(REFERENCE.read_text()) == []


def test_reference_defaults_equal_config_yaml() -> None:
    fields = _dataclass_fields(Config)
    configured = _config_yaml()
    for key, cell in _reference_rows(REFERENCE.read_text()).items():
        documented = _documented_default(cell)
        duration = bool(fields[key].metadata.get("duration"))
        assert _same(documented, configured[key], duration=duration), (
            f"{key}: documented default {cell}, config.yaml has {configured[key]!r}"
        )


def test_a_key_missing_from_the_reference_is_reported() -> None:
    row = "| `server.tls.key_file` |"
    text = REFERENCE.read_text()
    without = "\n".join(line for line in text.splitlines() if not line.startswith(row))
    assert _key_problems(without) == ["server.tls.key_file: missing from docs/operations.md"]


# --- links ------------------------------------------------------------------------------------

_LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE_RE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    anchors: set[str] = set()
    for line in _FENCE_RE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            base, n = slug, 1
            while slug in anchors:
                slug, n = f"{base}-{n}", n + 1
            anchors.add(slug)
    return anchors


def _relative_links(path: Path) -> list[str]:
    text = _FENCE_RE.sub("", path.read_text())
    return [
        target
        for target in _LINK_RE.findall(text)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_a_file_and_anchor(document: Path) -> None:
    broken = []
    for target in _relative_links(document):
        file_part, _, anchor = target.partition("#")
        linked = (document.parent / file_part).resolve() if file_part else document
        if not linked.exists():
            broken.append(f"{target}: no file {file_part}")
        elif anchor and (linked.suffix != ".md" or anchor not in _anchors(linked)):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{document.name}: broken links: {broken}"


def test_link_check_sees_a_broken_anchor(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Some `code` here\n\n[a](#some-code-here) [b](#nowhere)\n")
    assert _anchors(page) == {"title", "some-code-here"}
    assert _relative_links(page) == ["#some-code-here", "#nowhere"]
