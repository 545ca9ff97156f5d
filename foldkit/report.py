"""What foldkit did to each BatchNormalization, and how the result was verified."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


SCHEMA_VERSION = 1


def envelope(command: str, inputs, **extra) -> dict:
    """The fields every foldkit JSON output starts with: what wrote it, which version of the
    layout, and from which inputs (with the shapes and seed used, where the command has them)."""
    from . import __version__

    return {"schema_version": SCHEMA_VERSION, "tool": "foldkit", "version": __version__, "command": command,
            "inputs": [str(i) for i in inputs], **extra}


@dataclass
class Action:
    """The outcome for one BatchNormalization node.

    action: "folded" (into ``target``), "merged" (into the BN/affine ``target``), "lowered" (to Mul+Add),
    "kept" (left in the graph; ``reason`` says why), "converted" (training -> inference only).
    """

    node: str
    action: str
    target: Optional[str] = None
    reason: str = ""
    graph: str = "main"
    steps: list = field(default_factory=list)
    tensors: list = field(default_factory=list)  # names of the constants the rewrite wrote
    code: Optional[str] = None  # for "kept": why, as a stable foldkit.codes.Why value


@dataclass
class Report:
    bn_before: int = 0
    bn_after: int = 0
    actions: list = field(default_factory=list)
    verification: Optional[dict] = None
    notes: list = field(default_factory=list)
    passes: list = field(default_factory=list)
    affine: list = field(default_factory=list)  # Mul/Add/Sub/Div folds (not BNs)
    branches: list = field(default_factory=list)  # parallel branches merged (or not, with the reason)
    unchanged: bool = False  # no pass rewrote anything: the output is the input's bytes
    frozen_inputs: list = field(default_factory=list)  # graph inputs removed by --freeze-initializer-inputs
    # what the JSON's envelope says: the command, its inputs, and the shapes and seed verification used
    command: str = "fold"
    inputs: list = field(default_factory=list)
    input_shapes: Optional[dict] = None
    seed: int = 0

    # keyed by BN output name while the passes run; flattened into ``actions`` at the end
    _by_key: dict = field(default_factory=dict, repr=False)
    # (graph, output name) -> (reason, code) of the last refusal of each per-channel Mul/Add/Sub/Div
    _affine_why: dict = field(default_factory=dict, repr=False)

    def refuse_affine(self, key: str, graph: str, reason: str, code=None, stage: str = "") -> None:
        """Say why a per-channel Mul/Add/Sub/Div was not folded (the reasons of each stage, joined;
        the code of the most telling)."""
        from .codes import PRIORITY, Why

        lines, old = self._affine_why.get((graph, key), ([], None))
        line = f"{stage}: {reason}" if stage else reason
        if line not in lines:
            lines = lines + [line]
        code = Why(code or Why.NOT_APPLICABLE)
        if old is not None and PRIORITY.index(Why(old)) < PRIORITY.index(code):
            code = Why(old)
        self._affine_why[(graph, key)] = (lines, code.value)

    def entry(self, key: str, node: str, graph: str) -> Action:
        if key not in self._by_key:
            self._by_key[key] = Action(node=node, action="kept", graph=graph)
        return self._by_key[key]

    def rekey(self, old: str, new: str) -> None:
        """A BN now writes ``new`` (it absorbed its follower): keep its entry under the new key.

        If the follower was itself a BN, its entry stays (as "merged") under a private key."""
        entry = self._by_key.pop(old)
        if new in self._by_key:
            self._by_key[f"{new}#merged:{len(self._by_key)}"] = self._by_key.pop(new)
        self._by_key[new] = entry

    def refuse(self, key: str, node: str, graph: str, stage: str, reason: str, code=None) -> None:
        from .codes import PRIORITY, Why

        e = self.entry(key, node, graph)
        line = f"{stage}: {reason}"
        if line not in e.steps:
            e.steps.append(line)
        code = Why(code or Why.NOT_APPLICABLE)
        if e.code is None or PRIORITY.index(code) < PRIORITY.index(Why(e.code)):
            e.code = code.value

    def finish(self) -> None:
        self.actions = list(self._by_key.values())
        for a in self.actions:
            if a.action == "kept" and not a.reason:
                refusals = [s for s in a.steps if not s.startswith("converted")]
                a.reason = "; ".join(refusals) or "no rewrite applies"
            if a.action == "kept" and a.code is None:
                a.code = "not_applicable"
            elif a.action != "kept":
                a.code = None

    def to_dict(self) -> dict:
        shapes = (self.verification or {}).get("inputs") or self.input_shapes
        d = {
            **envelope(self.command, self.inputs, input_shapes=shapes, seed=self.seed),
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "actions": [asdict(a) for a in self.actions],
            "verification": self.verification,
            "notes": list(self.notes),
            "passes": list(self.passes),
            "affine_actions": [asdict(a) for a in self.affine],
            "branch_actions": [asdict(a) for a in self.branches],
            "frozen_inputs": list(self.frozen_inputs),
        }
        return d

    def to_json(self) -> str:
        from .text import to_json

        return to_json(self.to_dict())
