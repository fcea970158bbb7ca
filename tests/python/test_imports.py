"""Package layering: which rtllm packages may import which. Read from the sources, not from sys.modules,
since importing rtllm loads every layer anyway."""
import ast
import pathlib
import subprocess
import sys

import rtllm

PACKAGE_DIR = pathlib.Path(rtllm.__file__).parent


def imported_modules(source: str, package: str) -> set:
    """Absolute names of the modules `source` (a file of `package`) imports, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.add(".".join(p for p in (base, node.module or "") if p))
    return names


def test_imported_modules_resolves_relative_and_absolute_imports():
    source = "from ..llmapi import outputs\nimport rtllm.sampling_params\nfrom .result import X\n"
    assert imported_modules(source, "rtllm.executor") == {"rtllm.llmapi", "rtllm.sampling_params",
                                                          "rtllm.executor.result"}


def test_executor_does_not_import_llmapi():
    # llmapi builds on the executor; the reverse edge would make the two a cycle
    offenders = {path.name: sorted(m for m in imported_modules(path.read_text(), "rtllm.executor")
                                   if m == "rtllm.llmapi" or m.startswith("rtllm.llmapi."))
                 for path in (PACKAGE_DIR / "executor").glob("*.py")}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_public_output_names_keep_their_paths():
    from rtllm.executor.detokenizer import IncrementalDetokenizer
    from rtllm.executor.outputs import CompletionOutput, RequestOutput
    assert rtllm.RequestOutput is RequestOutput and rtllm.llmapi.RequestOutput is RequestOutput
    assert rtllm.CompletionOutput is CompletionOutput
    assert rtllm.llmapi.IncrementalDetokenizer is IncrementalDetokenizer


def test_runtime_imports_no_torch():
    code = "import sys, rtllm, rtllm.builder, rtllm.models, rtllm.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_top_level_names():
    from rtllm.mapping import Mapping
    from rtllm.quantization import QuantAlgo, QuantConfig
    assert (rtllm.Mapping, rtllm.QuantConfig, rtllm.QuantAlgo) == (Mapping, QuantConfig, QuantAlgo)
    assert {"Mapping", "QuantConfig", "QuantAlgo"} <= set(rtllm.__all__)
