"""A controller status document exactly as the #15 contract specifies (the controller branch
writes it; these tests play the controller), and a small HTML reader for the page's tests."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import orjson

from cotrr_ray.experiments.page import status_location
from cotrr_ray.storage import write_bytes


def contract_status(experiment_id: str, t0: float, **override: Any) -> dict[str, Any]:
    """Stage 2 ("5%") of a 4-stage plan, entered at t0 + 900 s; every field of the contract present."""
    stages = [
        {"name": "shadow", "mode": "shadow", "rollout_percentage": 0.0, "min_duration_s": 300.0, "min_units": 100},
        {
            "name": "interleave",
            "mode": "interleave",
            "rollout_percentage": 50.0,
            "min_duration_s": 600.0,
            "min_units": 200,
        },
        {"name": "5%", "mode": "ab", "rollout_percentage": 5.0, "min_duration_s": 600.0, "min_units": 200},
        {"name": "100%", "mode": "ab", "rollout_percentage": 100.0, "min_duration_s": 0.0, "min_units": 0},
    ]
    status = {
        "version": 1,
        "experiment_id": experiment_id,
        "state": "running",
        "updated_at": t0 + 1000.0,
        "plan": {"name": "default", "max_duration_s": 86400.0, "stages": stages},
        "stage": {"index": 2, "name": "5%", "mode": "ab", "rollout_percentage": 5.0, "entered_at": t0 + 900.0},
        "timeline": [
            {
                "stage": "shadow",
                "index": 0,
                "entered_at": t0,
                "left_at": t0 + 300.0,
                "reason": "min duration and sample reached, guardrails ok",
            },
            {
                "stage": "interleave",
                "index": 1,
                "entered_at": t0 + 300.0,
                "left_at": t0 + 900.0,
                "reason": "interleaving preference not harmful after 240 units",
            },
        ],
        "guardrails": [
            {
                "name": "fallback_rate",
                "value": 0.001,
                "threshold": 0.01,
                "status": "ok",
                "p_value": None,
                "detail": "1 fallback in 1000 answers",
            },
            {
                "name": "p99_latency_ms",
                "value": 41.0,
                "threshold": 50.0,
                "status": "ok",
                "p_value": None,
                "detail": "treatment p99 over the last 600 s",
            },
            {
                "name": "clicks_per_query",
                "value": -0.002,
                "threshold": 0.0,
                "status": "insufficient_data",
                "p_value": 0.61,
                "detail": "one-sided mSPRT for harm, alpha 0.0127",
            },
        ],
        "decisions": [
            {
                "seq": 1,
                "at": t0,
                "action": "start",
                "from_stage": None,
                "to_stage": "shadow",
                "reason": "plan default started",
                "actor": "operator:alice",
            },
            {
                "seq": 2,
                "at": t0 + 300.0,
                "action": "advance",
                "from_stage": "shadow",
                "to_stage": "interleave",
                "reason": "min duration and sample reached, guardrails ok",
                "actor": "controller",
            },
            {
                "seq": 3,
                "at": t0 + 900.0,
                "action": "advance",
                "from_stage": "interleave",
                "to_stage": "5%",
                "reason": "interleaving preference not harmful after 240 units",
                "actor": "controller",
            },
        ],
    }
    status.update(override)
    return status


def write_status(event_log_uri: str, status: dict[str, Any]) -> None:
    """Where and how the controller persists it: atomically, beside the event log."""
    write_bytes(status_location(event_log_uri, status["experiment_id"]), orjson.dumps(status))


class Page(HTMLParser):
    """Text and attributes of every element with an id, the table rows (cell texts) under each id,
    and how often each tag occurs."""

    VOID = {"meta", "br", "circle", "line", "rect", "polygon", "polyline", "img", "link", "input"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.by_id: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, int] = {}
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)
        self.close()

    def _ids(self) -> list[str]:
        return [i for _, i in self._open if i]

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.elements.append((tag, a))
        if a.get("id"):
            self.by_id[a["id"]] = {"attrs": a, "text": "", "rows": [], "tag": tag}
        if tag == "tr":
            for i in self._ids():
                self.by_id[i]["rows"].append({"class": a.get("class"), "cells": []})
        if tag == "td":
            for i in self._ids():
                if self.by_id[i]["rows"]:
                    self.by_id[i]["rows"][-1]["cells"].append("")
        if tag not in self.VOID:
            self._open.append((tag, a.get("id")))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self._open.pop()

    def handle_endtag(self, tag):
        if any(t == tag for t, _ in self._open):
            while self._open and self._open.pop()[0] != tag:
                pass

    def handle_data(self, data):
        in_td = any(t == "td" for t, _ in self._open)
        for i in self._ids():
            self.by_id[i]["text"] += data
            if in_td and self.by_id[i]["rows"] and self.by_id[i]["rows"][-1]["cells"]:
                self.by_id[i]["rows"][-1]["cells"][-1] += data

    def text(self, id_: str) -> str:
        return " ".join(self.by_id[id_]["text"].split())

    def attr(self, id_: str, name: str) -> str | None:
        return self.by_id[id_]["attrs"].get(name)

    def rows(self, id_: str) -> list[dict[str, Any]]:
        """Body rows (those with cells) of the table with this id, cell texts whitespace-normalised."""
        return [
            {"class": r["class"], "cells": [" ".join(c.split()) for c in r["cells"]]}
            for r in self.by_id[id_]["rows"]
            if r["cells"]
        ]
