"""The package's layers hold: no module imports from a layer above its own, and no two modules import each other
in a cycle. The layers, high to low, are docs/architecture.md's; this test reads every import of every module
(grimp), including those inside functions."""
from __future__ import annotations

import grimp
import pytest

#: High to low. Modules of one line with `|` are independent of each other.
LAYERS = [
    "eimf.cli",
    "eimf.experiments",
    "eimf.pipeline",
    "eimf.steps",
    "eimf.serving | eimf.training",
    "eimf.evaluation",
    "eimf.models",
    "eimf.semantic | eimf.modules",
    "eimf.data",
    "eimf.formats",
    "eimf.tracking | eimf.progress | eimf.ray_init | eimf.plots",
    "eimf.config | eimf.fs",
]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("eimf")


def test_every_top_level_module_has_a_layer(graph):
    placed = {m.strip() for line in LAYERS for m in line.split("|")}
    top = {m for m in graph.modules if m.count(".") == 1}
    assert top <= placed, f"modules in no layer: {sorted(top - placed)}; add them to LAYERS and docs/architecture.md"


def test_no_module_imports_from_a_layer_above_it(graph):
    layers = [grimp.Layer(*[m.strip() for m in line.split("|")], independent=True) for line in LAYERS]
    illegal = graph.find_illegal_dependencies_for_layers(layers=layers, containers=set())
    lines = [f"{dep.importer} -> {dep.imported}: " + "; ".join(
                 " -> ".join([sorted(r.heads)[0], *r.middle, sorted(r.tails)[0]]) for r in dep.routes)
             for dep in sorted(illegal, key=lambda d: (d.importer, d.imported))]
    assert not illegal, "imports against the layers:\n" + "\n".join(lines)


def test_no_import_cycles(graph):
    cycles = []
    for m in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(m):
            if m != imported and graph.chain_exists(importer=imported, imported=m):
                cycles.append(f"{m} -> {imported} -> ... -> {m}")
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
