"""The public names of DESIGN.md's Precision section, importable from the top level."""

import hybrid_jax as hj

_PRECISION = [
    "Policy",
    "PrecisionRules",
    "cast_to_compute",
    "cast_to_param",
    "cast_to_output",
    "NoOpLossScale",
    "StaticLossScale",
    "DynamicLossScale",
    "all_finite",
    "select_tree",
]


def test_precision_contract_is_importable_from_the_top_level():
    for name in _PRECISION:
        assert getattr(hj, name) is getattr(hj.precision, name), name
        assert name in hj.__all__


def test_all_lists_only_names_that_exist():
    for module in (hj, hj.precision):
        assert sorted(module.__all__) == sorted(set(module.__all__))
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
