"""Loading a model stays off torch's compiler stack: importing torch._dynamo costs about 1.7 s of every start,
and a random init or a meta-device op during the build is enough to pull it in."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from lmserve.loader import load_model
load_model(sys.argv[1])
print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
"""


def _dynamo_modules_after_loading(model) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, str(model)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_loading_the_default_gguf_does_not_import_dynamo(smollm2_gguf):
    assert _dynamo_modules_after_loading(smollm2_gguf) == "[]"


def test_loading_a_checkpoint_directory_does_not_import_dynamo(tiny_model):
    assert _dynamo_modules_after_loading(tiny_model[0]) == "[]"
