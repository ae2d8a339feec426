"""scheduling/targets.py: the preset a submit targets (named or routed by content type) and
its device wish once the request's fallback is applied."""

from __future__ import annotations

import pytest

from gpulane.errors import NotFoundError, UnsupportedMediaTypeError, ValidationError
from gpulane.model import DeviceWish
from gpulane.presets import Preset, PresetRegistry
from gpulane.scheduling.targets import device_wish, target_preset

FACES = Preset(name="faces", argv=("x",), accepts=("application/json", "image/*"))
CPU_ONLY = Preset(name="cpu-only", argv=("x",), devices=("cpu",))


def registry(routes: dict[str, str] | None = None) -> PresetRegistry:
    return PresetRegistry([FACES, CPU_ONLY], routes=routes)


def test_a_named_preset_wins_over_the_routes() -> None:
    assert target_preset(registry({"*/*": "cpu-only"}), "faces", "image/png") is FACES


def test_routed_by_content_type() -> None:
    assert target_preset(registry({"image/*": "faces"}), None, "Image/PNG; q=1") is FACES


def test_no_route_on_a_node_without_routes() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as info:
        target_preset(registry(), None, "image/png", "tasks[2].")
    err = info.value
    assert (err.status, err.code, err.field) == (415, "no_route", "tasks[2].content_type")
    assert "this node has no routes, so name the preset" in err.message
    assert err.extra == {"routes": []}


def test_neither_preset_nor_content_type() -> None:
    with pytest.raises(ValidationError) as info:
        target_preset(registry(), None, None)
    assert (info.value.code, info.value.field) == ("missing_field", "preset")


def test_an_unknown_preset_and_a_type_it_does_not_accept() -> None:
    with pytest.raises(NotFoundError):
        target_preset(registry(), "nope", None)
    with pytest.raises(ValidationError) as info:
        target_preset(registry(), "faces", "text/plain")
    assert info.value.code == "unsupported_content_type"


@pytest.mark.parametrize(("preset", "device", "fallback", "want"), [
    (FACES, "auto", False, DeviceWish.GPU), (FACES, "auto", None, DeviceWish.AUTO),
    (FACES, "auto", True, DeviceWish.AUTO), (FACES, "gpu", False, DeviceWish.GPU),
    (FACES, "cpu", None, DeviceWish.CPU), (CPU_ONLY, "auto", False, DeviceWish.AUTO)])
def test_device_wish(preset: Preset, device: str, fallback: bool | None,
                     want: DeviceWish) -> None:
    assert device_wish(preset, device, fallback) is want
