"""The validation cells' code digest is read from the source files, not by importing them."""

import subprocess
import sys

from dermt2im.core import identity
from dermt2im.validate import plan


def test_the_code_digest_is_the_validate_packages_identity():
    assert plan.code_digest() == identity.code_digest("dermt2im.validate")
    files = {p.relative_to(identity._package_root()).as_posix() for p in identity.code_files("dermt2im.validate")}
    assert {"validate/classify.py", "validate/cell.py", "validate/plan.py", "core/tracking.py"} <= files


def test_the_code_digest_does_not_import_torch():
    probe = "import sys; from dermt2im.validate import plan; plan.code_digest(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
