import inspect
from typing import TypedDict

import pytest

from embedloss import AnglELoss, TripletLoss
from embedloss.ops.keywords import keyword_options


def _create(scale: float = 1.0, shift: float = 0.0, name: str = "x") -> tuple[float, float, str]:
    return scale, shift, name


class _Two(TypedDict, total=False):
    scale: float
    shift: float


@keyword_options(_create, _Two, shift=5.0)
def _apply(x: float, *, power: int = 1, **options: float) -> tuple[float, float, float]:
    scale, shift, _ = _create(**options)
    return x**power, scale, shift


def test_signature_is_own_parameters_then_the_named_options_with_their_defaults():
    params = inspect.signature(_apply).parameters
    assert list(params) == ["x", "power", "scale", "shift"]
    assert params["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert (params["scale"].default, params["shift"].default) == (1.0, 5.0)
    assert params["scale"].annotation is inspect.signature(_create).parameters["scale"].annotation


def test_defaults_are_filled_in_and_keywords_pass_through():
    assert _apply(2.0) == (2.0, 1.0, 5.0)
    assert _apply(2.0, power=2, scale=3.0, shift=0.5) == (4.0, 3.0, 0.5)


def test_unknown_or_missing_arguments_are_type_errors_naming_the_function():
    with pytest.raises(TypeError, match=r"^_apply\(\) got an unexpected keyword argument 'name'"):
        _apply(2.0, name="y")  # an option of create, but not one of the keywords
    with pytest.raises(TypeError, match=r"^_apply\(\) missing a required argument: 'x'"):
        _apply()


def test_a_default_for_no_option_is_refused():
    with pytest.raises(TypeError, match=r"no option\(s\) \['name'\] in _Two"):
        keyword_options(_create, _Two, name="z")


def test_constructors_get_the_explicit_signature():
    # BasePairLoss takes PairOptions.create's options; TripletLoss merges them with its own.
    params = inspect.signature(TripletLoss).parameters
    assert list(params) == [
        "distance",
        "normalize",
        "reduction",
        "chunk_size",
        "gather_distributed",
        "margin",
        "mining",
    ]
    assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
    assert inspect.signature(AnglELoss).parameters["ibn_threshold"].default == 1.0
    with pytest.raises(TypeError, match=r"^AnglELoss.__init__\(\) got an unexpected keyword"):
        AnglELoss(ibn_weights=1.0)
    with pytest.raises(TypeError, match=r"^BasePairLoss.__init__\(\) got an unexpected keyword"):
        TripletLoss(distanse="dot")
