"""Patient-level splits: k-fold test folds, a validation subset and label budgets.

The unit of every split is the *patient*: all cases (time frames, follow-up scans) of one patient always go
to the same part. The protocol (as in the KAF and PCL papers' released code):

- test fold: scikit-learn's ``KFold(n_splits, shuffle=True, random_state=fold_seed)`` over the **sorted** unique
  patient ids (or a fixed hold-out list of test cases);
- validation subset: ``val_patients`` patients drawn with ``val_seed`` from the non-test patients;
- label budget: M patients from the remaining training patients, ``nested`` (first M of one seeded permutation,
  so M=2 is a subset of M=5) or ``legacy`` (``random.seed(s); random.sample(train_ids, M)`` as KAF/PCL), or the
  patients of a given case list (``split.labelled``: :func:`with_labelled_cases`, ``budget_mode`` "explicit");
- unlabelled: the rest of the training part.

Cases are grouped into patients by :func:`medssl.data.patients.patient_groups` (re-exported here).
"""

from __future__ import annotations

import json
import math
import numbers
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medssl.data.atomic import write_text
from medssl.data.patients import describe_rule, patient_groups
from medssl.errors import ConfigError

__all__ = [
    "Split",
    "describe_rule",
    "kfold_patients",
    "load_split",
    "make_split",
    "patient_groups",
    "save_split",
    "with_labelled",
    "with_labelled_cases",
]

SPLIT_FORMAT = "medssl-split/1"
BUDGET_MODES = ("nested", "legacy")
PARTS = ("test", "val", "labelled", "unlabelled")


# --------------------------------------------------------------------------------------------- k-fold
def _check_int(name: str, value: Any, *, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer (got {value!r})")
    if minimum is not None and int(value) < minimum:
        raise ConfigError(f"{name} must be >= {minimum} (got {value})")
    return int(value)


def kfold_patients(patient_ids: Iterable[str], n_folds: int = 5, seed: int = 12345) -> list[list[str]]:
    """Test folds of ``sklearn.model_selection.KFold(n_folds, shuffle=True, random_state=seed)``.

    Runs over the **sorted** unique patient ids (so the input order does not matter); each fold comes back in
    sorted-id order, as ``KFold.split`` yields test indices. ``tests/data/test_split_pins.py`` pins the folds.
    """
    from sklearn.model_selection import KFold

    ids = sorted({str(p) for p in patient_ids})
    k = _check_int("n_folds", n_folds, minimum=2)
    seed = _check_int("fold_seed", seed)
    if k > len(ids):
        raise ConfigError(f"n_folds={k} exceeds the {len(ids)} patients available")
    return [[ids[i] for i in test] for _, test in KFold(k, shuffle=True, random_state=seed).split(ids)]


# --------------------------------------------------------------------------------------------- split record
@dataclass
class Split:
    """One split of a dataset into case-id lists, with everything needed to reproduce it.

    ``test``/``val``/``labelled``/``unlabelled`` are sorted case ids; ``patients`` holds the sorted patient ids of
    each part. ``fold``/``n_folds``/``fold_seed`` are None for a fixed hold-out test list. ``budget`` is the budget
    as given, ``budget_m`` the resolved number of labelled patients, ``val_patients`` the validation size as given.
    """

    test: list[str]
    val: list[str]
    labelled: list[str]
    unlabelled: list[str]
    fold: int | None
    n_folds: int | None
    fold_seed: int | None
    val_seed: int
    budget_seed: int | None
    val_patients: int | float
    budget: int | float | str
    budget_m: int
    budget_mode: str
    rule: str
    patients: dict[str, list[str]] = field(default_factory=dict)

    @property
    def train(self) -> list[str]:
        """Training-part cases that may be used for training (labelled + unlabelled, not val)."""
        return sorted(self.labelled + self.unlabelled)

    @property
    def n_patients(self) -> dict[str, int]:
        """Number of patients per part."""
        return {part: len(self.patients.get(part, [])) for part in PARTS}

    def part_of(self, case_id: str) -> str:
        """The part (``test``, ``val``, ``labelled`` or ``unlabelled``) holding ``case_id``."""
        for part in PARTS:
            if case_id in getattr(self, part):
                return part
        raise KeyError(case_id)

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPLIT_FORMAT, **asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "split") -> Split:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a split must be a JSON object")
        if data.get("format", SPLIT_FORMAT) != SPLIT_FORMAT:
            raise ConfigError(f"{source}: unknown split format {data.get('format')!r} (expected {SPLIT_FORMAT!r})")
        names = list(cls.__dataclass_fields__)
        bad = sorted(set(data) - set(names) - {"format"}) or [n for n in names if n not in data and n != "patients"]
        if bad:
            raise ConfigError(f"{source}: split key {bad[0]!r} is {'unknown' if bad[0] in data else 'missing'}")
        seen: dict[str, str] = {}
        for part in PARTS:
            if not isinstance(data[part], list) or not all(isinstance(c, str) for c in data[part]):
                raise ConfigError(f"{source}: split key {part!r} must be a list of case ids")
            for case in data[part]:
                if seen.setdefault(case, part) != part:
                    raise ConfigError(f"{source}: case {case!r} is in both {seen[case]!r} and {part!r}")
        kwargs = {n: data[n] for n in names if n in data}
        kwargs.update({part: list(data[part]) for part in PARTS})
        kwargs["patients"] = {str(k): list(v) for k, v in dict(data.get("patients") or {}).items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str, *, source: str = "split") -> Split:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
        return cls.from_dict(data, source=source)


