"""`switchboard graph`: a handoff's `resume` state is drawn, and DOT labels survive backslashes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from middleware.engine import load_flows
from middleware.engine.flow import Flow
from middleware.engine.graph import dot, edges, mermaid

FLOW = r"""
flow: drawn
on:
  connector.failed:
    - handoff: {queue: tier2, resume: sorry}
always:
  - when: {text: {matches: "(?i)\\bhuman\\b"}}
    do: [{reply: "Connecting you."}, {handoff: {queue: tier1, reason: asked, resume: rate}}]
states:
  start:
    routes:
      - when: {text: {matches: "^\\d{6}$"}}
        do: [{goto: rate}]
      - when: {text: {contains: ["c:\\"]}}
        do: [{goto: sorry}]
      - do: [{ask: {connector: bot, fallback: [{handoff: {queue: tier3, resume: sorry}}]}}]
  rate:
    enter: [{reply: "How did we do?"}]
    routes:
      - do: [{goto: start}]
  sorry:
    enter: [{reply: "Sorry."}]
    routes:
      - do: [{goto: start}]
"""


@pytest.fixture
def flow(tmp_path: Path) -> Flow:
    (tmp_path / "drawn.yaml").write_text(FLOW)
    return load_flows(tmp_path)["drawn"]


def test_a_handoffs_resume_state_gets_an_edge(flow: Flow) -> None:
    resumes = {(e.source, e.target, e.label) for e in edges(flow) if e.resume}
    assert resumes == {
        ("*", "rate", r"/(?i)\bhuman\b/: handoff tier1"),
        ("on:connector.failed", "sorry", "handoff tier2"),
        ("start", "sorry", "else fallback: handoff tier3"),
    }
    text = mermaid(flow)  # dotted: it happens when a person gives the conversation back
    assert """  n__{{"*"}} -. "/(?i)\\bhuman\\b/: handoff tier1" .-> n_rate""" in text
    assert """  n_on_connector_failed{{"on:connector.failed"}} -. "handoff tier2" .-> n_sorry""" in text
    assert (
        'n_on_connector_failed -> n_sorry [label="handoff tier2", fontname="sans", fontsize=10, style=dashed];'
        in dot(flow)
    )


def test_dot_labels_escape_backslashes_and_quotes(flow: Flow) -> None:
    text = dot(flow)
    assert r'label="/^\\d{6}$/"' in text, "a regex's backslash is escaped, not a DOT escape"
    assert r'label="~c:\\"' in text, "a trailing backslash does not escape the closing quote"
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    svg = subprocess.run(["dot", "-Tsvg"], input=text, capture_output=True, text=True, timeout=30, check=True).stdout
    assert r"/^\d{6}$/" in svg and "~c:\\<" in svg
