"""Which cases belong to one patient: a regex over case ids, a mapping file, or each case its own patient.

Every split keeps all cases of a patient (time frames, follow-up scans) in the same part: see
:mod:`medssl.data.splits`.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterable

from medssl.errors import ConfigError

__all__ = ["describe_rule", "patient_groups"]


def describe_rule(regex: str | None = None, mapping_file: str | Path | None = None) -> str:
    """A one-line description of the case → patient grouping rule."""
    if regex is not None and mapping_file is not None:
        raise ConfigError("patient grouping: give either a regex or a mapping file, not both")
    if regex is not None:
        return f"regex '{regex}' (re.match; group 'patient', else group 1, else the whole match)"
    if mapping_file is not None:
        return f"mapping file '{mapping_file}' (case -> patient)"
    return "each case is its own patient"


def _compile(regex: str) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as exc:
        raise ConfigError(f"patient grouping regex {regex!r} is invalid: {exc}") from None


def _read_mapping(path: Path) -> dict[str, str]:
    """Read ``{case: patient}`` from a JSON object or a CSV with columns ``case,patient``."""
    if not path.is_file():
        raise ConfigError(f"patient mapping file {path} not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"patient mapping file {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(data, dict) or not all(isinstance(v, (str, int)) for v in data.values()):
            raise ConfigError(f"patient mapping file {path} must hold a JSON object {{case: patient}}")
        return {str(k): str(v) for k, v in data.items()}
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "case" not in fields or "patient" not in fields:
        raise ConfigError(f"patient mapping file {path} needs a header with columns 'case' and 'patient' "
                          f"(got {fields})")
    reader.fieldnames = fields
    out: dict[str, str] = {}
    for row in reader:
        case, patient = (row.get("case") or "").strip(), (row.get("patient") or "").strip()
        if not case and not patient:
            continue
        if not case or not patient:
            raise ConfigError(f"patient mapping file {path}: line {reader.line_num} lacks a case or a patient")
        if out.get(case, patient) != patient:
            raise ConfigError(f"patient mapping file {path}: case {case!r} is mapped to two patients")
        out[case] = patient
    return out


def patient_groups(
    case_ids: Iterable[str],
    *,
    regex: str | None = None,
    mapping_file: str | Path | None = None,
) -> dict[str, str]:
    """Map every case id to its patient id.

    ``regex`` is applied with :func:`re.match`; the patient is its named group ``patient``, else its first group,
    else the whole match (e.g. ``(patient\\d+)_frame\\d+``). ``mapping_file`` is a CSV (columns ``case,patient``)
    or a JSON object ``{case: patient}``. Without a rule each case is its own patient.
    """
    describe_rule(regex, mapping_file)  # rejects both rules at once
    cases = [str(c) for c in case_ids]
    if regex is not None:
        pattern = _compile(regex)
        out: dict[str, str] = {}
        for case in cases:
            m = pattern.match(case)
            if m is None:
                raise ConfigError(f"case {case!r} does not match the patient grouping regex {regex!r}")
            if "patient" in pattern.groupindex:
                patient = m.group("patient")
            else:
                patient = m.group(1) if pattern.groups else m.group(0)
            if not patient:
                raise ConfigError(f"patient grouping regex {regex!r} gives an empty patient id for case {case!r}")
            out[case] = patient
        return out
    if mapping_file is not None:
        path = Path(mapping_file)
        mapping = _read_mapping(path)
        missing = [c for c in cases if c not in mapping]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConfigError(f"case {missing[0]!r}{more} is missing from the patient mapping file {path}")
        return {c: mapping[c] for c in cases}
    return {c: c for c in cases}