def save_split(split: Split, path: str | Path) -> Path:
    """Write ``split`` as JSON atomically (see :mod:`medssl.data.atomic`)."""
    return write_text(path, split.to_json() + "\n")


def load_split(path: str | Path) -> Split:
    """Read a split written by :func:`save_split`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"split file {path} not found")
    return Split.from_json(path.read_text(encoding="utf-8"), source=f"split file {path}")


# --------------------------------------------------------------------------------------------- make_split
def _resolve_count(name: str, value: Any, n: int, *, budget: bool, context: str) -> int:
    """An int count, or a fraction of ``n`` rounded half up (at least 1 when > 0): (0, 1] budget, [0, 1) val."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer or a fraction (got {value!r})")
    f = float(value)
    ok = (0.0 < f <= 1.0) if budget else (0.0 <= f < 1.0)
    if not (math.isfinite(f) and ok):
        raise ConfigError(f"{name} fraction {f} is outside {'(0, 1]' if budget else '[0, 1)'} ({n} {context})")
    return max(1, math.floor(f * n + 0.5)) if f > 0 else 0


def _plain(value: Any) -> Any:
    """numpy scalars → Python int/float (so the split serialises to JSON)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


def _parse_budget(budget: Any) -> int | float | str:
    if not isinstance(budget, str):
        return budget
    text = budget.strip().lower()
    if text == "all":
        return "all"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    raise ConfigError(f"budget must be an integer, a fraction or 'all' (got {budget!r})")


def make_split(
    case_ids: Sequence[str],
    *,
    fold: int | None = None,
    n_folds: int = 5,
    fold_seed: int = 12345,
    val_patients: int | float = 2,
    val_seed: int = 0,
    budget: int | float | str = "all",
    budget_seed: int | None = 0,
    budget_mode: str = "nested",
    groups: Mapping[str, str] | None = None,
    test_cases: Sequence[str] | None = None,
    rule: str | None = None,
) -> Split:
    """Split cases into test / val / labelled / unlabelled, by patient.

    Args:
        case_ids: every case id (unique).
        fold: index of the k-fold test fold (required unless ``test_cases`` is given, then ignored).
        n_folds, fold_seed: the ``KFold`` over sorted patient ids (see :func:`kfold_patients`).
        val_patients: validation size: a patient count, or a fraction in [0, 1) of the non-test patients.
        val_seed: seed of ``np.random.default_rng`` permuting the sorted non-test patients (first V are val).
        budget: labelled patients M: an int, a fraction in (0, 1] of the training patients, or ``"all"``.
        budget_seed: ``nested``: seed of ``np.random.default_rng`` (None → 0); ``legacy``: ``random.seed``
            (None → 1234, the KAF/PCL value).
        budget_mode: ``"nested"`` (first M of one permutation) or ``"legacy"`` (``random.sample``).
        groups: ``{case: patient}`` (see :func:`patient_groups`); None → each case its own patient.
        test_cases: a fixed hold-out list; all patients of these cases are test.
        rule: description of the grouping rule, stored in the split (default: derived).
    """
    cases = [str(c) for c in case_ids]
    if not cases:
        raise ConfigError("make_split: the case list is empty")
    if len(set(cases)) != len(cases):
        raise ConfigError(f"make_split: case id {next(c for c in cases if cases.count(c) > 1)!r} appears twice")
    if groups is None:
        groups = {c: c for c in cases}
        rule = rule or describe_rule(None, None)
    else:
        missing = [c for c in cases if c not in groups]
        if missing:
            raise ConfigError(f"case {missing[0]!r} has no patient in the grouping ({len(missing)} cases missing)")
        rule = rule or "explicit case -> patient mapping"
    case_patient = {c: str(groups[c]) for c in cases}
    all_patients = sorted(set(case_patient.values()))
    if budget_mode not in BUDGET_MODES:
        raise ConfigError(f"budget_mode must be one of {BUDGET_MODES} (got {budget_mode!r})")
    val_seed = _check_int("val_seed", val_seed)
    if budget_seed is not None:
        budget_seed = _check_int("budget_seed", budget_seed)

    # --- test part
    if test_cases is not None:
        unknown = [c for c in test_cases if c not in case_patient]
        if unknown:
            raise ConfigError(f"test case {unknown[0]!r} is not among the {len(cases)} cases")
        test_patients = sorted({case_patient[c] for c in test_cases})
        if not test_patients:
            raise ConfigError("test_cases is empty: a hold-out split needs at least one test case")
        fold_i, n_folds_i, fold_seed_i = None, None, None
        where = "the hold-out split"
    else:
        if fold is None:
            raise ConfigError("make_split: 'fold' is required unless a fixed test_cases list is given")
        n_folds_i = _check_int("n_folds", n_folds, minimum=2)
        fold_i = _check_int("fold", fold)
        fold_seed_i = _check_int("fold_seed", fold_seed)
        if fold_i >= n_folds_i:
            raise ConfigError(f"fold index {fold_i} is out of range for n_folds={n_folds_i} "
                              f"(valid: 0..{n_folds_i - 1})")
        if n_folds_i > len(all_patients):
            raise ConfigError(f"n_folds={n_folds_i} exceeds the {len(all_patients)} patients available")
        test_patients = kfold_patients(all_patients, n_folds_i, fold_seed_i)[fold_i]
        where = f"fold {fold_i}"
    test_set = set(test_patients)
    non_test = [p for p in all_patients if p not in test_set]
    if not non_test:
        raise ConfigError(f"no training patients are left in {where} ({len(test_patients)} test patients)")

    # --- validation subset
    n_val = _resolve_count("val_patients", val_patients, len(non_test), budget=False,
                           context=f"non-test patients in {where}")
    if n_val < 0:
        raise ConfigError(f"validation size val_patients={n_val} is negative")
    if n_val >= len(non_test):
        raise ConfigError(f"validation subset of {n_val} patients leaves no training patients in {where} "
                          f"({len(non_test)} non-test patients)")
    perm = np.random.default_rng(val_seed).permutation(len(non_test))
    val_set = {non_test[i] for i in perm[:n_val].tolist()}
    train = [p for p in non_test if p not in val_set]  # sorted

    # --- label budget
    budget_given = _parse_budget(budget)
    after_val = f"after {n_val} validation patients"
    if budget_given == "all":
        m = len(train)
    else:
        m = _resolve_count("label budget", budget_given, len(train), budget=True,
                           context=f"training patients in {where} {after_val}")
    if m < 1:
        raise ConfigError(f"label budget M={m} is below 1 ({len(train)} training patients available in {where})")
    if m > len(train):
        raise ConfigError(f"config key 'split.budget': label budget M={m} exceeds the {len(train)} training patients available in {where} "
                          f"({after_val})")
    if budget_mode == "nested":
        seed = 0 if budget_seed is None else budget_seed
        order = np.random.default_rng(seed).permutation(len(train)).tolist()
        labelled_patients = [train[i] for i in order[:m]]
    else:
        # a private Random(s) draws exactly what random.seed(s); random.sample(...) draws, without touching
        # the global generator
        labelled_patients = random.Random(1234 if budget_seed is None else budget_seed).sample(train, m)
    lab_set = set(labelled_patients)

    patients = {"test": sorted(test_set), "val": sorted(val_set), "labelled": sorted(lab_set),
                "unlabelled": [p for p in train if p not in lab_set]}
    part_of = {p: part for part, ps in patients.items() for p in ps}
    lists: dict[str, list[str]] = {part: [] for part in PARTS}
    for c in sorted(cases):
        lists[part_of[case_patient[c]]].append(c)
    return Split(
        **lists, fold=fold_i, n_folds=n_folds_i, fold_seed=fold_seed_i, val_seed=val_seed, budget_seed=budget_seed,
        val_patients=_plain(val_patients), budget=_plain(budget_given), budget_m=m, budget_mode=budget_mode,
        rule=rule, patients=patients,
    )


def with_labelled(split: Split, patients: Sequence[str], groups: Mapping[str, str]) -> Split:
    """``split`` with its labelled part replaced by the given training patients (``budget_mode`` "explicit").

    ``groups`` maps each labelled case to its patient (cases missing from it, such as unlabelled-only cases,
    stay unlabelled). Test and validation parts are unchanged; a patient outside the training part is an error.
    """
    chosen = [str(p) for p in patients]
    train = set(split.patients.get("labelled", [])) | set(split.patients.get("unlabelled", []))
    bad = [p for p in chosen if p not in train]
    if not chosen or bad or len(set(chosen)) != len(chosen):
        what = f"{bad[0]!r} is not a training patient" if bad else "must be distinct and not empty"
        raise ConfigError(f"labelled patients: {what} (test and validation patients cannot be labelled)")
    lab = set(chosen)
    cases = split.labelled + split.unlabelled
    patients_of = {part: sorted(ps) for part, ps in (("labelled", lab), ("unlabelled", train - lab))}
    return replace(split, labelled=sorted(c for c in cases if groups.get(c) in lab),
                   unlabelled=sorted(c for c in cases if groups.get(c) not in lab),
                   budget_m=len(chosen), budget_mode="explicit", patients={**split.patients, **patients_of})


def with_labelled_cases(split: Split, cases: Sequence[str], groups: Mapping[str, str], *,
                        no_label: Iterable[str] = (), key: str = "split.labelled") -> Split:
    """``split`` with exactly the patients of ``cases`` labelled (every case of theirs: :func:`with_labelled`).

    Each case must be a training case of ``split``: a test or validation case, one of ``no_label`` (cases without
    a label) or a case the split does not hold is a one-line ConfigError naming the case and ``key``. A budget
    given as a count or a fraction must equal the number of listed patients; with ``"all"`` the list sets M.
    """
    given, seen = [str(c) for c in cases], set()
    if not given:
        raise ConfigError(f"config key '{key}': the list of labelled cases is empty")
    where = f"fold {split.fold}" if split.fold is not None else "the hold-out split"
    no_label = set(no_label)
    for case in given:
        if case in seen:
            raise ConfigError(f"config key '{key}': case {case!r} is listed twice")
        seen.add(case)
        if case in no_label:
            raise ConfigError(f"config key '{key}': case {case!r} has no label, so it cannot be a labelled case")
        try:
            part = split.part_of(case)
        except KeyError:
            n = sum(len(getattr(split, p)) for p in PARTS)
            raise ConfigError(f"config key '{key}': unknown case {case!r} (not one of the {n} labelled cases "
                              "of the dataset)") from None
        if part in ("test", "val"):
            raise ConfigError(f"config key '{key}': case {case!r} is a {'test' if part == 'test' else 'validation'} "
                              f"case of {where}; only its training cases can be labelled")
    patients = list(dict.fromkeys(str(groups.get(c, c)) for c in given))
    if split.budget != "all" and len(patients) != split.budget_m:
        raise ConfigError(f"config key '{key}': {len(patients)} patient(s) listed, but split.budget={split.budget} "
                          f"asks for M={split.budget_m}; set split.budget={len(patients)} (or all)")
    return with_labelled(split, patients, groups)
