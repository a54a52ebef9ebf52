"""The flow engine: YAML flows -> validated flow objects -> a decision per turn."""

from middleware.engine.flow import Flow, Resources
from middleware.engine.loader import Known, check_flows, load_flows
from middleware.engine.runtime import Engine, FlowFailed

__all__ = ["Engine", "Flow", "FlowFailed", "Known", "Resources", "check_flows", "load_flows"]
