"""`split.labelled` / `split.labelled_file`: fine-tuning on exactly the listed patients, and its checks."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from medssl.errors import ConfigError
from tests.advise.common import TINY, split_of


# ------------------------------------------------------------------------------------------ split.labelled
def finetune_cli(tmp_path, phantom_root, *extra):
    from medssl.cli import main

    return main(["finetune", "--config", "demo", "--data", str(phantom_root), "--name", "lab", "--no-evaluate",
                 *TINY, f"output_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'c'}", "split.budget=2",
                 *extra])


def seeded_split(tmp_path, phantom_root, *overrides):
    from medssl.config import load_config
    from medssl.data.cache import prepare
    from medssl.engine.finetune import build_split

    cfg = load_config("demo", overrides=[f"data.path={phantom_root}", "data.size=32", "split.n_folds=4",
                                         "split.val=1", f"data.cache_dir={tmp_path / 'c'}", *overrides])
    return build_split(cfg, prepare(cfg.data, progress=False))


def test_finetune_labels_exactly_split_labelled(phantom_root, tmp_path):
    train = split_of(tmp_path, phantom_root).patients["labelled"]  # budget=all: every training patient
    drawn = seeded_split(tmp_path, phantom_root, "split.budget=2").patients["labelled"]
    chosen = [p for p in train if p not in drawn][:2]  # two patients the seeded draw does not label
    assert len(chosen) == 2
    assert finetune_cli(tmp_path, phantom_root, f"split.labelled=[{chosen[1]},{chosen[0]}]") == 0
    run = tmp_path / "runs" / "lab"
    saved = json.loads((run / "splits.json").read_text())
    assert saved["labelled"] == saved["patients"]["labelled"] == sorted(chosen)
    assert saved["unlabelled"] == sorted(set(train) - set(chosen))
    assert (saved["budget_m"], saved["budget_mode"]) == (2, "explicit")
    seeded = seeded_split(tmp_path, phantom_root, "split.budget=2")
    assert (saved["test"], saved["val"]) == (seeded.test, seeded.val)
    assert yaml.safe_load((run / "config.yaml").read_text())["split"]["labelled"] == [chosen[1], chosen[0]]
    assert "labelled: 2 cases" in (run / "summary.md").read_text()


@pytest.mark.parametrize("what", ["test", "val", "unknown", "count"])
def test_finetune_rejects_a_bad_split_labelled(phantom_root, tmp_path, capsys, what):
    split = split_of(tmp_path, phantom_root)  # also builds the slice cache, so nothing else is printed
    train = split.patients["labelled"]
    given, needle = {
        "test": ([train[0], split.test[0]], f"case '{split.test[0]}' is a test case of fold 0"),
        "val": ([train[0], split.val[0]], f"case '{split.val[0]}' is a validation case of fold 0"),
        "unknown": ([train[0], "nope_case"], "unknown case 'nope_case'"),
        "count": (train[:3], "3 patient(s) listed, but split.budget=2 asks for M=2"),
    }[what]
    capsys.readouterr()
    rc = finetune_cli(tmp_path, phantom_root, f"split.labelled=[{','.join(given)}]")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and sum(ln.startswith("medssl: error:") for ln in err) == 1, err
    assert err[-1].startswith("medssl: error: config key 'split.labelled': ") and needle in err[-1], err
    assert not (tmp_path / "runs" / "lab").exists()  # no run folder


def test_split_labelled_file_and_key_checks(phantom_root, tmp_path):
    from medssl.config import load_config

    chosen = split_of(tmp_path, phantom_root).patients["labelled"][-2:]
    files = {"list.txt": f"# advised\n{chosen[1]}\n\n{chosen[0]}\n", "list.json": json.dumps(chosen),
             "advice.json": json.dumps({"chosen": chosen[::-1], "cases": {p: [p] for p in chosen[::-1]}})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        got = seeded_split(tmp_path, phantom_root, "split.budget=2", f"split.labelled_file={tmp_path / name}")
        assert got.labelled == got.patients["labelled"] == sorted(chosen) and got.budget_mode == "explicit", name
    (tmp_path / "ints.json").write_text("[1, 2]")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for name, needle in (("missing.txt", "file not found"), ("ints.json", "expected a JSON list"),
                         ("empty.txt", "empty")):
        with pytest.raises(ConfigError, match=f"^config key 'split.labelled_file': .*{needle}") as info:
            seeded_split(tmp_path, phantom_root, "split.budget=2", f"split.labelled_file={tmp_path / name}")
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="'split.labelled' and 'split.labelled_file' are both set"):
        load_config("demo", overrides=["split.labelled=[a]", f"split.labelled_file={tmp_path / 'list.txt'}"])
    with pytest.raises(ConfigError, match="split.labelled"):
        load_config("demo", overrides=["split.labelled=[1,2]"])  # unquoted numbers are not case ids


def test_labelled_override_round_trips_through_the_command_line():
    from medssl.advise.run import finetune_command, labelled_override
    from medssl.typed_config import parse_overrides

    cases = ["hippocampus_001", "001", "true", "a b", "x,y", "1e5"]
    assert parse_overrides([labelled_override(cases)]) == {"split": {"labelled": cases}}
    assert labelled_override(["hippocampus_001", "la_003"]) == "split.labelled=[hippocampus_001,la_003]"
    cmd = finetune_command("plan.yaml", "/d/my data", ["train.epochs=5", "split.budget=9", "split.labelled=[x]"],
                           2, ["a", "001"])
    assert shlex.split(cmd) == ["medssl", "finetune", "--config", "plan.yaml", "--data", "/d/my data",
                                "train.epochs=5", "split.budget=2", 'split.labelled=[a,"001"]']
    assert finetune_command(None, None, [], 1, ["a"]) == "medssl finetune split.budget=1 'split.labelled=[a]'"
