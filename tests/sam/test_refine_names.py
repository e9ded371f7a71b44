"""The merge rules of ``RefineConfig.merge`` and of the policy names are one list."""

from __future__ import annotations

import pytest

from medssl.errors import ConfigError
from medssl.sam.policy_names import RULES, parse_policy
from medssl.sam.refine import MERGES, RefineConfig


def test_merge_rules_are_the_policy_rules():
    assert MERGES is RULES
    for rule in MERGES:
        RefineConfig(merge=rule).validate()
        assert parse_policy(rule).merge == rule and parse_policy(f"component-{rule}").merge == rule
    with pytest.raises(ConfigError, match="merge"):
        RefineConfig(merge="gate0.5").validate()  # a policy name, not a merge rule
