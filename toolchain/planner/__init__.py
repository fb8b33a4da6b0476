"""The memory-budget planner: pick dtype and ResSVD ranks so a package fits a device profile."""

from edgepack.toolchain.planner.plan import Plan, PlanError, make_plan, model_shape, plan_for

__all__ = ["Plan", "PlanError", "make_plan", "model_shape", "plan_for"]
