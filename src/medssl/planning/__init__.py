"""Planning: derive a configuration from a dataset's fingerprint (``medssl plan``)."""

from medssl.planning.planner import BUDGETS, Planned, plan, render, write_plan

__all__ = ["BUDGETS", "Planned", "plan", "render", "write_plan"]
