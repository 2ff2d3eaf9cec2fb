"""Branching pulmonary vessel and airway trees grown into a lung by recursive splitting of targets.

The targets are random points inside the lung. Starting at the hilum, a branch grows toward the
centroid of the targets it serves, then the targets are split in two along their principal axis
and each half gets a child branch. Radii follow the number of targets served (a Murray-like power
law), so vessels are thick at the hilum and thin toward the periphery, and the branching fills the
lung without any explicit anatomy atlas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .tubes import TubeSet


@dataclass
class TreeStyle:
    """Growth parameters of one tree."""

    r_leaf: float = 0.35  # mm, radius of a branch serving one target
    gamma: float = 0.5  # radius ~ r_leaf * n_targets ** gamma
    r_max: float = 9.0  # mm, cap near the hilum
    r_min: float = 0.35  # mm, stop refining below this (resolution dependent)
    reach: tuple[float, float] = (0.35, 0.6)  # fraction of the way toward the served centroid


@dataclass
class Node:
    """A branch end point; the airway tree is derived from the arterial nodes."""

    pos: NDArray[Any]
    radius: float  # radius of the branch that ends here, at its start
    parent: int  # -1 for the root
    r_end: float = 0.0  # radius at this end of the branch (tapering)


def grow_tree(rng: np.random.Generator, root: NDArray[Any], targets: NDArray[Any], style: TreeStyle) -> list[Node]:
    """Grow a tree from ``root`` serving the (n, 3) ``targets``; returns the node list (root first)."""
    nodes: list[Node] = [Node(np.asarray(root, dtype=np.float64), style.r_max, -1)]
    stack: list[tuple[int, NDArray[Any]]] = [(0, targets)]
    while stack:
        parent, pts = stack.pop()
        start = nodes[parent].pos
        m = len(pts)
        r = min(style.r_max, style.r_leaf * m**style.gamma)
        if m == 1:
            nodes.append(Node(pts[0], style.r_leaf, parent, style.r_leaf * 0.6))
            continue
        c = pts.mean(axis=0)
        if r < style.r_min:
            # below the visible size: one tapering twig toward the served region
            nodes.append(Node(c, r, parent, max(r * 0.4, style.r_leaf * 0.5)))
            continue
        alpha = rng.uniform(*style.reach)
        end = start + alpha * (c - start)
        nodes.append(Node(end, r, parent, r * 0.93))
        me = len(nodes) - 1
        # split the served targets by direction as seen from the branch end, so that children fan
        # out radially (as pulmonary vessels do from the hilum) instead of heading for centroids
        dirs = pts - end
        dirs /= np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-6)
        dirs -= dirs.mean(axis=0)
        _, _, vt = np.linalg.svd(dirs, full_matrices=False)
        proj = dirs @ vt[0]
        cut = min(m - 1, max(1, int(round(rng.uniform(0.3, 0.7) * m))))
        order = np.argpartition(proj, cut)
        a, b = pts[order[:cut]], pts[order[cut:]]
        stack.append((me, a))
        stack.append((me, b))
    return nodes


def tree_to_tubes(nodes: list[Node], ts: TubeSet, material: int, rng: np.random.Generator | None = None,
                  bend: float = 0.12, max_piece: float = 6.0) -> None:
    """Add each parent->child branch as tapered segments along a gently curved path.

    Long branches are split into pieces so bounding boxes stay tight; the bend (a quadratic
    curve with a random sideways control point, ``bend`` times the length) avoids stick figures.
    """
    for n in nodes[1:]:
        a, b = nodes[n.parent].pos, n.pos
        length = float(np.linalg.norm(b - a))
        if rng is None or length < 4.0 * max(n.radius, 1.0):
            _add_split(ts, a, b, n.radius, n.r_end, material, max_piece)
            continue
        d = (b - a) / length
        side = rng.normal(0.0, 1.0, 3)
        side -= (side @ d) * d
        side /= max(float(np.linalg.norm(side)), 1e-6)
        ctrl = 0.5 * (a + b) + side * bend * length * rng.uniform(0.3, 1.0)
        k = max(2, int(np.ceil(length / max(max_piece, 4.0 * n.radius))))
        t = np.linspace(0.0, 1.0, k + 1)[:, None]
        pts = (1 - t) ** 2 * a + 2 * (1 - t) * t * ctrl + t**2 * b
        radii = n.radius + t[:, 0] * (n.r_end - n.radius)
        for i in range(k):
            ts.add(pts[i], pts[i + 1], radii[i], radii[i + 1], material)


def _add_split(ts: TubeSet, a: NDArray[Any], b: NDArray[Any], ra: float, rb: float, material: int, max_piece: float) -> None:
    length = float(np.linalg.norm(b - a))
    piece = max(max_piece, 4.0 * max(ra, rb))
    k = max(1, int(np.ceil(length / piece)))
    for i in range(k):
        t0, t1 = i / k, (i + 1) / k
        ts.add(a + t0 * (b - a), a + t1 * (b - a), ra + t0 * (rb - ra), ra + t1 * (rb - ra), material)


def airway_from_tree(nodes: list[Node], bronchus_root: NDArray[Any], ref: NDArray[Any], ts: TubeSet,
                     wall_mat: int, lumen_mat: int, r_min: float, ratio: float = 1.0) -> list[tuple[NDArray[Any], NDArray[Any], float, float]]:
    """Bronchi running beside the arteries: each arterial node offset sideways by the two radii.

    Returns the lumen segments (start, end, r_start, r_end) so callers can place lesions along them.
    """
    offs: dict[int, NDArray[Any]] = {0: np.asarray(bronchus_root, dtype=np.float64)}
    lumens: list[tuple[NDArray[Any], NDArray[Any], float, float]] = []
    for idx in range(1, len(nodes)):
        n = nodes[idx]
        if n.parent not in offs:
            continue
        ra = n.radius * ratio
        if ra < r_min:
            continue
        d = n.pos - nodes[n.parent].pos
        d /= max(float(np.linalg.norm(d)), 1e-6)
        side = ref - (ref @ d) * d
        nrm = float(np.linalg.norm(side))
        side = side / nrm if nrm > 1e-6 else np.array([0.0, 0.0, 1.0])
        pos = n.pos + side * (n.radius + ra + 0.4)
        offs[idx] = pos
        a = offs[n.parent]
        wall = 0.18 * ra + 0.25
        r1 = max(n.r_end * ratio, ra * 0.85)
        _add_split(ts, a, pos, ra, r1, wall_mat, 6.0)
        _add_split(ts, a, pos, max(ra - wall, 0.2), max(r1 - wall, 0.2), lumen_mat, 6.0)
        lumens.append((a, pos, max(ra - wall, 0.2), max(r1 - wall, 0.2)))
    return lumens
