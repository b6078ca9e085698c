"""`pip install -e .` must give the default build (nvfp4: ModelOpt calibration and export, the Triton
repository validated with Triton's protobuf) everything it imports: every third-party module those stages
load must come from a distribution that nemo3's core requirements pull in (transitively, as pip would)."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import nemo3

# imported by torch and ModelOpt only when installed (nemo3's `kernels` extra); absent, they do without it
IMPORTED_IF_PRESENT = {"triton"}
# what the default build's stages import, lazily, as they run (pipeline.STAGES and the stage functions)
BUILD_IMPORTS = """
import json, sys
from nemo3.pipeline import STAGES
stages = [make() for make in STAGES.values()]
import nemo3.export.rank_writer, nemo3.quant.calibrate, nemo3.quant.data, nemo3.quant.export
import nemo3.engines.evaluation.compare, nemo3.engines.network.loading, nemo3.triton_repo.generate
import nemo3.triton_repo.validate
import modelopt.torch.quantization, modelopt.torch.export, modelopt.torch.export.convert_hf_config
import tritonclient.grpc.model_config_pb2
from transformers import NemotronHForCausalLM
def where(module):  # a namespace package has no __file__, only __path__
    return getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), None)
top = {name.split(".")[0] for name in sys.modules}
print(json.dumps({name: where(sys.modules.get(name)) for name in sorted(top)}))
"""


def core_closure() -> set[str]:
    """The distributions `pip install -e .` installs: pyproject.toml's dependencies (this checkout's, not
    whatever nemo3 metadata is installed) and theirs, recursively, with the extras they ask for."""
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    project = tomllib.loads((Path(nemo3.__file__).parent / "pyproject.toml").read_text())["project"]
    seen, todo = set(), [(req.name, tuple(sorted(req.extras))) for req in map(Requirement, project["dependencies"])]
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        for line in md.requires(name) or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("",) + wanted):
                todo.append((req.name, tuple(sorted(req.extras))))
    return {name for name, _ in seen}


def test_the_default_build_needs_only_core_dependencies():
    loaded = json.loads(subprocess.run([sys.executable, "-c", BUILD_IMPORTS], check=True, capture_output=True,
                                       text=True).stdout.strip().splitlines()[-1])
    providers = md.packages_distributions()
    core = core_closure()
    core_packages = {name for name, dists in providers.items() if {canonicalize_name(d) for d in dists} & core}
    missing = {}
    for module, file in loaded.items():
        if module in sys.stdlib_module_names or module in IMPORTED_IF_PRESENT | {"nemo3"} or module not in providers:
            continue
        dists = {canonicalize_name(d) for d in providers[module]}
        vendored = file is not None and set(Path(file).parts[:-1]) & (core_packages - {module})  # setuptools/_vendor
        if not dists & core and not vendored:
            missing[module] = sorted(dists)
    assert not missing, f"imported by the default build, not installed by `pip install -e .`: {missing}"
