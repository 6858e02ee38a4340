"""docker/check_image.py, the image's build-time check, run on this machine.

Its judgements are pure functions of TF's version and build info and of what the dynamic
loader can open; main() is run with stand-in modules for TensorFlow and the image's packages
(none of them is TF 2.9 here) and a temporary /etc/tokenmeter/base.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import List

import pytest

from tests.container.conftest import DOCKER

GOOD_BUILD = {"is_cuda_build": True, "cuda_version": "11.2", "cudnn_version": "8"}
BOGUS = "libtokenmeter-no-such-library.so.7"


@pytest.fixture
def check():
    # A script in docker/, not a package module: loaded from its file, fresh per test.
    spec = importlib.util.spec_from_file_location("check_image", DOCKER / "check_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_library_the_loader_finds_passes_and_a_missing_one_is_named(check):
    assert check.missing_libraries(["libc.so.6", "libm.so.6"]) == []
    problems = check.missing_libraries(["libc.so.6", BOGUS, "libm.so.6"])
    assert len(problems) == 1
    assert problems[0].startswith(f"cannot load {BOGUS}: ")
    assert "No such file" in problems[0] or "cannot open" in problems[0], problems[0]


def test_tf_build_info_is_judged_for_the_gpu_bases(check):
    assert check.tf_problems("2.9.3", GOOD_BUILD) == []
    assert check.tf_problems("2.9.1", {**GOOD_BUILD, "cudnn_version": "8.1.0"}) == []
    assert check.tf_problems("2.15.1", GOOD_BUILD) == ["tensorflow 2.15.1, expected 2.9.x"]
    # A CPU build has no CUDA build info at all: three problems, each named.
    cpu = check.tf_problems("2.9.3", {"is_cuda_build": False})
    assert len(cpu) == 3 and any("not a CUDA build" in p for p in cpu)
    assert check.tf_problems("2.9.3", {**GOOD_BUILD, "cuda_version": "11.8"}) == [
        "tensorflow built for CUDA '11.8', expected 11.2"]
    assert check.tf_problems("2.9.3", {**GOOD_BUILD, "cudnn_version": "7.6"}) == [
        "tensorflow built for cuDNN '7.6', expected 8.x"]


def test_the_cpu_base_is_judged_on_the_tf_version_only(check):
    assert check.cpu_tf_problems("2.9.3") == []
    assert check.cpu_tf_problems("2.15.1") == ["tensorflow 2.15.1, expected 2.9.x"]


@pytest.fixture
def image_modules(check, monkeypatch):
    """Stand-ins for TF 2.9.3 (a CUDA build, no GPU visible), numpy 1.x and every package
    the check imports, at the versions it pins."""
    tf = types.ModuleType("tensorflow")
    tf.__version__ = "2.9.3"
    tf.sysconfig = types.SimpleNamespace(get_build_info=lambda: dict(GOOD_BUILD))
    tf.config = types.SimpleNamespace(list_physical_devices=lambda kind: [])
    numpy = types.ModuleType("numpy")
    numpy.__version__ = "1.23.5"
    monkeypatch.setitem(sys.modules, "tensorflow", tf)
    monkeypatch.setitem(sys.modules, "numpy", numpy)
    for name in check.IMPORTS:
        mod = types.ModuleType(name)
        mod.__version__ = check.PINNED.get(name, "1.0")
        monkeypatch.setitem(sys.modules, name, mod)
    # A soname no machine has stands for the CUDA libraries: whether the check looks for
    # them must not depend on what this host has installed.
    monkeypatch.setattr(check, "CUDA_LIBRARIES", (BOGUS,))


def run_main(check, monkeypatch, tmp_path, base: str, *argv: str):
    base_file = tmp_path / "base"
    base_file.write_text(base + "\n")
    monkeypatch.setattr(check, "BASE_FILE", base_file)
    return check.main(list(argv))


@pytest.mark.parametrize("base", ["official", "debian-gpu"])
def test_a_gpu_base_needs_its_cuda_libraries(base, check, image_modules, monkeypatch,
                                             tmp_path, capsys):
    assert run_main(check, monkeypatch, tmp_path, base) == 1
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if ln.startswith(f"image check: cannot load {BOGUS}")], err


def test_the_cpu_base_passes_without_cuda_libraries(check, image_modules, monkeypatch,
                                                    tmp_path, capsys):
    assert run_main(check, monkeypatch, tmp_path, "debian-cpu") == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out.startswith("image check: debian-cpu base, tensorflow 2.9.3 (CPU build)")


def test_asking_the_cpu_image_for_a_gpu_says_which_image_to_build(check, image_modules,
                                                                  monkeypatch, tmp_path, capsys):
    assert run_main(check, monkeypatch, tmp_path, "debian-cpu", "--gpu") == 1
    err: List[str] = capsys.readouterr().err.splitlines()
    assert err == ["image check: this is the CPU image (debian-cpu); build the GPU one: "
                   "invoke build --base debian --gpu"]


def test_a_wrong_pin_or_a_failing_import_is_reported(check, image_modules, monkeypatch,
                                                     tmp_path, capsys):
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.38.0")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import raises ImportError
    assert run_main(check, monkeypatch, tmp_path, "debian-cpu") == 1
    err = capsys.readouterr().err
    assert "image check: transformers 4.38.0, expected 4.37.2" in err
    assert "image check: import mlflow failed" in err
