"""cleanup: drop what the rewrite left dangling, then sort topologically.

Before::

    W (unused initializer)   Constant (unused)   nodes in any order

After::

    only live nodes and tensors, in topological order (subgraphs too)

Graph inputs are kept even when unused: the model's interface never changes.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from dsrewrite.graph import iter_nodes
from dsrewrite.pipeline import TOPOLOGICALLY_SORTED, Change, PassBase, PassContext, PassResult


class Cleanup(PassBase):
    name = "cleanup"
    ensures = (TOPOLOGICALLY_SORTED,)

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        before = sum(1 for _ in iter_nodes(graph))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        after = sum(1 for _ in iter_nodes(graph))
        result = PassResult(self.name)
        if after != before:
            result.changes.append(Change("", f"removed {before - after} dead nodes"))
        return result

