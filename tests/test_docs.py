"""Every public function documents its arguments, result and errors and shows a runnable example
(the examples run as doctests with the test command); every merge method cites its paper."""

import inspect

import pytest

import jaxmerge
from jaxmerge import checkpoints, coefficients, federated, lora, moe, sparsify

SPARSIFY = ["top_k_mask", "kth_largest_magnitude", "magnitude_mask", "breadcrumbs_mask", "band_mask", "random_mask",
            "della_mask", "della_probabilities", "rescale", "num_kept"]
PUBLIC = ([(f"jaxmerge.{n}", getattr(jaxmerge, n)) for n in jaxmerge.__all__]
          + [(f"jaxmerge.checkpoints.{n}", getattr(checkpoints, n)) for n in checkpoints.__all__]
          + [(f"jaxmerge.sparsify.{n}", getattr(sparsify, n)) for n in SPARSIFY]
          + [(f"jaxmerge.federated.{n}", getattr(federated, n)) for n in federated.__all__]
          + [(f"jaxmerge.lora.{n}", getattr(lora, n)) for n in lora.__all__ if n != "COMBINATION_TYPES"]
          + [(f"jaxmerge.moe.{n}", getattr(moe, n)) for n in moe.__all__ if n != "LAYOUTS"]
          + [(f"jaxmerge.coefficients.{n}", getattr(coefficients, n)) for n in coefficients.__all__])
FUNCTIONS = [(name, obj) for name, obj in PUBLIC if inspect.isfunction(inspect.unwrap(obj))]


@pytest.mark.parametrize("name,obj", FUNCTIONS, ids=[name for name, _ in FUNCTIONS])
def test_public_functions_are_documented_in_full(name, obj):
    doc = inspect.getdoc(obj)
    assert doc and "\n\n" in doc, f"{name}: a summary line and a description"
    has_arguments = any(p.kind != p.VAR_KEYWORD for p in inspect.signature(obj).parameters.values())
    for section in ["Args:" if has_arguments else None, "Returns:", "Examples:"]:
        assert section is None or section in doc, f"{name} has no {section} section"
    assert ">>> " in doc.split("Examples:")[1], f"{name}: the example runs as a doctest"


@pytest.mark.parametrize("name", sorted(jaxmerge.methods()))
def test_merge_methods_cite_their_papers(name):
    method = jaxmerge.methods()[name]
    doc = inspect.getdoc(method.function)
    assert "Raises:" in doc
    for arxiv in method.references:
        assert f"arXiv {arxiv}" in doc, f"{name}'s docstring does not cite arXiv {arxiv}"


def test_every_public_name_resolves_to_what_it_names():
    for name, obj in PUBLIC:
        modules = ("jaxmerge.checkpoints", "jaxmerge.coefficients", "jaxmerge.federated", "jaxmerge.lora", "jaxmerge.moe",
                   "jaxmerge.sparsify")
        assert inspect.ismodule(obj) == (name in modules), name
        assert inspect.ismodule(obj) or obj.__name__ == name.rsplit(".", 1)[-1], name


def test_classes_have_examples():
    for name, obj in PUBLIC:
        if inspect.isclass(obj):
            assert "Examples:" in (inspect.getdoc(obj) or ""), name
