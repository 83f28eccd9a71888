"""``openvino_backend.check_architecture``: kvtool's architectures are the ones optimum-intel can export to OpenVINO
with task image-text-to-text; a model type it has no such export for is refused in one line naming it and the
optimum-intel version (checked before anything is loaded or converted)."""

from __future__ import annotations

import pytest

from kvtool.errors import InputError
from kvtool.manifest import ARCHITECTURES


def test_kvtools_architectures_pass_and_others_are_refused():
    from kvtool.export.openvino_backend import check_architecture
    from kvtool.versions import library_versions

    for arch in ARCHITECTURES:
        check_architecture(arch)
    version = library_versions(("optimum-intel",))["optimum-intel"]
    for arch in ("bert", "no_such_model"):  # bert: optimum-intel exports it, but not as image-text-to-text
        with pytest.raises(InputError) as exc:
            check_architecture(arch)
        assert str(exc.value).startswith(f"architecture {arch}: optimum-intel {version} has no OpenVINO "
                                         f"image-text-to-text export")
