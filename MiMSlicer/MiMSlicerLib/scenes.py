"""Scene bookkeeping: which nodes an operation added, and taking them out again.

A task builds its result in the scene only at its very end; if that fails half-way, or
for a cancel, the scene must be left as it was. :func:`node_ids` before, then
:func:`remove_nodes_added_since` after, removes every node added in between (data,
display, storage and colour nodes alike, newest first).
"""

from __future__ import annotations


def node_ids(scene) -> set[str]:
    """IDs of every node in ``scene``."""
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def remove_nodes_added_since(scene, before: set[str]) -> int:
    """Remove the nodes of ``scene`` whose ID is not in ``before``; returns how many."""
    added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    added = [node for node in added if node.GetID() not in before]
    for node in reversed(added):
        if node.GetScene() is scene:
            scene.RemoveNode(node)
    return len(added)
