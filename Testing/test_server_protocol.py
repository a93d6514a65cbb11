"""One definition per default and per check, shared by the server, its client and the engine
(no server started here: these tests read the definitions themselves)."""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

pytest.importorskip("fastapi")

from medsam_slicer import propagation  # noqa: E402
from medsam_slicer.errors import InputError  # noqa: E402
from medsam_slicer.stop_rules import StopRules  # noqa: E402
from medsam_slicer.server import protocol  # noqa: E402
from medsam_slicer.windowing import IntensityWindow  # noqa: E402

# the request fields of each streamed route that are not options (its positional arguments and plumbing)
ROUTE_FIELDS = {
    "propagate": {"seed_index", "seed_box", "seed_mask", "protected"},
    "box3d": {"box", "first", "last"},
    "key-slices": {"key_boxes"},
    "repropagate": {"masks", "corrected_index", "corrected_mask", "seed_index", "protected"},
}
PLUMBING = {"axis", "job_id"}


def _request_model(route):
    from medsam_slicer.server import schemas

    return {"propagate": schemas.PropagateRequest, "box3d": schemas.Box3DRequest,
            "key-slices": schemas.KeySlicesRequest, "repropagate": schemas.RepropagateRequest}[route]


@pytest.mark.parametrize("route", sorted(protocol.JOB_OPTIONS))
def test_each_route_takes_exactly_its_functions_options_with_no_default_of_its_own(route):
    function = protocol.job_function(route)
    options = protocol.JOB_OPTIONS[route][1]
    params = inspect.signature(function).parameters
    assert set(options) <= set(params), set(options) - set(params)
    model = _request_model(route)
    assert set(model.model_fields) == set(options) | ROUTE_FIELDS[route] | PLUMBING
    for name in options:  # left out, an option must take the engine's default, not a copy of it
        assert model.model_fields[name].default is None, (route, name)
    # every keyword option of the function but progress/cancel travels (`protected`, a callable,
    # as the masks of the slices it protects: a field of its own, above)
    keywords = {n for n, p in params.items() if p.default is not inspect.Parameter.empty}
    assert keywords - set(options) <= {"progress", "cancel", "seed_box", "seed_mask", "protected"}, route


def test_key_slices_default_combine_is_the_engines():
    from medsam_slicer.server.schemas import KeySlicesRequest, job_kwargs

    req = KeySlicesRequest(key_boxes=[{"index": 0, "box": [1, 1, 5, 5]}])
    assert "combine" not in job_kwargs("key-slices", req)
    assert protocol.option_default("key-slices", "combine") == \
        inspect.signature(propagation.segment_key_slices).parameters["combine"].default == "union"
    assert "default: 'union'" in KeySlicesRequest.model_fields["combine"].description


def test_stop_rules_on_the_wire_follow_the_dataclass():
    from medsam_slicer.server.schemas import Rules

    assert set(Rules.model_fields) == {f.name for f in dataclasses.fields(StopRules)}
    rules = StopRules(min_area=7, max_slices=3)
    assert protocol.rules_from_wire(protocol.rules_to_wire(rules)) == rules
    assert protocol.rules_from_wire({}) == StopRules()
    assert protocol.rules_from_wire(None) is None
    off = protocol.rules_from_wire({name: None for name in Rules.model_fields})
    assert off.min_area == 0 and off.check_centroid is False  # a count of 0 and a check not made are "off"
    assert all(getattr(off, f.name) is None for f in dataclasses.fields(StopRules)
               if f.name not in ("min_area", "check_centroid"))
    with pytest.raises(InputError, match="unknown stop rule"):
        protocol.rules_from_wire({"speed": 1})


def test_null_rules_switch_rules_off_in_a_real_propagation():
    """`rules: {"min_area": null}` raised inside the stream (issue 13); null means off."""

    class Oracle:
        n_slices, slice_shape = 6, (16, 16)

        def __call__(self, index, box):
            mask = np.zeros(self.slice_shape, bool)
            mask[6:9, 6:8] = True  # 6 px
            return mask, 1.0

    rules = protocol.rules_from_wire({"min_area": None, "check_centroid": None, "max_area_ratio": None})
    result = propagation.propagate_from_slice(Oracle(), 2, seed_box=[5, 5, 9, 9], rules=rules)
    assert sorted(result.masks) == list(range(6))


def test_window_wire_format_round_trips_and_refuses_non_finite_bounds():
    window = IntensityWindow(-160.0, 240.0, False, "ct-abdomen")
    assert protocol.window_from_wire(protocol.window_to_wire(window)) == window
    assert protocol.window_request(window) == protocol.window_to_wire(window)
    assert protocol.window_request(None) == {"preset": "auto"}
    assert protocol.window_request((400, 40)) == {"width": 400.0, "level": 40.0}
    for bad in ({"low": float("-inf"), "high": 3.0}, {"low": 1.0, "high": None}, {"low": 5.0, "high": 1.0}):
        with pytest.raises(InputError, match="window"):
            protocol.window_from_wire(bad)


def test_slice_index_check_is_one_function():
    from medsam_slicer.server import jobs, scheduler

    assert protocol.check_index(3, 4, "k") == 3
    for bad in (4, -1, True, 2.0):
        with pytest.raises(InputError, match="outside the volume"):
            protocol.check_index(bad, 4, "k", "seed slice")
    assert jobs.check_index is protocol.check_index and scheduler.check_index is protocol.check_index


def test_api_version_devices_and_precisions_are_defined_once():
    from medsam_slicer.cli import build_parser
    from medsam_slicer.engine import PRECISIONS
    from medsam_slicer.server import app, client, state

    assert client.API_VERSION is protocol.API_VERSION is app.API_VERSION is state.API_VERSION
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    choices = {a.dest: a.choices for a in serve._actions}
    assert tuple(choices["device"]) == protocol.DEVICES and tuple(choices["precision"]) == PRECISIONS
