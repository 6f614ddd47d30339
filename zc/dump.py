"""Graph dumps: ``options={"dump": DIR}`` or ``ZC_DUMP=DIR``.

Per compiled graph, ``DIR/<graph-id>/`` holds::

    00_captured.py        the graph Dynamo handed to zc (torch-level, print_readable)
    01_aten.py            the ATen graph zc's passes start from
    02_<pass>.py ...      the graph after each enabled pass, in run order
    report.md, report.json
    code/<stage>.py       Inductor's generated wrapper code for that graph
    code/kernels/*.cpp|.py  each generated C++ (CPU) or Triton (GPU) kernel on its own

Training graphs (compiled with grad enabled) add ``_forward`` / ``_backward`` to the names.
A dump directory is overwritten graph by graph; graph ids count up within one process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch.fx

_CPP_KERNEL = re.compile(
    r"^(\w+) = async_compile\.cpp(?:_pybinding)?\(\[.*?\], r?'''\n?(.*?)'''\)", re.S | re.M
)
_TRITON_KERNEL = re.compile(r"^(\w+) = async_compile\.triton\('\w+', r?'''\n?(.*?)'''", re.S | re.M)


class GraphDump:
    """Writes one graph's dump; every method is a no-op when dumping is off."""

    def __init__(self, root: str | None, graph_id: str):
        self.directory = Path(root) / graph_id if root else None
        self._index = 0
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("**/*"):
                if stale.is_file():
                    stale.unlink()

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def write_graph(self, name: str, gm: torch.fx.GraphModule) -> None:
        if self.directory is None:
            return
        text = gm.print_readable(print_output=False, include_stride=True, include_device=True)
        self._write(f"{self._index:02d}_{name}.py", text)
        self._index += 1

    def write_code(self, stage: str, source: str) -> None:
        if self.directory is None:
            return
        self._write(f"code/{stage}.py", source)
        for pattern, suffix in ((_CPP_KERNEL, "cpp"), (_TRITON_KERNEL, "py")):
            for name, body in pattern.findall(source):
                self._write(f"code/kernels/{name}.{suffix}", body)

    def write_report(self, report: dict[str, Any]) -> None:
        if self.directory is None:
            return
        self._write("report.json", json.dumps(report, indent=2, default=repr))
        self._write("report.md", render_report(report))

    def _write(self, relative: str, text: str) -> None:
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def render_report(report: dict[str, Any]) -> str:
    """The markdown form of a graph report (the JSON form is the source of truth)."""
    lines = [
        f"# zc report: {report['graph_id']}",
        "",
        f"- dynamo compile id: {report['dynamo_compile_id']}",
        f"- device: {report['device']}",
        f"- zc {report['zc_version']}, torch {report['torch_version']}",
        f"- enabled passes: {', '.join(report['enabled_passes']) or 'none'}",
        f"- compile time: {report['compile_seconds']:.2f} s",
        "",
    ]
    for stage in report["stages"]:
        lines.append(f"## {stage['stage']} graph")
        lines.append("")
        if not stage["ran"]:
            lines += [
                "Inductor's cache served this graph: zc's passes ran when it was first compiled "
                "(the cache key covers zc's options). Dump with a fresh cache to see them.",
                "",
            ]
            continue
        lines.append(f"ATen nodes: {stage['nodes_before']} before zc's passes, {stage['nodes_after']} after.")
        lines.append("")
        if not stage["passes"]:
            lines += ["No pass enabled.", ""]
            continue
        lines += ["| pass | status | rewrites | skips | seconds |", "|---|---|---|---|---|"]
        for p in stage["passes"]:
            lines.append(
                f"| {p['name']} | {p['status']} | {len(p['rewrites'])} | {len(p['skips'])} | {p['seconds']:.3f} |"
            )
        lines.append("")
        for p in stage["passes"]:
            details = [f"- rewrote {r['where']}: {r['what']}" for r in p["rewrites"]]
            details += [f"- skipped {s['where']}: {s['reason']}" for s in p["skips"]]
            details += [f"- {k}: {v}" for k, v in p["metrics"].items() if v and k != "traceback"]
            if p["error"]:
                details.append(f"- error: {p['error']}")
            if details:
                lines += [f"### {p['name']}", "", *details, ""]
    return "\n".join(lines)


def load_report(graph_directory: str | Path) -> dict[str, Any]:
    """Read back ``report.json`` of one dumped graph."""
    return json.loads((Path(graph_directory) / "report.json").read_text())
