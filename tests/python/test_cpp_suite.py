"""The C++ side built against the installed package: GoogleTest units and the embedding example."""
import os
import shutil
import subprocess

import numpy as np
import pytest

import rtllm
from rtllm import LLM, BuildConfig, SamplingParams
from rtllm.builder import build_and_save
from rtllm.models import AutoModelForCausalLM

from hf_reference import random_prompts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cmake_build(source_dir, build_dir):
    """Configures and builds a CMake project that does find_package(rtllm)."""
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the C++ tests and example"
    subprocess.run([cmake, "-S", source_dir, "-B", str(build_dir), f"-Drtllm_DIR={rtllm.cmake_dir()}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True, text=True)
    result = subprocess.run([cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 2)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_cpp_unit_tests(tiny_model, tmp_path):
    # GoogleTest comes from the system (Debian: libgtest-dev); .ci/run installs it.
    cmake_build(os.path.join(REPO, "tests", "cpp"), tmp_path / "build")
    # The executor tests run a tiny engine, named in RTLLM_TEST_ENGINE_DIR.
    engine_dir = tmp_path / "engine"
    model = AutoModelForCausalLM.from_hugging_face(str(tiny_model("llama")))
    rtllm.build(model, BuildConfig(max_batch_size=8, max_input_len=64, max_seq_len=128)).save(str(engine_dir))
    result = subprocess.run([str(tmp_path / "build" / "rtllm_tests"), "--gtest_brief=1"],
                            env={**os.environ, "RTLLM_TEST_ENGINE_DIR": str(engine_dir)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "SKIPPED" not in result.stdout, result.stdout[-8000:]


@pytest.mark.parametrize("tp_size", [1, 2])
def test_cpp_example_matches_python(tiny_model, tmp_path, tp_size):
    """The example on an engine, and on its two-rank build under `mpirun -n 2` (rank 0 prints)."""
    if tp_size > 1 and (not rtllm._core.mpi_available() or shutil.which("mpirun") is None):
        pytest.skip("rtllm was built without MPI" if not rtllm._core.mpi_available() else "mpirun is not installed")
    checkpoint = tiny_model("llama")
    engine_dir = tmp_path / "engine"
    build_and_save(lambda mapping: AutoModelForCausalLM.from_hugging_face(str(checkpoint), mapping=mapping),
                   str(engine_dir), BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=128), tp_size=tp_size)
    cmake_build(os.path.join(REPO, "examples", "cpp"), tmp_path / "example")

    prompt = random_prompts(np.random.default_rng(7), [11])[0]
    command = [str(tmp_path / "example" / "generate"), str(engine_dir), "10"] + [str(t) for t in prompt]
    env = dict(os.environ)
    if tp_size > 1:
        command = [shutil.which("mpirun"), "--oversubscribe", "-n", str(tp_size)] + command
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cpp_ids = [int(t) for t in result.stdout.split()]

    with LLM(model=str(checkpoint), max_batch_size=4, max_input_len=64, max_seq_len=128) as llm:
        output = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False)
    assert cpp_ids == output.outputs[0].token_ids
