"""Tensor parallelism's C++ side on the CPU: the MPI Communicator and the all_reduce / gather /
vocab-parallel embedding ops, run under `mpirun` (scripts in mpi_scripts/), and the checks that tie an
engine's mapping to the ranks that run it (one process).
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rtllm import _core

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 60


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"mpi_scripts_{name}", os.path.join(HERE, "mpi_scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tp_graph = _load_script("tp_graph")  # its engine config also serves the one-process tests
tp_fused_norm = _load_script("tp_fused_norm")

needs_mpi = pytest.mark.skipif(not _core.mpi_available() or shutil.which("mpirun") is None,
                               reason="rtllm was built without MPI" if not _core.mpi_available()
                               else "mpirun is not installed (Debian: openmpi-bin)")


def mpirun(script, num_ranks):
    """Runs mpi_scripts/<script> on num_ranks processes; returns their output (asserting success)."""
    # Root in containers and CI; more ranks than cores on small machines.
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1"}
    cmd = [shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", str(num_ranks),
           sys.executable, os.path.join(HERE, "mpi_scripts", script)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def ok_lines(out):
    """The ranks' "ok rank R of N" reports, sorted (their lines may interleave in mpirun's output)."""
    return sorted(re.findall(r"ok rank \d+ of \d+", out))


@needs_mpi
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_collectives_match_numpy(num_ranks):
    out = mpirun("collectives.py", num_ranks)
    assert ok_lines(out) == [f"ok rank {r} of {num_ranks}" for r in range(num_ranks)], out


@needs_mpi
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_tensor_parallel_graph_matches_unsplit_reference(num_ranks):
    out = mpirun("tp_graph.py", num_ranks)
    assert ok_lines(out) == [f"ok rank {r} of {num_ranks}" for r in range(num_ranks)], out


@needs_mpi
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_all_reduce_add_rms_norm_matches_unsplit_reference(num_ranks):
    out = mpirun("tp_fused_norm.py", num_ranks)
    assert ok_lines(out) == [f"ok rank {r} of {num_ranks}" for r in range(num_ranks)], out


@pytest.mark.skipif(_core.mpi_available(), reason="this build has MPI")
def test_without_mpi_the_communicator_is_refused():
    with pytest.raises(_core.RtllmError, match="built without MPI"):
        _core.mpi_world_communicator()


# ---- one process: the engine's mapping and the runner's checks ----

def _tp_engine(tp_size, rank, mapping=True):
    config = tp_graph.engine_config(tp_size)
    if not mapping:
        del config["mapping"]
    shard = np.random.default_rng(rank).standard_normal((tp_graph.V_SHARD, tp_graph.H)).astype(np.float32)
    weights = [("embed", "F32", list(shard.shape), shard), ("lm_head", "F32", list(shard.shape), shard.copy())]
    return _core.Engine.from_memory(json.dumps(config), weights, rank=rank)


def test_engine_reads_tp_size_and_rank():
    e = _tp_engine(2, 1)
    assert (e.tp_size, e.rank) == (2, 1)
    assert _tp_engine(1, 0, mapping=False).tp_size == 1
    with pytest.raises(ValueError, match=r"rank 2 outside \[0, tp_size 2\)"):
        _tp_engine(2, 2)


def test_old_mapping_reads_as_one_rank(tmp_path):
    from engine_fixture import TinyModel, write_engine

    path = write_engine(tmp_path / "e", TinyModel())
    assert json.loads((path / "config.json").read_text())["mapping"] == {"tp_size": 1, "tp_rank": 0}
    e = _core.Engine.load(str(path))
    assert (e.tp_size, e.rank) == (1, 0)
    with pytest.raises(ValueError, match=r"rank 1 outside \[0, tp_size 1\)"):
        _core.Engine.load(str(path), 1)


def test_tensor_parallel_engine_needs_a_communicator():
    config = _core.RuntimeConfig(num_kv_blocks=4, tokens_per_block=16)
    assert config.communicator is None
    with pytest.raises(ValueError, match="tp_size 2.*communicator"):
        _core.ModelRunner(_tp_engine(2, 0), config)


def test_one_rank_engine_runs_without_communicator():
    """tp_size 1: vocab_parallel, all_reduce and gather are the plain embedding and copies."""
    rng = np.random.default_rng(2)
    table = rng.standard_normal((tp_graph.V_SHARD, tp_graph.H)).astype(np.float32)
    head = rng.standard_normal((tp_graph.V_SHARD, tp_graph.H)).astype(np.float32)
    engine = _core.Engine.from_memory(json.dumps(tp_graph.engine_config(1)),
                                      [("embed", "F32", list(table.shape), table),
                                       ("lm_head", "F32", list(head.shape), head)])
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=4, tokens_per_block=16))
    ids = np.array([3, 0, 5, 1], np.int32)
    logits = runner.forward(ids, [4], [0], np.array([[0]], np.int32), [0, 2, 3])
    expected = table.astype(np.float64)[ids[[0, 2, 3]]] @ head.astype(np.float64).T
    assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_one_rank_all_reduce_add_rms_norm_is_add_rms_norm():
    """tp_size 1: the fused op sums nothing; the add and the norm remain (float64 numpy reference)."""
    engine = _core.Engine.from_memory(json.dumps(tp_fused_norm.engine_config(1)), tp_fused_norm.rank_weights(1, 0))
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=4, tokens_per_block=16))
    ids = np.array([3, 0, 4, 1, 2], np.int32)
    logits = runner.forward(ids, [5], [0], np.array([[0]], np.int32), [4, 0, 2])
    expected = tp_fused_norm.expected_logits(1, ids, [4, 0, 2])
    assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))
