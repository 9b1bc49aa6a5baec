"""The lineage graph as SVG: layers from left (data) to right (what was made last), boxes linked to their pages.

A layered (Sugiyama-style) drawing, which suits a provenance graph's few dozen nodes: each node sits one layer
right of its furthest input, and a few barycentre sweeps order each layer to uncross the edges.
"""

from __future__ import annotations

from urllib.parse import quote

from markupsafe import Markup, escape

from mlc.runs.graph import Graph, Node

BOX_W, BOX_H, COL_W, ROW_H, PAD = 190, 44, 250, 62, 16
COLOURS = {"run": "#e8f0fb", "artifact": "#e9f6ea", "file": "#f4f4f4", "missing": "#fbeaea"}
STATUS = {"completed": "#2ca02c", "failed": "#d62728", "interrupted": "#ff7f0e", "running": "#1f77b4"}


def layers(graph: Graph) -> list[list[str]]:
    """Nodes by layer (longest path from a source), each layer ordered to keep edges short and uncrossed."""
    preds: dict[str, list[str]] = {n: [] for n in graph.nodes}
    succs: dict[str, list[str]] = {n: [] for n in graph.nodes}
    for a, b, _ in graph.edges:
        if a in preds and b in preds:
            preds[b].append(a)
            succs[a].append(b)
    layer = {n: 0 for n in graph.nodes}
    for _ in range(len(graph.nodes)):  # longest path by relaxation; bounded, so a cycle in damaged records cannot hang
        changed = False
        for a, b, _ in graph.edges:
            if a in layer and b in layer and layer[b] < layer[a] + 1 <= len(graph.nodes):
                layer[b] = layer[a] + 1
                changed = True
        if not changed:
            break
    for n in graph.nodes:  # data sits just left of its first user, so its edges stay short
        if not preds[n] and succs[n]:
            layer[n] = max(0, min(layer[m] for m in succs[n]) - 1)
    out: list[list[str]] = [[] for _ in range(max(layer.values(), default=0) + 1)]
    for n in sorted(graph.nodes, key=lambda n: (graph.nodes[n].kind, graph.nodes[n].detail.get("started") or "", n)):
        out[layer[n]].append(n)
    for sweep in range(4):  # barycentre ordering, alternately from the left and from the right
        pos = {n: i for col in out for i, n in enumerate(col)}
        order = out[1:] if sweep % 2 == 0 else out[-2::-1]
        for col in order:
            near = preds if sweep % 2 == 0 else succs
            col.sort(key=lambda n: sum(pos[m] for m in near[n]) / len(near[n]) if near[n] else pos[n])
            pos.update({n: i for i, n in enumerate(col)})
    return out


def draw(graph: Graph) -> Markup:
    cols = layers(graph)
    rows = max((len(c) for c in cols), default=1)
    width = PAD * 2 + COL_W * (len(cols) - 1) + BOX_W
    height = PAD * 2 + ROW_H * (rows - 1) + BOX_H
    at: dict[str, tuple[float, float]] = {}
    for i, col in enumerate(cols):
        offset = (rows - len(col)) * ROW_H / 2  # centre short layers
        for j, n in enumerate(col):
            at[n] = (PAD + i * COL_W, PAD + offset + j * ROW_H)
    parts = [f'<svg class="lineage" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="lineage graph" xmlns="http://www.w3.org/2000/svg">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto">'
             '<path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>']
    for a, b, label in graph.edges:
        if a not in at or b not in at:
            continue
        (x0, y0), (x1, y1) = at[a], at[b]
        x0, y0, x1, y1 = x0 + BOX_W, y0 + BOX_H / 2, x1, y1 + BOX_H / 2
        mid = (x0 + x1) / 2
        parts.append(f'<path class="edge" data-from="{escape(a)}" data-to="{escape(b)}" d="M{x0:.0f},{y0:.0f} C{mid:.0f},{y0:.0f} {mid:.0f},{y1:.0f} {x1:.0f},{y1:.0f}" '
                     f'fill="none" stroke="#999" stroke-width="1.3" marker-end="url(#arrow)"><title>{escape(label)}</title></path>')
        if label != "made":  # at the curve's midpoint: edges that share one end (several inputs of a run) do not overprint there
            parts.append(f'<text class="edge-label" x="{mid:.0f}" y="{(y0 + y1) / 2 - 4:.0f}" text-anchor="middle">{escape(_short(label, 18))}</text>')
    for n, (x, y) in at.items():
        parts.append(_box(graph.nodes[n], x, y, n == graph.focus))
    parts.append("</svg>")
    return Markup("".join(parts))


def _box(node: Node, x: float, y: float, focus: bool) -> str:
    d = node.detail
    if node.kind == "run":
        line2 = f"{_short_id(d['run'])} · {d.get('status')}"
        href = f"/runs/{quote(d['run'])}"
        tip = f"{node.label} run {d['run']} ({d.get('status')}), started {d.get('started')}"
    elif node.kind == "artifact":
        line2 = f"{d.get('kind') or 'artifact'} · {str(d.get('hash') or '')[7:15]}"
        href = f"/runs/{quote(d['run'])}/lineage?artifact={quote(node.label)}" if d.get("recorded") else f"/runs/{quote(d['run'])}"
        tip = f"artifact {node.label} of run {d['run']}: {d.get('path')} ({d.get('hash')})"
    elif node.kind == "file":
        line2 = str(d.get("hash") or "")[:19]
        href = None
        tip = f"{d.get('path') or ''} {d.get('hash')} (no recorded producer)"
    else:
        line2 = "run directory missing"
        href = None
        tip = f"run {d.get('run')} is referenced but not under this runs root"
    stroke = STATUS.get(d.get("status"), "#888") if node.kind == "run" else "#888"
    body = (f'<rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{COLOURS[node.kind]}" stroke="{stroke}" '
            f'stroke-width="{3 if focus else 1.2}"/>'
            f'<text class="node-title" x="{x + 8:.0f}" y="{y + 18:.0f}">{escape(_short(node.label, 26))}</text>'
            f'<text class="node-detail" x="{x + 8:.0f}" y="{y + 34:.0f}">{escape(_short(line2, 30))}</text><title>{escape(tip)}</title>')
    klass = f"node node-{node.kind}" + (" focus" if focus else "")
    inner = f'<a href="{escape(href)}">{body}</a>' if href else body
    return f'<g class="{klass}" data-node="{escape(node.id)}">{inner}</g>'


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _short_id(run_id: str) -> str:
    return run_id.rsplit("-", 1)[-1]
