"""The validation cells' code digest is read from the source files, not by importing them."""

import importlib
import subprocess
import sys

from dermt2im.core import identity
from dermt2im.validate import plan


def test_the_code_digest_is_the_imported_modules_digest():
    imported = identity.code_digest(*(importlib.import_module(f"dermt2im.validate.{m}") for m in plan.CELL_MODULES))
    assert plan.code_digest() == imported


def test_the_code_digest_does_not_import_torch():
    probe = "import sys; from dermt2im.validate import plan; plan.code_digest(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
