"""One faiss per install, and the suite says which one it runs with: the install's metadata requires exactly
one faiss distribution with or without the extras (setup.py), GPU search is refused without the GPU build
(never a silent CPU fallback), and the description names the build and a doubly installed module."""
import importlib.util
import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path
from types import SimpleNamespace

import pytest

from callbacks.evaluation import EmbeddingEvaluator
from callbacks.pseudo_labels import KMeansPseudoLabels
from embedding_core import faiss_build, search

ROOT = Path(__file__).resolve().parents[1]


def setup_module_file():
    spec = importlib.util.spec_from_file_location("suite_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() is not called
    return module


def metadata(tmp_path, faiss: str) -> dict[str, list[str]]:
    """Requires-Dist of the package as pip would build it (PEP 517 metadata hook), by extra ("" = base)."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    hook = ("import setuptools.build_meta as b, sys; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    out = tmp_path / "meta"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", hook, str(out)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "SUITE_FAISS": faiss}, check=False)
    assert done.returncode == 0, done.stderr
    info = Parser().parsestr((out / done.stdout.split()[-1] / "METADATA").read_text())
    by_extra: dict[str, list[str]] = {}
    for requirement in info.get_all("Requires-Dist"):
        name, _, marker = requirement.partition(";")
        extra = marker.split("==")[-1].strip().strip('"') if "extra" in marker else ""
        by_extra.setdefault(extra, []).append(name.strip())
    return by_extra


@pytest.mark.parametrize("build, wanted", [("cpu", "faiss-cpu"), ("gpu", "faiss-gpu-cu12")])
def test_every_install_line_gets_one_faiss(tmp_path, build, wanted):
    requires = metadata(tmp_path, build)
    for extras in ((), ("gpu",), ("cpu",), ("dev", "gpu")):  # pip install -e '.[...]'
        names = {r.split(">")[0].split("=")[0] for e in ("", *extras) for r in requires.get(e, [])}
        assert {n for n in names if n.startswith("faiss")} == {wanted}, extras


def test_the_build_is_chosen_by_suite_faiss_else_by_a_listed_gpu():
    setup = setup_module_file()
    assert setup.faiss_build({"SUITE_FAISS": "GPU"}, gpu_present=lambda: False) == "gpu"
    assert setup.faiss_build({"SUITE_FAISS": "cpu"}, gpu_present=lambda: True) == "cpu"
    assert setup.faiss_build({}, gpu_present=lambda: True) == "gpu"
    assert setup.faiss_build({}, gpu_present=lambda: False) == "cpu"
    with pytest.raises(SystemExit, match="use cpu or gpu"):
        setup.faiss_build({"SUITE_FAISS": "cuda"})


CPU_BUILD = SimpleNamespace(__version__="1.9.0", get_num_gpus=lambda: 0)


def test_gpu_search_is_refused_without_the_gpu_build_naming_the_install(monkeypatch):
    monkeypatch.setattr(search, "load_faiss", lambda: CPU_BUILD)
    for make in (lambda: search.resolve_backend("faiss-gpu"), lambda: EmbeddingEvaluator(backend="faiss-gpu"),
                 lambda: KMeansPseudoLabels(backend="faiss-gpu")):
        with pytest.raises(RuntimeError, match="needs faiss's GPU build.*CPU build.*SUITE_FAISS=gpu"):
            make()
    assert search.resolve_backend("faiss") == "faiss"  # the CPU build still searches on the CPU
    gpu_build_without_gpu = SimpleNamespace(__version__="1.9.0", get_num_gpus=lambda: 0, StandardGpuResources=1)
    monkeypatch.setattr(search, "load_faiss", lambda: gpu_build_without_gpu)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        search.resolve_backend("faiss-gpu")


def test_the_description_names_the_build_and_a_second_copy():
    assert faiss_build.describe(CPU_BUILD, ["faiss-cpu"]) == "faiss 1.9.0, CPU build (faiss-cpu)"
    both = faiss_build.describe(CPU_BUILD, ["faiss-cpu", "faiss-gpu-cu12"])
    assert "WARNING: 2 faiss distributions" in both and "the CPU build won" in both
    assert "not installed" in faiss_build.describe(None, [])
