"""The flow engine: YAML flows -> validated flow objects -> a decision per turn."""

from middleware.engine.loader import check_flows, load_flows
from middleware.engine.runtime import Engine, FlowFailed

__all__ = ["Engine", "FlowFailed", "check_flows", "load_flows"]
