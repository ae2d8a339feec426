"""The public API is what ``gpulane.__all__`` says, and nothing slips in by accident."""

import gpulane


def test_all_names_exist_and_are_public() -> None:
    for name in gpulane.__all__:
        assert hasattr(gpulane, name), name
    assert {"Client", "AsyncClient", "GpulaneError", "__version__"} <= set(gpulane.__all__)


def test_exported_classes_say_they_belong_to_gpulane() -> None:
    for name in gpulane.__all__:
        member = getattr(gpulane, name)
        if isinstance(member, type):
            assert member.__module__.startswith("gpulane."), (name, member.__module__)
